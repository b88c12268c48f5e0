//! Shared test scaffolding: a real broker, the simulator on a real socket, a fresh SQLite file and
//! uniquely named queues per test, so tests never share state and can run in parallel.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use keyturn::amqp::worker::{self, RunOptions};
use keyturn::audit::test_support::TestDatabase;
use keyturn::config::{Credentials, Settings};
use keyturn::events::ResultEvent;
use keyturn::pipeline::Pipeline;
use keyturn::simulator::{Faults, Simulator, SimulatorConfig, Stats};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const AK: &str = "TESTACCESSKEYKEYTURN";
pub const SK: &str = "test-secret-key-3f9c2e71-never-log-me";
pub const TOKEN: &str = "test-token-MIIZ-never-log-me-91b3";
pub const PROJECT: &str = "619d3e78f61b4be68bc5aa0b59edcf7b";
pub const IAM_DOMAIN: &str = "keyturn-account";
pub const IAM_USER: &str = "keyturn-worker";
pub const IAM_PASSWORD: &str = "iam-password-5e1d-never-log-me";
pub const KEY: &str = "b82fa43f-f6e8-4ec4-9c31-231bc547c526";

static BROKER: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

/// The broker for tests: KEYTURN_TEST_AMQP_URL, else the local one, else (built with
/// `--features testcontainers`) a RabbitMQ container; with none of them the test fails and says
/// how to get one. Never a silent skip.
pub async fn broker_url() -> String {
    BROKER.get_or_init(find_broker).await.clone()
}

async fn find_broker() -> String {
    if let Ok(url) = std::env::var("KEYTURN_TEST_AMQP_URL") {
        return url;
    }
    let local = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect("127.0.0.1:5672"),
    )
    .await;
    if matches!(local, Ok(Ok(_))) {
        return "amqp://guest:guest@127.0.0.1:5672/%2f".into();
    }
    match start_container().await {
        Ok(url) => url,
        Err(error) => panic!(
            "no RabbitMQ for the tests: KEYTURN_TEST_AMQP_URL is unset, nothing listens on 127.0.0.1:5672, \
             and no container could be started ({error}). Start one with `rabbitmq-server -detached` \
             or `docker compose up -d rabbitmq`, set KEYTURN_TEST_AMQP_URL, or, with Docker, run \
             `cargo test --features testcontainers`."
        ),
    }
}

#[cfg(feature = "testcontainers")]
async fn start_container() -> Result<String, String> {
    use testcontainers_modules::rabbitmq::RabbitMq;
    use testcontainers_modules::testcontainers::ImageExt;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    let container = RabbitMq::default()
        .with_tag("3.13-management")
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let port = container
        .get_host_port_ipv4(5672)
        .await
        .map_err(|e| e.to_string())?;
    // The container must outlive every test of this process; Docker removes it with the
    // process's other leftovers (`docker container prune`).
    std::mem::forget(container);
    Ok(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
}

#[cfg(not(feature = "testcontainers"))]
async fn start_container() -> Result<String, String> {
    Err("built without the testcontainers feature".into())
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// One isolated keyturn deployment: simulator, settings, topology names, audit file.
pub struct TestApp {
    pub settings: Settings,
    pub simulator: Arc<Simulator>,
    pub simulator_url: String,
    pub events_queue: String,
    pub channel: Channel,
    _connection: Connection,
    _dir: tempfile::TempDir,
    /// The test's own PostgreSQL database, when it runs on the PostgreSQL store.
    pub postgres: Option<Arc<TestDatabase>>,
    /// The simulator's server, which [`TestApp::simulator_down`] and `simulator_up` replace.
    simulator_server: std::sync::Mutex<SimulatorServer>,
}

pub struct Options {
    pub faults: Faults,
    /// How long the simulator's issued IAM tokens and temporary keys live.
    pub credential_life: Duration,
    pub fleet: Option<Vec<(String, String)>>,
    pub tweak: Box<dyn FnOnce(&mut Settings) + Send>,
    /// Run on a PostgreSQL database of the test's own instead of a SQLite file.
    pub postgres: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            faults: Faults::default(),
            credential_life: Duration::from_secs(3600),
            fleet: None,
            tweak: Box::new(|_| {}),
            postgres: false,
        }
    }
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Options::default()).await
    }

    /// An app whose simulator takes `latency_ms` to answer every call, so jobs stay in flight
    /// long enough for a test to break something under them.
    pub async fn spawn_with_latency(latency_ms: u64) -> TestApp {
        Self::spawn_with(Options {
            faults: Faults {
                latency_ms,
                ..Faults::default()
            },
            ..Options::default()
        })
        .await
    }

    pub async fn spawn_with(options: Options) -> TestApp {
        let simulator = Simulator::new(SimulatorConfig {
            credentials: vec![(AK.into(), SK.to_owned().into())],
            tokens: vec![TOKEN.to_owned().into()],
            fleet: options.fleet,
            faults: options.faults,
            max_clock_skew: Duration::from_secs(15 * 60),
            seed: 42,
            credential_life: options.credential_life,
            iam_users: vec![keyturn::simulator::IamUser {
                domain: IAM_DOMAIN.into(),
                name: IAM_USER.into(),
                password: IAM_PASSWORD.to_owned().into(),
            }],
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let simulator_url = format!("http://{}", listener.local_addr().unwrap());
        let simulator_server = SimulatorServer::start(listener, &simulator);

        let dir = tempfile::tempdir().unwrap();
        let name = unique("kt-test");
        let mut settings = Settings::load(None, &[]).unwrap();
        settings.amqp.url = broker_url().await;
        settings.amqp.name_under(&name);
        settings.amqp.reconnect_max_backoff = Duration::from_secs(2);
        settings.worker.id = name.clone();
        settings.worker.concurrency = 4;
        settings.worker.grace_period = Duration::from_secs(5);
        settings.api.endpoint = simulator_url.clone();
        settings.api.request_timeout = Duration::from_secs(5);
        settings.retry.base_delay = Duration::from_millis(20);
        settings.retry.max_delay = Duration::from_millis(200);
        settings.retry.deadline = Duration::from_secs(30);
        settings.rate_limit.per_project_per_second = 100;
        settings.rate_limit.per_project_burst = 20;
        settings.rate_limit.per_second = 200;
        settings.rate_limit.burst = 50;
        settings.rate_limit.throttle_pause = Duration::from_millis(300);
        settings.audit.path = dir.path().join("audit.db");
        let postgres = options
            .postgres
            .then(|| Arc::new(TestDatabase::create("it")));
        if let Some(db) = &postgres {
            settings.store.url = db.url.clone();
        }
        // Tests run many workers at once: none serves the ops endpoint unless a test asks.
        settings.ops.listen = String::new();
        (options.tweak)(&mut settings);

        let connection = Connection::connect(&settings.amqp.url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        keyturn::amqp::topology::declare(&channel, &settings.amqp)
            .await
            .unwrap();
        let events_queue = format!("{name}.events");
        channel
            .queue_declare(
                events_queue.as_str().into(),
                // Durable, so a broker restart (tests/restart.rs) keeps the events it collected.
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                events_queue.as_str().into(),
                settings.amqp.results_exchange.as_str().into(),
                "job.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        TestApp {
            settings,
            simulator,
            simulator_url,
            events_queue,
            channel,
            _connection: connection,
            _dir: dir,
            postgres,
            simulator_server: std::sync::Mutex::new(simulator_server),
        }
    }

    pub fn credentials(&self) -> Credentials {
        Credentials::AkSk {
            ak: AK.into(),
            sk: SK.to_owned().into(),
        }
    }

    /// Starts an in-process worker; stop it with the returned token.
    pub fn start_worker(&self) -> (CancellationToken, JoinHandle<()>) {
        self.start_worker_with(self.credentials(), RunOptions::default())
    }

    pub fn start_worker_with(
        &self,
        credentials: Credentials,
        options: RunOptions,
    ) -> (CancellationToken, JoinHandle<()>) {
        self.start_worker_on(self.settings.clone(), credentials, options)
    }

    /// Starts an in-process worker with `settings` in place of the app's own.
    pub fn start_worker_on(
        &self,
        settings: Settings,
        credentials: Credentials,
        options: RunOptions,
    ) -> (CancellationToken, JoinHandle<()>) {
        let (shutdown, handle, _) = self.start_worker_watched(settings, credentials, options);
        (shutdown, handle)
    }

    /// [`TestApp::start_worker_on`], also handing back the worker's pipeline to watch its state.
    pub fn start_worker_watched(
        &self,
        settings: Settings,
        credentials: Credentials,
        options: RunOptions,
    ) -> (CancellationToken, JoinHandle<()>, Arc<Pipeline>) {
        let (pipeline, publisher) = keyturn::cli::build_pipeline(settings, credentials).unwrap();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let running = pipeline.clone();
        let handle = tokio::spawn(async move {
            worker::run(running, options, token).await.unwrap();
            publisher.close().await;
        });
        (shutdown, handle, pipeline)
    }

    /// Runs a worker until the queue has been idle for a moment, then returns.
    pub async fn drain(&self) {
        self.drain_with(self.credentials()).await;
    }

    /// [`TestApp::drain`] with other credentials.
    pub async fn drain_with(&self, credentials: Credentials) {
        let (_, handle) = self.start_worker_with(
            credentials,
            RunOptions {
                exit_when_idle: Some(Duration::from_millis(600)),
            },
        );
        tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("worker drained in time")
            .unwrap();
    }

    pub async fn publish(&self, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.settings.amqp.jobs_queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    pub async fn publish_job(&self, job: &Value) {
        self.publish(
            job.to_string().as_bytes(),
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await;
    }

    /// Collects result events until at least `count` arrived or 60 s passed, and returns them.
    pub async fn events(&self, count: usize) -> Vec<ResultEvent> {
        self.events_until(|events| events.len() >= count).await
    }

    /// Collects result events until `enough` holds or 60 s passed; each is checked on the way.
    pub async fn events_until(&self, enough: impl Fn(&[ResultEvent]) -> bool) -> Vec<ResultEvent> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut events = Vec::new();
        loop {
            while let Some(message) = self
                .channel
                .basic_get(
                    self.events_queue.as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap()
            {
                let properties = &message.delivery.properties;
                assert_eq!(
                    properties.content_type().as_ref().map(|c| c.as_str()),
                    Some("application/cloudevents+json")
                );
                let event: ResultEvent = serde_json::from_slice(&message.delivery.data).unwrap();
                assert_eq!(
                    properties.message_id().as_ref().map(|m| m.as_str()),
                    Some(event.id.as_str())
                );
                assert_eq!(message.delivery.routing_key.as_str(), event.routing_key());
                assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
                assert_eq!(
                    properties.kind().as_ref().map(|k| k.as_str()),
                    Some(event.kind.as_str())
                );
                events.push(event);
            }
            if enough(&events) || tokio::time::Instant::now() >= deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every message waiting in `queue` now, taken off it.
    pub async fn take_waiting(&self, queue: &str) -> Vec<lapin::message::Delivery> {
        let mut taken = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            taken.push(message.delivery);
        }
        taken
    }

    pub async fn queue_len(&self, queue: &str) -> u32 {
        self.inspect(queue).await.message_count()
    }

    /// How many consumers `queue` has: a worker consumes only after it declared the topology.
    pub async fn consumers(&self, queue: &str) -> u32 {
        self.inspect(queue).await.consumer_count()
    }

    async fn inspect(&self, queue: &str) -> lapin::Queue {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .unwrap()
    }

    /// Takes every message from the dead queue (acking them) and returns their bodies.
    pub async fn dead_letters(&self) -> Vec<Vec<u8>> {
        self.take_waiting(&self.settings.amqp.dead_queue)
            .await
            .into_iter()
            .map(|delivery| delivery.data)
            .collect()
    }

    pub fn stats(&self) -> Stats {
        self.simulator.stats()
    }

    /// Describe calls the simulator saw, over all instances: reconciliations of uncertain jobs.
    pub fn describe_calls(&self) -> u64 {
        self.stats()
            .instances
            .values()
            .map(|i| i.describe_calls)
            .sum()
    }

    pub fn audit_path(&self) -> PathBuf {
        self.settings.audit.path.clone()
    }

    /// Every `toggles` row as a JSON object keyed by column.
    pub fn toggles(&self) -> Vec<Value> {
        self.store_rows("SELECT * FROM toggles ORDER BY id")
    }

    pub fn attempts(&self, job_id: &str) -> Vec<Value> {
        self.store_rows(&format!(
            "SELECT * FROM attempts WHERE job_id = '{job_id}' ORDER BY id"
        ))
    }

    /// The rows of `sql` on the app's store, whichever it is, as JSON objects keyed by column.
    pub fn store_rows(&self, sql: &str) -> Vec<Value> {
        match &self.postgres {
            Some(db) => pg_rows(db, sql),
            None => rows(&self.audit_path(), sql),
        }
    }

    /// A new connection and channel for the test's own use, after the broker cut the old ones.
    #[allow(dead_code, reason = "used by tests/restart.rs only")]
    pub async fn reconnect(&mut self) {
        let connection =
            Connection::connect(&self.settings.amqp.url, ConnectionProperties::default())
                .await
                .unwrap();
        self.channel = connection.create_channel().await.unwrap();
        self.channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        self._connection = connection;
    }

    /// The `keyturn worker` binary wired to this app's queues, simulator and audit file, with
    /// fast retries and generous rate limits; `extra` settings are applied last.
    /// The `keyturn` binary wired to this app as an operator's shell would be: its queue names,
    /// the simulator, its audit file and the test credentials.
    pub fn binary(&self) -> std::process::Command {
        let names = &self.settings.amqp;
        let mut command = keyturn_binary();
        command
            .env("KEYTURN_AMQP__URL", &names.url)
            .envs(names.topology_env())
            .env("KEYTURN_API__ENDPOINT", &self.simulator_url)
            .env("KEYTURN_AUDIT__PATH", self.audit_path())
            .env("KEYTURN_STORE__URL", &self.settings.store.url)
            .env("KEYTURN_OPS__LISTEN", "")
            .env("CLOUD_SDK_AK", AK)
            .env("CLOUD_SDK_SK", SK)
            .stdin(Stdio::null());
        command
    }

    pub fn worker_process(&self, extra: &[(&str, &str)]) -> tokio::process::Command {
        let mut command = self.binary();
        command
            .arg("worker")
            .env("KEYTURN_WORKER__ID", &self.settings.worker.id)
            // The simulator answers at once unless told to hang; a short timeout also lets a
            // restarted worker take its killed run's leases back soon after it starts.
            .env("KEYTURN_API__REQUEST_TIMEOUT", "5s")
            .env("KEYTURN_RETRY__BASE_DELAY", "20ms")
            .env("KEYTURN_RETRY__MAX_DELAY", "200ms")
            .env("KEYTURN_RATE_LIMIT__PER_PROJECT_PER_SECOND", "1000")
            .env("KEYTURN_RATE_LIMIT__PER_PROJECT_BURST", "100")
            .env("KEYTURN_RATE_LIMIT__PER_SECOND", "1000")
            .env("KEYTURN_RATE_LIMIT__BURST", "100")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (name, value) in extra {
            command.env(name, value);
        }
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);
        command
    }

    pub async fn cleanup(&self) {
        let _ = self
            .channel
            .queue_delete(self.events_queue.as_str().into(), Default::default())
            .await;
        let _ = keyturn::amqp::topology::delete(&self.channel, &self.settings.amqp).await;
        self.simulator_server().stop.cancel();
    }
}

/// Events grouped by job id.
pub fn by_job(events: &[ResultEvent]) -> HashMap<String, Vec<&ResultEvent>> {
    let mut grouped: HashMap<String, Vec<&ResultEvent>> = HashMap::new();
    for event in events {
        grouped
            .entry(event.data.job_id.clone())
            .or_default()
            .push(event);
    }
    grouped
}

/// Drains the events queue until every job has at least one event; asserts replays share ids.
/// Every job has exactly one final audit row, at least one event (replays share the event id),
/// its instance in the requested state, and at most one Modify sent.
pub async fn assert_one_outcome_per_job(app: &TestApp, jobs: &[(String, u32, &str)]) {
    let all = app
        .events_until(|events| by_job(events).len() >= jobs.len())
        .await;
    let grouped = by_job(&all);
    for (job_id, _, _) in jobs {
        let events = grouped
            .get(job_id)
            .unwrap_or_else(|| panic!("no event for {job_id}"));
        assert!(
            events.iter().all(|e| e.id == events[0].id),
            "replays of {job_id} keep the event id"
        );
    }
    let rows = app.toggles();
    assert_eq!(rows.len(), jobs.len(), "one final audit row per job");
    let stats = app.stats();
    for (job_id, n, status) in jobs {
        assert_eq!(
            app.simulator.status_of(PROJECT, &instance(*n)).as_deref(),
            Some(*status),
            "{job_id}"
        );
        let modify_calls = stats
            .instances
            .get(&instance(*n))
            .map_or(0, |i| i.modify_calls);
        assert!(modify_calls <= 1, "{job_id} was sent {modify_calls} times");
    }
}

/// After a fault injected mid-run, when `done_at_fault` jobs had finished: every job finishes
/// exactly once (see [`assert_one_outcome_per_job`]), and nothing is left in the jobs queue or
/// dead-lettered.
pub async fn assert_fleet_recovers(
    app: &TestApp,
    jobs: &[(String, u32, &str)],
    done_at_fault: usize,
) {
    wait_until(Duration::from_secs(120), || async {
        app.toggles().len() == jobs.len()
    })
    .await;
    assert!(
        done_at_fault < jobs.len(),
        "the fault came mid-run: {done_at_fault} of {} jobs done",
        jobs.len()
    );
    assert_one_outcome_per_job(app, jobs).await;
    wait_until(Duration::from_secs(60), || async {
        app.queue_len(&app.settings.amqp.jobs_queue).await == 0
    })
    .await;
    assert!(app.dead_letters().await.is_empty());
}

/// Publishes `count` valid jobs for instances `base..base+count`, a third of them "off".
pub async fn publish_fleet(
    app: &TestApp,
    count: u32,
    base: u32,
) -> Vec<(String, u32, &'static str)> {
    let mut jobs = Vec::new();
    for i in 0..count {
        let status = if i % 3 == 0 { "off" } else { "on" };
        let job_id = format!("J-{base}-{i}");
        app.publish_job(&job(&job_id, base + i, status)).await;
        jobs.push((job_id, base + i, status));
    }
    jobs
}

/// Sends SIGTERM to `child` and returns its exit code once it stopped, within `limit`.
pub async fn terminate(child: &mut tokio::process::Child, limit: Duration) -> Option<i32> {
    let pid = child.id().expect("the child is running").to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::time::timeout(limit, child.wait())
        .await
        .unwrap_or_else(|_| panic!("stopped within {limit:?} of SIGTERM"))
        .unwrap();
    status.code()
}

/// The `keyturn` binary with a clean environment and the shipped default configuration.
pub fn keyturn_binary() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keyturn"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "KEYTURN_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"),
        );
    command
}

pub fn rows(path: &std::path::Path, sql: &str) -> Vec<Value> {
    let connection = rusqlite::Connection::open(path).unwrap();
    let mut statement = connection.prepare(sql).unwrap();
    let names: Vec<String> = statement
        .column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    statement
        .query_map([], |row| {
            let mut object = serde_json::Map::new();
            for (index, name) in names.iter().enumerate() {
                let value = match row.get_ref(index)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(i) => json!(i),
                    rusqlite::types::ValueRef::Real(f) => json!(f),
                    rusqlite::types::ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
                    rusqlite::types::ValueRef::Blob(_) => json!("<blob>"),
                };
                object.insert(name.clone(), value);
            }
            Ok(Value::Object(object))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The rows of `sql` on a PostgreSQL test database, as JSON objects keyed by column.
pub fn pg_rows(db: &TestDatabase, sql: &str) -> Vec<Value> {
    let sql = sql.to_owned();
    db.with_client(move |client| {
        use postgres::types::Type;
        client
            .query(sql.as_str(), &[])
            .unwrap()
            .iter()
            .map(|row| {
                let mut object = serde_json::Map::new();
                for (index, column) in row.columns().iter().enumerate() {
                    let value = match *column.type_() {
                        Type::INT8 => json!(row.get::<_, Option<i64>>(index)),
                        Type::INT4 => json!(row.get::<_, Option<i32>>(index)),
                        Type::BOOL => json!(row.get::<_, Option<bool>>(index)),
                        Type::BYTEA => json!("<blob>"),
                        _ => json!(row.get::<_, Option<String>>(index)),
                    };
                    object.insert(column.name().to_owned(), value);
                }
                Value::Object(object)
            })
            .collect()
    })
}

/// Polls `condition` until it holds or `limit` passes; panics on the deadline.
pub async fn wait_until<F, Fut>(limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A valid job for instance number `n`.
pub fn job(job_id: &str, n: u32, status: &str) -> Value {
    let mut body = json!({
        "job_id": job_id, "rollout_id": "R-1", "ticket": "CHG-1042", "region": "cn-north-4",
        "project_id": PROJECT, "instance_id": instance(n), "encryption_status": status,
        "requested_by": "alice",
    });
    if status.eq_ignore_ascii_case("on") {
        body["type"] = json!("kms");
        body["kms_key_id"] = json!(KEY);
    }
    body
}

pub fn instance(n: u32) -> String {
    format!("{n:032x}in07")
}

/// The simulator's HTTP server of a [`TestApp`]: where it listens and how to stop it.
pub struct SimulatorServer {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl SimulatorServer {
    fn start(listener: tokio::net::TcpListener, simulator: &Arc<Simulator>) -> SimulatorServer {
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(keyturn::simulator::serve(
            listener,
            simulator.clone(),
            async move { stopped.cancelled().await },
        ));
        SimulatorServer {
            addr,
            stop,
            task: Some(task),
        }
    }
}

impl TestApp {
    fn simulator_server(&self) -> std::sync::MutexGuard<'_, SimulatorServer> {
        self.simulator_server
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the simulator off the network, keeping its state: once this returns nothing listens
    /// on its address (new connections are refused) and every connection it had is closed
    /// (requests in flight are answered at once, hangs cut short).
    #[allow(dead_code, reason = "used by the outage tests")]
    pub async fn simulator_down(&self) {
        let task = {
            let mut server = self.simulator_server();
            server.stop.cancel();
            server.task.take()
        };
        if let Some(task) = task {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the simulator closed its connections within 10 s")
                .unwrap()
                .unwrap();
        }
    }

    /// Serves the same simulator (same state) on the same address again.
    #[allow(dead_code, reason = "used by the outage tests")]
    pub async fn simulator_up(&self) {
        let addr = self.simulator_server().addr;
        assert!(
            self.simulator_server().task.is_none(),
            "the simulator is already up"
        );
        // tokio sets SO_REUSEADDR, so the port is free again at once despite closed connections.
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        *self.simulator_server() = SimulatorServer::start(listener, &self.simulator);
    }
}

impl TestApp {
    /// Waits until a worker process has created and migrated the audit file (it does so before
    /// it consumes), so the test can read its tables.
    pub async fn wait_for_audit(&self) {
        wait_until(Duration::from_secs(30), || async {
            match &self.postgres {
                // The last migration's table: every migration commits with its own.
                Some(db) => !pg_rows(
                    db,
                    "SELECT 1 AS migrated WHERE to_regclass('rate_buckets') IS NOT NULL",
                )
                .is_empty(),
                None => {
                    self.audit_path().exists()
                        && !rows(
                            &self.audit_path(),
                            "SELECT name FROM sqlite_master WHERE name = 'rate_buckets'",
                        )
                        .is_empty()
                }
            }
        })
        .await;
    }
}

/// The control queue, as a ticketing system or an operator's tool uses it.
impl TestApp {
    /// Sends a control command and returns the worker's answer (within 30 s).
    pub async fn command(&self, command: Value) -> keyturn::rollout::Reply {
        let reply_queue = self
            .channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut replies = self
            .channel
            .basic_consume(
                reply_queue.name().clone(),
                "".into(),
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let id = uuid::Uuid::new_v4().to_string();
        self.send_command(&command, &id, Some(reply_queue.name().as_str()))
            .await;
        let reply = tokio::time::timeout(Duration::from_secs(30), replies.next())
            .await
            .expect("the worker answered within 30 s")
            .unwrap()
            .unwrap();
        assert_eq!(
            reply
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some(id.as_str())
        );
        serde_json::from_slice(&reply.data).unwrap()
    }

    /// Publishes a control command with `message_id` (and optionally `reply_to`).
    /// Publishes a control command with `message_id` ("" for none) and optionally `reply_to`.
    pub async fn send_command(&self, command: &Value, message_id: &str, reply_to: Option<&str>) {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if !message_id.is_empty() {
            properties = properties
                .with_message_id(message_id.into())
                .with_correlation_id(message_id.into());
        }
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.settings.amqp.control_queue.as_str().into(),
                Default::default(),
                command.to_string().as_bytes(),
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    pub async fn status(&self, rollout_id: &str) -> keyturn::rollout::Snapshot {
        let reply = self
            .command(json!({"kind": "status", "rollout_id": rollout_id}))
            .await;
        assert!(reply.ok, "{reply:?}");
        reply.rollouts.into_iter().next().unwrap()
    }
}

/// Closes, with `rabbitmqctl`, every connection whose client-given name contains `worker_id`.
pub async fn close_connections_named(worker_id: &str) -> usize {
    let listing = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .await
        .expect("rabbitmqctl is installed with the broker");
    let text = String::from_utf8_lossy(&listing.stdout);
    let pids: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(worker_id))
        .filter_map(|line| line.split('\t').next())
        .collect();
    for pid in &pids {
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "keyturn test: forced close"])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    }
    pids.len()
}

/// The worker's stderr, read to the end once it exited.
pub async fn stderr_of(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        stderr.read_to_string(&mut text).await.unwrap();
    }
    text
}

/// Jobs parked in the app's store.
pub fn parked(app: &TestApp) -> usize {
    app.store_rows("SELECT job_id FROM parked").len()
}
