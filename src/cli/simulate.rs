//! `keyturn simulator`: the GaussDB API stand-in as a process, for tests and benchmarks that run
//! the real binary. It accepts the AK/SK from CLOUD_SDK_AK / CLOUD_SDK_SK and/or the tokens in
//! KEYTURN_SIMULATOR_TOKENS (comma-separated). Its IAM endpoint issues tokens to the user
//! KEYTURN_SIMULATOR_IAM_USER (`domain/name`) with KEYTURN_SIMULATOR_IAM_PASSWORD; its metadata
//! endpoint issues temporary AK/SK to anyone. Both live `--credential-life`.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::simulator::{Faults, IamUser, Simulator, SimulatorConfig};

#[derive(clap::Args, Debug)]
pub struct SimulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8600")]
    pub listen: String,
    /// Fixed fleet: lines of `<project_id> <instance_id>`; others answer 404. Default: any instance.
    #[arg(long)]
    pub fleet: Option<PathBuf>,
    /// Added latency per call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of calls answered 500.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Share of calls answered 429.
    #[arg(long, default_value_t = 0.0)]
    pub throttle_rate: f64,
    /// Share of calls answered 409 (instance busy).
    #[arg(long, default_value_t = 0.0)]
    pub busy_rate: f64,
    /// Share of calls left hanging (client timeouts).
    #[arg(long, default_value_t = 0.0)]
    pub timeout_rate: f64,
    /// How long a hanging call hangs, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub hang_ms: u64,
    /// Seed of the fault dice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How long issued IAM tokens and temporary AK/SK stay valid, e.g. `3s`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub credential_life: Duration,
}

pub enum Failure {
    Config(ConfigError),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Other(error)
    }
}

fn config_error(key: &str, problem: impl Into<String>) -> Failure {
    Failure::Config(ConfigError {
        key: key.into(),
        problem: problem.into(),
    })
}

pub async fn run(args: SimulatorArgs, env: &[(String, String)]) -> Result<(), Failure> {
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let credentials: Vec<_> = match (var("CLOUD_SDK_AK"), var("CLOUD_SDK_SK")) {
        (Some(ak), Some(sk)) => vec![(ak, sk.into())],
        _ => Vec::new(),
    };
    let tokens: Vec<_> = var("KEYTURN_SIMULATOR_TOKENS")
        .map(|list| {
            list.split(',')
                .map(|t| t.trim().to_owned().into())
                .collect()
        })
        .unwrap_or_default();
    if credentials.is_empty() && tokens.is_empty() {
        return Err(config_error(
            "CLOUD_SDK_AK",
            "set CLOUD_SDK_AK and CLOUD_SDK_SK (or KEYTURN_SIMULATOR_TOKENS) for the simulator to accept",
        ));
    }
    for (key, rate) in [
        ("--error-rate", args.error_rate),
        ("--throttle-rate", args.throttle_rate),
        ("--busy-rate", args.busy_rate),
        ("--timeout-rate", args.timeout_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            return Err(config_error(key, "must be between 0 and 1"));
        }
    }
    let fleet = match &args.fleet {
        Some(path) => Some(read_fleet(path)?),
        None => None,
    };
    let config = SimulatorConfig {
        credentials,
        tokens,
        fleet,
        faults: Faults {
            latency_ms: args.latency_ms,
            error_rate: args.error_rate,
            throttle_rate: args.throttle_rate,
            retry_after_secs: None,
            busy_rate: args.busy_rate,
            timeout_rate: args.timeout_rate,
            hang_ms: args.hang_ms,
            // Set at run time with `PUT /_simulator/faults`.
            apply_then_error_rate: 0.0,
            refuse_credential_fetches: false,
        },
        max_clock_skew: Duration::from_secs(15 * 60),
        seed: args.seed,
        credential_life: args.credential_life,
        iam_users: iam_user(&var)?.into_iter().collect(),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|error| {
            config_error(
                "--listen",
                format!("cannot listen on {}: {error}", args.listen),
            )
        })?;
    let address = listener.local_addr().map_err(anyhow::Error::from)?;
    eprintln!("keyturn simulator listening on http://{address}");
    tracing::info!(%address, "simulator listening");
    let shutdown = CancellationToken::new();
    tokio::spawn(super::cancel_on_signal(shutdown.clone()));
    crate::simulator::serve(listener, Simulator::new(config), async move {
        shutdown.cancelled().await
    })
    .await
    .map_err(|error| Failure::Other(error.into()))
}

/// The IAM user from KEYTURN_SIMULATOR_IAM_USER (`domain/name`) and its password.
fn iam_user(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<IamUser>, Failure> {
    let Some(user) = var("KEYTURN_SIMULATOR_IAM_USER") else {
        return Ok(None);
    };
    let Some((domain, name)) = user.split_once('/') else {
        return Err(config_error(
            "KEYTURN_SIMULATOR_IAM_USER",
            "must be domain/name",
        ));
    };
    let password = var("KEYTURN_SIMULATOR_IAM_PASSWORD").ok_or_else(|| {
        config_error(
            "KEYTURN_SIMULATOR_IAM_PASSWORD",
            "is not set (KEYTURN_SIMULATOR_IAM_USER is)",
        )
    })?;
    Ok(Some(IamUser {
        domain: domain.into(),
        name: name.into(),
        password: password.into(),
    }))
}

fn read_fleet(path: &std::path::Path) -> Result<Vec<(String, String)>, Failure> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        config_error(
            "--fleet",
            format!("cannot read {}: {error}", path.display()),
        )
    })?;
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .enumerate()
        .map(|(number, line)| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(project), Some(instance), None) => {
                    Ok((project.to_owned(), instance.to_owned()))
                }
                _ => Err(config_error(
                    "--fleet",
                    format!("entry {} is not `<project_id> <instance_id>`", number + 1),
                )),
            }
        })
        .collect()
}
