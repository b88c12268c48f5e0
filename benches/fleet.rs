//! Fleet benchmark: real `keyturn worker` processes against a real broker, a `keyturn simulator`
//! process and either store. Prints markdown tables; asserts nothing (a target beside a number
//! says "met" or "missed", nothing fails). Run with `cargo bench --bench fleet`; it needs RabbitMQ
//! on 127.0.0.1:5672 (or KEYTURN_TEST_AMQP_URL) and PostgreSQL at
//! postgres://postgres@127.0.0.1:5432 (or KEYTURN_TEST_POSTGRES_URL, see
//! `keyturn::audit::test_support`).
//!
//! Every configuration gets its own queues, exchanges, simulator process, SQLite file or fresh
//! PostgreSQL database, and deletes them at the end.
//!
//! **How jobs are fed.** Closed loop: the harness keeps `window = 2 × consumers × prefetch` jobs
//! outstanding (published, no result yet; KEYTURN_BENCH_WINDOW changes the factor 2). It
//! publishes the first `window` at once and one more each time a new result event arrives, so
//! every consumer's prefetch is full and as many jobs again wait ready in the queue: throughput is
//! the fleet's, not the harness's round trip. Before timing, one `window` of warm-up jobs runs
//! untimed (connections, the store's first pages).
//!
//! **jobs/s**: measured jobs ÷ (last result received − first measured job published).
//!
//! **p50 / p99 ms**: per job, from the moment the harness published the job to the moment the
//! harness received that job's result event. A worker publishes the result event with publisher
//! confirms and acks the job only after that confirm, so the end point is "received to acked"
//! within a few ms. With the closed loop, this includes the job's wait in the queue (about one
//! processing cycle, because half the window waits ready); by Little's law mean latency ≈
//! window ÷ jobs/s. **in-worker p50/p99** is the worker's own `data.duration_ms` of the event: from
//! the worker receiving the delivery until the job's result was decided (API call included; the
//! final store write, the event's publish and confirm and the ack come after it).
//!
//! **raw lapin loop** (the baseline, in this process): per consumer one connection consuming from
//! a quorum queue declared exactly like keyturn's jobs queue (`topology::declare`), with the
//! same prefetch as the workers (`worker.prefetch`), and one connection in confirm mode publishing. For
//! each delivery (up to `prefetch` at once) it parses the job's JSON, publishes one persistent
//! mandatory event to the results (topic) exchange, waits for the confirm, then acks. Same window,
//! same message count, same event queue and collector as the keyturn rows. It runs with 1, 2
//! and 4 consumers (each with its own connections, as a process would), three runs each (a run
//! is well under a second): its row shows the run with the median jobs/s. A 0 ms row's ratio
//! (**× raw**) is its jobs/s ÷ that raw row's with as many consumers as the row has workers.
//!
//! **of ideal** (the 50 ms rows' ratio): jobs/s ÷ (workers × worker.concurrency ÷ 0.050 s), the
//! rate if every slot always had a call in flight and nothing else took time.
//!
//! **Rate fidelity**: 4 workers on PostgreSQL with KEYTURN_RATE_LIMIT__PER_SECOND=60,
//! KEYTURN_RATE_LIMIT__BURST=5 (per-project limits 100,000), simulator latency 0 ms, all jobs
//! published at once. From the simulator's own log of Modify (POST) requests (`GET
//! /_simulator/stats`, `recent[].at_ms`, the last 1,000 requests), the calls/s from call `from`
//! to the last, (n − 1 − from) ÷ (t[n−1] − t[from]), divided by 60, twice:
//! - **steady** (`from` = burst + 60, the calls after the burst and one second more): the
//!   fidelity held against the target. In the first second after the burst the four workers'
//!   claims of their first 128 deliveries load both cores, and a granted call reaches the API
//!   some tens of ms late; counting from the first call after the burst, that one late start
//!   shortens a 10-s span and reads 1.001–1.004, while from call 20 on it reads 60.00 ± 0.02/s
//!   (measured on 2026-11-30, starting points 5, 20, 35, 65, 125, 245).
//! - **from the burst** (`from` = burst), shown beside it with the start-up included.
//!
//! Beside them, the least-squares slope of call number over time for the calls after the burst,
//! which one late first call or early last call moves less (timestamps are whole milliseconds).
//! Each is held against [0.98, 1.00] as printed, to three decimals. Also the most Modify
//! calls in one calendar second (floor of at_ms ÷ 1000) and in any sliding 1-s window; a bucket
//! of 60/s that starts with 5 grants at most 64 within one second (65 counting both ends), and
//! calls reach the API a few ms apart from their grants.
//!
//! **Per worker process**: peak RSS is VmHWM from /proc/<pid>/status, read just before the
//! harness sends SIGTERM. CPU ms/job is (utime + stime) from /proc/<pid>/stat at the same moment ÷
//! the jobs that worker ran (result events whose `source` names it, warm-up included). The CPU
//! time includes the worker's start (connect, migrations) and idle waiting, not its shutdown.
//! Beside them, per job run in the row: the simulator's CPU time (its process, at the same
//! moment), the broker's (every `beam.smp` on this host, from the fleet's start to its stop;
//! harness traffic included) and PostgreSQL's (every `postgres` process on this host, the same
//! way; SQLite rows show what other databases on it did meanwhile), each with the CPU time of
//! the children its topmost process reaped meanwhile (a backend that ended still counts), and
//! the harness's (this bench process), which show where a CPU-bound host spends its time. The
//! raw loop's rows show the broker's and this process's CPU per job over its median run (from
//! opening its harness to the last result, warm-up included): there the consumers run in this
//! process, so "harness" is the harness and the raw consumers together.
//!
//! Everything shares the machine: the harness, the simulator, the broker and PostgreSQL run on
//! the same cores as the workers, so the numbers are what this host does, not what a worker
//! would do alone. Knobs: KEYTURN_BENCH_JOBS (0 ms rows, default 2000), KEYTURN_BENCH_ROUNDS
//! (50 ms rows run workers × concurrency × rounds jobs, default 100 ≈ 5 s at the ideal rate),
//! KEYTURN_BENCH_RATE_JOBS (default 600, at most 1000), KEYTURN_BENCH_CONCURRENCY (default 16,
//! the shipped worker.concurrency), KEYTURN_BENCH_PREFETCH (default twice the concurrency, the
//! shipped worker.prefetch), KEYTURN_BENCH_WINDOW (default 2), KEYTURN_BENCH_ONLY (comma-separated words; only rows whose
//! label starts with one run, part by part: labels are `sqlite/0ms/1`, `postgres/50ms/4`, `rate`;
//! e.g. `sqlite/0ms` or `postgres`), KEYTURN_BENCH_RAW_DELAY_MS (default 0: the raw consumers
//! wait this long before each event, to run the raw loop at a keyturn row's rate: the broker's
//! CPU per job grows as throughput falls, since it batches less). Every other
//! `KEYTURN_<SECTION>__<KEY>` variable but `store.url` and `log.level` is passed to the workers
//! (see `passed_settings`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keyturn::audit::test_support::TestDatabase;
use keyturn::config::AmqpSettings;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer, PublisherConfirm,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const AK: &str = "BENCHACCESSKEYKEYTURN";
const SK: &str = "bench-secret-key-fleet-never-log-me";
const PROJECT: &str = "619d3e78f61b4be68bc5aa0b59edcf7b";
const KMS_KEY: &str = "b82fa43f-f6e8-4ec4-9c31-231bc547c526";
const BINARY: &str = env!("CARGO_BIN_EXE_keyturn");
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
/// A configuration with no new result for this long is reported incomplete.
const STALL: Duration = Duration::from_secs(60);
const LATENCIES_MS: [u64; 2] = [0, 50];
const WORKER_COUNTS: [usize; 3] = [1, 2, 4];
const RATE_PER_SECOND: u32 = 60;
const RATE_BURST: u32 = 5;
const RATE_WORKERS: usize = 4;
const HIGH_LIMIT: &str = "100000";
/// The raw loop runs this often per consumer count (a run is well under a second, so one
/// broker hiccup moves it a lot); its row is the run with the median jobs/s.
const RAW_RUNS: usize = 3;

fn main() {
    let knobs = Knobs::from_env().with_prefetch();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run(knobs));
}

struct Knobs {
    amqp_url: String,
    jobs_0ms: usize,
    rounds_50ms: usize,
    rate_jobs: usize,
    concurrency: u16,
    /// The workers' `worker.prefetch`, and the raw loop's prefetch.
    prefetch: u16,
    window_factor: usize,
    /// `KEYTURN_BENCH_RAW_DELAY_MS`: the raw consumers wait this long before each event (zero:
    /// not at all), to run the raw loop at a keyturn row's rate and compare the broker's CPU at
    /// equal throughput.
    raw_delay: Duration,
    /// `KEYTURN_BENCH_ONLY`: run only the rows whose label (`sqlite/0ms/1`, `postgres/50ms/4`,
    /// `rate`) starts with the parts of one of these comma-separated words; empty = every row.
    only: Vec<String>,
}

impl Knobs {
    fn from_env() -> Knobs {
        let number = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|v| *v > 0)
                .unwrap_or(default)
        };
        Knobs {
            amqp_url: std::env::var("KEYTURN_TEST_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            jobs_0ms: number("KEYTURN_BENCH_JOBS", 2_000),
            rounds_50ms: number("KEYTURN_BENCH_ROUNDS", 100),
            // The simulator keeps the last 1,000 requests; the rate is read from them.
            rate_jobs: number("KEYTURN_BENCH_RATE_JOBS", 600).min(1_000),
            concurrency: number("KEYTURN_BENCH_CONCURRENCY", 16).min(2_000) as u16,
            window_factor: number("KEYTURN_BENCH_WINDOW", 2),
            raw_delay: Duration::from_millis(number("KEYTURN_BENCH_RAW_DELAY_MS", 0) as u64),
            prefetch: 0,
            only: std::env::var("KEYTURN_BENCH_ONLY")
                .unwrap_or_default()
                .split(',')
                .map(|word| word.trim().to_lowercase())
                .filter(|word| !word.is_empty())
                .collect(),
        }
    }

    /// The prefetch: KEYTURN_BENCH_PREFETCH, else the worker's default of twice the concurrency.
    fn with_prefetch(mut self) -> Knobs {
        let default = usize::from(self.concurrency) * 2;
        self.prefetch = std::env::var("KEYTURN_BENCH_PREFETCH")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|v| *v >= usize::from(self.concurrency))
            .unwrap_or(default)
            .min(4_000) as u16;
        self
    }

    /// Whether the row labelled `label` runs (see `only`): a word's `/`-separated parts equal the
    /// label's first parts (`sqlite/0ms` runs `sqlite/0ms/1`, `/2` and `/4`, not `sqlite/50ms/1`).
    fn runs(&self, label: &str) -> bool {
        let parts: Vec<&str> = label.split('/').collect();
        self.only.is_empty()
            || self.only.iter().any(|word| {
                let wanted: Vec<&str> = word.split('/').collect();
                wanted.len() <= parts.len() && parts.iter().zip(&wanted).all(|(p, w)| p == w)
            })
    }

    fn fleet_label(store: StoreKind, latency_ms: u64, workers: usize) -> String {
        let store = match store {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        };
        format!("{store}/{latency_ms}ms/{workers}")
    }

    fn window(&self, consumers: usize) -> usize {
        self.window_factor * consumers * usize::from(self.prefetch)
    }

    fn jobs_for(&self, workers: usize, latency_ms: u64) -> usize {
        if latency_ms == 0 {
            self.jobs_0ms
        } else {
            workers * usize::from(self.concurrency) * self.rounds_50ms
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "SQLite",
            StoreKind::Postgres => "PostgreSQL",
        }
    }
}

async fn run(knobs: Knobs) {
    let started = Instant::now();
    let header = header_line();
    eprintln!("{header}");

    let mut raw = HashMap::new();
    for consumers in WORKER_COUNTS {
        let needed = [StoreKind::Sqlite, StoreKind::Postgres]
            .into_iter()
            .any(|store| knobs.runs(&Knobs::fleet_label(store, 0, consumers)));
        if !needed {
            continue;
        }
        let mut runs = Vec::new();
        for _ in 0..RAW_RUNS {
            let run = raw_loop(&knobs, consumers).await;
            eprintln!("raw lapin loop ×{consumers}: {}", run.collected.summary());
            runs.push(run);
        }
        raw.insert(consumers, RawMeasured::median_of(runs));
    }

    let mut fleets = Vec::new();
    for store in [StoreKind::Sqlite, StoreKind::Postgres] {
        for latency_ms in LATENCIES_MS {
            for workers in WORKER_COUNTS {
                if !knobs.runs(&Knobs::fleet_label(store, latency_ms, workers)) {
                    continue;
                }
                let measured = keyturn_throughput(&knobs, workers, store, latency_ms).await;
                eprintln!(
                    "keyturn ×{workers} {} {latency_ms} ms: {}",
                    store.name(),
                    measured.collected.summary()
                );
                fleets.push(measured);
            }
        }
    }

    let rate = if knobs.runs("rate") {
        let rate = rate_fidelity(&knobs).await;
        match rate.fidelity() {
            Some((per_second, ratio)) => eprintln!(
                "rate fidelity: {per_second:.2} calls/s in the steady state = {ratio:.3} of the limit"
            ),
            None => eprintln!("rate fidelity: too few calls to measure"),
        }
        Some(rate)
    } else {
        None
    };

    println!();
    println!("{header}");
    println!();
    print_throughput(&knobs, &raw, &fleets);
    println!();
    if let Some(rate) = &rate {
        print_rate(rate);
        println!();
    }
    print_workers(&knobs, &raw, &fleets, rate.as_ref());
    println!();
    println!(
        "Whole bench: {:.0} s. Jobs: {} per 0 ms row, workers × {} × {} per 50 ms row, {} for the rate run; worker.concurrency {}, prefetch {}, window {} × consumers × prefetch.",
        started.elapsed().as_secs_f64(),
        knobs.jobs_0ms,
        knobs.concurrency,
        knobs.rounds_50ms,
        knobs.rate_jobs,
        knobs.concurrency,
        knobs.prefetch,
        knobs.window_factor,
    );
}

// ---------------------------------------------------------------------------------------------
// Machine

fn header_line() -> String {
    let nproc = std::process::Command::new("nproc")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!(
        "keyturn fleet bench, {} — nproc {nproc}, CPU {cpu}, load average at start {load}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
    )
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU time (clock ticks) of every process named `command` on this host (`beam.smp`: the
/// broker's nodes; `postgres`: PostgreSQL's server and its backends), with the CPU time of the
/// children the topmost of them reaped: a backend that exited between two readings still counts
/// (in its postmaster's), so the total only grows.
fn cpu_ticks_of(command: &str) -> Option<u64> {
    let named = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim() == command)
    };
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if !named(pid) {
            continue;
        }
        let Some(fields) = stat_fields(pid) else {
            continue;
        };
        let field = |index: usize| fields.get(index).and_then(|f| f.parse::<u64>().ok());
        // Fields after the command name: ppid is field 4, utime 14, stime 15, cutime 16, cstime 17.
        let mut ticks = field(11).unwrap_or(0) + field(12).unwrap_or(0);
        if !field(1).is_some_and(|parent| named(parent as u32)) {
            ticks += field(13).unwrap_or(0) + field(14).unwrap_or(0);
        }
        *total.get_or_insert(0) += ticks;
    }
    total
}

/// CPU time read at one moment from the shared processes of the host: the broker, PostgreSQL
/// and this bench process itself (the harness, and in the raw loop its consumers too).
#[derive(Clone, Copy)]
struct CpuMark {
    broker: Option<u64>,
    postgres: Option<u64>,
    harness: Option<u64>,
}

/// CPU seconds since a [`CpuMark`]: `None` where a reading is missing.
#[derive(Clone, Copy, Default)]
struct CpuSince {
    broker: Option<f64>,
    postgres: Option<f64>,
    harness: Option<f64>,
}

impl CpuMark {
    fn now() -> CpuMark {
        CpuMark {
            broker: cpu_ticks_of("beam.smp"),
            postgres: cpu_ticks_of("postgres"),
            harness: process_usage(std::process::id()).map(|(_, cpu)| cpu),
        }
    }

    fn elapsed(&self) -> CpuSince {
        let now = CpuMark::now();
        let ticks = clock_ticks_per_second();
        let since = |now: Option<u64>, start: Option<u64>| {
            now.zip(start)
                .map(|(now, start)| now.saturating_sub(start) as f64 / ticks)
        };
        CpuSince {
            broker: since(now.broker, self.broker),
            postgres: since(now.postgres, self.postgres),
            harness: since(now.harness, self.harness),
        }
    }
}

/// The fields of /proc/<pid>/stat after the command name (which may hold spaces): index 0 is
/// field 3, the state.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Peak RSS (VmHWM, KiB) and CPU time (utime + stime, clock ticks) of a live process.
fn process_usage(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    // utime is field 14, stime 15.
    let fields = stat_fields(pid)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((hwm, utime + stime))
}

// ---------------------------------------------------------------------------------------------
// Broker plumbing shared by every configuration

fn unique(label: &str) -> String {
    format!(
        "kt-fleet-{}-{label}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn names(knobs: &Knobs, tag: &str) -> AmqpSettings {
    let mut names = AmqpSettings {
        url: knobs.amqp_url.clone(),
        ..AmqpSettings::default()
    };
    names.name_under(tag);
    names
}

/// The harness's side of one configuration: keyturn's topology, an events queue bound to the
/// results exchange (`job.#`), a confirm-mode channel publishing jobs and a consumer of events.
struct Harness {
    names: AmqpSettings,
    events_queue: String,
    connection: Connection,
    channel: Channel,
    publisher: Channel,
    events: Consumer,
}

impl Harness {
    async fn open(names: AmqpSettings, tag: &str) -> Harness {
        let connection = Connection::connect(&names.url, ConnectionProperties::default())
            .await
            .expect("the harness connects to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        keyturn::amqp::topology::declare(&channel, &names)
            .await
            .expect("topology");
        let events_queue = format!("{tag}.events");
        channel
            .queue_declare(
                events_queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .expect("events queue");
        channel
            .queue_bind(
                events_queue.as_str().into(),
                names.results_exchange.as_str().into(),
                "job.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind events");
        let publisher = connection.create_channel().await.expect("channel");
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let consuming = connection.create_channel().await.expect("channel");
        let events = consuming
            .basic_consume(
                events_queue.as_str().into(),
                "kt-fleet-events".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume events");
        Harness {
            names,
            events_queue,
            connection,
            channel,
            publisher,
            events,
        }
    }

    async fn consumers(&self) -> u32 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        self.channel
            .queue_declare(
                self.names.jobs_queue.as_str().into(),
                passive,
                FieldTable::default(),
            )
            .await
            .map(|queue| queue.consumer_count())
            .unwrap_or(0)
    }

    async fn publish(&self, body: &[u8]) -> PublisherConfirm {
        self.publisher
            .basic_publish(
                "".into(),
                self.names.jobs_queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish a job")
    }

    async fn close(self) {
        let _ = self
            .channel
            .queue_delete(
                self.events_queue.as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
        if let Err(error) = keyturn::amqp::topology::delete(&self.channel, &self.names).await {
            eprintln!(
                "deleting the topology of {}: {error}",
                self.names.jobs_queue
            );
        }
        let _ = self.connection.close(200, "bench done".into()).await;
    }
}

/// Jobs numbered `from..from + count` of run `tag`, each for an instance of its own, all "on".
fn jobs(tag: &str, from: usize, count: usize) -> Vec<(String, Vec<u8>)> {
    (from..from + count)
        .map(|n| {
            let job_id = format!("{tag}-{n}");
            let body = json!({
                "job_id": job_id, "region": "cn-north-4", "project_id": PROJECT,
                "instance_id": format!("{n:032x}in07"), "encryption_status": "on",
                "type": "kms", "kms_key_id": KMS_KEY,
            });
            (job_id, body.to_string().into_bytes())
        })
        .collect()
}

/// What the collector saw of one batch of jobs.
#[derive(Default)]
struct Collected {
    jobs: usize,
    received: usize,
    latencies_ms: Vec<f64>,
    in_worker_ms: Vec<f64>,
    elapsed: Duration,
    not_succeeded: usize,
    duplicates: usize,
    nacked: usize,
    stalled: bool,
}

impl Collected {
    fn per_second(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.received as f64 / self.elapsed.as_secs_f64()
        }
    }

    fn summary(&self) -> String {
        format!(
            "{}/{} jobs, {:.0} jobs/s, p50 {:.1} ms, p99 {:.1} ms{}",
            self.received,
            self.jobs,
            self.per_second(),
            percentile(&self.latencies_ms, 0.5),
            percentile(&self.latencies_ms, 0.99),
            self.notes()
                .map(|notes| format!(" ({notes})"))
                .unwrap_or_default()
        )
    }

    fn notes(&self) -> Option<String> {
        let mut notes = Vec::new();
        if self.stalled {
            notes.push(format!(
                "INCOMPLETE: {} of {} results, none for {} s",
                self.received,
                self.jobs,
                STALL.as_secs()
            ));
        }
        if self.not_succeeded > 0 {
            notes.push(format!("{} not succeeded", self.not_succeeded));
        }
        if self.duplicates > 0 {
            notes.push(format!("{} duplicate events", self.duplicates));
        }
        if self.nacked > 0 {
            notes.push(format!("{} job publishes not confirmed", self.nacked));
        }
        (!notes.is_empty()).then(|| notes.join("; "))
    }
}

/// Nearest-rank percentile of unsorted values; 0 for none.
fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Publishes `batch` with at most `window` jobs outstanding and collects their result events;
/// `sources` counts every event by its `source` (the worker that published it).
async fn drive(
    harness: &mut Harness,
    batch: &[(String, Vec<u8>)],
    window: usize,
    sources: &mut HashMap<String, usize>,
) -> Collected {
    let index: HashMap<&str, usize> = batch
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
        .collect();
    let mut published_at: Vec<Option<Instant>> = vec![None; batch.len()];
    let mut done = vec![false; batch.len()];
    let mut confirms = Vec::with_capacity(batch.len());
    let mut collected = Collected {
        jobs: batch.len(),
        ..Collected::default()
    };
    let start = Instant::now();
    let mut next = 0;
    while next < window.min(batch.len()) {
        published_at[next] = Some(Instant::now());
        confirms.push(harness.publish(&batch[next].1).await);
        next += 1;
    }
    let mut last = start;
    while collected.received < batch.len() {
        let delivery = match tokio::time::timeout(STALL, harness.events.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(error))) => {
                eprintln!("the events consumer failed: {error}");
                collected.stalled = true;
                break;
            }
            Ok(None) | Err(_) => {
                collected.stalled = true;
                break;
            }
        };
        let now = Instant::now();
        let Ok(event) = serde_json::from_slice::<Value>(&delivery.data) else {
            continue;
        };
        if let Some(source) = event["source"].as_str() {
            *sources.entry(source.to_owned()).or_default() += 1;
        }
        let data = &event["data"];
        let Some(&i) = data["job_id"].as_str().and_then(|id| index.get(id)) else {
            continue;
        };
        if done[i] {
            collected.duplicates += 1;
            continue;
        }
        done[i] = true;
        collected.received += 1;
        last = now;
        if let Some(at) = published_at[i] {
            collected
                .latencies_ms
                .push(now.duration_since(at).as_secs_f64() * 1e3);
        }
        if let Some(ms) = data["duration_ms"].as_u64() {
            collected.in_worker_ms.push(ms as f64);
        }
        if data["outcome"].as_str() != Some("succeeded") {
            collected.not_succeeded += 1;
        }
        if next < batch.len() {
            published_at[next] = Some(Instant::now());
            confirms.push(harness.publish(&batch[next].1).await);
            next += 1;
        }
    }
    collected.elapsed = last.duration_since(start);
    for confirm in confirms {
        if !confirm.await.is_ok_and(|c| c.is_ack()) {
            collected.nacked += 1;
        }
    }
    collected
}

/// Waits until `expected` consumers read the jobs queue.
async fn wait_for_consumers(harness: &Harness, expected: u32) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if harness.consumers().await >= expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{expected} consumers did not appear on {} within 120 s",
            harness.names.jobs_queue
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The raw lapin loop

/// The raw loop's run with the median jobs/s of [`RAW_RUNS`], and every run's jobs/s.
struct RawMeasured {
    /// The run with the median jobs/s.
    median: RawRun,
    all_per_second: Vec<f64>,
}

/// One raw run: its results, its CPU (the broker's, and this process's: harness and raw
/// consumers) and the jobs it handled, warm-up included (what the CPU is divided by).
struct RawRun {
    collected: Collected,
    cpu: CpuSince,
    jobs_run: usize,
}

impl RawMeasured {
    fn median_of(mut runs: Vec<RawRun>) -> RawMeasured {
        runs.sort_by(|a, b| {
            a.collected
                .per_second()
                .total_cmp(&b.collected.per_second())
        });
        let all_per_second = runs.iter().map(|r| r.collected.per_second()).collect();
        RawMeasured {
            median: runs.swap_remove(runs.len() / 2),
            all_per_second,
        }
    }
}

async fn raw_loop(knobs: &Knobs, consumers: usize) -> RawRun {
    let tag = unique(&format!("raw{consumers}"));
    let mark = CpuMark::now();
    let mut harness = Harness::open(names(knobs, &tag), &tag).await;
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for n in 0..consumers {
        tasks.push(tokio::spawn(raw_consumer(
            harness.names.clone(),
            knobs.prefetch,
            knobs.raw_delay,
            format!("/raw/{tag}/{n}"),
            stop.clone(),
        )));
    }
    wait_for_consumers(&harness, consumers as u32).await;
    let window = knobs.window(consumers);
    let mut sources = HashMap::new();
    let warm = drive(&mut harness, &jobs(&tag, 0, window), window, &mut sources).await;
    assert!(!warm.stalled, "the raw loop's warm-up stalled");
    let batch = jobs(&tag, window, knobs.jobs_0ms);
    let collected = drive(&mut harness, &batch, window, &mut sources).await;
    // Read before the consumers stop, as a fleet's is read before its workers stop.
    let cpu = mark.elapsed();
    stop.cancel();
    for task in tasks {
        if let Ok(Err(error)) = task.await {
            eprintln!("a raw consumer failed: {error}");
        }
    }
    harness.close().await;
    RawRun {
        jobs_run: window + collected.received,
        collected,
        cpu,
    }
}

/// One consumer of the raw loop: consume (prefetch), publish one confirmed event per delivery,
/// wait for its confirm, ack.
async fn raw_consumer(
    names: AmqpSettings,
    prefetch: u16,
    delay: Duration,
    source: String,
    stop: CancellationToken,
) -> lapin::Result<()> {
    let consume = Connection::connect(&names.url, ConnectionProperties::default()).await?;
    let channel = consume.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let publish = Connection::connect(&names.url, ConnectionProperties::default()).await?;
    let events = publish.create_channel().await?;
    events
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut deliveries = channel
        .basic_consume(
            names.jobs_queue.as_str().into(),
            format!("kt-raw-{}", uuid::Uuid::new_v4().simple())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut handlers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
            next = deliveries.next() => {
                let Some(delivery) = next else { break };
                let delivery = delivery?;
                let events = events.clone();
                let exchange = names.results_exchange.clone();
                let source = source.clone();
                handlers.spawn(async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let job: Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
                    let event = json!({
                        "specversion": "1.0", "source": source,
                        "data": {"job_id": job["job_id"], "outcome": "succeeded"},
                    });
                    let confirmed = events
                        .basic_publish(
                            exchange.as_str().into(),
                            "job.succeeded.cn-north-4".into(),
                            BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                            event.to_string().as_bytes(),
                            BasicProperties::default()
                                .with_content_type("application/cloudevents+json".into())
                                .with_delivery_mode(2),
                        )
                        .await?
                        .await?;
                    if confirmed.is_ack() {
                        delivery.acker.ack(BasicAckOptions::default()).await?;
                    }
                    lapin::Result::Ok(())
                });
            }
        }
    }
    handlers.shutdown().await;
    let _ = consume.close(200, "bench done".into()).await;
    let _ = publish.close(200, "bench done".into()).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// keyturn processes

/// A `keyturn` command with a clean environment, the shipped configuration and the bench's
/// credentials, its output appended to `log`.
fn keyturn_command(log: &Path) -> Command {
    let mut command = Command::new(BINARY);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEYTURN_CONFIG", CONFIG)
        .env("KEYTURN_LOG__LEVEL", "warn")
        .env("CLOUD_SDK_AK", AK)
        .env("CLOUD_SDK_SK", SK)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .kill_on_drop(true);
    command
}

/// Settings from the bench's own environment for the workers it starts: each
/// `KEYTURN_<SECTION>__<KEY>` variable (`KEYTURN_AUDIT__SYNCHRONOUS=normal`, say), for
/// experiments. Not `store.url` (the bench sets it for the PostgreSQL rows only, and one passed
/// to a SQLite row would run it on PostgreSQL) nor `log.level`; what the bench sets per run
/// (URLs, ids, paths, concurrency, prefetch, limits) is set after these and wins.
fn passed_settings() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(name, _)| {
            name.starts_with("KEYTURN_")
                && name.contains("__")
                && !matches!(name.as_str(), "KEYTURN_STORE__URL" | "KEYTURN_LOG__LEVEL")
        })
        .collect()
}

struct SimulatorProcess {
    child: Child,
    url: String,
}

async fn start_simulator(latency_ms: u64, log: &Path) -> SimulatorProcess {
    let mut command = keyturn_command(log);
    command
        .args(["simulator", "--listen", "127.0.0.1:0", "--latency-ms"])
        .arg(latency_ms.to_string())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start the simulator");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some((_, url)) = line.split_once("listening on ") {
                return url.trim().to_owned();
            }
        }
        panic!("the simulator exited before listening")
    })
    .await
    .expect("the simulator listens within 30 s");
    // Keep its stderr flowing into the log so the pipe never fills.
    let log = log.to_owned();
    tokio::spawn(async move {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).ok();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(file) = file.as_mut() {
                let _ = writeln!(file, "{line}");
            }
        }
    });
    SimulatorProcess { child, url }
}

struct WorkerProcess {
    id: String,
    child: Child,
    log: PathBuf,
}

/// One worker process's figures, read just before it was stopped.
#[derive(Clone)]
struct WorkerUsage {
    jobs_run: usize,
    peak_rss_kib: u64,
    cpu_seconds: f64,
}

/// What one row's processes used: each worker, the simulator, and the broker's, PostgreSQL's
/// and the harness's CPU time over the row (every `beam.smp` or `postgres` process on the host,
/// and this bench process, from the fleet's start to its stop).
struct Usage {
    workers: Vec<WorkerUsage>,
    simulator_cpu_seconds: Option<f64>,
    shared: CpuSince,
}

impl Usage {
    fn jobs_run(&self) -> usize {
        self.workers.iter().map(|w| w.jobs_run).sum()
    }
}

/// `seconds` of CPU as ms per job of `jobs` ("—" for none).
fn cpu_ms_per_job(seconds: f64, jobs: usize) -> String {
    match jobs {
        0 => "—".to_owned(),
        jobs => format!("{:.2}", seconds * 1e3 / jobs as f64),
    }
}

/// A running deployment: simulator, store, worker processes and the harness's broker side.
struct Fleet {
    harness: Harness,
    simulator: SimulatorProcess,
    workers: Vec<WorkerProcess>,
    postgres: Option<TestDatabase>,
    sources: HashMap<String, usize>,
    cpu_at_start: CpuMark,
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(
        knobs: &Knobs,
        label: &str,
        workers: usize,
        store: StoreKind,
        latency_ms: u64,
        limits: &[(&str, String)],
    ) -> Fleet {
        let tag = unique(label);
        let cpu_at_start = CpuMark::now();
        let dir = tempfile::tempdir().expect("temp dir");
        let harness = Harness::open(names(knobs, &tag), &tag).await;
        let simulator = start_simulator(latency_ms, &dir.path().join("simulator.log")).await;
        let postgres = (store == StoreKind::Postgres).then(|| TestDatabase::create("bench"));
        let audit = dir.path().join("audit.db");
        let mut processes = Vec::new();
        for n in 0..workers {
            let id = format!("{tag}-w{n}");
            let log = dir.path().join(format!("worker-{n}.log"));
            let amqp = &harness.names;
            let mut command = keyturn_command(&log);
            command
                .arg("worker")
                .envs(passed_settings())
                .env("KEYTURN_AMQP__URL", &amqp.url)
                .envs(amqp.topology_env())
                .env("KEYTURN_WORKER__ID", &id)
                .env("KEYTURN_WORKER__CONCURRENCY", knobs.concurrency.to_string())
                .env("KEYTURN_WORKER__PREFETCH", knobs.prefetch.to_string())
                .env("KEYTURN_API__ENDPOINT", &simulator.url)
                .env("KEYTURN_AUDIT__PATH", &audit)
                .env("KEYTURN_OPS__LISTEN", "");
            if let Some(db) = &postgres {
                command.env("KEYTURN_STORE__URL", &db.url);
            }
            for (name, value) in limits {
                command.env(name, value);
            }
            let child = command.spawn().expect("start a worker");
            processes.push(WorkerProcess { id, child, log });
        }
        let fleet = Fleet {
            harness,
            simulator,
            workers: processes,
            postgres,
            sources: HashMap::new(),
            cpu_at_start,
            _dir: dir,
        };
        fleet.wait_ready(workers).await
    }

    async fn wait_ready(mut self, workers: usize) -> Fleet {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.harness.consumers().await < workers as u32 {
            for worker in &mut self.workers {
                if let Ok(Some(status)) = worker.child.try_wait() {
                    let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
                    panic!(
                        "worker {} exited ({status}) before consuming:\n{log}",
                        worker.id
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "{workers} workers did not consume within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self
    }

    async fn drive(&mut self, batch: &[(String, Vec<u8>)], window: usize) -> Collected {
        drive(&mut self.harness, batch, window, &mut self.sources).await
    }

    /// Reads each worker's usage, stops it with SIGTERM, then removes everything the run made.
    async fn stop(mut self) -> Usage {
        let ticks = clock_ticks_per_second();
        let simulator_cpu_seconds = self
            .simulator
            .child
            .id()
            .and_then(process_usage)
            .map(|(_, cpu)| cpu as f64 / ticks);
        let shared = self.cpu_at_start.elapsed();
        let mut usage = Vec::new();
        for worker in &mut self.workers {
            let (peak_rss_kib, cpu_ticks) =
                worker.child.id().and_then(process_usage).unwrap_or((0, 0));
            usage.push(WorkerUsage {
                jobs_run: self
                    .sources
                    .get(&format!("/keyturn/worker/{}", worker.id))
                    .copied()
                    .unwrap_or(0),
                peak_rss_kib,
                cpu_seconds: cpu_ticks as f64 / ticks,
            });
        }
        for worker in &self.workers {
            terminate(&worker.child);
        }
        for worker in &mut self.workers {
            match tokio::time::timeout(Duration::from_secs(60), worker.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => eprintln!("worker {} exited with {status}", worker.id),
                _ => {
                    eprintln!("worker {} did not stop within 60 s; killed", worker.id);
                    let _ = worker.child.kill().await;
                }
            }
        }
        for worker in &self.workers {
            let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
            if !log.trim().is_empty() {
                let lines: Vec<&str> = log.lines().collect();
                eprintln!(
                    "worker {} logged {} line(s), the first: {}",
                    worker.id,
                    lines.len(),
                    lines
                        .iter()
                        .take(3)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
            }
        }
        terminate(&self.simulator.child);
        if tokio::time::timeout(Duration::from_secs(10), self.simulator.child.wait())
            .await
            .is_err()
        {
            let _ = self.simulator.child.kill().await;
        }
        self.harness.close().await;
        // Dropping the database after its workers stopped (it is dropped WITH (FORCE) anyway).
        drop(self.postgres.take());
        Usage {
            workers: usage,
            simulator_cpu_seconds,
            shared,
        }
    }
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
}

fn throughput_limits() -> Vec<(&'static str, String)> {
    // On PostgreSQL every call also takes its tokens from the store's shared buckets: far above
    // anything reachable here, so only the work itself limits the rate.
    [
        "KEYTURN_RATE_LIMIT__PER_SECOND",
        "KEYTURN_RATE_LIMIT__BURST",
        "KEYTURN_RATE_LIMIT__PER_PROJECT_PER_SECOND",
        "KEYTURN_RATE_LIMIT__PER_PROJECT_BURST",
    ]
    .into_iter()
    .map(|name| (name, HIGH_LIMIT.to_owned()))
    .collect()
}

struct FleetMeasured {
    workers: usize,
    store: StoreKind,
    latency_ms: u64,
    collected: Collected,
    usage: Usage,
}

async fn keyturn_throughput(
    knobs: &Knobs,
    workers: usize,
    store: StoreKind,
    latency_ms: u64,
) -> FleetMeasured {
    let label = format!(
        "{}{workers}-{latency_ms}ms",
        match store {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "pg",
        }
    );
    let mut fleet = Fleet::start(
        knobs,
        &label,
        workers,
        store,
        latency_ms,
        &throughput_limits(),
    )
    .await;
    let window = knobs.window(workers);
    let tag = label.clone();
    let warm = fleet.drive(&jobs(&tag, 0, window), window).await;
    if warm.stalled {
        eprintln!("warm-up of {label} stalled: {}", warm.summary());
    }
    let batch = jobs(&tag, window, knobs.jobs_for(workers, latency_ms));
    let collected = fleet.drive(&batch, window).await;
    let usage = fleet.stop().await;
    FleetMeasured {
        workers,
        store,
        latency_ms,
        collected,
        usage,
    }
}

// ---------------------------------------------------------------------------------------------
// Rate fidelity

struct RateMeasured {
    collected: Collected,
    /// Modify (POST) answer times, milliseconds since the epoch, sorted.
    modify_at_ms: Vec<i64>,
    /// All API requests the simulator counted (`recent` keeps the last 1,000).
    requests: u64,
    usage: Usage,
}

/// The first call of the steady state: after the burst's calls and one second of calls more.
const STEADY_FROM: usize = (RATE_BURST + RATE_PER_SECOND) as usize;

impl RateMeasured {
    /// The fidelity: calls/s from the steady state's first call to the last, ÷ the limit.
    fn fidelity(&self) -> Option<(f64, f64)> {
        self.rate_from(STEADY_FROM)
    }

    /// Calls/s from call `from` (by arrival) to the last, and that ÷ the limit.
    fn rate_from(&self, from: usize) -> Option<(f64, f64)> {
        let at = &self.modify_at_ms;
        if at.len() < from + 2 {
            return None;
        }
        let span_ms = (at[at.len() - 1] - at[from]) as f64;
        if span_ms <= 0.0 {
            return None;
        }
        let rate = (at.len() - 1 - from) as f64 / (span_ms / 1e3);
        Some((rate, rate / f64::from(RATE_PER_SECOND)))
    }

    /// The least-squares slope of call number over time for the calls after the first `burst`
    /// (calls/s): less moved by when the first and last of them happened to arrive.
    fn slope(&self) -> Option<f64> {
        let at = self.modify_at_ms.get(RATE_BURST as usize..)?;
        if at.len() < 2 {
            return None;
        }
        let n = at.len() as f64;
        let mean_t = at.iter().map(|t| (t - at[0]) as f64).sum::<f64>() / n;
        let mean_k = (n - 1.0) / 2.0;
        let (mut covariance, mut variance) = (0.0, 0.0);
        for (k, t) in at.iter().enumerate() {
            let dt = (t - at[0]) as f64 - mean_t;
            covariance += dt * (k as f64 - mean_k);
            variance += dt * dt;
        }
        (variance > 0.0).then(|| covariance / variance * 1e3)
    }

    /// The most calls in one calendar second, and in any sliding 1-s window.
    fn busiest(&self) -> (usize, usize) {
        let mut per_second: HashMap<i64, usize> = HashMap::new();
        for at in &self.modify_at_ms {
            *per_second.entry(at.div_euclid(1000)).or_default() += 1;
        }
        let calendar = per_second.values().copied().max().unwrap_or(0);
        let at = &self.modify_at_ms;
        let mut sliding = 0;
        let mut first = 0;
        for last in 0..at.len() {
            while at[last] - at[first] >= 1000 {
                first += 1;
            }
            sliding = sliding.max(last - first + 1);
        }
        (calendar, sliding)
    }
}

async fn rate_fidelity(knobs: &Knobs) -> RateMeasured {
    let limits = vec![
        (
            "KEYTURN_RATE_LIMIT__PER_SECOND",
            RATE_PER_SECOND.to_string(),
        ),
        ("KEYTURN_RATE_LIMIT__BURST", RATE_BURST.to_string()),
        (
            "KEYTURN_RATE_LIMIT__PER_PROJECT_PER_SECOND",
            HIGH_LIMIT.to_owned(),
        ),
        (
            "KEYTURN_RATE_LIMIT__PER_PROJECT_BURST",
            HIGH_LIMIT.to_owned(),
        ),
    ];
    let mut fleet =
        Fleet::start(knobs, "rate", RATE_WORKERS, StoreKind::Postgres, 0, &limits).await;
    let tag = "rate".to_owned();
    let batch = jobs(&tag, 0, knobs.rate_jobs);
    // Everything at once: the workers always have jobs waiting for tokens.
    let collected = fleet.drive(&batch, batch.len()).await;
    let stats: Option<keyturn::simulator::Stats> = async {
        reqwest::get(format!("{}/_simulator/stats", fleet.simulator.url))
            .await
            .ok()?
            .json()
            .await
            .ok()
    }
    .await;
    let usage = fleet.stop().await;
    let (mut modify_at_ms, requests) = match stats {
        Some(stats) => (
            stats
                .recent
                .iter()
                .filter(|r| r.method == "POST")
                .map(|r| r.at_ms)
                .collect::<Vec<_>>(),
            stats.requests,
        ),
        None => {
            eprintln!("the simulator's stats could not be read");
            (Vec::new(), 0)
        }
    };
    modify_at_ms.sort_unstable();
    RateMeasured {
        collected,
        modify_at_ms,
        requests,
        usage,
    }
}

// ---------------------------------------------------------------------------------------------
// Tables

fn ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// Whether a fidelity is in [0.98, 1.00] as printed (three decimals): a slope of 60.002/s is
/// 1.000, not a miss; the timestamps are whole milliseconds anyway.
fn within_fidelity_target(fidelity: f64) -> bool {
    let shown = (fidelity * 1e3).round() / 1e3;
    (0.98..=1.0).contains(&shown)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "missed" }
}

/// How the raw loop's rows say that its consumers waited before each event (nothing if not).
fn raw_delay_note(knobs: &Knobs) -> String {
    if knobs.raw_delay.is_zero() {
        String::new()
    } else {
        format!(", waiting {} ms per job", knobs.raw_delay.as_millis())
    }
}

fn print_throughput(knobs: &Knobs, raw: &HashMap<usize, RawMeasured>, fleets: &[FleetMeasured]) {
    println!(
        "| run | workers | store | API latency | jobs | jobs/s | p50 ms | p99 ms | in-worker p50 / p99 ms | ratio | target |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for consumers in WORKER_COUNTS {
        let Some(measured) = raw.get(&consumers) else {
            continue;
        };
        let c = &measured.median.collected;
        let runs: Vec<String> = measured
            .all_per_second
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect();
        println!(
            "| raw lapin loop{} | {consumers} consumer{} | — | — | {} | {:.0} | {} | {} | — | median of {RAW_RUNS} runs: {} jobs/s | —{} |",
            raw_delay_note(knobs),
            if consumers == 1 { "" } else { "s" },
            c.received,
            c.per_second(),
            ms(percentile(&c.latencies_ms, 0.5)),
            ms(percentile(&c.latencies_ms, 0.99)),
            runs.join(" / "),
            c.notes().map(|n| format!(" ({n})")).unwrap_or_default(),
        );
    }
    for fleet in fleets {
        let c = &fleet.collected;
        let (ratio, target) = if fleet.latency_ms == 0 {
            match raw.get(&fleet.workers) {
                Some(raw) if raw.median.collected.per_second() > 0.0 => {
                    let ratio = c.per_second() / raw.median.collected.per_second();
                    let target = match fleet.store {
                        _ if !knobs.raw_delay.is_zero() => format!(
                            "(none: the raw loop waited {} ms per job)",
                            knobs.raw_delay.as_millis()
                        ),
                        StoreKind::Sqlite => format!("≥ 0.5× raw: {}", met(ratio >= 0.5)),
                        StoreKind::Postgres => "(none; SQLite's is ≥ 0.5× raw)".to_owned(),
                    };
                    (format!("{ratio:.2}× raw"), target)
                }
                _ => ("?".to_owned(), String::new()),
            }
        } else {
            let ideal = fleet.workers as f64 * f64::from(knobs.concurrency)
                / (fleet.latency_ms as f64 / 1e3);
            let ratio = c.per_second() / ideal;
            (
                format!("{ratio:.2} of ideal {ideal:.0}/s"),
                format!("≥ 0.9 of ideal: {}", met(ratio >= 0.9)),
            )
        };
        println!(
            "| keyturn | {} | {} | {} ms | {} | {:.0} | {} | {} | {} / {} | {ratio} | {target}{} |",
            fleet.workers,
            fleet.store.name(),
            fleet.latency_ms,
            c.received,
            c.per_second(),
            ms(percentile(&c.latencies_ms, 0.5)),
            ms(percentile(&c.latencies_ms, 0.99)),
            ms(percentile(&c.in_worker_ms, 0.5)),
            ms(percentile(&c.in_worker_ms, 0.99)),
            c.notes().map(|n| format!(" ({n})")).unwrap_or_default(),
        );
    }
}

fn print_rate(rate: &RateMeasured) {
    let c = &rate.collected;
    println!(
        "| rate fidelity: {RATE_WORKERS} workers, PostgreSQL, limit {RATE_PER_SECOND}/s burst {RATE_BURST} | value | target |"
    );
    println!("|---|---|---|");
    println!(
        "| jobs finished | {} of {}{} | |",
        c.received,
        c.jobs,
        c.notes().map(|n| format!(" ({n})")).unwrap_or_default()
    );
    println!(
        "| Modify calls in the simulator's log | {} (of {} API requests it counted) | |",
        rate.modify_at_ms.len(),
        rate.requests
    );
    let rows = [
        (
            STEADY_FROM,
            format!(
                "steady: calls/s from call {STEADY_FROM} (the burst and one second after it) to the last (simulator's clock) ÷ {RATE_PER_SECOND}"
            ),
        ),
        (
            RATE_BURST as usize,
            format!(
                "the same from call {RATE_BURST}, the first after the burst (start-up included)"
            ),
        ),
    ];
    for (from, label) in rows {
        match rate.rate_from(from) {
            Some((per_second, fidelity)) => println!(
                "| {label} | {per_second:.2}/s = {fidelity:.3} | [0.98, 1.00]: {} |",
                met(within_fidelity_target(fidelity))
            ),
            None => println!("| {label} | not measurable | [0.98, 1.00] |"),
        }
    }
    if let Some(slope) = rate.slope() {
        let fidelity = slope / f64::from(RATE_PER_SECOND);
        println!(
            "| the same as a least-squares slope over those calls ÷ {RATE_PER_SECOND} | {slope:.2}/s = {fidelity:.3} | [0.98, 1.00]: {} |",
            met(within_fidelity_target(fidelity))
        );
    }
    let (calendar, sliding) = rate.busiest();
    println!(
        "| busiest calendar second | {calendar} calls | ≤ {} (rate + burst) |",
        RATE_PER_SECOND + RATE_BURST
    );
    println!(
        "| busiest sliding 1-s window | {sliding} calls | ≤ {} |",
        RATE_PER_SECOND + RATE_BURST
    );
    println!(
        "| job latency p50 / p99 (queue wait for tokens included) | {} / {} ms | |",
        ms(percentile(&c.latencies_ms, 0.5)),
        ms(percentile(&c.latencies_ms, 0.99))
    );
}

fn print_workers(
    knobs: &Knobs,
    raw: &HashMap<usize, RawMeasured>,
    fleets: &[FleetMeasured],
    rate: Option<&RateMeasured>,
) {
    println!(
        "| processes | jobs run, per worker | peak RSS MiB (VmHWM), per worker | CPU ms per job run, per worker | RSS ≤ 50 MiB | simulator CPU ms per job | broker CPU ms per job | PostgreSQL CPU ms per job | harness CPU ms per job |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let shared = |cpu: Option<f64>, jobs: usize| {
        cpu.map_or("not read".to_owned(), |seconds| {
            cpu_ms_per_job(seconds, jobs)
        })
    };
    for consumers in WORKER_COUNTS {
        let Some(measured) = raw.get(&consumers) else {
            continue;
        };
        println!(
            "| raw lapin loop{}, {consumers} consumer{} (its median run; the consumers run in the harness) | — | — | — | — | — | {} | — | {} |",
            raw_delay_note(knobs),
            if consumers == 1 { "" } else { "s" },
            shared(measured.median.cpu.broker, measured.median.jobs_run),
            shared(measured.median.cpu.harness, measured.median.jobs_run),
        );
    }
    let mut rows: Vec<(String, &Usage)> = fleets
        .iter()
        .map(|f| {
            (
                format!("{} × {}, {} ms", f.workers, f.store.name(), f.latency_ms),
                &f.usage,
            )
        })
        .collect();
    if let Some(rate) = rate {
        rows.push((
            format!("{RATE_WORKERS} × PostgreSQL, rate fidelity run"),
            &rate.usage,
        ));
    }
    for (label, usage) in rows {
        let join = |values: Vec<String>| values.join(" / ");
        let workers = &usage.workers;
        let peak = workers.iter().map(|u| u.peak_rss_kib).max().unwrap_or(0);
        let jobs = usage.jobs_run();
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} |",
            join(workers.iter().map(|u| u.jobs_run.to_string()).collect()),
            join(
                workers
                    .iter()
                    .map(|u| format!("{:.1}", u.peak_rss_kib as f64 / 1024.0))
                    .collect()
            ),
            join(
                workers
                    .iter()
                    .map(|u| cpu_ms_per_job(u.cpu_seconds, u.jobs_run))
                    .collect()
            ),
            met(peak > 0 && peak <= 50 * 1024),
            shared(usage.simulator_cpu_seconds, jobs),
            shared(usage.shared.broker, jobs),
            shared(usage.shared.postgres, jobs),
            shared(usage.shared.harness, jobs),
        );
    }
}
