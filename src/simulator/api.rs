//! The two API calls, in the order the real service handles them: gateway routing, gateway
//! authentication, path checks, then the instance's answer as shaped by scripts and fault rates.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::json;

use super::auth::{self, Received};
use super::body::{self, Desired};
use super::{
    App, Faults, Instance, RECENT_LIMIT, REQUEST_ID_HEADER, RequestRecord, Simulator, Step, World,
    new_request_id, status_word,
};

/// Far above any real Modify body; keeps a misbehaving client from filling memory.
const MAX_BODY: usize = 1 << 20;

/// Answers every request that is not an admin endpoint.
pub(super) async fn handle(State(app): State<App>, request: Request) -> Response {
    let request_id = new_request_id();
    let (parts, body) = request.into_parts();
    let route = Route::parse(&parts.method, parts.uri.path());
    let _in_flight = route
        .as_ref()
        .map(|route| app.sim.enter(&route.instance_id));
    let outcome = match route {
        None => Outcome::unrouted(),
        Some(route) => match axum::body::to_bytes(body, MAX_BODY).await {
            Ok(bytes) => app.sim.answer(&route, &parts, &bytes),
            Err(_) => Outcome::unreadable(&route),
        },
    };
    app.sim.record(parts.method.as_str(), &request_id, &outcome);
    tracing::debug!(
        request_id,
        method = %parts.method,
        path = parts.uri.path(),
        status = outcome.decision.reply.status.as_u16(),
        error_code = outcome.decision.reply.error_code(),
        delay_ms = outcome.decision.delay.as_millis(),
        "simulator answered"
    );
    // The answer is decided and recorded before any delay, so a client that gives up and closes
    // the connection cannot make the simulator forget what it did.
    if !outcome.decision.delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(outcome.decision.delay) => {}
            () = app.stop.cancelled() => {}
        }
    }
    outcome.decision.reply.into_response(&request_id)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Modify,
    Describe,
}

/// A request that matched one of the two APIs; ids are percent-decoded, not yet validated.
struct Route {
    call: Call,
    project_id: String,
    instance_id: String,
}

impl Route {
    /// `POST|GET /v3/{project_id}/instances/{instance_id}/backups/encryption`, else `None`.
    fn parse(method: &Method, path: &str) -> Option<Self> {
        let call = match *method {
            Method::POST => Call::Modify,
            Method::GET => Call::Describe,
            _ => return None,
        };
        let ids = path
            .strip_prefix("/v3/")?
            .strip_suffix("/backups/encryption")?;
        let (project, instance) = ids.split_once("/instances/")?;
        if project.contains('/') || instance.contains('/') {
            return None;
        }
        Some(Self {
            call,
            project_id: auth::percent_decode(project),
            instance_id: auth::percent_decode(instance),
        })
    }

    /// The service's own check of the ids, after authentication.
    fn problem(&self) -> Option<&'static str> {
        if !is_project_id(&self.project_id) {
            return Some("Parameter project_id is invalid: it must be 32 letters or digits.");
        }
        if !is_instance_id(&self.instance_id) {
            return Some(
                "Parameter instance_id is invalid: it must be 32 hex digits, in, 2 digits.",
            );
        }
        None
    }
}

fn is_project_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn is_instance_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    bytes.len() == 36
        && bytes[..32].iter().all(u8::is_ascii_hexdigit)
        && &bytes[32..34] == b"in"
        && bytes[34..].iter().all(u8::is_ascii_digit)
}

/// How an answer counts in the totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Served,
    AuthFailure,
    BadRequest,
}

/// One HTTP answer, before it gets its request id.
struct Reply {
    status: StatusCode,
    answer: Answer,
    retry_after_secs: Option<u64>,
    class: Class,
}

enum Answer {
    Status(bool),
    Error { code: String, msg: String },
}

impl Reply {
    fn status(on: bool) -> Self {
        Self {
            status: StatusCode::OK,
            answer: Answer::Status(on),
            retry_after_secs: None,
            class: Class::Served,
        }
    }

    fn error(status: StatusCode, code: &str, msg: impl Into<String>) -> Self {
        Self {
            status,
            answer: Answer::Error {
                code: code.to_owned(),
                msg: msg.into(),
            },
            retry_after_secs: None,
            class: Class::Served,
        }
    }

    fn bad_request(msg: impl Into<String>) -> Self {
        let reply = Self::error(StatusCode::BAD_REQUEST, "DBS.200001", msg);
        Self {
            class: Class::BadRequest,
            ..reply
        }
    }

    fn auth_failure(error: &auth::AuthError) -> Self {
        let reply = Self::error(StatusCode::UNAUTHORIZED, error.code(), error.to_string());
        Self {
            class: Class::AuthFailure,
            ..reply
        }
    }

    /// What a client would get if it waited out a hang: the gateway's backend timeout.
    fn timeout() -> Self {
        Self::error(
            StatusCode::GATEWAY_TIMEOUT,
            "APIGW.0201",
            "Backend timeout.",
        )
    }

    fn retry_after(self, secs: Option<u64>) -> Self {
        Self {
            retry_after_secs: secs,
            ..self
        }
    }

    fn error_code(&self) -> Option<&str> {
        match &self.answer {
            Answer::Error { code, .. } => Some(code),
            Answer::Status(_) => None,
        }
    }

    fn into_response(self, request_id: &str) -> Response {
        let body = match self.answer {
            Answer::Status(on) => json!({ "encryption_status": status_word(on) }),
            // The gateway's own errors carry the request id in the body too.
            Answer::Error { code, msg } if code.starts_with("APIG") => {
                json!({ "error_code": code, "error_msg": msg, "request_id": request_id })
            }
            Answer::Error { code, msg } => json!({ "error_code": code, "error_msg": msg }),
        };
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert(REQUEST_ID_HEADER, id);
        }
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The reply and how it is delivered.
struct Decision {
    reply: Reply,
    delay: Duration,
    /// Shaped by a fault rate or a script step other than `Ok`.
    injected: bool,
}

impl Decision {
    fn now(reply: Reply) -> Self {
        Self {
            reply,
            delay: Duration::ZERO,
            injected: false,
        }
    }

    fn injected(reply: Reply, delay_ms: u64) -> Self {
        Self {
            reply,
            delay: Duration::from_millis(delay_ms),
            injected: true,
        }
    }
}

/// A decision plus what the stats record about the request.
struct Outcome {
    decision: Decision,
    instance_id: Option<String>,
    signed_headers: Option<Vec<String>>,
    access_key: Option<String>,
}

impl Outcome {
    fn unrouted() -> Self {
        let msg = "The API does not exist or has not been published in the environment.";
        Self {
            decision: Decision::now(Reply::error(StatusCode::NOT_FOUND, "APIGW.0101", msg)),
            instance_id: None,
            signed_headers: None,
            access_key: None,
        }
    }

    fn unreadable(route: &Route) -> Self {
        let msg = "The request body could not be read or is larger than 1 MiB.";
        Self {
            decision: Decision::now(Reply::bad_request(msg)),
            instance_id: Some(route.instance_id.clone()),
            signed_headers: None,
            access_key: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Timeout,
    Throttle,
    Busy,
    ServerError,
    ApplyThenError,
}

impl Simulator {
    fn answer(&self, route: &Route, parts: &Parts, body: &[u8]) -> Outcome {
        let received = Received {
            method: parts.method.as_str(),
            raw_path: parts.uri.path(),
            raw_query: parts.uri.query(),
            headers: &parts.headers,
            body,
        };
        let verdict = auth::authenticate(
            &self.keys(),
            &self.issued(),
            self.config.max_clock_skew,
            &received,
            &route.project_id,
            chrono::Utc::now(),
        );
        let decision = match (verdict.result, route.problem()) {
            (Err(error), _) => Decision::now(Reply::auth_failure(&error)),
            (Ok(()), Some(problem)) => Decision::now(Reply::bad_request(problem)),
            (Ok(()), None) => self.decide(route, body),
        };
        Outcome {
            decision,
            instance_id: Some(route.instance_id.clone()),
            signed_headers: verdict.signed_headers,
            access_key: verdict.access_key,
        }
    }

    /// An authenticated, well-addressed call: find the instance, then let a script step, a
    /// fault roll or the normal behaviour answer, in that order.
    fn decide(&self, route: &Route, body: &[u8]) -> Decision {
        let mut world = self.world();
        let World {
            instances,
            scripts,
            faults,
            rng,
            ..
        } = &mut *world;
        let Some(instance) = find_instance(instances, self.config.fleet.is_some(), route) else {
            let msg = "The DB instance does not exist.";
            return Decision::now(Reply::error(StatusCode::NOT_FOUND, "DBS.200002", msg));
        };
        let step = match route.call {
            Call::Modify => {
                instance.modify_calls += 1;
                scripts
                    .get_mut(&route.instance_id)
                    .and_then(VecDeque::pop_front)
            }
            Call::Describe => {
                instance.describe_calls += 1;
                None
            }
        };
        let mut decision = match step {
            Some(step) => scripted(step, instance, route.call, body),
            None => match roll(rng, faults) {
                Some(Fault::ApplyThenError) if route.call == Call::Describe => {
                    Decision::now(serve_call(instance, route.call, body))
                }
                Some(fault) => injected(fault, faults, instance, body),
                None => Decision::now(serve_call(instance, route.call, body)),
            },
        };
        decision.delay += Duration::from_millis(faults.latency_ms);
        decision
    }

    fn record(&self, method: &str, request_id: &str, outcome: &Outcome) {
        let mut world = self.world();
        let totals = &mut world.totals;
        totals.requests += 1;
        match outcome.decision.reply.class {
            Class::AuthFailure => totals.auth_failures += 1,
            Class::BadRequest => totals.bad_requests += 1,
            Class::Served => {}
        }
        if outcome.decision.injected {
            totals.faults_injected += 1;
        }
        if world.recent.len() >= RECENT_LIMIT {
            world.recent.pop_front();
        }
        let reply = &outcome.decision.reply;
        world.recent.push_back(RequestRecord {
            method: method.to_owned(),
            instance_id: outcome.instance_id.clone(),
            status: reply.status.as_u16(),
            error_code: reply.error_code().map(str::to_owned),
            request_id: request_id.to_owned(),
            signed_headers: outcome.signed_headers.clone(),
            access_key: outcome.access_key.clone(),
            at_ms: chrono::Utc::now().timestamp_millis(),
        });
    }
}

/// The instance in that project; without a fixed fleet a new instance appears, "off".
fn find_instance<'w>(
    instances: &'w mut BTreeMap<String, Instance>,
    fixed_fleet: bool,
    route: &Route,
) -> Option<&'w mut Instance> {
    if !fixed_fleet {
        instances
            .entry(route.instance_id.clone())
            .or_insert_with(|| Instance::new(&route.project_id));
    }
    instances
        .get_mut(&route.instance_id)
        .filter(|instance| instance.project_id == route.project_id)
}

/// Normal behaviour: Describe reports, Modify validates and writes.
fn serve_call(instance: &mut Instance, call: Call, body: &[u8]) -> Reply {
    if call == Call::Describe {
        return Reply::status(instance.on);
    }
    match body::parse_modify(body) {
        Ok(desired) => {
            apply(instance, desired);
            Reply::status(instance.on)
        }
        Err(error) => Reply::bad_request(error.to_string()),
    }
}

/// Writes the state even when it is unchanged (the API answers 200 either way), counting both.
fn apply(instance: &mut Instance, desired: Desired) {
    if instance.on == desired.on {
        instance.noop_toggles += 1;
    }
    instance.toggles_applied += 1;
    instance.on = desired.on;
    instance.kms_key_id = desired.kms_key_id;
}

fn scripted(step: Step, instance: &mut Instance, call: Call, body: &[u8]) -> Decision {
    match step {
        Step::Ok => Decision::now(serve_call(instance, call, body)),
        Step::Error {
            status,
            code,
            msg,
            retry_after_secs,
            apply,
        } => {
            if apply {
                apply_quietly(instance, call, body);
            }
            let msg = msg.unwrap_or_else(|| format!("Scripted error {code}."));
            let reply = Reply::error(error_status(status), &code, msg);
            Decision::injected(reply.retry_after(retry_after_secs), 0)
        }
        Step::Hang { ms, apply: true } => Decision::injected(serve_call(instance, call, body), ms),
        Step::Hang { ms, apply: false } => Decision::injected(Reply::timeout(), ms),
        Step::Answer { status } => Decision::injected(Reply::status(status == "on"), 0),
    }
}

/// Lands a Modify's toggle whose answer will be an error anyway; a body that is not a valid
/// Modify body changes nothing (the error still answers).
fn apply_quietly(instance: &mut Instance, call: Call, body: &[u8]) {
    if call == Call::Modify
        && let Ok(desired) = body::parse_modify(body)
    {
        apply(instance, desired);
    }
}

/// A scripted status outside 400..=599 would not be an error answer; it becomes 500.
fn error_status(status: u16) -> StatusCode {
    StatusCode::from_u16(status)
        .ok()
        .filter(|code| code.is_client_error() || code.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// One draw per call against the cumulative rates; no draw at all when every rate is zero.
fn roll(rng: &mut StdRng, faults: &Faults) -> Option<Fault> {
    let table = [
        (faults.timeout_rate, Fault::Timeout),
        (faults.throttle_rate, Fault::Throttle),
        (faults.busy_rate, Fault::Busy),
        (faults.error_rate, Fault::ServerError),
        (faults.apply_then_error_rate, Fault::ApplyThenError),
    ];
    if table.iter().all(|(rate, _)| *rate <= 0.0) {
        return None;
    }
    let draw: f64 = rng.random();
    let mut edge = 0.0;
    for (rate, fault) in table {
        edge += rate.clamp(0.0, 1.0);
        if draw < edge {
            return Some(fault);
        }
    }
    None
}

fn injected(fault: Fault, faults: &Faults, instance: &mut Instance, body: &[u8]) -> Decision {
    let reply = match fault {
        Fault::Timeout => return Decision::injected(Reply::timeout(), faults.hang_ms),
        Fault::Throttle => {
            let msg = "The throttling threshold has been reached: policy user over ratelimit.";
            Reply::error(StatusCode::TOO_MANY_REQUESTS, "APIGW.0308", msg)
                .retry_after(faults.retry_after_secs)
        }
        Fault::Busy => {
            let msg = "Another operation is being performed on the DB instance.";
            Reply::error(StatusCode::CONFLICT, "DBS.200019", msg)
        }
        Fault::ServerError => server_error(),
        Fault::ApplyThenError => {
            apply_quietly(instance, Call::Modify, body);
            server_error()
        }
    };
    Decision::injected(reply, 0)
}

fn server_error() -> Reply {
    Reply::error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "DBS.05000000",
        "Server error.",
    )
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::test_support::Call;
    use super::super::test_support::*;
    use super::super::{Faults, SimulatorConfig, Step};
    use super::*;

    const OTHER_INSTANCE: &str = "11111111111111111111111111111111in07";

    #[tokio::test]
    async fn other_paths_and_methods_answer_404_apigw_0101() {
        let server = Server::start(config()).await;
        let client = reqwest::Client::new();
        let path = modify_path();
        let misses = [
            client.get(server.url("/v3/x/instances")),
            client.get(server.url(&format!("{path}/"))),
            client.put(server.url(path)),
            client.delete(server.url(path)),
        ];
        for miss in misses {
            let response = miss.send().await.expect("sent");
            let id = request_id_of(&response);
            let body = json_of(response).await;
            assert_eq!(body["error_code"], "APIGW.0101");
            assert_eq!(body["request_id"], id.as_str());
        }
        let stats = server.sim.stats();
        assert_eq!((stats.requests, stats.auth_failures), (4, 0));
        assert_eq!(stats.recent[0].instance_id, None);
        server.stop().await;
    }

    #[tokio::test]
    async fn malformed_ids_answer_400_naming_the_parameter() {
        let server = Server::start(config()).await;
        let cases = [
            (path_for("short", INSTANCE), "project_id"),
            (
                path_for(PROJECT, "7033e7c3cf93438797d44ad7ae0a7d95"),
                "instance_id",
            ),
            (
                path_for(PROJECT, "7033e7c3cf93438797d44ad7ae0a7d9zin07"),
                "instance_id",
            ),
            (
                path_for(PROJECT, "7033e7c3cf93438797d44ad7ae0a7d95inxx"),
                "instance_id",
            ),
        ];
        for (path, named) in &cases {
            let (status, code, msg) = error_of(server.send(Call::get(path)).await).await;
            assert_eq!((status, code.as_str()), (400, "DBS.200001"), "{path}");
            assert!(msg.contains(named), "{msg}");
        }
        assert_eq!(server.sim.stats().bad_requests, 4);
        server.stop().await;
    }

    #[tokio::test]
    async fn fixed_fleet_answers_404_dbs_200002_for_strangers() {
        let fleet = vec![(PROJECT.to_owned(), INSTANCE.to_owned())];
        let server = Server::start(SimulatorConfig {
            fleet: Some(fleet),
            ..config()
        })
        .await;
        assert_eq!(
            server.sim.status_of(PROJECT, INSTANCE).as_deref(),
            Some("off")
        );
        let stranger = path_for(PROJECT, OTHER_INSTANCE);
        let (status, code, _) =
            error_of(server.send(Call::post(&stranger, &on_body())).await).await;
        assert_eq!((status, code.as_str()), (404, "DBS.200002"));
        let other_project = path_for("ffffffffffffffffffffffffffffffff", INSTANCE);
        let (status, ..) = error_of(server.send(Call::get(&other_project)).await).await;
        assert_eq!(status, 404);
        assert_eq!(
            server
                .send(Call::post(modify_path(), &on_body()))
                .await
                .status(),
            200
        );
        assert!(!server.sim.stats().instances.contains_key(OTHER_INSTANCE));
        server.stop().await;
    }

    #[tokio::test]
    async fn open_fleet_keeps_an_instance_in_its_first_project() {
        let server = Server::start(config()).await;
        assert_eq!(server.send(Call::get(modify_path())).await.status(), 200);
        let other_project = path_for("ffffffffffffffffffffffffffffffff", INSTANCE);
        let (status, code, _) = error_of(server.send(Call::get(&other_project)).await).await;
        assert_eq!((status, code.as_str()), (404, "DBS.200002"));
        server.stop().await;
    }

    #[tokio::test]
    async fn scripted_error_then_ok() {
        let server = Server::start(config()).await;
        let error = Step::Error {
            status: 500,
            code: "DBS.05000000".into(),
            msg: Some("boom".into()),
            retry_after_secs: None,
            apply: false,
        };
        server.sim.script(INSTANCE, vec![error, Step::Ok]);
        let (status, code, msg) =
            error_of(server.send(Call::post(modify_path(), &on_body())).await).await;
        assert_eq!(
            (status, code.as_str(), msg.as_str()),
            (500, "DBS.05000000", "boom")
        );
        assert_eq!(
            server.sim.status_of(PROJECT, INSTANCE).as_deref(),
            Some("off")
        );
        // A Describe does not consume the script.
        assert_eq!(server.send(Call::get(modify_path())).await.status(), 200);
        assert_eq!(
            server
                .send(Call::post(modify_path(), &on_body()))
                .await
                .status(),
            200
        );
        assert_eq!(
            server.sim.status_of(PROJECT, INSTANCE).as_deref(),
            Some("on")
        );
        let stats = server.sim.stats();
        assert_eq!(stats.instances[INSTANCE].modify_calls, 2);
        assert_eq!(stats.instances[INSTANCE].toggles_applied, 1);
        assert_eq!(stats.faults_injected, 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn scripted_errors_with_apply_land_the_toggle_then_answer_the_error() {
        let server = Server::start(config()).await;
        // Scripted over the control endpoint, as a test driving the binary would.
        let steps = serde_json::json!([
            {"kind": "error", "status": 500, "code": "DBS.05000000", "apply": true},
            {"kind": "error", "status": 504, "code": "APIGW.0201", "apply": true},
        ]);
        let script_url = server.url(&format!("/_simulator/script/{INSTANCE}"));
        let posted = reqwest::Client::new().post(script_url).json(&steps).send();
        assert_eq!(posted.await.expect("sent").status(), 204);

        let (status, code, _) =
            error_of(server.send(Call::post(modify_path(), &on_body())).await).await;
        assert_eq!((status, code.as_str()), (500, "DBS.05000000"));
        assert_eq!(
            server.sim.status_of(PROJECT, INSTANCE).as_deref(),
            Some("on")
        );

        let off = r#"{"encryption_status":"off"}"#;
        let (status, code, _) = error_of(server.send(Call::post(modify_path(), off)).await).await;
        assert_eq!((status, code.as_str()), (504, "APIGW.0201"));
        assert_eq!(
            server.sim.status_of(PROJECT, INSTANCE).as_deref(),
            Some("off")
        );

        let stats = server.sim.stats();
        let instance = &stats.instances[INSTANCE];
        assert_eq!((instance.modify_calls, instance.toggles_applied), (2, 2));
        assert_eq!(instance.kms_key_id, None);
        assert_eq!(stats.faults_injected, 2);
        server.stop().await;
    }

    #[tokio::test]
    async fn apply_then_error_rate_lands_modify_answers_500_and_serves_describe() {
        let server = Server::start(config()).await;
        let faults = serde_json::json!({"apply_then_error_rate": 1.0});
        let put = reqwest::Client::new()
            .put(server.url("/_simulator/faults"))
            .json(&faults)
            .send();
        assert_eq!(put.await.expect("sent").status(), 204);

        let (status, code, _) =
            error_of(server.send(Call::post(modify_path(), &on_body())).await).await;
        assert_eq!((status, code.as_str()), (500, "DBS.05000000"));
        let described = server.send(Call::get(modify_path())).await;
        assert_eq!(described.status(), 200);
        assert_eq!(json_of(described).await["encryption_status"], "on");

        // A body the service would refuse changes nothing, though the fault still answers.
        let (status, ..) = error_of(server.send(Call::post(modify_path(), "{}")).await).await;
        assert_eq!(status, 500);
        let stats = server.sim.stats();
        let instance = &stats.instances[INSTANCE];
        assert_eq!(instance.status, "on");
        assert_eq!(instance.kms_key_id.as_deref(), Some(KEY_ID));
        assert_eq!((instance.toggles_applied, instance.describe_calls), (1, 1));
        assert_eq!(stats.faults_injected, 2);
        server.stop().await;
    }

    #[tokio::test]
    async fn hang_with_apply_lands_the_toggle_while_the_client_times_out() {
        let server = Server::start(config()).await;
        let hangs = vec![
            Step::Hang {
                ms: 10_000,
                apply: true,
            },
            Step::Hang {
                ms: 10_000,
                apply: false,
            },
        ];
        server.sim.script(INSTANCE, hangs);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .expect("client");
        let landed = server.request(&client, Call::post(modify_path(), &on_body()));
        assert!(landed.send().await.is_err_and(|error| error.is_timeout()));
        server.wait_for_requests(1).await;
        let status = server.sim.status_of(PROJECT, INSTANCE);
        assert_eq!(status.as_deref(), Some("on"));

        let off = r#"{"encryption_status":"off"}"#;
        let lost = server.request(&client, Call::post(modify_path(), off));
        assert!(lost.send().await.is_err_and(|error| error.is_timeout()));
        server.wait_for_requests(2).await;
        let status = server.sim.status_of(PROJECT, INSTANCE);
        assert_eq!(status.as_deref(), Some("on"));
        let stats = server.sim.stats();
        assert_eq!(stats.instances[INSTANCE].toggles_applied, 1);
        assert_eq!(stats.recent[1].status, 504);
        server.stop().await;
    }

    #[tokio::test]
    async fn throttling_answers_429_with_retry_after_when_configured() {
        let faults = Faults {
            throttle_rate: 1.0,
            retry_after_secs: Some(3),
            ..Faults::default()
        };
        let server = Server::start(SimulatorConfig { faults, ..config() }).await;
        let response = server.send(Call::post(modify_path(), &on_body())).await;
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "3");
        assert_eq!(json_of(response).await["error_code"], "APIGW.0308");
        server.sim.set_faults(Faults {
            throttle_rate: 1.0,
            ..Faults::default()
        });
        let response = server.send(Call::get(modify_path())).await;
        assert_eq!(response.status(), 429);
        assert!(response.headers().get("retry-after").is_none());
        assert_eq!(
            server.sim.status_of(PROJECT, INSTANCE).as_deref(),
            Some("off")
        );
        assert_eq!(server.sim.stats().faults_injected, 2);
        server.stop().await;
    }

    #[tokio::test]
    async fn busy_error_timeout_and_latency_faults() {
        let server = Server::start(config()).await;
        let cases = [
            (
                Faults {
                    busy_rate: 1.0,
                    ..Faults::default()
                },
                409,
                "DBS.200019",
            ),
            (
                Faults {
                    error_rate: 1.0,
                    ..Faults::default()
                },
                500,
                "DBS.05000000",
            ),
            (
                Faults {
                    timeout_rate: 1.0,
                    hang_ms: 150,
                    ..Faults::default()
                },
                504,
                "APIGW.0201",
            ),
        ];
        for (faults, status, code) in cases {
            server.sim.set_faults(faults);
            let (got, got_code, _) = error_of(server.send(Call::get(modify_path())).await).await;
            assert_eq!((got, got_code.as_str()), (status, code));
        }
        server.sim.set_faults(Faults {
            latency_ms: 200,
            ..Faults::default()
        });
        let started = Instant::now();
        assert_eq!(server.send(Call::get(modify_path())).await.status(), 200);
        assert!(started.elapsed() >= Duration::from_millis(200));
        server.stop().await;
    }

    #[tokio::test]
    async fn fault_rolls_repeat_with_the_seed() {
        let faults = Faults {
            error_rate: 0.5,
            ..Faults::default()
        };
        let mut runs = Vec::new();
        for _ in 0..2 {
            let server = Server::start(SimulatorConfig {
                faults: faults.clone(),
                seed: 42,
                ..config()
            })
            .await;
            let mut statuses = Vec::new();
            for _ in 0..20 {
                statuses.push(
                    server
                        .send(Call::get(modify_path()))
                        .await
                        .status()
                        .as_u16(),
                );
            }
            server.stop().await;
            runs.push(statuses);
        }
        assert_eq!(runs[0], runs[1]);
        assert!(
            runs[0].contains(&200) && runs[0].contains(&500),
            "{:?}",
            runs[0]
        );
    }

    #[test]
    fn id_shapes() {
        assert!(is_project_id(PROJECT));
        assert!(!is_project_id("0a1b2c3d4e5f60718293a4b5c6d7e8f-"));
        assert!(is_instance_id(INSTANCE));
        assert!(!is_instance_id("7033e7c3cf93438797d44ad7ae0a7d95in0é"));
        assert_eq!(error_status(200), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error_status(403), StatusCode::FORBIDDEN);
    }
}
