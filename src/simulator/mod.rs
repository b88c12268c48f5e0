//! A local stand-in for the GaussDB (for MySQL) backup-encryption API, served over plain HTTP.
//!
//! keyturn's demo, CLI and integration tests point the GaussDB endpoint at it instead of Huawei
//! Cloud. Like the API gateway it checks AK/SK signatures (with the project's own [`signer`]) or
//! tokens; like the service it validates paths and bodies and keeps the on/off state per instance.
//! It can be told to misbehave: random faults at configured rates ([`Faults`], rolled with a seeded
//! RNG) or a script of answers for one instance's next Modify calls ([`Step`]). [`Stats`] tells a
//! test what actually reached it. The same controls are HTTP endpoints under `/_simulator/`, for
//! tests that drive the `keyturn` binary from another process. The keys it accepts can be swapped
//! at run time ([`Simulator::set_credentials`]), so a test can fix "wrong credentials" mid-run.
//!
//! [`signer`]: crate::gaussdb::signer

mod api;
mod auth;
mod body;
mod issuer;
#[cfg(test)]
mod test_support;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use rand::SeedableRng;
use rand::rngs::StdRng;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use auth::Keys;
use issuer::Issued;
pub use issuer::{FetchRecord, IamUser};

/// The header every answer carries, as Huawei Cloud's gateway does.
const REQUEST_ID_HEADER: &str = "x-request-id";
/// How many requests [`Stats::recent`] keeps.
const RECENT_LIMIT: usize = 1_000;

/// What the simulator accepts and how it starts out.
#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    /// Accepted (AK, SK) pairs for `SDK-HMAC-SHA256` signatures.
    pub credentials: Vec<(String, SecretString)>,
    /// Accepted `X-Auth-Token` values.
    pub tokens: Vec<SecretString>,
    /// A fixed set of (project_id, instance_id), all starting "off"; `None` lets any well-formed
    /// instance appear, "off", on first use.
    pub fleet: Option<Vec<(String, String)>>,
    pub faults: Faults,
    /// How far `X-Sdk-Date` may be from the simulator's clock (the gateway allows 15 minutes).
    pub max_clock_skew: Duration,
    /// Seeds the RNG that rolls the fault rates, so a run with faults is repeatable.
    pub seed: u64,
    /// How long an IAM token or temporary AK/SK the simulator issues stays valid.
    pub credential_life: Duration,
    /// Users its IAM endpoint issues tokens to.
    pub iam_users: Vec<IamUser>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            credentials: Vec::new(),
            tokens: Vec::new(),
            fleet: None,
            faults: Faults::default(),
            max_clock_skew: Duration::from_secs(15 * 60),
            seed: 0,
            credential_life: Duration::from_secs(3600),
            iam_users: Vec::new(),
        }
    }
}

/// Random misbehaviour, applied to authenticated Modify and Describe calls. Rates are
/// probabilities in `0.0..=1.0`; one roll per call picks at most one fault, checked in the order
/// timeout, throttle, busy, error, apply-then-error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Added to every authenticated call before it answers.
    pub latency_ms: u64,
    /// 500 `DBS.05000000`.
    pub error_rate: f64,
    /// 429 `APIGW.0308`.
    pub throttle_rate: f64,
    /// Sent as `Retry-After` with injected 429s when set (the real gateway has not been seen to).
    pub retry_after_secs: Option<u64>,
    /// 409 `DBS.200019`, instance busy with another operation.
    pub busy_rate: f64,
    /// Hang for `hang_ms`, then answer 504 `APIGW.0201` without touching the state.
    pub timeout_rate: f64,
    /// Apply a Modify's toggle, then answer 500 `DBS.05000000` anyway: the error that landed.
    /// Describe calls are served normally when this fault is rolled.
    pub apply_then_error_rate: f64,
    /// How long a hang lasts (default 30 s): long enough for any sane client to give up first.
    pub hang_ms: u64,
    /// IAM and the metadata service refuse every fetch (401 and 404).
    pub refuse_credential_fetches: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            error_rate: 0.0,
            throttle_rate: 0.0,
            retry_after_secs: None,
            busy_rate: 0.0,
            timeout_rate: 0.0,
            apply_then_error_rate: 0.0,
            hang_ms: 30_000,
            refuse_credential_fetches: false,
        }
    }
}

/// One scripted answer to an instance's next Modify call; scripts take precedence over [`Faults`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// Behave normally (no fault roll).
    Ok,
    /// Answer this error. A `status` outside 400..=599 becomes 500. Without `apply` the state
    /// is left alone; with it the toggle is applied first ("the 500 or 504 that landed"), when the
    /// body is a valid Modify body.
    Error {
        status: u16,
        code: String,
        #[serde(default)]
        msg: Option<String>,
        #[serde(default)]
        retry_after_secs: Option<u64>,
        #[serde(default)]
        apply: bool,
    },
    /// Hang for `ms` before answering. With `apply` the toggle is applied first and the normal
    /// answer follows the hang ("the POST landed but the client timed out"); without it the state
    /// is untouched and the answer is 504 `APIGW.0201`.
    Hang {
        ms: u64,
        #[serde(default)]
        apply: bool,
    },
    /// Answer 200 reporting `status` ("on"/"off") without changing anything: the answer that
    /// disagrees with the request, which a client must settle with Describe.
    Answer { status: String },
}

/// A snapshot of what reached the simulator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Every API request (admin endpoints excluded), whatever the answer.
    pub requests: u64,
    /// Requests answered 401.
    pub auth_failures: u64,
    /// Requests answered 400 for a bad path or body.
    pub bad_requests: u64,
    /// Answers shaped by a fault rate or a script step other than `Ok`.
    pub faults_injected: u64,
    /// Per instance, keyed by instance_id.
    pub instances: BTreeMap<String, InstanceStats>,
    /// The last 1,000 API requests, oldest first.
    pub recent: Vec<RequestRecord>,
    /// Every IAM and metadata fetch, oldest first.
    #[serde(default)]
    pub credential_fetches: Vec<FetchRecord>,
    /// The most API requests, over all instances, it ever answered at once.
    #[serde(default)]
    pub max_in_flight: u64,
}

/// What one instance saw and where it stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceStats {
    pub project_id: String,
    /// "on" or "off".
    pub status: String,
    pub kms_key_id: Option<String>,
    /// Authenticated Modify requests that reached the instance, whatever the answer.
    pub modify_calls: u64,
    /// State writes performed, including ones that set the state the instance already had.
    pub toggles_applied: u64,
    /// The part of `toggles_applied` that asked for the status the instance already had.
    pub noop_toggles: u64,
    pub describe_calls: u64,
    /// The most requests (Modify or Describe, authenticated or not) this instance ever had
    /// in flight at once: 1 when calls never overlapped.
    #[serde(default)]
    pub max_in_flight: u64,
}

/// One API request as the simulator answered it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub method: String,
    /// `None` when the path matched no API.
    pub instance_id: Option<String>,
    pub status: u16,
    pub error_code: Option<String>,
    pub request_id: String,
    /// The SignedHeaders of an AK/SK request; `None` for token or unauthenticated requests.
    pub signed_headers: Option<Vec<String>>,
    /// The AK that signed it (an access key id is not a secret).
    #[serde(default)]
    pub access_key: Option<String>,
    /// When it was answered, in milliseconds since the epoch (the simulator's clock).
    #[serde(default)]
    pub at_ms: i64,
}

/// The simulated service: configuration plus the mutable world behind one lock.
pub struct Simulator {
    config: SimulatorConfig,
    /// The accepted keys, swapped whole; a request authenticates against one consistent set.
    keys: RwLock<Arc<Keys>>,
    /// Tokens and temporary keys its IAM and metadata endpoints issued.
    issued: Mutex<Issued>,
    state: Mutex<World>,
}

struct World {
    instances: BTreeMap<String, Instance>,
    scripts: HashMap<String, VecDeque<Step>>,
    faults: Faults,
    rng: StdRng,
    totals: Totals,
    recent: VecDeque<RequestRecord>,
    /// Requests per instance being answered now, and the most ever at once.
    in_flight: HashMap<String, Peak>,
    /// The same over all instances.
    in_flight_total: Peak,
    fetches: Vec<FetchRecord>,
}

#[derive(Default)]
struct Totals {
    requests: u64,
    auth_failures: u64,
    bad_requests: u64,
    faults_injected: u64,
}

struct Instance {
    project_id: String,
    on: bool,
    kms_key_id: Option<String>,
    modify_calls: u64,
    toggles_applied: u64,
    noop_toggles: u64,
    describe_calls: u64,
}

impl Instance {
    fn new(project_id: &str) -> Self {
        Self {
            project_id: project_id.to_owned(),
            on: false,
            kms_key_id: None,
            modify_calls: 0,
            toggles_applied: 0,
            noop_toggles: 0,
            describe_calls: 0,
        }
    }

    fn stats(&self) -> InstanceStats {
        InstanceStats {
            project_id: self.project_id.clone(),
            status: status_word(self.on).to_owned(),
            kms_key_id: self.kms_key_id.clone(),
            modify_calls: self.modify_calls,
            toggles_applied: self.toggles_applied,
            noop_toggles: self.noop_toggles,
            describe_calls: self.describe_calls,
            max_in_flight: 0,
        }
    }
}

/// A count of requests being answered now, and the most it ever was.
#[derive(Debug, Default, Clone, Copy)]
struct Peak {
    now: u64,
    most: u64,
}

impl Peak {
    fn enter(&mut self) {
        self.now += 1;
        self.most = self.most.max(self.now);
    }

    fn leave(&mut self) {
        self.now = self.now.saturating_sub(1);
    }
}

/// A request being answered; see [`Simulator::enter`].
struct InFlight {
    sim: Arc<Simulator>,
    instance_id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut world = self.sim.world();
        if let Some(peak) = world.in_flight.get_mut(&self.instance_id) {
            peak.leave();
        }
        world.in_flight_total.leave();
    }
}

fn status_word(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

impl Simulator {
    pub fn new(config: SimulatorConfig) -> Arc<Self> {
        let instances = config
            .fleet
            .iter()
            .flatten()
            .map(|(project, instance)| (instance.clone(), Instance::new(project)))
            .collect();
        let world = World {
            instances,
            scripts: HashMap::new(),
            faults: config.faults.clone(),
            rng: StdRng::seed_from_u64(config.seed),
            totals: Totals::default(),
            recent: VecDeque::new(),
            in_flight: HashMap::new(),
            in_flight_total: Peak::default(),
            fetches: Vec::new(),
        };
        let keys = Keys {
            credentials: config.credentials.clone(),
            tokens: config.tokens.clone(),
        };
        Arc::new(Self {
            config,
            keys: RwLock::new(Arc::new(keys)),
            issued: Mutex::new(Issued::default()),
            state: Mutex::new(world),
        })
    }

    /// Replaces the accepted AK/SK pairs and tokens (both sets, whole); requests already being
    /// authenticated keep the old ones. The secrets go nowhere else: not into stats or logs.
    pub fn set_credentials(
        &self,
        credentials: Vec<(String, SecretString)>,
        tokens: Vec<SecretString>,
    ) {
        let keys = Arc::new(Keys {
            credentials,
            tokens,
        });
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
    }

    /// The keys to authenticate one request with.
    fn keys(&self) -> Arc<Keys> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the fault rates; calls already decided keep the old ones.
    pub fn set_faults(&self, faults: Faults) {
        self.world().faults = faults;
    }

    /// Queues `steps` after any steps still pending for `instance_id`'s Modify calls.
    pub fn script(&self, instance_id: &str, steps: Vec<Step>) {
        self.world()
            .scripts
            .entry(instance_id.to_owned())
            .or_default()
            .extend(steps);
    }

    /// Drops whatever is left of `instance_id`'s script: it behaves normally again.
    pub fn clear_script(&self, instance_id: &str) {
        self.world().scripts.remove(instance_id);
    }

    /// Counts a request for `instance_id` as in flight until the returned guard drops.
    fn enter(self: &Arc<Self>, instance_id: &str) -> InFlight {
        let mut world = self.world();
        world
            .in_flight
            .entry(instance_id.to_owned())
            .or_default()
            .enter();
        world.in_flight_total.enter();
        InFlight {
            sim: self.clone(),
            instance_id: instance_id.to_owned(),
        }
    }

    pub fn stats(&self) -> Stats {
        let world = self.world();
        Stats {
            requests: world.totals.requests,
            auth_failures: world.totals.auth_failures,
            bad_requests: world.totals.bad_requests,
            faults_injected: world.totals.faults_injected,
            instances: world
                .instances
                .iter()
                .map(|(id, instance)| {
                    let mut stats = instance.stats();
                    stats.max_in_flight = world.in_flight.get(id).map_or(0, |peak| peak.most);
                    (id.clone(), stats)
                })
                .collect(),
            recent: world.recent.iter().cloned().collect(),
            credential_fetches: world.fetches.clone(),
            max_in_flight: world.in_flight_total.most,
        }
    }

    /// "on" or "off"; `None` when the instance does not exist (yet) in that project.
    pub fn status_of(&self, project_id: &str, instance_id: &str) -> Option<String> {
        self.world()
            .instances
            .get(instance_id)
            .filter(|instance| instance.project_id == project_id)
            .map(|instance| status_word(instance.on).to_owned())
    }

    fn issued(&self) -> MutexGuard<'_, Issued> {
        self.issued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The world survives a panicking holder: every update leaves it consistent.
    fn world(&self) -> MutexGuard<'_, World> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Serves the API and the admin endpoints on `listener` until `shutdown` resolves, then lets
/// in-flight requests finish (hangs are cut short so shutdown does not wait for them).
pub async fn serve(
    listener: tokio::net::TcpListener,
    sim: Arc<Simulator>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    let app = router(sim, stop.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.cancel();
        })
        .await
}

/// What every handler shares.
#[derive(Clone)]
struct App {
    sim: Arc<Simulator>,
    /// Cancelled at shutdown, ending hangs and latency early.
    stop: CancellationToken,
}

/// The API and admin endpoints as a [`Router`], for serving some other way than [`serve`] (over
/// TLS in the tests, for example). Cancelling `stop` cuts hangs and latency short.
pub fn router(sim: Arc<Simulator>, stop: CancellationToken) -> Router {
    Router::new()
        .route("/_simulator/health", get(admin_health))
        .route("/_simulator/stats", get(admin_stats))
        .route("/_simulator/faults", put(admin_faults))
        .route("/_simulator/script/{instance_id}", post(admin_script))
        .route("/_simulator/credentials", put(admin_credentials))
        // IAM and the ECS metadata service, which hand out credentials with short lives on demand.
        .route("/v3/auth/tokens", post(issuer::iam_tokens))
        .route("/meta-data/latest/api/token", put(issuer::metadata_token))
        .route("/openstack/latest/securitykey", get(issuer::security_key))
        // Everything else is the API, whose routing and errors mimic the gateway's.
        .fallback(api::handle)
        .layer(axum::middleware::map_response(ensure_request_id))
        .with_state(App { sim, stop })
}

/// API answers set their own id (it is recorded in the stats); this covers the rest.
async fn ensure_request_id(mut response: Response) -> Response {
    if !response.headers().contains_key(REQUEST_ID_HEADER)
        && let Ok(id) = HeaderValue::from_str(&new_request_id())
    {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    response
}

/// A fresh request id, 32 hex digits like Huawei Cloud's.
fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

async fn admin_health() -> &'static str {
    "ok"
}

async fn admin_stats(State(app): State<App>) -> Json<Stats> {
    Json(app.sim.stats())
}

async fn admin_faults(State(app): State<App>, Json(faults): Json<Faults>) -> StatusCode {
    app.sim.set_faults(faults);
    StatusCode::NO_CONTENT
}

async fn admin_script(
    State(app): State<App>,
    Path(instance_id): Path<String>,
    Json(steps): Json<Vec<Step>>,
) -> StatusCode {
    app.sim.script(&instance_id, steps);
    StatusCode::NO_CONTENT
}

/// The body of `PUT /_simulator/credentials`. No `Debug`: it holds secrets.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsBody {
    #[serde(default)]
    credentials: Vec<KeyPair>,
    #[serde(default)]
    tokens: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyPair {
    ak: String,
    sk: String,
}

async fn admin_credentials(
    State(app): State<App>,
    Json(body): Json<CredentialsBody>,
) -> StatusCode {
    let credentials = body
        .credentials
        .into_iter()
        .map(|pair| (pair.ak, SecretString::from(pair.sk)))
        .collect();
    let tokens = body.tokens.into_iter().map(SecretString::from).collect();
    app.sim.set_credentials(credentials, tokens);
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn signed_modify_on_then_describe_sees_on() {
        let server = Server::start(config()).await;
        let response = server.send(Call::post(modify_path(), &on_body())).await;
        assert_eq!(response.status(), 200);
        assert_eq!(json_of(response).await, json!({"encryption_status": "on"}));
        let response = server.send(Call::get(modify_path())).await;
        assert_eq!(json_of(response).await, json!({"encryption_status": "on"}));
        assert_eq!(
            server.sim.status_of(PROJECT, INSTANCE).as_deref(),
            Some("on")
        );
        let stats = server.sim.stats();
        let instance = &stats.instances[INSTANCE];
        assert_eq!(instance.kms_key_id.as_deref(), Some(KEY_ID));
        assert_eq!((instance.modify_calls, instance.describe_calls), (1, 1));
        server.stop().await;
    }

    #[tokio::test]
    async fn off_clears_the_key_and_repeating_a_state_still_answers_200() {
        let server = Server::start(config()).await;
        server.send(Call::post(modify_path(), &on_body())).await;
        let off = r#"{"encryption_status":"OFF"}"#;
        for _ in 0..2 {
            let response = server.send(Call::post(modify_path(), off)).await;
            assert_eq!(response.status(), 200);
            assert_eq!(json_of(response).await, json!({"encryption_status": "off"}));
        }
        let stats = server.sim.stats();
        let instance = &stats.instances[INSTANCE];
        assert_eq!(instance.status, "off");
        assert_eq!(instance.kms_key_id, None);
        assert_eq!((instance.modify_calls, instance.toggles_applied), (3, 3));
        assert_eq!(instance.noop_toggles, 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn stats_count_requests_failures_and_remember_recent_ones() {
        let server = Server::start(config()).await;
        server.send(Call::post(modify_path(), &on_body())).await;
        server.send(Call::post(modify_path(), "{}")).await;
        let wrong_key = Call {
            sk: "wrong",
            ..Call::get(modify_path())
        };
        server.send(wrong_key).await;
        server.sim.script(INSTANCE, vec![busy_step()]);
        server.send(Call::post(modify_path(), &on_body())).await;
        let stats = server.sim.stats();
        assert_eq!(stats.requests, 4);
        assert_eq!((stats.auth_failures, stats.bad_requests), (1, 1));
        assert_eq!(stats.faults_injected, 1);
        assert_eq!(stats.instances[INSTANCE].modify_calls, 3);
        let codes: Vec<_> = stats.recent.iter().map(|r| r.status).collect();
        assert_eq!(codes, [200, 400, 401, 409]);
        let first = &stats.recent[0];
        assert_eq!(first.method, "POST");
        assert_eq!(first.instance_id.as_deref(), Some(INSTANCE));
        let signed = first.signed_headers.clone().unwrap_or_default();
        assert_eq!(
            signed,
            ["content-type", "host", "x-project-id", "x-sdk-date"]
        );
        assert_eq!(stats.recent[3].error_code.as_deref(), Some("DBS.200019"));
        server.stop().await;
    }

    #[tokio::test]
    async fn recent_requests_are_capped() {
        let server = Server::start(config()).await;
        let client = reqwest::Client::new();
        for _ in 0..RECENT_LIMIT + 5 {
            let sent = client.get(server.url("/nowhere")).send().await;
            assert_eq!(sent.expect("sent").status(), 404);
        }
        let stats = server.sim.stats();
        assert_eq!(stats.requests, (RECENT_LIMIT + 5) as u64);
        assert_eq!(stats.recent.len(), RECENT_LIMIT);
        server.stop().await;
    }

    #[tokio::test]
    async fn every_response_carries_a_fresh_request_id() {
        let server = Server::start(config()).await;
        let client = reqwest::Client::new();
        let wrong_key = Call {
            sk: "wrong",
            ..Call::get(modify_path())
        };
        let responses = [
            server.send(Call::post(modify_path(), &on_body())).await,
            server.send(wrong_key).await,
            client
                .get(server.url("/v3/nowhere"))
                .send()
                .await
                .expect("sent"),
            client
                .get(server.url("/_simulator/health"))
                .send()
                .await
                .expect("sent"),
        ];
        let ids: Vec<String> = responses.iter().map(request_id_of).collect();
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len());
        let recorded = server.sim.stats().recent[0].request_id.clone();
        assert_eq!(recorded, ids[0]);
        server.stop().await;
    }

    #[tokio::test]
    async fn admin_endpoints_control_and_report() {
        let server = Server::start(config()).await;
        let client = reqwest::Client::new();
        let health = client.get(server.url("/_simulator/health")).send().await;
        assert_eq!(health.expect("sent").status(), 200);
        let faults = json!({"busy_rate": 1.0});
        let put = client.put(server.url("/_simulator/faults")).json(&faults);
        assert_eq!(put.send().await.expect("sent").status(), 204);
        let steps = json!([{"kind": "ok"}]);
        let script_url = server.url(&format!("/_simulator/script/{INSTANCE}"));
        let post = client.post(script_url).json(&steps).send().await;
        assert_eq!(post.expect("sent").status(), 204);

        // The scripted Ok wins over the busy rate once; then the rate applies.
        let first = server.send(Call::post(modify_path(), &on_body())).await;
        assert_eq!(first.status(), 200);
        let second = server.send(Call::post(modify_path(), &on_body())).await;
        assert_eq!(second.status(), 409);

        let stats = client.get(server.url("/_simulator/stats")).send().await;
        let stats: Stats = stats.expect("sent").json().await.expect("stats json");
        assert_eq!(stats, server.sim.stats());
        assert_eq!(stats.instances[INSTANCE].status, "on");
        server.stop().await;
    }

    #[tokio::test]
    async fn switched_credentials_take_effect_at_once_and_stay_secret() {
        const NEW_AK: &str = "SWITCHEDAK000000001";
        const NEW_SK: &str = "switched-secret-key-never-show-me-0001";
        const NEW_TOKEN: &str = "MIIswitched-token-never-show-me";
        let server = Server::start(config()).await;
        let on = on_body();
        let with_new_key = Call {
            ak: NEW_AK,
            sk: NEW_SK,
            ..Call::post(modify_path(), &on)
        };
        let (status, code, msg) = error_of(server.send(with_new_key).await).await;
        assert_eq!((status, code.as_str()), (401, "APIGW.0301"));
        assert!(msg.contains("access key not found"), "{msg}");

        let body = json!({
            "credentials": [{"ak": NEW_AK, "sk": NEW_SK}],
            "tokens": [NEW_TOKEN],
        });
        let client = reqwest::Client::new();
        let put = client
            .put(server.url("/_simulator/credentials"))
            .json(&body);
        assert_eq!(put.send().await.expect("sent").status(), 204);

        assert_eq!(server.send(with_new_key).await.status(), 200);
        // Both sets were replaced: the old key and the old token are refused now.
        let old_key = server.send(Call::get(modify_path())).await;
        assert_eq!(old_key.status(), 401);
        let token_call = |token: &'static str| {
            client
                .get(server.url(modify_path()))
                .header("X-Auth-Token", token)
                .send()
        };
        assert_eq!(token_call(TOKEN).await.expect("sent").status(), 401);
        assert_eq!(token_call(NEW_TOKEN).await.expect("sent").status(), 200);

        let stats = serde_json::to_string(&server.sim.stats()).expect("stats json");
        for secret in [NEW_SK, NEW_TOKEN, SK, TOKEN] {
            assert!(!stats.contains(secret), "a secret reached the stats");
        }
        // Back through the library call, to the original pair.
        server
            .sim
            .set_credentials(vec![(AK.into(), SecretString::from(SK))], Vec::new());
        let back = server.send(Call::get(modify_path())).await;
        assert_eq!(back.status(), 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_bad_credentials_body_is_refused_without_echoing_it() {
        let server = Server::start(config()).await;
        let body = json!({"credentials": [{"ak": "X", "secret": "leaky-secret-value"}]});
        let put = reqwest::Client::new()
            .put(server.url("/_simulator/credentials"))
            .json(&body)
            .send()
            .await
            .expect("sent");
        assert!(put.status().is_client_error());
        let text = put.text().await.expect("body");
        assert!(!text.contains("leaky-secret-value"), "{text}");
        assert_eq!(server.send(Call::get(modify_path())).await.status(), 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_for_a_hang() {
        let server = Server::start(config()).await;
        let hang = Step::Hang {
            ms: 60_000,
            apply: false,
        };
        server.sim.script(INSTANCE, vec![hang]);
        let client = reqwest::Client::new();
        let call = server.request(&client, Call::post(modify_path(), &on_body()));
        let pending = tokio::spawn(call.send());
        server.wait_for_requests(1).await;
        let stopped = tokio::time::timeout(Duration::from_secs(5), server.stop()).await;
        assert!(stopped.is_ok(), "serve kept waiting for the hang");
        let answer = pending.await.expect("joined").expect("answered");
        assert_eq!(answer.status(), 504);
    }

    #[test]
    fn steps_and_faults_read_the_documented_json() {
        let steps: Vec<Step> = serde_json::from_value(json!([
            {"kind": "ok"},
            {"kind": "error", "status": 500, "code": "DBS.05000000"},
            {"kind": "hang", "ms": 10, "apply": true},
        ]))
        .expect("steps parse");
        assert_eq!(
            steps[2],
            Step::Hang {
                ms: 10,
                apply: true
            }
        );
        let faults: Faults = serde_json::from_value(json!({"error_rate": 0.5})).expect("parse");
        assert_eq!(faults.hang_ms, 30_000);
        assert_eq!(faults.error_rate, 0.5);
    }

    /// Official SDK compatibility: serves on 127.0.0.1 and runs
    /// `tests/sdk_compat/sign_with_official_sdk.py`, which signs with Huawei's `huaweicloudsdkcore`
    /// and calls through `huaweicloudsdkgaussdb`. Needs
    /// `pip install huaweicloudsdkcore huaweicloudsdkgaussdb`; run with
    /// `cargo test official_python_sdk -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore = "needs python3 with huaweicloudsdkcore and huaweicloudsdkgaussdb"]
    async fn official_python_sdk_requests_are_accepted() {
        let server = Server::start(config()).await;
        let script = std::env::var("KEYTURN_SDK_COMPAT_SCRIPT").unwrap_or_else(|_| {
            let manifest = env!("CARGO_MANIFEST_DIR");
            format!("{manifest}/tests/sdk_compat/sign_with_official_sdk.py")
        });
        let mut command = std::process::Command::new("python3");
        command
            .arg(script)
            .env("SIM_ENDPOINT", server.url(""))
            .env("SIM_AK", AK)
            .env("SIM_SK", SK)
            .env("SIM_PROJECT_ID", PROJECT)
            .env("SIM_INSTANCE_ID", INSTANCE)
            .env("SIM_KMS_KEY_ID", KEY_ID);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("joined")
            .expect("python3 runs");
        print!("{}", String::from_utf8_lossy(&output.stdout));
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "the SDK script failed");
        let stats = server.sim.stats();
        assert!(
            stats
                .recent
                .iter()
                .any(|r| r.status == 200 && r.method == "POST")
        );
        assert_eq!(
            server.sim.status_of(PROJECT, INSTANCE).as_deref(),
            Some("off")
        );
        server.stop().await;
    }
}
