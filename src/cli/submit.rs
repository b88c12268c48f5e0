//! `keyturn submit FILE`: a rollout from a CSV or JSON-lines list of instances.
//!
//! The order is what makes it safe: every line is checked with the worker's own parser and the
//! plan with the worker's own command parser before anything is published, so a bad file
//! publishes nothing. Then the declaration goes to the control queue and the jobs follow only
//! once a worker answered that it applied it (a rollout's budget and canary must be in force
//! before its first job arrives). Job ids are `<rollout>:<instance_id>`, so submitting the same
//! file twice is harmless. Exit codes as `keyturn rollout` (see [`super::rollout`]).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};
use serde_json::{Value, json};

use super::rollout::{NO_ANSWER, REFUSED, control_failure, verdict};
use crate::amqp::control::ControlClient;
use crate::config::Settings;
use crate::gaussdb::Client;
use crate::gaussdb::client::CallError;
use crate::job::{Job, ParseContext, Status};
use crate::limits::Limits;
use crate::plan_file::{self, Counts, Defaults, FileJob, Format};
use crate::rollout::{self, Command, Plan};

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// CSV with a header (region,project_id,instance_id[,encryption_status][,kms_key_id]) or
    /// JSON lines with the same keys.
    file: PathBuf,
    /// The rollout id; job ids are <rollout>:<instance_id>.
    #[arg(long)]
    rollout: String,
    /// Target state for lines without encryption_status.
    #[arg(long, value_parser = ["on", "off"])]
    status: Option<String>,
    /// KMS key (UUID) for `on` lines without kms_key_id.
    #[arg(long)]
    kms_key: Option<String>,
    /// Ticket reference, echoed in events and the audit.
    #[arg(long)]
    ticket: Option<String>,
    /// Who asks.
    #[arg(long)]
    requested_by: Option<String>,
    /// Failures tolerated: a count (25) or a percentage of the jobs (2%, rounded down).
    #[arg(long)]
    failure_budget: Option<String>,
    /// Run this many jobs first; the rest wait until they are final.
    #[arg(long)]
    canary: Option<u32>,
    /// After a clean canary: continue (auto) or wait for `keyturn rollout resume` (manual).
    #[arg(long)]
    canary_gate: Option<String>,
    /// Cap on this rollout's API calls per second, across the deployment.
    #[arg(long)]
    max_per_second: Option<u32>,
    /// Print the plan and publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// Describe every instance first and leave out those already in the target state.
    #[arg(long)]
    preflight: bool,
    /// How long to wait for a worker to apply the declaration.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub async fn run(
    settings: &Settings,
    env: &[(String, String)],
    args: SubmitArgs,
) -> anyhow::Result<ExitCode> {
    let mut jobs = match read_jobs(settings, &args)? {
        Ok(jobs) => jobs,
        Err(code) => return Ok(code),
    };
    if args.preflight {
        jobs = preflight(settings, env, jobs).await?;
        if jobs.is_empty() {
            println!("nothing to submit: every instance is already in its target state");
            return Ok(ExitCode::SUCCESS);
        }
    }
    let plan = match plan(&args, jobs.len()) {
        Ok(plan) => plan,
        Err(rejection) => {
            eprintln!("keyturn: the rollout plan is invalid: {rejection}; nothing was published");
            return Ok(ExitCode::from(REFUSED));
        }
    };
    if args.dry_run {
        print!("{}", dry_run(settings, &plan, &jobs, &args.file));
        return Ok(ExitCode::SUCCESS);
    }
    publish(settings, plan, &jobs, args.timeout).await
}

/// The file's jobs, or the exit code after listing every bad line.
fn read_jobs(
    settings: &Settings,
    args: &SubmitArgs,
) -> anyhow::Result<Result<Vec<FileJob>, ExitCode>> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let defaults = Defaults {
        rollout_id: &args.rollout,
        status: args.status.as_deref(),
        kms_key: args.kms_key.as_deref(),
        ticket: args.ticket.as_deref(),
        requested_by: args.requested_by.as_deref(),
    };
    // The worker's context: the same region rules, so the worker cannot reject a line we let by.
    let ctx = ParseContext {
        default_region: Some(settings.worker.default_region.as_str()).filter(|r| !r.is_empty()),
        any_region: !settings.api.endpoint.is_empty(),
        message_id: None,
        content_type: None,
    };
    let format = Format::detect(&args.file, &text);
    match plan_file::read(&text, format, &defaults, &ctx) {
        Ok(jobs) if jobs.is_empty() => {
            eprintln!("keyturn: {} lists no instance", args.file.display());
            Ok(Err(ExitCode::from(REFUSED)))
        }
        Ok(jobs) => Ok(Ok(jobs)),
        Err(errors) => {
            eprintln!(
                "keyturn: {} has {} bad line(s); nothing was published:",
                args.file.display(),
                errors.len()
            );
            errors.iter().for_each(|error| eprintln!("  {error}"));
            Ok(Err(ExitCode::from(REFUSED)))
        }
    }
}

/// The declaration, checked by the worker's own command parser.
fn plan(args: &SubmitArgs, expected_jobs: usize) -> Result<Plan, crate::job::Rejection> {
    let mut value =
        json!({"kind": "rollout", "rollout_id": args.rollout, "expected_jobs": expected_jobs});
    if let Some(budget) = &args.failure_budget {
        value["failure_budget"] = budget
            .trim()
            .parse::<u64>()
            .map_or_else(|_| Value::from(budget.as_str()), Value::from);
    }
    let optional = [
        ("ticket", args.ticket.as_deref().map(Value::from)),
        (
            "requested_by",
            args.requested_by.as_deref().map(Value::from),
        ),
        ("canary", args.canary.map(Value::from)),
        ("canary_gate", args.canary_gate.as_deref().map(Value::from)),
        ("max_per_second", args.max_per_second.map(Value::from)),
    ];
    for (name, field) in optional {
        if let Some(field) = field {
            value[name] = field;
        }
    }
    match rollout::parse_command(value.to_string().as_bytes())? {
        Command::Declare(plan) => Ok(plan),
        _ => unreachable!("a rollout kind parses as a declaration"),
    }
}

/// Describes every instance (rate-limited as the worker is) and keeps those not yet in their
/// target state; an instance that cannot be described is kept, with a warning.
async fn preflight(
    settings: &Settings,
    env: &[(String, String)],
    jobs: Vec<FileJob>,
) -> anyhow::Result<Vec<FileJob>> {
    let credentials = settings.credentials(env)?;
    let client = Client::new(&settings.api, credentials).map_err(|error| match error {
        crate::gaussdb::client::ClientError::Config(config) => anyhow::Error::from(config),
        other => anyhow::Error::from(other).context("building the HTTP client"),
    })?;
    let limits = Limits::new(&settings.rate_limit);
    let concurrency = usize::from(settings.worker.concurrency.max(1));
    let checked: Vec<(FileJob, Result<Status, String>)> = futures_util::stream::iter(jobs)
        .map(|job| {
            let (client, limits) = (&client, &limits);
            async move {
                let found = describe(client, limits, &job.job).await;
                (job, found.map_err(|error| error.to_string()))
            }
        })
        .buffered(concurrency)
        .collect()
        .await;
    let mut keep = Vec::new();
    for (job, found) in checked {
        let instance = &job.job.instance_id;
        let wanted = job.job.change.status();
        match found {
            Ok(status) if status == wanted => println!(
                "already {}: {instance} (line {}); left out",
                wanted.as_str(),
                job.line
            ),
            Ok(_) => keep.push(job),
            Err(error) => {
                eprintln!(
                    "keyturn: could not describe {instance} (line {}): {error}; submitted anyway",
                    job.line
                );
                keep.push(job);
            }
        }
    }
    Ok(keep)
}

/// Describe under the worker's rate limits; a 429 pauses that region and project as in the
/// worker, and is tried again a few times.
async fn describe(client: &Client, limits: &Limits, job: &Job) -> Result<Status, CallError> {
    const ATTEMPTS: u32 = 5;
    let key = (job.region.to_string(), job.project_id.to_string());
    let mut attempt = 1;
    loop {
        limits.acquire(&key).await;
        match client.describe(job).await.result {
            Err(CallError::Api {
                status: 429,
                retry_after,
                ..
            }) if attempt < ATTEMPTS => {
                limits.throttled(&key, retry_after);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// What the rollout would do, for a person to check before running it.
fn dry_run(settings: &Settings, plan: &Plan, jobs: &[FileJob], file: &Path) -> String {
    let counts = Counts::of(jobs.iter().map(|j| &j.job));
    let on = jobs
        .iter()
        .filter(|j| j.job.change.status() == Status::On)
        .count();
    let mut out = format!(
        "rollout {}: {} jobs from {} (dry run: nothing was published)\n",
        plan.rollout_id,
        counts.total,
        file.display()
    );
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!("  target: {on} on, {} off", jobs.len() - on));
    line("  per region:".into());
    for (region, n) in &counts.per_region {
        line(format!("    {region:<24} {n}"));
    }
    line("  per project (region / project):".into());
    const SHOWN: usize = 20;
    for ((region, project), n) in counts.per_project.iter().take(SHOWN) {
        line(format!("    {region} / {project}  {n}"));
    }
    if counts.per_project.len() > SHOWN {
        line(format!(
            "    … and {} more",
            counts.per_project.len() - SHOWN
        ));
    }
    line(format!("  failure budget: {}", budget_text(plan)));
    line(format!("  canary: {}", canary_text(plan)));
    line(format!("  {}", estimate_text(settings, plan, &counts)));
    out
}

fn budget_text(plan: &Plan) -> String {
    match (plan.failure_budget, plan.allowed_failures()) {
        (Some(budget), Some(allowed)) => {
            let written = budget.to_value();
            format!(
                "{} = {allowed} failed jobs allowed; failure {} halts the rollout",
                written.as_str().map_or(written.to_string(), str::to_owned),
                allowed + 1
            )
        }
        _ => "none (every failure is tolerated)".into(),
    }
}

fn canary_text(plan: &Plan) -> String {
    match plan.canary {
        0 => "none".into(),
        n => format!(
            "the first {n} jobs run alone, then {}",
            match plan.canary_gate {
                rollout::CanaryGate::Auto => "the rest continue if none failed",
                rollout::CanaryGate::Manual => "the rollout pauses until `keyturn rollout resume`",
            }
        ),
    }
}

fn estimate_text(settings: &Settings, plan: &Plan, counts: &Counts) -> String {
    let rates = &settings.rate_limit;
    let estimate = plan_file::estimate(counts, rates, plan.max_per_second);
    let largest = counts.per_project.values().max().copied().unwrap_or(0);
    let cap = plan.max_per_second.map_or(String::new(), |cap| {
        format!(", all at max_per_second={cap}")
    });
    format!(
        "estimated duration: about {} (the slowest of {} jobs at rate_limit.per_second={}, \
         the largest project's {largest} at rate_limit.per_project_per_second={}{cap}; \
         bursts, retries and API latency not counted)",
        humantime::format_duration(rounded(estimate)),
        counts.total,
        rates.per_second,
        rates.per_project_per_second,
    )
}

/// Whole seconds from 10 s on, tenths below: precise enough for a plan, short to read.
fn rounded(estimate: Duration) -> Duration {
    if estimate >= Duration::from_secs(10) {
        Duration::from_secs(estimate.as_secs_f64().round() as u64)
    } else {
        Duration::from_millis((estimate.as_secs_f64() * 10.0).round() as u64 * 100)
    }
}

/// Declares, waits for the worker to apply the declaration, then publishes the jobs.
async fn publish(
    settings: &Settings,
    plan: Plan,
    jobs: &[FileJob],
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let rollout_id = plan.rollout_id.to_string();
    let declaration = Command::Declare(plan);
    let mut client = match ControlClient::connect(&settings.amqp, "keyturn-submit").await {
        Ok(client) => client,
        Err(error) => return control_failure(error),
    };
    let reply = match client.request(&declaration, timeout).await {
        Ok(reply) => reply,
        Err(error) => {
            client.close().await;
            let code = control_failure(error)?;
            if code == ExitCode::from(NO_ANSWER) {
                eprintln!("keyturn: no job was published");
            }
            return Ok(code);
        }
    };
    if !reply.ok {
        client.close().await;
        eprintln!("keyturn: no job was published");
        return Ok(verdict(&reply));
    }
    let published = publish_jobs(client.channel(), &settings.amqp.jobs_queue, jobs).await;
    client.close().await;
    published?;
    println!(
        "rollout {rollout_id}: declared, {} jobs published to {}",
        jobs.len(),
        settings.amqp.jobs_queue
    );
    println!("watch it with: keyturn watch {rollout_id} (or keyturn rollout status {rollout_id})");
    Ok(ExitCode::SUCCESS)
}

/// Confirms awaited at once per window: enough to keep the broker busy, bounded in memory.
const WINDOW: usize = 256;

async fn publish_jobs(channel: &Channel, queue: &str, jobs: &[FileJob]) -> anyhow::Result<()> {
    let mut progress = Progress::new(jobs.len() as u64);
    for window in jobs.chunks(WINDOW) {
        let mut confirms = Vec::with_capacity(window.len());
        for job in window {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(job.job.id.as_str().into());
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    // Returned, not dropped, when no queue has that name (a jobs_queue setting
                    // that differs from the worker's).
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &job.body,
                    properties,
                )
                .await
                .context("publishing a job")?;
            confirms.push(confirm);
        }
        for confirmation in futures_util::future::try_join_all(confirms)
            .await
            .context("waiting for the broker's confirms")?
        {
            match confirmation {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(_)) => anyhow::bail!(
                    "no queue named {queue} took the jobs; set amqp.jobs_queue to the worker's \
                     and submit again (the declaration is idempotent, the job ids are the same)"
                ),
                _ => anyhow::bail!(
                    "the broker refused a job (nack); submit the file again: the job ids are the same"
                ),
            }
        }
        progress.advance(window.len() as u64);
    }
    progress.finish();
    Ok(())
}

/// A bar on a terminal; plain lines, at most one every 5 s plus a last one, in a log.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines {
        total: u64,
        done: u64,
        last: Instant,
    },
}

const LINE_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new(total: u64) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "publishing {bar:40} {pos}/{len} jobs ({per_sec}, {eta} left)",
            )
            .expect("a valid template");
            bar.set_style(style);
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                total,
                done: 0,
                last: Instant::now(),
            }
        }
    }

    fn advance(&mut self, count: u64) {
        match self {
            Progress::Bar(bar) => bar.inc(count),
            Progress::Lines { total, done, last } => {
                *done += count;
                if last.elapsed() >= LINE_EVERY && done < total {
                    eprintln!("published {done}/{total} jobs");
                    *last = Instant::now();
                }
            }
        }
    }

    fn finish(self) {
        match self {
            Progress::Bar(bar) => bar.finish(),
            Progress::Lines { total, done, .. } => eprintln!("published {done}/{total} jobs"),
        }
    }
}
