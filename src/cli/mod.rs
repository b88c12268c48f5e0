//! The `keyturn` subcommands and the glue they share: settings, credentials, signals.

pub mod demo;
pub mod simulate;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::amqp::publisher::Publisher;
use crate::amqp::worker::{self, RunOptions};
use crate::audit::{AuditOptions, AuditStore};
use crate::config::{ConfigError, Credentials, Settings};
use crate::gaussdb::Client;
use crate::circuit::AuthMode;
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
}

/// Runs the parsed command; configuration problems exit 2 with one line naming the key.
pub async fn run(cli: Cli) -> ExitCode {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut settings = match load_settings(cli.config.as_deref(), &env) {
        Ok(settings) => settings,
        Err(error) => return config_failure(&error),
    };
    // The demo's output is its summary table; a line per job would bury it. Warnings (rejected
    // jobs, retries) still show, and RUST_LOG or KEYTURN_LOG__LEVEL bring back the rest.
    let chosen = |name: &str| env.iter().any(|(key, _)| key == name);
    if matches!(cli.command, Command::Demo(_))
        && !chosen("RUST_LOG")
        && !chosen("KEYTURN_LOG__LEVEL")
    {
        settings.log.level = "warn".into();
    }
    crate::telemetry::init(&settings.log);
    let result = match cli.command {
        Command::Worker { exit_when_idle } => match settings.credentials(&env) {
            Ok(credentials) => run_worker(settings, credentials, exit_when_idle).await,
            Err(error) => return config_failure(&error),
        },
        Command::Simulator(args) => match simulate::run(args, &env).await {
            Err(simulate::Failure::Config(error)) => return config_failure(&error),
            Err(simulate::Failure::Other(error)) => Err(error),
            Ok(()) => Ok(()),
        },
        Command::Demo(args) => demo::run(settings, args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keyturn: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_failure(error: &ConfigError) -> ExitCode {
    eprintln!("keyturn: {error}");
    ExitCode::from(2)
}

fn load_settings(
    path: Option<&std::path::Path>,
    env: &[(String, String)],
) -> Result<Settings, ConfigError> {
    let shipped = PathBuf::from("config/default.toml");
    let path = path
        .map(PathBuf::from)
        .or_else(|| shipped.exists().then_some(shipped));
    Settings::load(path.as_deref(), env)
}

/// Builds the pipeline the worker and the demo share.
pub fn build_pipeline(
    settings: Settings,
    credentials: Credentials,
) -> anyhow::Result<(Arc<Pipeline>, Arc<Publisher>)> {
    let audit_options = AuditOptions {
        busy_timeout: settings.audit.busy_timeout,
        synchronous_full: settings.audit.synchronous == "full",
    };
    let audit = AuditStore::open(&settings.audit.path, &audit_options)?;
    let auth = match credentials {
        Credentials::AkSk { .. } => AuthMode::AkSk,
        Credentials::Token(_) => AuthMode::Token,
    };
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
    credentials: Credentials,
    exit_when_idle: Option<Duration>,
) -> anyhow::Result<()> {
    let (pipeline, publisher) = build_pipeline(settings, credentials)?;
    tracing::info!(
        worker_id = %pipeline.worker_id,
        broker = %crate::amqp::redacted_url(&pipeline.settings.amqp.url),
        audit = %pipeline.audit.path().display(),
        "keyturn worker starting"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    worker::run(pipeline, RunOptions { exit_when_idle }, shutdown).await?;
    publisher.close().await;
    tracing::info!("keyturn worker stopped");
    Ok(())
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
