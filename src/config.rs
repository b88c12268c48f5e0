//! Settings: `config/default.toml` (or `--config FILE` / `KEYTURN_CONFIG`), then environment
//! overrides `KEYTURN_<SECTION>__<KEY>`, then credentials from `CLOUD_SDK_AK` / `CLOUD_SDK_SK`.
//!
//! Loading validates everything once; a bad value is a [`ConfigError`] naming the key, which
//! `main` prints as one line before exiting with status 2.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::gaussdb::regions;

/// What a URL that does not parse is told. The parser's own message quotes the text, which may
/// hold a password (or part of one, when a comma split it), so it is not repeated.
pub const NOT_AN_AMQP_URL: &str = "is not an AMQP URL: expected amqp://user:password@host:port/vhost (or amqps://); the text is not shown, it may hold a password; in a password write , as %2C and @ as %40";

/// A configuration problem, always tied to the key that caused it.
#[derive(Debug, thiserror::Error)]
#[error("config key {key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn config_error(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub worker: WorkerSettings,
    pub api: ApiSettings,
    pub rate_limit: RateLimitSettings,
    pub retry: RetrySettings,
    pub circuit: CircuitSettings,
    pub rollouts: RolloutSettings,
    pub audit: AuditSettings,
    pub store: StoreSettings,
    pub log: LogSettings,
    pub ops: OpsSettings,
    pub trace: TraceSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// The broker, one node; ignored when `urls` is set.
    pub url: String,
    /// The nodes of one broker cluster, tried in order (see `amqp::nodes`); when non-empty it
    /// replaces `url`.
    pub urls: Vec<String>,
    pub jobs_queue: String,
    pub dead_letter_exchange: String,
    pub dead_queue: String,
    pub results_exchange: String,
    /// Bounded queue keeping result events no binding routed (published `mandatory`, returned).
    pub unrouted_queue: String,
    /// Quorum queue of rollout declarations and commands (contract §6).
    pub control_queue: String,
    /// When set, a job's or command's `reply_to` must start with it; empty = any queue but
    /// keyturn's own.
    pub reply_to_prefix: String,
    /// PEM bundle of CAs trusted for `amqps://` URLs; empty = the system roots.
    pub ca_file: PathBuf,
    pub delivery_limit: u32,
    pub heartbeat_secs: u16,
    #[serde(with = "duration_text")]
    pub reconnect_max_backoff: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Names this worker in event sources and audit rows; empty = host name and process id.
    pub id: String,
    /// API calls in flight at once: a job holds a call slot from its rate-limit wait to its
    /// call's answer.
    pub concurrency: u16,
    /// Deliveries the worker holds at once (the AMQP prefetch); 0 = twice `concurrency`, so the
    /// store writes, result events and acks of finished jobs overlap the next jobs' calls.
    pub prefetch: u16,
    #[serde(with = "duration_text")]
    pub grace_period: Duration,
    /// Region for jobs that name none; empty = none.
    pub default_region: String,
    /// Longest a delivery waits (rate limits, its instance's turn, the health gate) before it is
    /// handed back to the queue's tail: below RabbitMQ's 30-minute consumer timeout.
    #[serde(with = "duration_text")]
    pub max_hold: Duration,
}

/// Rollouts (contract §6).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSettings {
    /// Park jobs of a rollout nobody declared until its declaration arrives (else they run as an
    /// ad-hoc rollout: counted, no budget).
    pub require_declaration: bool,
}

/// Circuits for faults of the deployment (refused credentials, unreachable endpoints).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitSettings {
    /// Server errors or timeouts in a row from one region that open its circuit.
    pub strikes_to_open: u32,
    /// First wait before a probe; it doubles after each failed probe...
    #[serde(with = "duration_text")]
    pub probe_interval: Duration,
    /// ...up to this.
    #[serde(with = "duration_text")]
    pub probe_max_interval: Duration,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        CircuitSettings {
            strikes_to_open: 5,
            probe_interval: Duration::from_secs(1),
            probe_max_interval: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Replaces the region table when set (private endpoints, the simulator).
    pub endpoint: String,
    /// The older name of `api.credentials`, still read when that is empty.
    pub auth: String,
    /// Where credentials come from: `aksk` (CLOUD_SDK_AK / CLOUD_SDK_SK, plus
    /// CLOUD_SDK_SECURITY_TOKEN for temporary keys), `metadata` (the ECS metadata service),
    /// `token` (api.token) or `iam` (a token fetched from IAM). Empty = `api.auth`.
    pub credentials: String,
    /// The ECS metadata service, for `credentials = "metadata"`.
    pub metadata_url: String,
    /// IAM, for `credentials = "iam"`: `POST {iam_endpoint}/v3/auth/tokens`.
    pub iam_endpoint: String,
    /// The account (domain) name of the IAM user.
    pub iam_domain: String,
    /// The IAM user. Each token is scoped to the project of the job it is for (by the job's
    /// `project_id`), so there is no project setting.
    pub iam_user: String,
    /// The IAM user's password, only from KEYTURN_API__IAM_PASSWORD (refused in a file, like
    /// `api.token`). Never serialized.
    #[serde(skip_serializing, deserialize_with = "secret_text::deserialize")]
    pub iam_password: SecretString,
    /// How long before a fetched credential expires it is replaced; never more than half its
    /// lifetime, so short-lived credentials are still used for a while.
    #[serde(with = "duration_text")]
    pub refresh_before: Duration,
    /// Static IAM token for `auth = "token"`, only from KEYTURN_API__TOKEN: a file is copied,
    /// backed up and shown on screens, so [`Settings::load`] refuses it there. Never serialized.
    #[serde(skip_serializing, deserialize_with = "secret_text::deserialize")]
    pub token: SecretString,
    pub language: String,
    #[serde(with = "duration_text")]
    pub connect_timeout: Duration,
    #[serde(with = "duration_text")]
    pub request_timeout: Duration,
    /// Ask Describe after a successful Modify and report what the instance says.
    pub confirm_after: bool,
    /// Accept an `http://` endpoint that is not loopback. Off: a token or signature sent in the
    /// clear to another host is a mistake worth stopping at start.
    pub allow_insecure_http: bool,
    /// A PEM bundle of extra roots the API client trusts besides the built-in ones (a private
    /// endpoint behind a company CA); empty = the built-in roots only.
    pub ca_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    pub per_second: u32,
    pub burst: u32,
    pub per_project_per_second: u32,
    pub per_project_burst: u32,
    /// How long calls to one region+project pause after a 429 without Retry-After.
    #[serde(with = "duration_text")]
    pub throttle_pause: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    pub max_attempts: u32,
    #[serde(with = "duration_text")]
    pub base_delay: Duration,
    #[serde(with = "duration_text")]
    pub max_delay: Duration,
    /// Total time a job may spend on API calls and waits before it ends `failed`.
    #[serde(with = "duration_text")]
    pub deadline: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    pub path: PathBuf,
    #[serde(with = "duration_text")]
    pub busy_timeout: Duration,
    /// SQLite `synchronous`: `full` (default, every commit reaches the disk) or `normal`.
    pub synchronous: String,
}

/// Where job state and the audit live (contract §8).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `postgres://user:password@host:port/database`: the PostgreSQL store, shared by every
    /// worker of the deployment; empty: the SQLite file at `audit.path` (one host).
    pub url: String,
    /// How long a worker's claim on a job and its instance lasts unless renewed; a worker that
    /// dies holds them this long at most.
    #[serde(with = "duration_text")]
    pub lease: Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            url: String::new(),
            lease: Duration::from_secs(60),
        }
    }
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &self.location_words())
            .field("lease", &self.lease)
            .finish()
    }
}

impl StoreSettings {
    fn location_words(&self) -> String {
        if self.url.is_empty() {
            String::new()
        } else {
            crate::audit::Location::Postgres(self.url.clone()).describe()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A tracing filter such as `info` or `keyturn=debug`; RUST_LOG wins when set.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

/// Trace export (the trace context itself is always carried from jobs to events).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceSettings {
    /// Base URL of an OTLP/HTTP collector (spans go to `<it>/v1/traces`); empty = no export.
    /// Needs a build with the `otlp` feature.
    pub otlp_endpoint: String,
}

impl TraceSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        const KEY: &str = "trace.otlp_endpoint";
        if self.otlp_endpoint.is_empty() {
            return Ok(());
        }
        if !cfg!(feature = "otlp") {
            return Err(config_error(
                KEY,
                "is set, but this keyturn was built without OTLP export (cargo build --features otlp); leave it empty",
            ));
        }
        let url = reqwest::Url::parse(&self.otlp_endpoint)
            .map_err(|error| config_error(KEY, format!("is not a URL: {error}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(config_error(
                KEY,
                "must be an http:// or https:// URL of an OTLP/HTTP collector (e.g. http://127.0.0.1:4318)",
            ));
        }
        Ok(())
    }
}

/// The operations endpoint (contract §7): `/metrics`, `/livez`, `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsSettings {
    /// `host:port` to serve on; empty = no ops endpoint.
    pub listen: String,
}

impl Default for OpsSettings {
    fn default() -> Self {
        OpsSettings {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

impl OpsSettings {
    /// The socket address to serve on, `None` when turned off.
    pub fn address(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            config_error(
                "ops.listen",
                format!("must be host:port with an IP address (e.g. 127.0.0.1:9464), or empty to turn it off; not {:?}", self.listen),
            )
        })
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            urls: Vec::new(),
            jobs_queue: "keyturn.jobs".into(),
            dead_letter_exchange: "keyturn.dlx".into(),
            dead_queue: "keyturn.jobs.dead".into(),
            results_exchange: "keyturn.results".into(),
            unrouted_queue: "keyturn.results.unrouted".into(),
            control_queue: "keyturn.control".into(),
            reply_to_prefix: String::new(),
            ca_file: PathBuf::new(),
            delivery_limit: 20,
            heartbeat_secs: 10,
            reconnect_max_backoff: Duration::from_secs(30),
        }
    }
}

impl WorkerSettings {
    /// The AMQP prefetch: `prefetch`, or twice `concurrency` when it is 0.
    pub fn prefetch(&self) -> u16 {
        match self.prefetch {
            0 => self.concurrency.saturating_mul(2),
            set => set,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            id: String::new(),
            concurrency: 16,
            prefetch: 0,
            grace_period: Duration::from_secs(30),
            default_region: String::new(),
            max_hold: Duration::from_secs(10 * 60),
        }
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            endpoint: String::new(),
            auth: "aksk".into(),
            credentials: String::new(),
            metadata_url: "http://169.254.169.254".into(),
            iam_endpoint: "https://iam.myhuaweicloud.com".into(),
            iam_domain: String::new(),
            iam_user: String::new(),
            iam_password: SecretString::from(""),
            refresh_before: Duration::from_secs(5 * 60),
            token: SecretString::from(""),
            language: "en-us".into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            confirm_after: false,
            allow_insecure_http: false,
            ca_file: PathBuf::new(),
        }
    }
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            per_second: 50,
            burst: 10,
            per_project_per_second: 5,
            per_project_burst: 5,
            throttle_pause: Duration::from_secs(3),
        }
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 6,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(20),
            deadline: Duration::from_secs(300),
        }
    }
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            path: PathBuf::from("./keyturn-audit.db"),
            busy_timeout: Duration::from_secs(5),
            synchronous: "full".into(),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Where the worker's credentials come from (`api.credentials`). `Debug` never shows the secrets.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// Permanent AK/SK.
    AkSk { ak: String, sk: SecretString },
    /// Temporary AK/SK with the security token they were issued with (sent as `X-Security-Token`).
    TemporaryAkSk {
        ak: String,
        sk: SecretString,
        security_token: SecretString,
    },
    /// Temporary AK/SK fetched from the ECS metadata service at `url`, renewed before expiry.
    Metadata { url: String },
    /// A static IAM token.
    Token(SecretString),
    /// An IAM token fetched with the user's password, renewed before expiry.
    Iam(IamIdentity),
}

/// The IAM user a token is fetched for.
#[derive(Debug, Clone)]
pub struct IamIdentity {
    pub endpoint: String,
    pub domain: String,
    pub user: String,
    pub password: SecretString,
}

/// The valid values of `api.credentials`.
const SOURCES: [&str; 4] = ["aksk", "metadata", "token", "iam"];

impl Settings {
    /// Reads `path` (or the built-in defaults when `None`), applies `env` overrides and validates.
    pub fn load(path: Option<&Path>, env: &[(String, String)]) -> Result<Settings, ConfigError> {
        let mut table = match path {
            Some(path) => read_table(path)?,
            None => toml::Table::new(),
        };
        refuse_secrets_in_file(&table)?;
        apply_env(&mut table, env)?;
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|error| {
                // toml appends "in `key`" on further lines; the path already names the key.
                let problem = error.inner().to_string();
                let first = problem.lines().next().unwrap_or_default().to_owned();
                config_error(error.path().to_string(), first)
            })?;
        settings.validate()?;
        Ok(settings)
    }

    /// The worker's name: `worker.id`, or host name and process id.
    pub fn worker_id(&self) -> String {
        if !self.worker.id.is_empty() {
            return self.worker.id.clone();
        }
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|name| name.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        format!("{host}-{}", std::process::id())
    }

    /// The credentials `api.credentials` (or `api.auth`) asks for, from `env` (CLOUD_SDK_AK /
    /// CLOUD_SDK_SK / CLOUD_SDK_SECURITY_TOKEN) or the `api` section.
    pub fn credentials(&self, env: &[(String, String)]) -> Result<Credentials, ConfigError> {
        let var = |name: &str| {
            env.iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
                .filter(|value| !value.is_empty())
        };
        let (key, source) = self.api.source();
        let missing = |name: &str| config_error(name, format!("is not set ({key} = \"{source}\")"));
        match source {
            "aksk" => {
                let ak = var("CLOUD_SDK_AK").ok_or_else(|| missing("CLOUD_SDK_AK"))?;
                let sk = var("CLOUD_SDK_SK").ok_or_else(|| missing("CLOUD_SDK_SK"))?;
                Ok(match var("CLOUD_SDK_SECURITY_TOKEN") {
                    Some(token) => Credentials::TemporaryAkSk {
                        ak,
                        sk: sk.into(),
                        security_token: token.into(),
                    },
                    None => Credentials::AkSk { ak, sk: sk.into() },
                })
            }
            "metadata" => Ok(Credentials::Metadata {
                url: self.api.metadata_url.trim_end_matches('/').to_owned(),
            }),
            "token" if !self.api.token.expose_secret().is_empty() => {
                Ok(Credentials::Token(self.api.token.clone()))
            }
            "token" => Err(config_error(
                "api.token",
                format!("is empty ({key} = \"token\")"),
            )),
            "iam" => self.api.iam_identity(),
            other => Err(config_error(
                key,
                format!("must be {}, not {other:?}", SOURCES.join(", ")),
            )),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let amqp = &self.amqp;
        for (key, url) in amqp.nodes() {
            url.parse::<lapin::uri::AMQPUri>()
                .map_err(|_| config_error(key, NOT_AN_AMQP_URL))?;
        }
        for (key, name) in amqp.topology_names() {
            if name.is_empty() || name.len() > 255 || name.starts_with("amq.") {
                return Err(config_error(
                    key,
                    "must be 1-255 characters and not start with amq.",
                ));
            }
        }
        if !amqp.ca_file.as_os_str().is_empty() {
            amqp.ca_bundle()?;
        }
        range("amqp.delivery_limit", amqp.delivery_limit.into(), 1, 1000)?;
        range("amqp.heartbeat_secs", amqp.heartbeat_secs.into(), 1, 600)?;
        range(
            "worker.concurrency",
            self.worker.concurrency.into(),
            1,
            2000,
        )?;
        if self.worker.prefetch != 0 {
            range(
                "worker.prefetch",
                self.worker.prefetch.into(),
                self.worker.concurrency.into(),
                4000,
            )?;
        }
        bounded(
            "amqp.reconnect_max_backoff",
            amqp.reconnect_max_backoff,
            HOUR,
        )?;
        bounded("worker.grace_period", self.worker.grace_period, HOUR)?;
        bounded("worker.max_hold", self.worker.max_hold, 25 * MINUTE)?;
        let circuit = &self.circuit;
        range(
            "circuit.strikes_to_open",
            circuit.strikes_to_open.into(),
            1,
            1000,
        )?;
        bounded("circuit.probe_interval", circuit.probe_interval, HOUR)?;
        bounded(
            "circuit.probe_max_interval",
            circuit.probe_max_interval,
            HOUR,
        )?;
        if circuit.probe_max_interval < circuit.probe_interval {
            return Err(config_error(
                "circuit.probe_max_interval",
                "must be at least circuit.probe_interval",
            ));
        }
        self.validate_api()?;
        self.validate_limits()?;
        // A delivery is held for its waits (max_hold), its own API time (deadline) and one last
        // call (request_timeout): together under RabbitMQ's 30-minute consumer timeout.
        let held = self.worker.max_hold + self.retry.deadline + self.api.request_timeout;
        if held >= 30 * MINUTE {
            return Err(config_error(
                "worker.max_hold",
                format!(
                    "with retry.deadline and api.request_timeout it holds a delivery up to {}; keep the sum under RabbitMQ's 30-minute consumer timeout",
                    humantime::format_duration(held)
                ),
            ));
        }

        match self.audit.synchronous.as_str() {
            "full" | "normal" => {}
            _ => return Err(config_error("audit.synchronous", "must be full or normal")),
        }
        bounded("audit.busy_timeout", self.audit.busy_timeout, HOUR)?;
        if self.audit.path.as_os_str().is_empty() {
            return Err(config_error("audit.path", "is empty"));
        }
        self.validate_store()?;
        self.ops.address()?;
        self.trace.validate()?;
        match self.log.format.as_str() {
            "text" | "json" => {}
            _ => return Err(config_error("log.format", "must be text or json")),
        }
        validate_log_level(&self.log.level)
    }

    fn validate_store(&self) -> Result<(), ConfigError> {
        let url = &self.store.url;
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if !url.is_empty() {
            let checked = if postgres {
                crate::audit::check_store_url(url)
            } else {
                Err(crate::audit::postgres::NOT_A_POSTGRES_URL.to_owned())
            };
            checked.map_err(|problem| config_error("store.url", problem))?;
        }
        if self.store.lease < Duration::from_secs(2) || self.store.lease > 10 * MINUTE {
            return Err(config_error(
                "store.lease",
                "must be between 2s and 10m: renewed every third of it, a dead worker's jobs wait it out",
            ));
        }
        // A call starts only while the lease will outlive it, and renewals come every third of
        // it: below twice the request timeout no call could ever start.
        if self.store.lease < 2 * self.api.request_timeout {
            return Err(config_error(
                "store.lease",
                format!(
                    "is {}, less than twice api.request_timeout ({}): a call must end well within the lease it runs under",
                    humantime::format_duration(self.store.lease),
                    humantime::format_duration(self.api.request_timeout)
                ),
            ));
        }
        Ok(())
    }

    /// Where the store is: `store.url` when set, else the SQLite file at `audit.path`.
    pub fn store_location(&self) -> crate::audit::Location {
        if self.store.url.is_empty() {
            crate::audit::Location::Sqlite(self.audit.path.clone())
        } else {
            crate::audit::Location::Postgres(self.store.url.clone())
        }
    }

    fn validate_api(&self) -> Result<(), ConfigError> {
        let api = &self.api;
        if !api.endpoint.is_empty() {
            validate_endpoint(&api.endpoint, api.allow_insecure_http)?;
        }
        if !api.ca_file.as_os_str().is_empty() {
            crate::gaussdb::client::read_ca_bundle(&api.ca_file)?;
        }
        let default_region = &self.worker.default_region;
        if !default_region.is_empty()
            && api.endpoint.is_empty()
            && regions::host_prefix(default_region).is_none()
        {
            return Err(config_error(
                "worker.default_region",
                format!("{default_region:?} is not a known region"),
            ));
        }
        let (key, source) = api.source();
        if !SOURCES.contains(&source) {
            return Err(config_error(
                key,
                format!("must be {}, not {source:?}", SOURCES.join(", ")),
            ));
        }
        validate_url("api.metadata_url", &api.metadata_url, true)?;
        validate_url(
            "api.iam_endpoint",
            &api.iam_endpoint,
            api.allow_insecure_http,
        )?;
        bounded("api.refresh_before", api.refresh_before, HOUR)?;
        if !matches!(api.language.as_str(), "en-us" | "zh-cn") {
            return Err(config_error("api.language", "must be en-us or zh-cn"));
        }
        bounded("api.connect_timeout", api.connect_timeout, 10 * MINUTE)?;
        bounded("api.request_timeout", api.request_timeout, 10 * MINUTE)
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let limits = &self.rate_limit;
        range(
            "rate_limit.per_second",
            limits.per_second.into(),
            1,
            100_000,
        )?;
        range("rate_limit.burst", limits.burst.into(), 1, 100_000)?;
        range(
            "rate_limit.per_project_per_second",
            limits.per_project_per_second.into(),
            1,
            100_000,
        )?;
        range(
            "rate_limit.per_project_burst",
            limits.per_project_burst.into(),
            1,
            100_000,
        )?;
        bounded(
            "rate_limit.throttle_pause",
            limits.throttle_pause,
            10 * MINUTE,
        )?;
        let retry = &self.retry;
        range("retry.max_attempts", retry.max_attempts.into(), 1, 100)?;
        bounded("retry.base_delay", retry.base_delay, 10 * MINUTE)?;
        bounded("retry.max_delay", retry.max_delay, 10 * MINUTE)?;
        if retry.max_delay < retry.base_delay {
            return Err(config_error(
                "retry.max_delay",
                "must be at least retry.base_delay",
            ));
        }
        positive("retry.deadline", retry.deadline)?;
        if retry.deadline > Duration::from_secs(20 * 60) {
            return Err(config_error(
                "retry.deadline",
                "must stay well under RabbitMQ's 30 min consumer timeout (at most 20m)",
            ));
        }
        Ok(())
    }
}

impl ApiSettings {
    /// The key that chose the credentials and its value: `api.credentials`, or the older
    /// `api.auth` when that is empty.
    pub fn source(&self) -> (&'static str, &str) {
        if self.credentials.is_empty() {
            ("api.auth", self.auth.as_str())
        } else {
            ("api.credentials", self.credentials.as_str())
        }
    }

    /// The IAM user of `credentials = "iam"`; each missing piece names its key.
    fn iam_identity(&self) -> Result<Credentials, ConfigError> {
        let required = |key: &str, value: &str| {
            if value.is_empty() {
                Err(config_error(key, "is empty (api.credentials = \"iam\")"))
            } else {
                Ok(value.to_owned())
            }
        };
        let identity = IamIdentity {
            endpoint: self.iam_endpoint.trim_end_matches('/').to_owned(),
            domain: required("api.iam_domain", &self.iam_domain)?,
            user: required("api.iam_user", &self.iam_user)?,
            password: self.iam_password.clone(),
        };
        if identity.password.expose_secret().is_empty() {
            return Err(config_error(
                "api.iam_password",
                "is empty (api.credentials = \"iam\"); set KEYTURN_API__IAM_PASSWORD",
            ));
        }
        Ok(Credentials::Iam(identity))
    }
}

/// An http(s) URL with a host under `key`; plain `http://` only to loopback unless `allow_http`.
fn validate_url(key: &str, url: &str, allow_http: bool) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|error| config_error(key, format!("is not a URL: {error}")))?;
    match (parsed.scheme(), parsed.host_str()) {
        ("https", Some(_)) => Ok(()),
        ("http", Some(host)) if allow_http || is_loopback(host) => Ok(()),
        // The host only: a URL may carry user info that is not for a log line.
        ("http", Some(host)) => Err(config_error(
            key,
            format!(
                "plain http to {host}, which is not loopback; use https or set api.allow_insecure_http = true"
            ),
        )),
        _ => Err(config_error(key, "must be an http(s) URL with a host")),
    }
}

/// An http(s) URL with a host; plain `http://` only to loopback unless explicitly allowed, because
/// every request carries a signature or a token.
fn validate_endpoint(endpoint: &str, allow_insecure_http: bool) -> Result<(), ConfigError> {
    validate_url("api.endpoint", endpoint, allow_insecure_http)
}

/// `localhost`, 127.0.0.0/8 or ::1 (the URL parser has already normalised the host).
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Secrets written in the settings file are refused, not ignored: the operator learns at once
/// that the file is the wrong place, and where the value belongs.
fn refuse_secrets_in_file(table: &toml::Table) -> Result<(), ConfigError> {
    let api = table.get("api").and_then(toml::Value::as_table);
    for key in SECRET_API_KEYS {
        if api.is_some_and(|api| api.contains_key(key)) {
            return Err(config_error(
                format!("api.{key}"),
                format!(
                    "must not be written in the config file; set KEYTURN_API__{}",
                    key.to_ascii_uppercase()
                ),
            ));
        }
    }
    Ok(())
}

/// `api` keys read only from the environment.
const SECRET_API_KEYS: [&str; 2] = ["token", "iam_password"];

impl AmqpSettings {
    /// The queue and exchange names of keyturn's topology, each with its key.
    pub fn topology_names(&self) -> [(&'static str, &str); 6] {
        [
            ("amqp.jobs_queue", &self.jobs_queue),
            ("amqp.dead_letter_exchange", &self.dead_letter_exchange),
            ("amqp.dead_queue", &self.dead_queue),
            ("amqp.results_exchange", &self.results_exchange),
            ("amqp.unrouted_queue", &self.unrouted_queue),
            ("amqp.control_queue", &self.control_queue),
        ]
    }

    /// Names every queue and exchange of the topology under `prefix` (`{prefix}.jobs`,
    /// `{prefix}.jobs.dead`, `{prefix}.dlx`, ...), so that one run's topology meets no other's.
    pub fn name_under(&mut self, prefix: &str) {
        self.jobs_queue = format!("{prefix}.jobs");
        self.dead_queue = format!("{prefix}.jobs.dead");
        self.dead_letter_exchange = format!("{prefix}.dlx");
        self.results_exchange = format!("{prefix}.results");
        self.unrouted_queue = format!("{prefix}.results.unrouted");
        self.control_queue = format!("{prefix}.control");
    }

    /// The `KEYTURN_AMQP__…` variables that give a `keyturn` process this topology's names.
    pub fn topology_env(&self) -> Vec<(String, &str)> {
        self.topology_names()
            .into_iter()
            .map(|(key, name)| (env_name(key), name))
            .collect()
    }

    /// The broker nodes to connect to, each with the key that names it in errors: the entries
    /// of `amqp.urls` (`amqp.urls[0]`, ...) when there are any, else `amqp.url`.
    pub fn nodes(&self) -> Vec<(String, &str)> {
        if self.urls.is_empty() {
            return vec![("amqp.url".into(), self.url.as_str())];
        }
        self.urls
            .iter()
            .enumerate()
            .map(|(index, url)| (format!("amqp.urls[{index}]"), url.as_str()))
            .collect()
    }

    /// The PEM text of `amqp.ca_file`, checked to hold at least one certificate.
    pub fn ca_bundle(&self) -> Result<String, ConfigError> {
        let path = std::path::absolute(&self.ca_file).unwrap_or_else(|_| self.ca_file.clone());
        let text = std::fs::read_to_string(&path).map_err(|error| {
            config_error(
                "amqp.ca_file",
                format!("cannot read {}: {error}", path.display()),
            )
        })?;
        if !text.contains("-----BEGIN CERTIFICATE-----") {
            return Err(config_error(
                "amqp.ca_file",
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        Ok(text)
    }
}

const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// `log.level` is a comma-separated list of level names and `target=level` directives.
/// Checked here because `EnvFilter` takes any bare word (`verbose`, `infoo`) as a target name
/// and would silently log nothing.
fn validate_log_level(level: &str) -> Result<(), ConfigError> {
    let bad = |problem: String| {
        config_error(
            "log.level",
            format!(
                "{problem}; use a level ({}) or target=level, comma-separated",
                LOG_LEVELS.join(", ")
            ),
        )
    };
    let is_level = |word: &str| LOG_LEVELS.contains(&word.to_ascii_lowercase().as_str());
    let is_target = |word: &str| {
        !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
    };
    if level.trim().is_empty() {
        return Err(bad("is empty".into()));
    }
    for directive in level.split(',') {
        let directive = directive.trim();
        let fine = match directive.split_once('=') {
            None => is_level(directive),
            Some((target, level)) => is_target(target) && is_level(level),
        };
        if !fine {
            return Err(bad(format!("{directive:?} is not a level or target=level")));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|error| bad(error.to_string()))
}

fn range(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(config_error(
            key,
            format!("is {value}; it must be between {min} and {max}"),
        ))
    }
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// Longer than zero and at most `max`: every duration is bounded, so no arithmetic on it can
/// overflow an `Instant`.
fn bounded(key: &str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    positive(key, value)?;
    if value > max {
        return Err(config_error(
            key,
            format!(
                "is {}; it must be at most {}",
                humantime::format_duration(value),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

fn positive(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(config_error(key, "must be longer than zero"))
    } else {
        Ok(())
    }
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        config_error(
            "--config",
            format!("cannot read {}: {error}", path.display()),
        )
    })?;
    toml::from_str(&text).map_err(|error| {
        let at = error
            .span()
            .map(|span| format!(" (byte {})", span.start))
            .unwrap_or_default();
        config_error(
            path.display().to_string(),
            format!("is not valid TOML{at}: {}", error.message()),
        )
    })
}

/// The environment variable that sets `key` (`amqp.jobs_queue` → `KEYTURN_AMQP__JOBS_QUEUE`).
pub fn env_name(key: &str) -> String {
    format!("KEYTURN_{}", key.replacen('.', "__", 1).to_uppercase())
}

/// Applies `KEYTURN_<SECTION>__<KEY>` variables. Each value takes the type the key has in the
/// defaults, so `KEYTURN_AMQP__URL=...` stays a string and `KEYTURN_WORKER__CONCURRENCY=8` a number.
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<(), ConfigError> {
    let defaults = match toml::Value::try_from(Settings::default()).expect("defaults serialize") {
        toml::Value::Table(table) => table,
        _ => unreachable!("settings serialize to a table"),
    };
    for (name, value) in env {
        let Some(path) = name.strip_prefix("KEYTURN_") else {
            continue;
        };
        let Some((section, key)) = path.split_once("__") else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let dotted = format!("{section}.{key}");
        let secret = (section == "api" && SECRET_API_KEYS.contains(&key.as_str()))
            .then(|| toml::Value::String(String::new()));
        let Some(default) = defaults
            .get(&section)
            .and_then(|s| s.get(&key))
            .or(secret.as_ref())
        else {
            return Err(config_error(
                name.clone(),
                format!("names no config key ({dotted})"),
            ));
        };
        let typed = typed_value(default, value).ok_or_else(|| {
            config_error(
                dotted.clone(),
                format!("{name} is not a valid {}", default.type_str()),
            )
        })?;
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = entry else {
            return Err(config_error(dotted, "its section is not a table"));
        };
        section_table.insert(key, typed);
    }
    Ok(())
}

fn typed_value(like: &toml::Value, text: &str) -> Option<toml::Value> {
    Some(match like {
        toml::Value::Integer(_) => toml::Value::Integer(text.trim().parse().ok()?),
        toml::Value::Float(_) => toml::Value::Float(text.trim().parse().ok()?),
        toml::Value::Boolean(_) => toml::Value::Boolean(text.trim().parse().ok()?),
        // Lists (`KEYTURN_AMQP__URLS`) are comma-separated; empty text is the empty list.
        toml::Value::Array(_) if text.trim().is_empty() => toml::Value::Array(Vec::new()),
        toml::Value::Array(_) => toml::Value::Array(
            text.split(',')
                .map(|item| toml::Value::String(item.trim().to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(text.to_owned()),
    })
}

/// Secret text read straight into a [`SecretString`], so no plain copy outlives deserializing.
mod secret_text {
    use secrecy::SecretString;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<SecretString, D::Error> {
        String::deserialize(deserializer).map(SecretString::from)
    }
}

/// Durations written the human way (`250ms`, `30s`, `10m`).
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|error| {
            serde::de::Error::custom(format!("{text:?} is not a duration like 30s: {error}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn shipped() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/default.toml")
    }

    #[test]
    fn shipped_file_loads_and_equals_the_defaults() {
        let loaded = Settings::load(Some(&shipped()), &[]).unwrap();
        let defaults = Settings::default();
        assert_eq!(
            toml::to_string(&loaded).unwrap(),
            toml::to_string(&defaults).unwrap()
        );
    }

    #[test]
    fn store_settings_are_checked_and_the_url_never_repeated() {
        let load = |pairs: &[(&str, &str)]| Settings::load(None, &env(pairs));
        let postgres =
            load(&[("KEYTURN_STORE__URL", "postgres://u:secret-pw@db:5432/kt")]).unwrap();
        assert_eq!(
            postgres.store_location(),
            crate::audit::Location::Postgres("postgres://u:secret-pw@db:5432/kt".into())
        );
        assert!(
            !format!("{postgres:?}").contains("secret-pw"),
            "Debug hides it"
        );
        for (pairs, key) in [
            (
                vec![("KEYTURN_STORE__URL", "mysql://u:secret-pw@db/kt")],
                "store.url",
            ),
            (
                vec![("KEYTURN_STORE__URL", "postgres://u:secret-pw@db:99999/kt")],
                "store.url",
            ),
            (vec![("KEYTURN_STORE__LEASE", "1s")], "store.lease"),
            (
                vec![
                    ("KEYTURN_STORE__LEASE", "20s"),
                    ("KEYTURN_API__REQUEST_TIMEOUT", "15s"),
                ],
                "store.lease",
            ),
        ] {
            let error = load(&pairs).unwrap_err();
            assert_eq!(error.key, key, "{pairs:?}: {error}");
            assert!(!error.to_string().contains("secret-pw"), "{error}");
        }
        let fits = load(&[
            ("KEYTURN_STORE__LEASE", "3s"),
            ("KEYTURN_API__REQUEST_TIMEOUT", "1s"),
        ]);
        assert!(fits.is_ok(), "{fits:?}");
    }

    #[test]
    fn env_overrides_take_the_key_type() {
        let settings = Settings::load(
            None,
            &env(&[
                ("KEYTURN_AMQP__URL", "amqp://u:p@host:5673/v"),
                ("KEYTURN_WORKER__CONCURRENCY", "8"),
                ("KEYTURN_API__CONFIRM_AFTER", "true"),
                ("KEYTURN_RETRY__BASE_DELAY", "50ms"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.amqp.url, "amqp://u:p@host:5673/v");
        assert_eq!(settings.worker.concurrency, 8);
        assert!(settings.api.confirm_after);
        assert_eq!(settings.retry.base_delay, Duration::from_millis(50));
    }

    #[test]
    fn amqp_urls_come_comma_separated_from_the_env_and_win_over_url() {
        let load = |value: &str| Settings::load(None, &env(&[("KEYTURN_AMQP__URLS", value)]));
        let settings =
            load(" amqp://a:pw@n1:5701/%2f , amqp://a:pw@n2:5702/%2f,amqps://n3/v").unwrap();
        assert_eq!(
            settings.amqp.urls,
            [
                "amqp://a:pw@n1:5701/%2f",
                "amqp://a:pw@n2:5702/%2f",
                "amqps://n3/v"
            ]
        );
        let keys: Vec<_> = settings
            .amqp
            .nodes()
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(keys, ["amqp.urls[0]", "amqp.urls[1]", "amqp.urls[2]"]);
        // Empty: the single `amqp.url` is the one node.
        let single = load("").unwrap();
        assert!(single.amqp.urls.is_empty());
        assert_eq!(
            single.amqp.nodes(),
            [(
                "amqp.url".to_owned(),
                "amqp://guest:guest@127.0.0.1:5672/%2f"
            )]
        );
    }

    #[test]
    fn a_bad_node_in_amqp_urls_is_named_by_its_index() {
        let load = |value: &str| Settings::load(None, &env(&[("KEYTURN_AMQP__URLS", value)]));
        for (value, key) in [
            ("amqp://n1:5701/%2f,http://n2:5702", "amqp.urls[1]"),
            ("amqp://n1:5701/%2f,,amqp://n3", "amqp.urls[1]"),
            ("nope", "amqp.urls[0]"),
        ] {
            let error = load(value).unwrap_err();
            assert_eq!(error.key, key, "{value}: {error}");
            assert!(error.problem.contains("is not an AMQP URL"), "{error}");
        }
        // A comma in a password splits the entry; the error never repeats the text.
        let split = load("amqp://u:secret-part,x@h:5672/%2f").unwrap_err();
        assert_eq!(split.key, "amqp.urls[0]");
        assert!(!split.to_string().contains("secret-part"), "{split}");
        assert!(split.problem.contains("%2C"), "{split}");
        let file = load_file(
            "[amqp]\nurls = [\"amqp://n1:5701/%2f\", \"ftp://n2\"]\n",
            &[],
        );
        assert_eq!(file.unwrap_err().key, "amqp.urls[1]");
        let file = load_file("[amqp]\nurls = \"amqp://n1:5701/%2f\"\n", &[]);
        assert_eq!(file.unwrap_err().key, "amqp.urls");
    }

    #[test]
    fn an_otlp_endpoint_needs_the_otlp_feature_and_an_http_url() {
        let load =
            |value: &str| Settings::load(None, &env(&[("KEYTURN_TRACE__OTLP_ENDPOINT", value)]));
        assert!(load("").unwrap().trace.otlp_endpoint.is_empty());
        for bad in ["not a url", "ftp://collector:4318"] {
            let error = load(bad).unwrap_err();
            assert_eq!(error.key, "trace.otlp_endpoint", "{bad}: {error}");
        }
        let good = load("http://127.0.0.1:4318");
        if cfg!(feature = "otlp") {
            assert_eq!(good.unwrap().trace.otlp_endpoint, "http://127.0.0.1:4318");
        } else {
            let error = good.unwrap_err();
            assert_eq!(error.key, "trace.otlp_endpoint");
            assert!(error.problem.contains("--features otlp"), "{error}");
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("KEYTURN_WORKER__CONCURRENCY", "many", "worker.concurrency"),
            ("KEYTURN_WORKER__CONCURRENCY", "0", "worker.concurrency"),
            ("KEYTURN_WORKER__PREFETCH", "15", "worker.prefetch"),
            ("KEYTURN_WORKER__PREFETCH", "4001", "worker.prefetch"),
            ("KEYTURN_AMQP__URL", "http://x", "amqp.url"),
            ("KEYTURN_API__ENDPOINT", "not a url", "api.endpoint"),
            ("KEYTURN_RETRY__BASE_DELAY", "soon", "retry.base_delay"),
            ("KEYTURN_RETRY__DEADLINE", "40m", "retry.deadline"),
            ("KEYTURN_WORKER__MAX_HOLD", "26m", "worker.max_hold"),
            ("KEYTURN_WORKER__MAX_HOLD", "25m", "worker.max_hold"),
            ("KEYTURN_WORKER__MAX_HOLD", "0s", "worker.max_hold"),
            ("KEYTURN_API__REQUEST_TIMEOUT", "11m", "api.request_timeout"),
            (
                "KEYTURN_CIRCUIT__PROBE_MAX_INTERVAL",
                "100ms",
                "circuit.probe_max_interval",
            ),
            (
                "KEYTURN_CIRCUIT__STRIKES_TO_OPEN",
                "0",
                "circuit.strikes_to_open",
            ),
            (
                "KEYTURN_AMQP__CONTROL_QUEUE",
                "amq.control",
                "amqp.control_queue",
            ),
            ("KEYTURN_API__AUTH", "password", "api.auth"),
            ("KEYTURN_LOG__FORMAT", "xml", "log.format"),
            ("KEYTURN_LOG__LEVEL", "verbose", "log.level"),
            ("KEYTURN_LOG__LEVEL", "infoo", "log.level"),
            ("KEYTURN_LOG__LEVEL", "debug,,x=", "log.level"),
            ("KEYTURN_LOG__LEVEL", "keyturn=loud", "log.level"),
            (
                "KEYTURN_AMQP__UNROUTED_QUEUE",
                "amq.x",
                "amqp.unrouted_queue",
            ),
            (
                "KEYTURN_AMQP__CA_FILE",
                "/nonexistent/ca.pem",
                "amqp.ca_file",
            ),
            (
                "KEYTURN_WORKER__DEFAULT_REGION",
                "mars-1",
                "worker.default_region",
            ),
            ("KEYTURN_NOPE__KEY", "1", "KEYTURN_NOPE__KEY"),
        ];
        for (name, value, key) in cases {
            let result = Settings::load(None, &env(&[(name, value)]))
                .and_then(|settings| settings.credentials(&[]).map(|_| settings));
            let error = result.expect_err(name);
            assert_eq!(error.key, key, "{name}={value}: {error}");
        }
    }

    #[test]
    fn log_levels_and_directives_pass() {
        for level in [
            "info",
            "WARN",
            "keyturn=debug",
            "warn,keyturn=trace,lapin=off",
        ] {
            Settings::load(None, &env(&[("KEYTURN_LOG__LEVEL", level)]))
                .unwrap_or_else(|error| panic!("{level}: {error}"));
        }
    }

    #[test]
    fn the_broker_ca_file_must_hold_a_pem_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let error = Settings::load(
            None,
            &env(&[("KEYTURN_AMQP__CA_FILE", empty.to_str().unwrap())]),
        )
        .unwrap_err();
        assert_eq!(error.key, "amqp.ca_file");
        assert!(error.problem.contains("no PEM certificate"), "{error}");
        let good = dir.path().join("ca.pem");
        std::fs::write(
            &good,
            "-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let settings = Settings::load(
            None,
            &env(&[("KEYTURN_AMQP__CA_FILE", good.to_str().unwrap())]),
        )
        .unwrap();
        assert!(
            settings
                .amqp
                .ca_bundle()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[worker]\nconcurency = 3\n").unwrap();
        let error = Settings::load(Some(&path), &[]).unwrap_err();
        assert!(error.key.starts_with("worker"), "{error}");
        assert!(error.problem.contains("concurency"), "{error}");
    }

    fn load_file(text: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyturn.toml");
        std::fs::write(&path, text).unwrap();
        Settings::load(Some(&path), &env(vars))
    }

    #[test]
    fn plain_http_endpoints_only_on_loopback_unless_allowed() {
        for endpoint in [
            "http://127.0.0.1:8600",
            "http://127.9.8.7",
            "http://[::1]:8600/",
            "http://localhost:8600",
            "http://LOCALHOST",
            "https://gaussdb.example.com",
        ] {
            let loaded = Settings::load(None, &env(&[("KEYTURN_API__ENDPOINT", endpoint)]));
            assert!(loaded.is_ok(), "{endpoint}: {:?}", loaded.err());
        }
        for endpoint in [
            "http://10.0.0.8:8600",
            "http://localhost.example.com",
            "http://gaussdb.example.com",
            "http://[::2]",
            "http://128.0.0.1",
        ] {
            let error = Settings::load(None, &env(&[("KEYTURN_API__ENDPOINT", endpoint)]))
                .expect_err(endpoint);
            assert_eq!(error.key, "api.endpoint", "{error}");
            assert!(error.problem.contains("use https"), "{error}");
            assert!(error.problem.contains("api.allow_insecure_http"), "{error}");
            let allowed = Settings::load(
                None,
                &env(&[
                    ("KEYTURN_API__ENDPOINT", endpoint),
                    ("KEYTURN_API__ALLOW_INSECURE_HTTP", "true"),
                ]),
            );
            assert!(allowed.is_ok(), "{endpoint}: {:?}", allowed.err());
        }
        let in_file = load_file(
            "[api]\nendpoint = \"http://10.1.2.3\"\nallow_insecure_http = true\n",
            &[],
        );
        assert!(in_file.unwrap().api.allow_insecure_http);
    }

    #[test]
    fn a_token_in_the_file_is_refused_and_the_env_token_stays_secret() {
        for text in [
            "[api]\ntoken = \"file-token-secret\"\n",
            "[api]\ntoken = \"\"\n",
        ] {
            let error = load_file(text, &[("KEYTURN_API__TOKEN", "x")]).unwrap_err();
            assert_eq!(
                error.to_string(),
                "config key api.token: must not be written in the config file; set KEYTURN_API__TOKEN"
            );
        }
        let vars = [
            ("KEYTURN_API__AUTH", "token"),
            ("KEYTURN_API__TOKEN", "env-token-secret-42"),
        ];
        let settings = load_file("[api]\nauth = \"aksk\"\n", &vars).unwrap();
        match settings.credentials(&[]).unwrap() {
            Credentials::Token(token) => assert_eq!(token.expose_secret(), "env-token-secret-42"),
            _ => panic!("token auth expected"),
        }
        assert!(!format!("{settings:?}").contains("env-token-secret-42"));
        assert!(
            !toml::to_string(&settings)
                .unwrap()
                .contains("env-token-secret-42")
        );
        let no_token = Settings::load(None, &env(&[("KEYTURN_API__AUTH", "token")])).unwrap();
        assert_eq!(no_token.credentials(&[]).unwrap_err().key, "api.token");
    }

    #[test]
    fn a_ca_file_must_be_a_readable_pem_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let garbage = write("garbage.pem", "not a certificate\n");
        let empty = write("empty.pem", "");
        let bad_der = write(
            "bad.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let missing = dir.path().join("missing.pem");
        for path in [&garbage, &empty, &bad_der, &missing] {
            let shown = path.display().to_string();
            let error =
                Settings::load(None, &env(&[("KEYTURN_API__CA_FILE", &shown)])).expect_err(&shown);
            assert_eq!(error.key, "api.ca_file", "{error}");
            assert!(error.problem.contains(&shown), "{error}");
            assert_eq!(error.to_string().lines().count(), 1, "{error}");
        }
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let good = write("good.pem", &ca.cert.pem());
        let shown = good.display().to_string();
        let settings = Settings::load(None, &env(&[("KEYTURN_API__CA_FILE", &shown)])).unwrap();
        assert_eq!(settings.api.ca_file, good);
    }

    #[test]
    fn each_missing_piece_of_a_credential_source_names_its_key() {
        let iam = [
            ("KEYTURN_API__CREDENTIALS", "iam"),
            ("KEYTURN_API__IAM_DOMAIN", "acct"),
            ("KEYTURN_API__IAM_USER", "worker"),
            ("KEYTURN_API__IAM_PASSWORD", "iam-password-never-show"),
        ];
        for missing in 1..iam.len() {
            let vars: Vec<_> = iam
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != missing)
                .map(|(_, v)| *v)
                .collect();
            let error = Settings::load(None, &env(&vars))
                .and_then(|settings| settings.credentials(&[]))
                .unwrap_err();
            let key = iam[missing]
                .0
                .strip_prefix("KEYTURN_API__")
                .unwrap()
                .to_ascii_lowercase();
            assert_eq!(error.key, format!("api.{key}"), "{error}");
        }
        let settings = Settings::load(None, &env(&iam)).unwrap();
        let credentials = settings.credentials(&[]).unwrap();
        assert!(matches!(credentials, Credentials::Iam(_)));
        for shown in [
            format!("{credentials:?}"),
            format!("{settings:?}"),
            toml::to_string(&settings).unwrap(),
        ] {
            assert!(!shown.contains("iam-password-never-show"), "{shown}");
        }
        for (name, value, key) in [
            ("KEYTURN_API__CREDENTIALS", "password", "api.credentials"),
            (
                "KEYTURN_API__IAM_ENDPOINT",
                "http://iam.example.com",
                "api.iam_endpoint",
            ),
            (
                "KEYTURN_API__METADATA_URL",
                "169.254.169.254",
                "api.metadata_url",
            ),
            ("KEYTURN_API__REFRESH_BEFORE", "0s", "api.refresh_before"),
            ("KEYTURN_API__REFRESH_BEFORE", "2h", "api.refresh_before"),
        ] {
            let error = Settings::load(None, &env(&[(name, value)])).expect_err(name);
            assert_eq!(error.key, key, "{error}");
        }
        // Gone (each token is scoped to its job's project): an old setting is refused, not ignored.
        let error = load_file("[api]\niam_project = \"cn-north-4\"\n", &[]).unwrap_err();
        assert_eq!(error.key, "api.iam_project", "{error}");
        let error = Settings::load(None, &env(&[("KEYTURN_API__IAM_PROJECT", "x")])).unwrap_err();
        assert_eq!(error.key, "KEYTURN_API__IAM_PROJECT", "{error}");
        let error = load_file("[api]\niam_password = \"x\"\n", &[]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "config key api.iam_password: must not be written in the config file; set KEYTURN_API__IAM_PASSWORD"
        );
    }

    #[test]
    fn a_security_token_makes_the_sdk_keys_temporary_and_never_prints() {
        let settings = Settings::load(None, &[]).unwrap();
        let vars = env(&[
            ("CLOUD_SDK_AK", "AK1"),
            ("CLOUD_SDK_SK", "sk"),
            ("CLOUD_SDK_SECURITY_TOKEN", "security-token-never-show"),
        ]);
        let credentials = settings.credentials(&vars).unwrap();
        assert!(matches!(credentials, Credentials::TemporaryAkSk { .. }));
        assert!(!format!("{credentials:?}").contains("security-token-never-show"));
        let metadata = Settings::load(None, &env(&[("KEYTURN_API__AUTH", "metadata")])).unwrap();
        match metadata.credentials(&[]).unwrap() {
            Credentials::Metadata { url } => assert_eq!(url, "http://169.254.169.254"),
            other => panic!("metadata expected, not {other:?}"),
        }
    }

    #[test]
    fn credentials_come_from_the_sdk_variables_and_never_print() {
        let settings = Settings::load(None, &[]).unwrap();
        assert_eq!(settings.credentials(&[]).unwrap_err().key, "CLOUD_SDK_AK");
        let creds = settings
            .credentials(&env(&[
                ("CLOUD_SDK_AK", "AK1"),
                ("CLOUD_SDK_SK", "very-secret-sk"),
            ]))
            .unwrap();
        assert!(!format!("{creds:?}").contains("very-secret-sk"));
    }
}
