//! `keyturn demo`: the whole product in one command on the local broker. It starts the simulator
//! in-process, publishes a sample fleet (mixed on/off, a few deliberately invalid jobs) to a
//! queue of its own, runs the worker until the queue is drained, and prints a summary.

use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, topology, worker};
use crate::config::{Credentials, Settings};
use crate::simulator::{Faults, Simulator, SimulatorConfig};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// How many jobs the sample fleet has (every tenth is deliberately invalid).
    #[arg(long, default_value_t = 30)]
    pub jobs: usize,
    /// Share of API calls the simulator answers 500, to show retries.
    #[arg(long, default_value_t = 0.15)]
    pub error_rate: f64,
    /// Share of API calls the simulator answers 429, to show throttling.
    #[arg(long, default_value_t = 0.05)]
    pub throttle_rate: f64,
}

const DEMO_AK: &str = "KEYTURNDEMOACCESSKEY";
const DEMO_SK: &str = "keyturn-demo-secret-key-not-for-production";
const PROJECT: &str = "619d3e78f61b4be68bc5aa0b59edcf7b";
const KEY: &str = "b82fa43f-f6e8-4ec4-9c31-231bc547c526";
const REGIONS: &[&str] = &[
    "cn-north-4",
    "ap-southeast-1",
    "af-south-1",
    "cn-east-3",
    "tr-west-1",
];

pub async fn run(mut settings: Settings, args: DemoArgs) -> anyhow::Result<()> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let broker = amqp::redacted_url(&settings.amqp.url);
    let connection = tokio::time::timeout(Duration::from_secs(10), amqp::connect(&settings.amqp, "keyturn-demo"))
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .and_then(|connected| connected.map_err(anyhow::Error::from))
        .map_err(|error| {
            anyhow::anyhow!(
                "no RabbitMQ reachable at {broker} ({error}); start one with `rabbitmq-server -detached` \
                 (or `docker compose up -d rabbitmq`), or point KEYTURN_AMQP__URL at one"
            )
        })?;
    let channel = connection.create_channel().await?;

    let amqp_names = &mut settings.amqp;
    amqp_names.jobs_queue = format!("keyturn.demo.{run_id}.jobs");
    amqp_names.dead_queue = format!("keyturn.demo.{run_id}.jobs.dead");
    amqp_names.dead_letter_exchange = format!("keyturn.demo.{run_id}.dlx");
    amqp_names.results_exchange = format!("keyturn.demo.{run_id}.results");
    amqp_names.unrouted_queue = format!("keyturn.demo.{run_id}.results.unrouted");
    amqp_names.control_queue = format!("keyturn.demo.{run_id}.control");
    let dir = std::env::temp_dir().join(format!("keyturn-demo-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    settings.audit.path = dir.join("audit.db");

    let simulator = Simulator::new(SimulatorConfig {
        credentials: vec![(DEMO_AK.into(), DEMO_SK.to_owned().into())],
        tokens: Vec::new(),
        fleet: None,
        faults: Faults {
            latency_ms: 20,
            error_rate: args.error_rate,
            throttle_rate: args.throttle_rate,
            hang_ms: 30_000,
            ..Faults::default()
        },
        max_clock_skew: Duration::from_secs(15 * 60),
        seed: 7,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    settings.api.endpoint = format!("http://{}", listener.local_addr()?);
    let stop_simulator = CancellationToken::new();
    let simulator_task = tokio::spawn(crate::simulator::serve(listener, simulator.clone(), {
        let stop = stop_simulator.clone();
        async move { stop.cancelled().await }
    }));
    settings.retry.base_delay = Duration::from_millis(50);
    settings.retry.max_delay = Duration::from_millis(500);
    settings.rate_limit.throttle_pause = Duration::from_millis(500);
    settings.rate_limit.per_project_per_second = 50;
    settings.rate_limit.per_project_burst = 10;

    topology::declare(&channel, &settings.amqp).await?;
    let events_queue = format!("keyturn.demo.{run_id}.events");
    channel
        .queue_declare(
            events_queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            events_queue.as_str().into(),
            settings.amqp.results_exchange.as_str().into(),
            "job.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let jobs = sample_fleet(args.jobs, &run_id);
    amqp::publish_jobs(&channel, &settings.amqp.jobs_queue, &jobs).await?;
    println!(
        "keyturn demo: {} jobs published to {} on {broker}; simulator at {}",
        jobs.len(),
        settings.amqp.jobs_queue,
        settings.api.endpoint
    );

    let credentials = Credentials::AkSk {
        ak: DEMO_AK.into(),
        sk: DEMO_SK.to_owned().into(),
    };
    let audit_path = settings.audit.path.clone();
    let (pipeline, publisher) = super::build_pipeline(settings.clone(), credentials)?;
    let options = worker::RunOptions {
        exit_when_idle: Some(Duration::from_secs(1)),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(super::cancel_on_signal(shutdown.clone()));
    worker::run(pipeline, options, shutdown).await?;
    publisher.close().await;

    let events = drain_count(&channel, &events_queue).await?;
    let dead = topology::ready_messages(&channel, &settings.amqp.dead_queue).await?;
    let counts = crate::audit::outcome_counts(&audit_path)?;
    let stats = simulator.stats();
    print_summary(&counts, events, dead, &stats, &audit_path);
    if let Err(error) = topology::delete(&channel, &settings.amqp).await {
        tracing::warn!(%error, "could not delete the demo's queues and exchanges");
    }
    stop_simulator.cancel();
    let _ = simulator_task.await;
    let _ = connection.close(200, "demo done".into()).await;
    Ok(())
}

/// A mixed fleet: on and off across regions, and every tenth job invalid in its own way.
fn sample_fleet(count: usize, run_id: &str) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let job_id = format!("DEMO-{run_id}-{i:04}");
            let instance = format!("{:08x}{:024x}in07", 0x7033_e7c3_u32.wrapping_add(i as u32), i);
            let region = REGIONS[i % REGIONS.len()];
            let mut body = if i % 2 == 0 {
                json!({"job_id": job_id, "rollout_id": format!("DEMO-{run_id}"), "ticket": "DEMO-1", "region": region,
                       "project_id": PROJECT, "instance_id": instance, "encryption_status": "on", "type": "kms", "kms_key_id": KEY})
            } else {
                json!({"job_id": job_id, "rollout_id": format!("DEMO-{run_id}"), "ticket": "DEMO-1", "region": region,
                       "project_id": PROJECT, "instance_id": instance, "encryption_status": "off"})
            };
            match i % 30 {
                9 => body["instance_id"] = json!("not-an-instance"),
                19 => body["encryption"] = json!("on"),
                29 => body["kms_key_id"] = json!("12345"),
                _ => {}
            }
            (job_id, body.to_string().into_bytes())
        })
        .collect()
}

async fn drain_count(channel: &Channel, queue: &str) -> anyhow::Result<usize> {
    let mut count = 0;
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        drop(message);
        count += 1;
    }
    Ok(count)
}

fn print_summary(
    counts: &[(String, i64)],
    events: usize,
    dead: u32,
    stats: &crate::simulator::Stats,
    audit: &std::path::Path,
) {
    println!();
    println!("{:<12} {:>6}", "outcome", "jobs");
    println!("{:-<12} {:->6}", "", "");
    for (outcome, count) in counts {
        println!("{outcome:<12} {count:>6}");
    }
    println!("{:-<12} {:->6}", "", "");
    println!(
        "{:<12} {:>6}",
        "total",
        counts.iter().map(|(_, c)| c).sum::<i64>()
    );
    println!();
    println!("result events received: {events}; dead-lettered messages: {dead}");
    let modify: u64 = stats.instances.values().map(|i| i.modify_calls).sum();
    let applied: u64 = stats.instances.values().map(|i| i.toggles_applied).sum();
    println!(
        "simulator: {modify} Modify calls, {applied} toggles applied, {} faults injected",
        stats.faults_injected
    );
    println!("audit log: {}", audit.display());
}
