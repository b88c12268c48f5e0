//! `keyturn demo`: the product told as a story, in one command on the local broker.
//!
//! A new user learns more from one rollout that goes wrong and is put right than from a table of
//! counts, so the demo runs exactly that, through the same code an operator uses: it writes a
//! fleet file and hands it to `keyturn submit` (declaration first, then the jobs), with a canary
//! and a failure budget. The canary passes; then a missing key grant (the in-process simulator
//! answers 403 `DBS.200010` for chosen instances) fails jobs until the budget halts the rollout
//! and parks the rest. The demo shows the halt, fixes the fault, resumes, runs `retry-failed`,
//! and sends one invalid job to show `rejected` next to `failed`. It ends with what happened in
//! plain words, one event as consumers see it, the commands to look inside, and how to run a
//! real worker. Its queues and exchanges are deleted; its files stay, and it says where.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use lapin::Channel;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, topology, worker};
use crate::config::{Credentials, Settings};
use crate::rollout::{self, Snapshot, State};
use crate::simulator::{Faults, Simulator, SimulatorConfig, Step};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// How many instances the sample rollout has (20 to 1000).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(20..=1000))]
    pub jobs: u32,
    /// Share of API calls the simulator answers 500, to show retries.
    #[arg(long, default_value_t = 0.1)]
    pub error_rate: f64,
    /// Share of API calls the simulator answers 429, to show throttling.
    #[arg(long, default_value_t = 0.02)]
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
/// The canary's size and the failures the budget allows: the 3rd failure halts.
const CANARY: u32 = 3;
const BUDGET: u32 = 2;
/// Instances whose key grant is missing: after the canary, four of them, so the budget halts.
const DOOMED: [u32; 4] = [5, 8, 11, 14];
/// Each stage of the story gets this long before the demo gives up.
const STAGE: Duration = Duration::from_secs(30);

pub async fn run(mut settings: Settings, args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let broker = amqp::redacted_nodes(&settings.amqp);
    let connection = tokio::time::timeout(
        Duration::from_secs(10),
        amqp::connect(&settings.amqp, "keyturn-demo"),
    )
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
    let dir = std::env::temp_dir().join(format!("keyturn-demo-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    own_names(&mut settings, &run_id, &dir);

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
        ..SimulatorConfig::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    settings.api.endpoint = format!("http://{}", listener.local_addr()?);
    let stop_simulator = CancellationToken::new();
    let simulator_task = tokio::spawn(crate::simulator::serve(listener, simulator.clone(), {
        let stop = stop_simulator.clone();
        async move { stop.cancelled().await }
    }));

    topology::declare(&channel, &settings.amqp).await?;
    let events_queue = follow_events(&channel, &settings, &run_id).await?;
    let (pipeline, publisher) = super::build_pipeline(settings.clone(), demo_credentials())?;
    let shutdown = CancellationToken::new();
    tokio::spawn(super::cancel_on_signal(shutdown.clone()));
    let worker = tokio::spawn(worker::run(
        pipeline,
        worker::RunOptions::default(),
        shutdown.clone(),
    ));

    let rollout_id = format!("DEMO-{run_id}");
    println!(
        "keyturn demo: a rollout of {} instances on {broker}, with a worker and the GaussDB \
         simulator ({}) in this process",
        args.jobs, settings.api.endpoint
    );
    let story = tell(&settings, &simulator, &rollout_id, args.jobs, &dir).await;
    let stray = match &story {
        Ok(_) => publish_stray(&channel, &settings, &run_id).await,
        Err(_) => Ok(()),
    };
    let events = match (&story, &stray) {
        (Ok(_), Ok(())) => collect_events(&channel, &events_queue).await,
        _ => Ok(Vec::new()),
    };
    shutdown.cancel();
    let _ = worker.await;
    publisher.close().await;
    let (story, events) = (story?, events?);
    stray?;

    let counts = crate::audit::outcome_counts(&settings.audit.path)?;
    print_summary(&story, &counts, &events, &simulator.stats());
    print_next_steps(&settings, &rollout_id, &dir);
    if let Err(error) = topology::delete(&channel, &settings.amqp).await {
        tracing::warn!(%error, "could not delete the demo's queues and exchanges");
    }
    stop_simulator.cancel();
    let _ = simulator_task.await;
    let _ = connection.close(200, "demo done".into()).await;
    println!(
        "The demo's queues and exchanges (keyturn.demo.{run_id}.*) are deleted; its files stay in \
         {} (`rm -rf` it when done). Took {:.1} s.",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Queues and exchanges of this run only, and its audit file in `dir`.
fn own_names(settings: &mut Settings, run_id: &str, dir: &Path) {
    settings.amqp.name_under(&format!("keyturn.demo.{run_id}"));
    settings.audit.path = dir.join("audit.db");
    // The demo's workers are its own: they leave the ops port to a real worker on this host.
    settings.ops.listen = String::new();
    settings.worker.concurrency = 4;
    // The canary places go to the first jobs that ask, among the deliveries held: with four
    // held, no doomed instance (the first is the 6th job) can take one.
    settings.worker.prefetch = 4;
    settings.retry.base_delay = Duration::from_millis(50);
    settings.retry.max_delay = Duration::from_millis(500);
    settings.rate_limit.throttle_pause = Duration::from_millis(300);
    settings.rate_limit.per_project_per_second = 100;
    settings.rate_limit.per_project_burst = 20;
}

fn demo_credentials() -> Credentials {
    Credentials::AkSk {
        ak: DEMO_AK.into(),
        sk: DEMO_SK.to_owned().into(),
    }
}

/// A queue of this run's job and rollout events, read at the end.
async fn follow_events(
    channel: &Channel,
    settings: &Settings,
    run_id: &str,
) -> anyhow::Result<String> {
    let queue = format!("keyturn.demo.{run_id}.events");
    let private = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.as_str().into(), private, FieldTable::default())
        .await?;
    for key in ["job.#", "rollout.#"] {
        channel
            .queue_bind(
                queue.as_str().into(),
                settings.amqp.results_exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(queue)
}

/// What the story saw, for the summary.
struct Story {
    at_halt: Snapshot,
    after_resume: Snapshot,
    after_retry: Snapshot,
}

/// Submit, canary, halt, fix, resume, retry-failed; prints each step as it happens.
async fn tell(
    settings: &Settings,
    simulator: &Simulator,
    rollout_id: &str,
    jobs: u32,
    dir: &Path,
) -> anyhow::Result<Story> {
    let file = dir.join("fleet.csv");
    std::fs::write(&file, fleet_csv(jobs))?;
    for n in DOOMED {
        simulator.script(&instance(n), vec![forbidden(); 5]);
    }
    println!(
        "\n1. submit   {} ({jobs} instances): canary {CANARY}, failure budget {BUDGET} (failure {} halts)",
        file.display(),
        BUDGET + 1
    );
    submit(settings, &file, rollout_id).await?;

    let at_halt = wait_for(settings, rollout_id, "halted", |s| {
        s.state == State::Halted && s.counts.in_flight == 0
    })
    .await?;
    if at_halt.canary_done {
        println!(
            "2. canary   the first {CANARY} jobs ran alone and all succeeded, so the rest were released"
        );
    }
    println!(
        "3. halted   {} instances lack the key grant (403 DBS.200010); {}",
        DOOMED.len(),
        at_halt.reason.as_deref().unwrap_or("halted")
    );
    println!(
        "            {} succeeded, {} failed, {} parked: held back, never sent to the API",
        at_halt.counts.succeeded, at_halt.counts.failed, at_halt.counts.parked
    );

    for n in DOOMED {
        simulator.clear_script(&instance(n));
    }
    println!(
        "4. fix      the grant is restored; then `keyturn rollout resume {rollout_id} --reason \"grant fixed\"`"
    );
    steer(settings, "resume", rollout_id).await?;
    let after_resume = wait_for(settings, rollout_id, "completed", |s| {
        s.state == State::Completed && s.counts.in_flight == 0
    })
    .await?;
    println!(
        "   resumed  the parked jobs ran: completed with {} succeeded, {} failed",
        after_resume.counts.succeeded, after_resume.counts.failed
    );

    println!("5. retry    `keyturn rollout retry-failed {rollout_id}`: each failed job runs again");
    steer(settings, "retry_failed", rollout_id).await?;
    let after_retry = wait_for(settings, rollout_id, "no failures left", |s| {
        s.counts.failed == 0 && s.counts.in_flight == 0 && s.counts.parked == 0
    })
    .await?;
    println!(
        "            now {} of {} succeeded, {} failed; the audit keeps both runs of each retried job",
        after_retry.counts.succeeded, jobs, after_retry.counts.failed
    );
    Ok(Story {
        at_halt,
        after_resume,
        after_retry,
    })
}

/// `keyturn submit FILE --rollout ID …`, the same code path as on the command line.
async fn submit(settings: &Settings, file: &Path, rollout_id: &str) -> anyhow::Result<()> {
    #[derive(Parser)]
    struct Line {
        #[command(flatten)]
        args: super::submit::SubmitArgs,
    }
    let (canary, budget) = (CANARY.to_string(), BUDGET.to_string());
    let line = Line::try_parse_from([
        "submit",
        &file.display().to_string(),
        "--rollout",
        rollout_id,
        "--ticket",
        "DEMO-1",
        "--requested-by",
        "demo",
        "--status",
        "on",
        "--kms-key",
        KEY,
        "--canary",
        &canary,
        "--failure-budget",
        &budget,
        "--timeout",
        "10s",
    ])
    .context("the demo's submit line")?;
    let code = super::submit::run(settings, &[], line.args).await?;
    anyhow::ensure!(
        code == std::process::ExitCode::SUCCESS,
        "keyturn submit failed ({code:?})"
    );
    Ok(())
}

/// `keyturn rollout <kind> ROLLOUT`, over the control queue.
async fn steer(settings: &Settings, kind: &str, rollout_id: &str) -> anyhow::Result<()> {
    let request = json!({"kind": kind, "rollout_id": rollout_id, "reason": "grant fixed",
                         "requested_by": "demo"});
    let command = rollout::parse_command(request.to_string().as_bytes())
        .map_err(|rejection| anyhow::anyhow!("{rejection}"))?;
    let reply = super::rollout::ask(settings, &command, Duration::from_secs(10)).await?;
    anyhow::ensure!(
        reply.ok,
        "the worker refused {kind}: {}",
        reply.error.unwrap_or_default()
    );
    Ok(())
}

/// Polls `status` until `done` holds, for at most [`STAGE`].
async fn wait_for(
    settings: &Settings,
    rollout_id: &str,
    what: &str,
    done: impl Fn(&Snapshot) -> bool,
) -> anyhow::Result<Snapshot> {
    let deadline = Instant::now() + STAGE;
    let command = rollout::Command::Status(Some(crate::job::RolloutId(rollout_id.into())));
    loop {
        let reply = super::rollout::ask(settings, &command, Duration::from_secs(10)).await?;
        if let Some(snapshot) = reply.rollouts.into_iter().next() {
            if done(&snapshot) {
                return Ok(snapshot);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the rollout did not reach {what} within {}s: {}",
                STAGE.as_secs(),
                super::rollout::describe(&snapshot)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One job from outside the rollout with a malformed instance id: `rejected`, never called.
async fn publish_stray(channel: &Channel, settings: &Settings, run_id: &str) -> anyhow::Result<()> {
    let job_id = format!("DEMO-{run_id}-stray");
    let body = json!({"job_id": job_id, "region": "cn-north-4", "project_id": PROJECT,
        "instance_id": "not-an-instance", "encryption_status": "on", "type": "kms",
        "kms_key_id": KEY});
    amqp::publish_jobs(
        channel,
        &settings.amqp.jobs_queue,
        &[(job_id, body.to_string().into_bytes())],
    )
    .await?;
    println!(
        "6. rejected a job with instance_id \"not-an-instance\" (outside the rollout) is rejected: \
         nothing is called"
    );
    Ok(())
}

/// Every event of the run: (routing key, event), until the stray's `rejected` is among them.
async fn collect_events(channel: &Channel, queue: &str) -> anyhow::Result<Vec<(String, Value)>> {
    let deadline = Instant::now() + STAGE;
    let mut events = Vec::new();
    loop {
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await?
        {
            let value = serde_json::from_slice(&message.delivery.data).unwrap_or(Value::Null);
            events.push((message.delivery.routing_key.to_string(), value));
        }
        if events
            .iter()
            .any(|(key, _)| key.starts_with("job.rejected"))
        {
            return Ok(events);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the rejected job's event did not come"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn instance(n: u32) -> String {
    format!(
        "{:08x}{:024x}in07",
        0x7033_e7c3_u32.wrapping_add(n),
        u64::from(n)
    )
}

fn forbidden() -> Step {
    Step::Error {
        status: 403,
        code: "DBS.200010".into(),
        msg: Some("the KMS key grant is missing for this instance".into()),
        retry_after_secs: None,
        apply: false,
    }
}

/// `region,project_id,instance_id`, across five regions.
fn fleet_csv(jobs: u32) -> String {
    let mut text = String::from("region,project_id,instance_id\n");
    for n in 0..jobs {
        let region = REGIONS[n as usize % REGIONS.len()];
        text.push_str(&format!("{region},{PROJECT},{}\n", instance(n)));
    }
    text
}

fn print_summary(
    story: &Story,
    rows: &[(String, i64)],
    events: &[(String, Value)],
    stats: &crate::simulator::Stats,
) {
    let now = &story.after_retry.counts;
    println!("\nWhat happened, in plain words:");
    println!(
        "  succeeded  the API applied the change (or it was already so); the audit has the proof"
    );
    println!(
        "  failed     the job was valid but the API refused it for good (here 403 DBS.200010);"
    );
    println!("             fix the cause, then `retry-failed` runs those jobs again");
    println!("  rejected   the job itself was invalid (a bad field): no API call; fix the job");
    println!(
        "  parked     held by a paused or halted rollout, never sent to the API, until resume"
    );
    println!(
        "  The budget counts failed and rejected jobs: {} failures halted this rollout; after the fix",
        story.at_halt.budget.used
    );
    println!(
        "  and resume it completed ({} failed), and retry-failed left {} succeeded, {} failed.",
        story.after_resume.counts.failed, now.succeeded, now.failed
    );
    let row = |name: &str| {
        rows.iter()
            .find(|(outcome, _)| outcome == name)
            .map_or(0, |(_, n)| *n)
    };
    println!(
        "\naudit rows (one per run): {} succeeded, {} failed, {} rejected, {} cancelled",
        row("succeeded"),
        row("failed"),
        row("rejected"),
        row("cancelled")
    );
    let jobs = events
        .iter()
        .filter(|(key, _)| key.starts_with("job."))
        .count();
    let mut kinds: Vec<&str> = Vec::new();
    for (key, _) in events {
        if let Some(kind) = key.strip_prefix("rollout.")
            && kinds.last() != Some(&kind)
        {
            kinds.push(kind);
        }
    }
    println!(
        "events: {jobs} job events; rollout events in order: {}",
        kinds.join(", ")
    );
    let modify: u64 = stats.instances.values().map(|i| i.modify_calls).sum();
    println!(
        "simulator: {modify} Modify calls, {} faults injected (500s and 429s the worker retried)",
        stats.faults_injected
    );
    if let Some((key, event)) = events.iter().find(|(key, _)| key.starts_with("job.failed")) {
        println!("\nOne event, as a consumer of the results exchange gets it (routing key {key}):");
        println!("{event}");
    }
}

fn print_next_steps(settings: &Settings, rollout_id: &str, dir: &Path) {
    let audit = settings.audit.path.display();
    println!("\nLook inside (helper commands read the audit file):");
    println!("  KEYTURN_AUDIT__PATH={audit} keyturn audit --rollout {rollout_id}");
    println!(
        "  KEYTURN_AUDIT__PATH={audit} keyturn audit report {rollout_id} --html {}",
        dir.join("report.html").display()
    );
    println!("Run a real worker (README \"Running a rollout\"):");
    println!("  CLOUD_SDK_AK=… CLOUD_SDK_SK=… keyturn worker");
    println!(
        "  keyturn submit fleet.csv --rollout CHG-1 --status on --kms-key KEY --canary 10 --failure-budget 2%"
    );
    println!("  keyturn watch CHG-1");
}
