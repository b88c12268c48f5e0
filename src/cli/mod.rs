//! The `keyturn` subcommands and the glue they share: settings, credentials, signals.

pub mod audit;
pub mod demo;
pub mod healthcheck;
pub mod rollout;
pub mod simulate;
pub mod submit;
pub mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::amqp::publisher::Publisher;
use crate::amqp::worker::{self, RunOptions};
use crate::audit::{AuditOptions, AuditStore, Location};
use crate::circuit::AuthMode;
use crate::config::{ConfigError, Credentials, Settings};
use crate::gaussdb::Client;
use crate::pipeline::Pipeline;

#[derive(Parser, Debug)]
#[command(
    name = "keyturn",
    version,
    about = "Roll GaussDB backup encryption on or off across a fleet"
)]
pub struct Cli {
    /// Settings file (default: config/default.toml when present, else built-in defaults).
    #[arg(long, global = true, env = "KEYTURN_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Consume encryption jobs until SIGINT/SIGTERM.
    Worker {
        /// Exit once the queue has been empty, with nothing in flight, this long (e.g. 5s).
        #[arg(long, value_parser = humantime::parse_duration)]
        exit_when_idle: Option<Duration>,
    },
    /// Serve a local stand-in for the GaussDB backup-encryption API.
    Simulator(simulate::SimulatorArgs),
    /// Run everything at once: simulator, sample fleet, worker, summary.
    Demo(demo::DemoArgs),
    /// Publish a rollout from a CSV or JSON-lines file: declaration first, then its jobs.
    Submit(submit::SubmitArgs),
    /// Ask about or steer rollouts over the control queue (exit 1 refused, 3 no answer).
    Rollout(rollout::RolloutArgs),
    /// Read the audit log: query and export runs, a job's HTTP calls, verify, rollout reports.
    Audit(audit::AuditArgs),
    /// Follow a rollout live: progress, rate, ETA, failures against the budget, state (exit 0
    /// done, 1 something failed, 3 halted with --exit-on-halt, 130 Ctrl-C).
    Watch(watch::WatchArgs),
    /// GET the worker's /readyz (or --url) once, for container healthchecks: exit 0 on 200,
    /// else 1 with the reason on one line.
    Healthcheck(healthcheck::HealthcheckArgs),
}

/// Runs the parsed command; configuration problems exit 2 with one line naming the key.
pub async fn run(cli: Cli) -> ExitCode {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let (mut settings, source) = match load_settings(cli.config.as_deref(), &env) {
        Ok(loaded) => loaded,
        Err(error) => return config_failure(&error),
    };
    // The demo's output is its story, and the client commands' their answers: a line per job
    // would bury them. The demo keeps errors only (its failures are part of the story it tells),
    // the others warnings too; RUST_LOG or KEYTURN_LOG__LEVEL bring back the rest.
    let chosen = |name: &str| env.iter().any(|(key, _)| key == name);
    if !chosen("RUST_LOG") && !chosen("KEYTURN_LOG__LEVEL") {
        match cli.command {
            Command::Demo(_) => settings.log.level = "error".into(),
            Command::Submit(_)
            | Command::Rollout(_)
            | Command::Audit(_)
            | Command::Watch(_)
            | Command::Healthcheck(_) => {
                settings.log.level = "warn".into();
            }
            _ => {}
        }
    }
    // Spans are exported for the worker only: a `healthcheck` every 10 s has nothing to trace.
    let trace = match cli.command {
        Command::Worker { .. } => settings.trace.clone(),
        _ => crate::config::TraceSettings::default(),
    };
    let _telemetry =
        crate::telemetry::init(&settings.log, &trace, crate::telemetry::use_colour(&env));
    let result = match cli.command {
        Command::Worker { exit_when_idle } => match settings.credentials(&env) {
            Ok(credentials) => run_worker(settings, &source, credentials, exit_when_idle).await,
            Err(error) => return config_failure(&error),
        },
        Command::Simulator(args) => match simulate::run(args, &env).await {
            Err(simulate::Failure::Config(error)) => return config_failure(&error),
            Err(simulate::Failure::Other(error)) => Err(error),
            Ok(()) => Ok(()),
        },
        Command::Demo(args) => demo::run(settings, args).await,
        // These exit 0, 1 (refused) or 3 (no answer) on their own; errors take the usual path.
        Command::Submit(args) => exit_code(submit::run(&settings, &env, args).await),
        Command::Rollout(args) => exit_code(rollout::run(&settings, args).await),
        Command::Audit(args) => exit_code(audit::run(&settings, args)),
        Command::Watch(args) => exit_code(watch::run(&settings, args).await),
        Command::Healthcheck(args) => exit_code(healthcheck::run(&settings, args).await),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.downcast_ref::<Exit>().is_some() => {
            error.downcast_ref::<Exit>().expect("checked").0
        }
        Err(error) if error.downcast_ref::<ConfigError>().is_some() => {
            config_failure(error.downcast_ref::<ConfigError>().expect("checked"))
        }
        Err(error) => {
            eprintln!("keyturn: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns early from `run` with a command's own exit code, or passes its error on.
fn exit_code(result: anyhow::Result<ExitCode>) -> anyhow::Result<()> {
    match result {
        Ok(code) if code == ExitCode::SUCCESS => Ok(()),
        Ok(code) => Err(anyhow::Error::new(Exit(code))),
        Err(error) => Err(error),
    }
}

/// A command's chosen exit code, carried through `run`'s error path (it has printed already).
#[derive(Debug)]
struct Exit(ExitCode);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}", self.0)
    }
}

impl std::error::Error for Exit {}

fn config_failure(error: &ConfigError) -> ExitCode {
    eprintln!("keyturn: {error}");
    ExitCode::from(2)
}

/// The settings, and where they came from for the start line: the file used (absolute) or
/// "built-in defaults".
fn load_settings(
    path: Option<&std::path::Path>,
    env: &[(String, String)],
) -> Result<(Settings, String), ConfigError> {
    let shipped = PathBuf::from("config/default.toml");
    let path = path
        .map(PathBuf::from)
        .or_else(|| shipped.exists().then_some(shipped));
    let settings = Settings::load(path.as_deref(), env)?;
    let source = match &path {
        Some(path) => absolute(path).display().to_string(),
        None => "built-in defaults".to_owned(),
    };
    Ok((settings, source))
}

fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Opens the audit log; failing that, a [`ConfigError`] on `audit.path` with the absolute path
/// and the cause in words (SQLite alone says only "unable to open database file").
fn open_audit(settings: &Settings) -> Result<AuditStore, ConfigError> {
    let options = AuditOptions {
        busy_timeout: settings.audit.busy_timeout,
        synchronous_full: settings.audit.synchronous == "full",
    };
    let location = settings.store_location();
    if let Location::Postgres(_) = &location {
        return open_postgres(&location, &options);
    }
    let path = absolute(&settings.audit.path);
    let failure = |problem: String| ConfigError {
        key: "audit.path".into(),
        problem: format!("cannot open the audit log {}: {problem}", path.display()),
    };
    if path.is_dir() {
        return Err(failure("it is a directory; give a file path".into()));
    }
    if let Some(parent) = path.parent()
        && !parent.is_dir()
    {
        return Err(failure(format!(
            "the directory {} does not exist",
            parent.display()
        )));
    }
    AuditStore::open(&path, &options).map_err(|error| match error {
        crate::audit::AuditError::Open { source, .. } => failure(source.to_string()),
        other => failure(other.to_string()),
    })
}

/// Opens the PostgreSQL store. A server that does not answer yet is waited for (one WARN line
/// per attempt: nothing is consumed meanwhile, so nothing waits on it); one that refuses (a
/// password, a missing database, a schema newer than this build) is a configuration error on
/// `store.url`.
fn open_postgres(location: &Location, options: &AuditOptions) -> Result<AuditStore, ConfigError> {
    let mut attempt = 0u32;
    loop {
        match AuditStore::open_at(location, options) {
            Ok(store) => return Ok(store),
            Err(crate::audit::AuditError::Unreachable(problem)) => {
                attempt += 1;
                let wait = Duration::from_secs(u64::from(attempt.min(5)));
                tracing::warn!(
                    store = %location.describe(),
                    %problem,
                    attempt,
                    retry_in = ?wait,
                    "the store does not answer yet; retrying"
                );
                std::thread::sleep(wait);
            }
            Err(error) => {
                return Err(ConfigError {
                    key: "store.url".into(),
                    problem: format!("cannot open the store ({}): {error}", location.describe()),
                });
            }
        }
    }
}

/// Builds the pipeline the worker and the demo share.
pub fn build_pipeline(
    settings: Settings,
    credentials: Credentials,
) -> anyhow::Result<(Arc<Pipeline>, Arc<Publisher>)> {
    let audit = open_audit(&settings)?;
    let auth = AuthMode::of(&credentials);
    let client = Client::new(&settings.api, credentials).context("building the HTTP client")?;
    let worker_id = settings.worker_id();
    let publisher = Publisher::new(&settings.amqp, &worker_id);
    let pipeline = Pipeline::new(
        settings,
        worker_id,
        client,
        auth,
        audit,
        publisher.clone(),
        publisher.clone(),
    );
    Ok((Arc::new(pipeline), publisher))
}

async fn run_worker(
    settings: Settings,
    source: &str,
    credentials: Credentials,
    exit_when_idle: Option<Duration>,
) -> anyhow::Result<()> {
    let (pipeline, publisher) = build_pipeline(settings, credentials)?;
    let ops = bind_ops(&pipeline.settings).await?;
    log_start(&pipeline.settings, source, &pipeline.worker_id);
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    // The ops endpoint outlives the consuming loop: /readyz says 503 while the worker drains.
    let ops_stop = CancellationToken::new();
    if let Some(listener) = ops {
        let (pipeline, stop) = (pipeline.clone(), ops_stop.clone());
        tokio::spawn(async move {
            if let Err(error) = crate::ops::serve(listener, pipeline, stop).await {
                tracing::error!(%error, "the ops endpoint stopped");
            }
        });
    }
    if first_connect(&pipeline.settings, &pipeline.worker_id, &shutdown).await? {
        worker::run(pipeline, RunOptions { exit_when_idle }, shutdown).await?;
    }
    ops_stop.cancel();
    publisher.close().await;
    tracing::info!("keyturn worker stopped");
    Ok(())
}

/// One INFO line saying what this worker runs with; no secrets (the URL is redacted).
/// Binds `ops.listen` at start, so a taken port stops the worker with the key named.
async fn bind_ops(settings: &Settings) -> Result<Option<tokio::net::TcpListener>, ConfigError> {
    let Some(address) = settings.ops.address()? else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| ConfigError {
            key: "ops.listen".into(),
            problem: format!("cannot listen on {address}: {error}"),
        })?;
    tracing::info!(address = %address, "ops endpoint: /metrics, /livez, /readyz");
    Ok(Some(listener))
}

fn log_start(settings: &Settings, source: &str, worker_id: &str) {
    if !settings.amqp.urls.is_empty()
        && settings.amqp.url != crate::config::AmqpSettings::default().url
    {
        tracing::warn!("amqp.url is set but ignored: amqp.urls lists the broker's nodes");
    }
    let endpoint = if settings.api.endpoint.is_empty() {
        "region table"
    } else {
        settings.api.endpoint.as_str()
    };
    let limits = &settings.rate_limit;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = source,
        endpoint,
        auth = %settings.api.source().1,
        concurrency = settings.worker.concurrency,
        prefetch = settings.worker.prefetch(),
        per_second = limits.per_second,
        per_project_per_second = limits.per_project_per_second,
        worker_id,
        broker = %crate::amqp::redacted_nodes(&settings.amqp),
        store = %match settings.store_location() {
            Location::Sqlite(path) => absolute(&path).display().to_string(),
            postgres => postgres.describe(),
        },
        "keyturn worker starting"
    );
}

/// Connects once before consuming, to tell settings the broker refuses (exit 2, one line) from
/// a broker that is not there yet (one WARN line per attempt, retried with capped backoff).
/// Returns false when shutdown came first.
async fn first_connect(
    settings: &Settings,
    worker_id: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let backoff = crate::retry::Backoff {
        base: Duration::from_millis(500),
        cap: settings.amqp.reconnect_max_backoff,
    };
    let name = format!("keyturn-check-{worker_id}");
    for attempt in 1u32.. {
        let connected = tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            connected = crate::amqp::connect(&settings.amqp, &name) => connected,
        };
        match connected {
            Ok(connection) => {
                let _ = connection.close(200, "start check done".into()).await;
                return Ok(true);
            }
            Err(crate::amqp::ConnectError::Settings(error)) => return Err(error.into()),
            Err(error) => {
                let wait = backoff
                    .delay(attempt - 1, &mut rand::rng())
                    .max(Duration::from_millis(200));
                tracing::warn!(attempt, retry_in_ms = wait.as_millis() as u64, "{error}");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(false),
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    unreachable!("the loop only ends by returning")
}

/// Cancels `token` on the first SIGINT or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("signal received; stopping");
    token.cancel();
}
