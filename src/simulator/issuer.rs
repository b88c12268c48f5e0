//! The credential services a worker fetches from, on the same listener as the API: IAM's
//! `POST /v3/auth/tokens` (password identity) and the ECS metadata service
//! (`PUT /meta-data/latest/api/token`, then `GET /openstack/latest/securitykey` with that token).
//!
//! Every fetch issues something new (a token, or a temporary AK/SK with its security token) that
//! the gateway ([`super::auth`]) accepts until its expiry, `credential_life` after issue; a token
//! only on the project its request scoped it to by id (`"scope":{"project":{"id":…}}`; a token
//! without one is good for no project, as an unscoped IAM token is). Every answer carries a
//! `Date` from the simulator's clock, which clients measure `expires_at` against. Each
//! fetch is logged in [`super::Stats::credential_fetches`] (kind, time, the temporary AK; never a
//! secret); `Faults::refuse_credential_fetches` makes both services refuse.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{App, Simulator};

/// How long after its expiry an issued credential is forgotten (it is refused either way).
const FORGET_AFTER: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// An IAM user the simulated IAM accepts. No `Debug` derive: it holds a password.
#[derive(Clone)]
pub struct IamUser {
    pub domain: String,
    pub name: String,
    pub password: SecretString,
}

impl std::fmt::Debug for IamUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IamUser({}/{})", self.domain, self.name)
    }
}

/// One fetch as the simulator answered it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FetchRecord {
    /// `iam` or `metadata`.
    pub kind: String,
    /// When it was answered, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The temporary AK a metadata fetch issued.
    pub access_key: Option<String>,
    /// The project id an IAM token was asked to be scoped to.
    #[serde(default)]
    pub project_id: Option<String>,
    pub refused: bool,
}

/// A temporary AK/SK and its security token.
pub(super) struct TemporaryKey {
    pub ak: String,
    pub sk: SecretString,
    pub security_token: SecretString,
    pub expires_at: DateTime<Utc>,
}

/// An IAM token and the project it was scoped to.
pub(super) struct IssuedToken {
    pub token: SecretString,
    pub expires_at: DateTime<Utc>,
    pub project_id: Option<String>,
}

/// What the services issued and the gateway accepts until expiry.
#[derive(Default)]
pub(super) struct Issued {
    pub temporary: Vec<TemporaryKey>,
    pub tokens: Vec<IssuedToken>,
    pub metadata_tokens: Vec<SecretString>,
}

impl Issued {
    fn forget_expired(&mut self, now: DateTime<Utc>) {
        self.temporary
            .retain(|key| key.expires_at + FORGET_AFTER > now);
        self.tokens
            .retain(|token| token.expires_at + FORGET_AFTER > now);
    }
}

fn random(length: usize) -> String {
    let mut text = uuid::Uuid::new_v4().simple().to_string();
    text.push_str(&uuid::Uuid::new_v4().simple().to_string());
    text.truncate(length);
    text
}

/// Huawei's format: microseconds and a `Z`.
fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl Simulator {
    fn expiry(&self) -> DateTime<Utc> {
        let life = chrono::TimeDelta::from_std(self.config.credential_life)
            .unwrap_or(chrono::TimeDelta::hours(1));
        Utc::now() + life
    }

    /// Issues a temporary AK/SK with its security token, as the metadata service does; also for
    /// tests that hand one to a worker through CLOUD_SDK_SECURITY_TOKEN.
    pub fn issue_temporary(&self) -> (String, SecretString, SecretString, DateTime<Utc>) {
        let key = TemporaryKey {
            ak: random(20).to_ascii_uppercase(),
            sk: SecretString::from(random(40)),
            security_token: SecretString::from(format!("gQpjbi1ub3J0aC00{}", random(64))),
            expires_at: self.expiry(),
        };
        let issued = (
            key.ak.clone(),
            key.sk.clone(),
            key.security_token.clone(),
            key.expires_at,
        );
        let mut store = self.issued();
        store.forget_expired(Utc::now());
        store.temporary.push(key);
        issued
    }

    fn issue_token(&self, project_id: Option<String>) -> (SecretString, DateTime<Utc>) {
        let token = SecretString::from(format!("MIIissued-{}", random(64)));
        let expires_at = self.expiry();
        let mut store = self.issued();
        store.forget_expired(Utc::now());
        store.tokens.push(IssuedToken {
            token: token.clone(),
            expires_at,
            project_id,
        });
        (token, expires_at)
    }

    fn log_fetch(&self, kind: &str, access_key: Option<String>, refused: bool) {
        self.log_scoped_fetch(kind, access_key, None, refused);
    }

    fn log_scoped_fetch(
        &self,
        kind: &str,
        access_key: Option<String>,
        project_id: Option<String>,
        refused: bool,
    ) {
        self.world().fetches.push(FetchRecord {
            kind: kind.into(),
            at_ms: Utc::now().timestamp_millis(),
            access_key,
            project_id,
            refused,
        });
    }

    fn refusing_fetches(&self) -> bool {
        self.world().faults.refuse_credential_fetches
    }

    fn knows_user(&self, domain: &str, name: &str, password: &str) -> bool {
        self.config.iam_users.iter().any(|user| {
            user.domain == domain
                && user.name == name
                && super::auth::same_secret(&user.password, password.as_bytes())
        })
    }
}

#[derive(Deserialize)]
struct TokenRequest {
    auth: TokenAuth,
}

#[derive(Deserialize)]
struct TokenAuth {
    identity: Identity,
    scope: Option<TokenScope>,
}

#[derive(Deserialize)]
struct TokenScope {
    project: Option<ProjectRef>,
}

/// A project by id (the one the gateway checks) or by name (which the simulator cannot resolve).
#[derive(Deserialize)]
struct ProjectRef {
    id: Option<String>,
}

#[derive(Deserialize)]
struct Identity {
    methods: Vec<String>,
    password: Option<PasswordIdentity>,
}

#[derive(Deserialize)]
struct PasswordIdentity {
    user: PasswordUser,
}

#[derive(Deserialize)]
struct PasswordUser {
    domain: Named,
    name: String,
    password: String,
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

fn iam_error(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"code": status.as_u16().to_string(), "message": message,
        "title": status.canonical_reason().unwrap_or_default()}});
    dated((status, Json(body)).into_response())
}

/// Adds `Date` (an HTTP date) from the simulator's clock. hyper adds one too when it serves
/// the router, but not every way of serving it does, and clients depend on it.
fn dated(mut response: Response) -> Response {
    let date = Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    if let Ok(value) = HeaderValue::from_str(&date) {
        response
            .headers_mut()
            .insert(axum::http::header::DATE, value);
    }
    response
}

/// `POST /v3/auth/tokens`: 201 with `X-Subject-Token` for a known user's password.
pub(super) async fn iam_tokens(State(app): State<App>, body: Bytes) -> Response {
    let sim = &app.sim;
    let Ok(request) = serde_json::from_slice::<TokenRequest>(&body) else {
        sim.log_fetch("iam", None, true);
        return iam_error(StatusCode::BAD_REQUEST, "The request body is invalid.");
    };
    let project_id = request
        .auth
        .scope
        .and_then(|scope| scope.project)
        .and_then(|project| project.id);
    let identity = request.auth.identity;
    let known = identity.methods.iter().any(|m| m == "password")
        && identity
            .password
            .is_some_and(|p| sim.knows_user(&p.user.domain.name, &p.user.name, &p.user.password));
    if sim.refusing_fetches() || !known {
        sim.log_fetch("iam", None, true);
        return iam_error(
            StatusCode::UNAUTHORIZED,
            "The username or password is wrong.",
        );
    }
    let (token, expires_at) = sim.issue_token(project_id.clone());
    sim.log_scoped_fetch("iam", None, project_id, false);
    let body = json!({"token": {"expires_at": timestamp(expires_at),
        "issued_at": timestamp(Utc::now()), "methods": ["password"]}});
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(token.expose_secret()) {
        response.headers_mut().insert("x-subject-token", value);
    }
    dated(response)
}

/// `PUT /meta-data/latest/api/token`: a metadata API token, when a TTL is asked for.
pub(super) async fn metadata_token(State(app): State<App>, headers: HeaderMap) -> Response {
    if !headers.contains_key("x-metadata-token-ttl-seconds") {
        return dated(
            (
                StatusCode::BAD_REQUEST,
                "X-Metadata-Token-Ttl-Seconds is required",
            )
                .into_response(),
        );
    }
    let token = random(48);
    app.sim
        .issued()
        .metadata_tokens
        .push(SecretString::from(token.clone()));
    dated((StatusCode::OK, token).into_response())
}

/// `GET /openstack/latest/securitykey`: a new temporary AK/SK, for a known metadata token.
pub(super) async fn security_key(State(app): State<App>, headers: HeaderMap) -> Response {
    let sim = &app.sim;
    let offered = headers
        .get("x-metadata-token")
        .map(|value| value.as_bytes().to_vec())
        .unwrap_or_default();
    let known = sim
        .issued()
        .metadata_tokens
        .iter()
        .any(|token| super::auth::same_secret(token, &offered));
    if !known {
        return dated(
            (
                StatusCode::UNAUTHORIZED,
                "metadata token missing or unknown",
            )
                .into_response(),
        );
    }
    if sim.refusing_fetches() {
        sim.log_fetch("metadata", None, true);
        return dated(
            (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "Please configure Cloud Service Agency first"})),
            )
                .into_response(),
        );
    }
    let (ak, sk, security_token, expires_at) = sim.issue_temporary();
    sim.log_fetch("metadata", Some(ak.clone()), false);
    let body = json!({"credential": {"access": ak, "secret": sk.expose_secret(),
        "securitytoken": security_token.expose_secret(), "expires_at": timestamp(expires_at)}});
    dated((StatusCode::OK, Json(body)).into_response())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::SimulatorConfig;
    use super::super::test_support::*;
    use super::*;

    async fn fetch_security_key(server: &Server) -> serde_json::Value {
        let client = reqwest::Client::new();
        let token = client
            .put(server.url("/meta-data/latest/api/token"))
            .header("X-Metadata-Token-Ttl-Seconds", "21600")
            .send()
            .await
            .expect("sent")
            .text()
            .await
            .expect("token");
        let answer = client
            .get(server.url("/openstack/latest/securitykey"))
            .header("X-Metadata-Token", token)
            .send()
            .await
            .expect("sent");
        assert_eq!(answer.status(), 200);
        assert!(
            answer.headers().contains_key("date"),
            "metadata answers carry a Date"
        );
        json_of(answer).await["credential"].clone()
    }

    #[tokio::test]
    async fn a_temporary_key_needs_its_own_signed_security_token_and_rotates() {
        let server = Server::start(config()).await;
        let first = fetch_security_key(&server).await;
        let second = fetch_security_key(&server).await;
        assert_ne!(
            first["access"], second["access"],
            "each fetch issues a new key"
        );
        let text = |value: &serde_json::Value, key: &str| value[key].as_str().unwrap().to_owned();
        let (ak, sk, token) = (
            text(&first, "access"),
            text(&first, "secret"),
            text(&first, "securitytoken"),
        );
        let other_token = text(&second, "securitytoken");
        let call = |security_token, minimal| Call {
            ak: &ak,
            sk: &sk,
            security_token,
            minimal,
            ..Call::get(modify_path())
        };
        assert_eq!(server.send(call(Some(&token), false)).await.status(), 200);
        for refused in [
            call(None, false),
            call(Some(&other_token), false),
            call(Some(&token), true),
        ] {
            let (status, code, msg) = error_of(server.send(refused).await).await;
            assert_eq!((status, code.as_str()), (401, "APIGW.0301"));
            assert!(msg.contains("x-security-token"), "{msg}");
        }
        let stats = server.sim.stats();
        assert_eq!(stats.credential_fetches.len(), 2);
        assert_eq!(stats.recent[0].access_key.as_deref(), Some(ak.as_str()));
        let shown = serde_json::to_string(&stats).expect("stats json");
        assert!(
            !shown.contains(&sk) && !shown.contains(&token),
            "no secret in the stats"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn an_expired_temporary_key_or_token_is_refused() {
        let server = Server::start(SimulatorConfig {
            credential_life: Duration::ZERO,
            ..with_user()
        })
        .await;
        let (ak, sk, token, _) = server.sim.issue_temporary();
        let call = Call {
            ak: &ak,
            sk: sk.expose_secret(),
            security_token: Some(token.expose_secret()),
            ..Call::get(modify_path())
        };
        let (status, code, msg) = error_of(server.send(call).await).await;
        assert_eq!((status, code.as_str()), (401, "APIGW.0301"));
        assert!(msg.contains("expired"), "{msg}");

        let client = reqwest::Client::new();
        let token = token_for(&server, Some(PROJECT)).await;
        let refused = client
            .get(server.url(modify_path()))
            .header("X-Auth-Token", token)
            .send();
        let (status, code, msg) = error_of(refused.await.expect("sent")).await;
        assert_eq!((status, code.as_str()), (401, "APIGW.0301"));
        assert_eq!(msg, "Incorrect token or token resolution failed");
        server.stop().await;
    }

    fn with_user() -> SimulatorConfig {
        SimulatorConfig {
            iam_users: vec![IamUser {
                domain: "d".into(),
                name: "u".into(),
                password: SecretString::from("p"),
            }],
            ..config()
        }
    }

    /// A token of user d/u, scoped to `project` by id (or unscoped).
    async fn token_for(server: &Server, project: Option<&str>) -> String {
        let mut body = serde_json::json!({"auth": {"identity": {"methods": ["password"],
            "password": {"user": {"domain": {"name": "d"}, "name": "u", "password": "p"}}}}});
        if let Some(project) = project {
            body["auth"]["scope"] = serde_json::json!({"project": {"id": project}});
        }
        let issued = reqwest::Client::new()
            .post(server.url("/v3/auth/tokens"))
            .json(&body)
            .send()
            .await
            .expect("sent");
        assert_eq!(issued.status(), 201);
        assert!(
            issued.headers().contains_key("date"),
            "IAM answers carry a Date"
        );
        issued.headers()["x-subject-token"]
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[tokio::test]
    async fn an_iam_token_passes_only_on_the_project_it_is_scoped_to() {
        let server = Server::start(with_user()).await;
        let other = "ffffffffffffffffffffffffffffffff";
        // Each project's own instance (an instance id belongs to one project).
        let call = |token: String, project: &str| {
            let instance = if project == PROJECT {
                INSTANCE
            } else {
                "8033e7c3cf93438797d44ad7ae0a7d95in07"
            };
            reqwest::Client::new()
                .get(server.url(&path_for(project, instance)))
                .header("X-Auth-Token", token)
                .send()
        };
        let scoped = token_for(&server, Some(PROJECT)).await;
        assert_eq!(
            call(scoped.clone(), PROJECT).await.expect("sent").status(),
            200
        );
        let unscoped = token_for(&server, None).await;
        for (token, project) in [(scoped, other), (unscoped, PROJECT)] {
            let (status, code, msg) = error_of(call(token, project).await.expect("sent")).await;
            assert_eq!((status, code.as_str()), (401, "APIGW.0301"));
            assert!(msg.contains("not scoped to the project"), "{msg}");
        }
        let other_token = token_for(&server, Some(other)).await;
        assert_eq!(call(other_token, other).await.expect("sent").status(), 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn refused_fetches_are_logged_and_issue_nothing() {
        let server = Server::start(config()).await;
        server.sim.set_faults(super::super::Faults {
            refuse_credential_fetches: true,
            ..Default::default()
        });
        let body = serde_json::json!({"auth": {"identity": {"methods": ["password"],
            "password": {"user": {"domain": {"name": "d"}, "name": "u", "password": "p"}}}}});
        let answer = reqwest::Client::new()
            .post(server.url("/v3/auth/tokens"))
            .json(&body)
            .send()
            .await
            .expect("sent");
        assert_eq!(answer.status(), 401);
        assert!(answer.headers().get("x-subject-token").is_none());
        let fetches = server.sim.stats().credential_fetches;
        assert_eq!(fetches.len(), 1);
        assert!(fetches[0].refused);
        server.stop().await;
    }
}
