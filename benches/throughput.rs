//! Throughput harness: prints numbers, asserts nothing. Run with
//! `cargo bench --bench throughput` (a RabbitMQ on 127.0.0.1:5672, or KEYTURN_TEST_AMQP_URL).
//!
//! - signing: SDK-HMAC-SHA256 signatures per second (pure CPU);
//! - parsing: job bodies decoded and validated per second (pure CPU);
//! - end to end: jobs per second through broker → worker → simulator → SQLite (FULL sync) →
//!   confirmed event → ack, with per-job latency percentiles from the audit log;
//! - peak memory of the whole process after the end-to-end run.

use std::time::{Duration, Instant};

use keyturn::amqp::worker::{self, RunOptions};
use keyturn::config::{Credentials, Settings};
use keyturn::gaussdb::signer;
use keyturn::job::{self, ParseContext};
use keyturn::simulator::{Simulator, SimulatorConfig};
use tokio_util::sync::CancellationToken;

const PROJECT: &str = "619d3e78f61b4be68bc5aa0b59edcf7b";

fn main() {
    bench_signing();
    bench_parsing();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let jobs: usize = std::env::var("KEYTURN_BENCH_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    runtime.block_on(bench_end_to_end(jobs));
    // Last: its 100,000 keys would raise the peak memory reported for the end-to-end run.
    runtime.block_on(bench_limits_memory());
}

fn bench_signing() {
    let headers = vec![
        (
            "Content-Type".to_owned(),
            "application/json;charset=UTF-8".to_owned(),
        ),
        (
            "Host".to_owned(),
            "gaussdb.cn-north-4.myhuaweicloud.com".to_owned(),
        ),
        ("X-Project-Id".to_owned(), PROJECT.to_owned()),
        ("X-Sdk-Date".to_owned(), "20261128T101500Z".to_owned()),
    ];
    let body = br#"{"encryption_status":"on","type":"kms","kms_key_id":"b82fa43f-f6e8-4ec4-9c31-231bc547c526"}"#;
    let path =
        format!("/v3/{PROJECT}/instances/7033e7c3cf93438797d44ad7ae0a7d95in07/backups/encryption");
    let request = signer::Request {
        method: "POST",
        path: &path,
        query: &[],
        headers: &headers,
        body,
    };
    let signed = signer::signable_headers(&headers);
    let rounds = 50_000;
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(signer::sign(&request, &signed, "AK", b"SK"));
    }
    report("signing", rounds, start.elapsed());
}

fn bench_parsing() {
    let body = format!(
        r#"{{"job_id":"CHG-1042-0001","rollout_id":"CHG-1042","ticket":"CHG-1042","region":"cn-north-4","project_id":"{PROJECT}","instance_id":"7033e7c3cf93438797d44ad7ae0a7d95in07","encryption_status":"on","type":"kms","kms_key_id":"b82fa43f-f6e8-4ec4-9c31-231bc547c526"}}"#
    );
    let rounds = 100_000;
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(job::parse(body.as_bytes(), &ParseContext::default()).is_ok());
    }
    report("job parsing", rounds, start.elapsed());
}

fn report(what: &str, rounds: usize, elapsed: Duration) {
    let per_second = rounds as f64 / elapsed.as_secs_f64();
    println!(
        "{what:<12} {rounds:>8} in {:>8.1} ms  = {per_second:>12.0}/s",
        elapsed.as_secs_f64() * 1e3
    );
}

async fn bench_end_to_end(jobs: usize) {
    let url = std::env::var("KEYTURN_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let dir = tempfile::tempdir().expect("temp dir");
    let simulator = Simulator::new(SimulatorConfig {
        credentials: vec![("BENCHAK".into(), "bench-sk".to_owned().into())],
        tokens: Vec::new(),
        fleet: None,
        faults: Default::default(),
        max_clock_skew: Duration::from_secs(900),
        seed: 1,
        ..SimulatorConfig::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let stop = CancellationToken::new();
    tokio::spawn(keyturn::simulator::serve(
        listener,
        simulator.clone(),
        stop.clone().cancelled_owned(),
    ));

    let mut settings = Settings::load(None, &[]).expect("defaults");
    settings.amqp.url = url;
    settings.amqp.name_under(&format!("kt-bench-{run}"));
    settings.worker.concurrency = 64;
    settings.api.endpoint = endpoint;
    settings.rate_limit.per_second = 100_000;
    settings.rate_limit.burst = 10_000;
    settings.rate_limit.per_project_per_second = 100_000;
    settings.rate_limit.per_project_burst = 10_000;
    settings.audit.path = dir.path().join("audit.db");
    settings.ops.listen = String::new();

    let connection = keyturn::amqp::connect(&settings.amqp, "keyturn-bench")
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    keyturn::amqp::topology::declare(&channel, &settings.amqp)
        .await
        .expect("topology");
    // A consumer's queue on the results, as in production: an event nobody is bound for is
    // published twice (returned, then kept in the unrouted queue) and logged.
    let events_queue = format!("kt-bench-{run}.events");
    channel
        .queue_declare(
            events_queue.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("events queue");
    channel
        .queue_bind(
            events_queue.as_str().into(),
            settings.amqp.results_exchange.as_str().into(),
            "#".into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("bind");
    let bodies: Vec<(String, Vec<u8>)> = (0..jobs)
        .map(|i| {
            let id = format!("B-{run}-{i}");
            let body = format!(
                r#"{{"job_id":"{id}","region":"cn-north-4","project_id":"{PROJECT}","instance_id":"{i:032x}in07","encryption_status":"off"}}"#
            );
            (id, body.into_bytes())
        })
        .collect();
    keyturn::amqp::publish_jobs(&channel, &settings.amqp.jobs_queue, &bodies)
        .await
        .expect("publish");

    let credentials = Credentials::AkSk {
        ak: "BENCHAK".into(),
        sk: "bench-sk".to_owned().into(),
    };
    let (pipeline, publisher) =
        keyturn::cli::build_pipeline(settings.clone(), credentials).expect("pipeline");
    let start = Instant::now();
    worker::run(
        pipeline,
        RunOptions {
            exit_when_idle: Some(Duration::from_millis(500)),
        },
        CancellationToken::new(),
    )
    .await
    .expect("worker");
    let elapsed = start.elapsed().saturating_sub(Duration::from_millis(500));
    publisher.close().await;
    report("end to end", jobs, elapsed);

    let db = rusqlite::Connection::open(&settings.audit.path).expect("audit");
    let mut latencies: Vec<i64> = db
        .prepare("SELECT duration_ms FROM toggles")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("latencies");
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "job latency  p50 {} ms  p99 {} ms  max {} ms  (rows {})",
        at(0.5),
        at(0.99),
        at(1.0),
        latencies.len()
    );
    let _ = channel
        .queue_delete(events_queue.as_str().into(), Default::default())
        .await;
    let _ = keyturn::amqp::topology::delete(&channel, &settings.amqp).await;
    println!(
        "peak memory  {} (whole process: worker, in-process simulator and harness)",
        peak_rss().unwrap_or_else(|| "unknown".into())
    );
    stop.cancel();
}

/// Memory of the per-project limiter and 429-pause maps with 100,000 distinct projects, before
/// and after the pruning the worker runs every minute.
async fn bench_limits_memory() {
    use keyturn::limits::Limits;
    let limits = Limits::new(&keyturn::config::RateLimitSettings {
        per_second: 1_000_000,
        burst: 1_000_000,
        per_project_per_second: 1_000,
        per_project_burst: 1,
        throttle_pause: std::time::Duration::from_millis(1),
    });
    let before = current_rss_kib();
    for n in 0..100_000u32 {
        let key = ("cn-north-4".to_owned(), format!("{n:032x}"));
        limits.acquire(&key).await;
        limits.throttled(&key, None);
    }
    let filled = current_rss_kib();
    std::thread::sleep(std::time::Duration::from_millis(20));
    limits.prune();
    let pruned = current_rss_kib();
    println!(
        "limits       100,000 projects: RSS {} -> {} KiB; after prune {:?} keys (limiters, pauses), RSS {} KiB",
        before,
        filled,
        limits.len(),
        pruned
    );
}

fn current_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

/// The process's peak resident set size, as Linux reports it (`VmHWM`).
fn peak_rss() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    Some(line.trim_start_matches("VmHWM:").trim().to_owned())
}
