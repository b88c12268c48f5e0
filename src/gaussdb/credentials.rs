//! Credentials behind one interface: the client asks a [`Provider`] for a [`Lease`] before each
//! attempt and signs (or sets `X-Auth-Token`) with what it gets.
//!
//! Static credentials (permanent AK/SK, temporary AK/SK from the environment, a static token)
//! never change. Fetched ones (temporary AK/SK from the ECS metadata service, an IAM token) live
//! in a [`Refreshing`] cache: replaced `min(api.refresh_before, half their lifetime)` before they
//! expire, one fetch at a time however many attempts want one (single-flight). A fetch that fails
//! while the old credential is still valid keeps the old one; with nothing valid left the client
//! gets a [`FetchError`], sends nothing, and the pipeline opens the credentials circuit.
//!
//! An IAM token is scoped to one project, and jobs name many: [`PerProject`] keeps one cache per
//! job `project_id`, each fetching a token scoped to that project by id. Expiry is measured
//! against the fetch answer's `Date` header when there is one, so a skewed local clock neither
//! keeps an expired credential nor throws away a fresh one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{Credentials, IamIdentity};

/// One usable credential. `Debug` never shows the secrets.
#[derive(Clone, Debug)]
pub enum Credential {
    /// Signs with `SDK-HMAC-SHA256`; a temporary key also sends (and signs) `X-Security-Token`.
    AkSk {
        ak: String,
        sk: SecretString,
        security_token: Option<SecretString>,
    },
    /// Sent as `X-Auth-Token`.
    Token(SecretString),
}

/// A credential lent to one attempt; its generation tells [`Provider::refused`] which one failed.
#[derive(Clone, Debug)]
pub struct Lease {
    pub credential: Credential,
    generation: u64,
}

/// Why no credential could be had. The text names the source (a URL), never a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// Where an attempt gets its credential.
#[async_trait]
pub trait Provider: Send + Sync {
    /// A credential for a call on `project_id`'s resources (only IAM tokens depend on it).
    async fn lease(&self, project_id: &str) -> Result<Lease, FetchError>;
    /// The API answered 401 to `lease` (leased for `project_id`): a fetched credential is
    /// dropped, so the next lease (the circuit's probe) fetches afresh.
    fn refused(&self, _project_id: &str, _lease: &Lease) {}
    /// Successful fetches so far (0 for static credentials): a monotonic counter for metrics.
    fn fetches(&self) -> u64 {
        0
    }
}

/// Builds the provider for the configured source; fetches go through `http`.
pub fn provider(
    credentials: Credentials,
    http: reqwest::Client,
    refresh_before: Duration,
) -> Arc<dyn Provider> {
    let fixed = |credential| Arc::new(Static::new(credential)) as Arc<dyn Provider>;
    match credentials {
        Credentials::AkSk { ak, sk } => fixed(Credential::AkSk {
            ak,
            sk,
            security_token: None,
        }),
        Credentials::TemporaryAkSk {
            ak,
            sk,
            security_token,
        } => fixed(Credential::AkSk {
            ak,
            sk,
            security_token: Some(security_token),
        }),
        Credentials::Token(token) => fixed(Credential::Token(token)),
        Credentials::Metadata { url } => {
            Arc::new(Refreshing::new(Metadata::new(http, url), refresh_before))
        }
        Credentials::Iam(identity) => Arc::new(PerProject::new(
            Arc::new(IamUser { http, identity }),
            refresh_before,
        )),
    }
}

/// A credential that never changes.
pub struct Static(Lease);

impl Static {
    pub fn new(credential: Credential) -> Static {
        Static(Lease {
            credential,
            generation: 0,
        })
    }
}

#[async_trait]
impl Provider for Static {
    async fn lease(&self, _project_id: &str) -> Result<Lease, FetchError> {
        Ok(self.0.clone())
    }
}

/// A fetched credential and how long it stays valid from now.
pub struct Fetched {
    pub credential: Credential,
    pub valid_for: Duration,
}

/// One way of fetching a credential.
#[async_trait]
pub trait Fetch: Send + Sync {
    async fn fetch(&self) -> Result<Fetched, FetchError>;
}

/// After a failed refresh while the old credential still serves, how long before trying again:
/// attempts in that window keep the old one instead of queueing behind fetch after fetch.
const RETRY_GAP: Duration = Duration::from_secs(1);

/// A cache of fetched credentials, refreshed before expiry, one fetch at a time.
pub struct Refreshing<F> {
    fetcher: F,
    refresh_before: Duration,
    /// Held across a fetch: that is what makes it single-flight.
    state: Mutex<Cached>,
    /// Fetches started; the generation of what each one fetched.
    attempts: AtomicU64,
    /// Fetches that brought a usable credential: what the metric counts.
    succeeded: AtomicU64,
    /// Fetches finished; read before waiting for `state`, to see whether one ended meanwhile.
    finished: AtomicU64,
    /// The newest generation the API refused (0: none).
    refused: AtomicU64,
}

#[derive(Default)]
struct Cached {
    current: Option<Held>,
    last_error: Option<FetchError>,
    retry_at: Option<Instant>,
}

struct Held {
    lease: Lease,
    refresh_at: Instant,
    expires_at: Instant,
}

impl<F: Fetch> Refreshing<F> {
    pub fn new(fetcher: F, refresh_before: Duration) -> Refreshing<F> {
        Refreshing {
            fetcher,
            refresh_before,
            state: Mutex::new(Cached::default()),
            attempts: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The held credential if it may still be sent (`until` its expiry or its refresh time).
    fn held(&self, cached: &Cached, until: impl Fn(&Held) -> Instant) -> Option<Lease> {
        let held = cached.current.as_ref()?;
        let refused = held.lease.generation <= self.refused.load(Ordering::SeqCst);
        (!refused && Instant::now() < until(held)).then(|| held.lease.clone())
    }

    async fn fetch_into(&self, cached: &mut Cached) -> Result<Lease, FetchError> {
        let generation = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
        let fetched = self.fetcher.fetch().await.and_then(|fetched| {
            if fetched.valid_for.is_zero() {
                Err(FetchError(format!(
                    "the fetched credential has already expired; {CLOCK_HINT}"
                )))
            } else {
                Ok(fetched)
            }
        });
        self.finished.fetch_add(1, Ordering::SeqCst);
        match fetched {
            Ok(fetched) => {
                self.succeeded.fetch_add(1, Ordering::SeqCst);
                let lease = Lease {
                    credential: fetched.credential,
                    generation,
                };
                cached.current = Some(self.hold(lease.clone(), fetched.valid_for));
                cached.last_error = None;
                cached.retry_at = None;
                Ok(lease)
            }
            Err(error) => {
                cached.last_error = Some(error.clone());
                cached.retry_at = Some(Instant::now() + RETRY_GAP);
                match self.held(cached, |held| held.expires_at) {
                    Some(old) => {
                        tracing::warn!(%error, "refreshing credentials failed; the current ones stay valid a little longer");
                        Ok(old)
                    }
                    None => Err(error),
                }
            }
        }
    }

    /// Refreshes `min(refresh_before, valid_for / 2)` before expiry: early enough to survive a
    /// failed fetch or two, late enough that a short-lived credential is used at all.
    fn hold(&self, lease: Lease, valid_for: Duration) -> Held {
        let now = Instant::now();
        let margin = self.refresh_before.min(valid_for / 2);
        Held {
            lease,
            refresh_at: now + (valid_for - margin),
            expires_at: now + valid_for,
        }
    }
}

#[async_trait]
impl<F: Fetch> Provider for Refreshing<F> {
    /// One cache whatever the project: metadata credentials are not project-scoped.
    async fn lease(&self, _project_id: &str) -> Result<Lease, FetchError> {
        let seen = self.finished.load(Ordering::SeqCst);
        let mut cached = self.state.lock().await;
        if let Some(fresh) = self.held(&cached, |held| held.refresh_at) {
            return Ok(fresh);
        }
        let valid = self.held(&cached, |held| held.expires_at);
        if self.finished.load(Ordering::SeqCst) != seen {
            // A fetch ran while this caller waited: share its outcome instead of fetching again.
            if let Some(lease) = valid {
                return Ok(lease);
            }
            if let Some(error) = &cached.last_error {
                return Err(error.clone());
            }
        }
        if let (Some(lease), Some(retry_at)) = (&valid, cached.retry_at)
            && Instant::now() < retry_at
        {
            return Ok(lease.clone());
        }
        self.fetch_into(&mut cached).await
    }

    fn refused(&self, _project_id: &str, lease: &Lease) {
        self.refused.fetch_max(lease.generation, Ordering::SeqCst);
    }

    fn fetches(&self) -> u64 {
        self.succeeded.load(Ordering::SeqCst)
    }
}

/// A fetcher for credentials scoped to one project.
pub trait Scoped: Send + Sync + 'static {
    type Fetcher: Fetch + 'static;
    fn for_project(self: &Arc<Self>, project_id: &str) -> Self::Fetcher;
}

/// One [`Refreshing`] cache per project id, created on first use: each is single-flight on its
/// own, so jobs of two projects fetch one credential each and never wait on each other's fetch.
/// Projects are few (an account's), so caches are kept for the life of the worker.
pub struct PerProject<S: Scoped> {
    scoped: Arc<S>,
    refresh_before: Duration,
    caches: std::sync::Mutex<HashMap<String, Arc<Refreshing<S::Fetcher>>>>,
}

impl<S: Scoped> PerProject<S> {
    pub fn new(scoped: Arc<S>, refresh_before: Duration) -> PerProject<S> {
        PerProject {
            scoped,
            refresh_before,
            caches: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self, project_id: &str) -> Arc<Refreshing<S::Fetcher>> {
        let mut caches = self.caches.lock().expect("per-project caches lock");
        caches
            .entry(project_id.to_owned())
            .or_insert_with(|| {
                let fetcher = self.scoped.for_project(project_id);
                Arc::new(Refreshing::new(fetcher, self.refresh_before))
            })
            .clone()
    }
}

#[async_trait]
impl<S: Scoped> Provider for PerProject<S> {
    async fn lease(&self, project_id: &str) -> Result<Lease, FetchError> {
        self.cache(project_id).lease(project_id).await
    }

    fn refused(&self, project_id: &str, lease: &Lease) {
        self.cache(project_id).refused(project_id, lease);
    }

    /// The sum over projects; caches are never dropped, so it never goes down.
    fn fetches(&self) -> u64 {
        let caches = self.caches.lock().expect("per-project caches lock");
        caches.values().map(|cache| cache.fetches()).sum()
    }
}

/// Appended to "already expired": the usual cause is a wrong clock, not a bad service.
const CLOCK_HINT: &str = "check the clocks of this host and of the credential service (NTP)";

/// The server's clock when it answered, from the `Date` header (an HTTP date, RFC 2822 form).
fn server_date(headers: &reqwest::header::HeaderMap) -> Option<DateTime<Utc>> {
    let text = headers.get(reqwest::header::DATE)?.to_str().ok()?;
    DateTime::parse_from_rfc2822(text)
        .ok()
        .map(|date| date.with_timezone(&Utc))
}

/// How long a credential expiring at `expires_at` (server time) stays valid, as a duration the
/// local monotonic clock can count down.
///
/// With a `Date` from the server, the server's "now" is within `[date, date + 1 s)` (the header
/// has whole seconds): the local clock is used when it falls in that window (it is finer), else
/// the nearest end of it, so a local clock that is minutes off changes nothing. Without a `Date`
/// the local clock is all there is.
fn valid_for(
    expires_at: DateTime<Utc>,
    server_date: Option<DateTime<Utc>>,
    local_now: DateTime<Utc>,
) -> Duration {
    let now = match server_date {
        Some(date) => {
            let latest = date + chrono::TimeDelta::milliseconds(999);
            local_now.clamp(date, latest)
        }
        None => local_now,
    };
    (expires_at - now).to_std().unwrap_or(Duration::ZERO)
}

/// `valid_for` of an answer's `expires_at` text; an error when it is unreadable or already past.
fn remaining(
    expires_at: &str,
    server_date: Option<DateTime<Utc>>,
    source: &str,
) -> Result<Duration, FetchError> {
    let at = DateTime::parse_from_rfc3339(expires_at)
        .map_err(|_| FetchError(format!("{source} gave an expires_at that is not RFC 3339")))?;
    let left = valid_for(at.with_timezone(&Utc), server_date, Utc::now());
    if left.is_zero() {
        let against = match server_date {
            Some(date) => format!("its Date header says {}", date.to_rfc2822()),
            None => "it sent no Date header, so this host's clock was used".into(),
        };
        return Err(FetchError(format!(
            "{source} gave a credential that has already expired (expires_at {expires_at}; \
             {against}); {CLOCK_HINT}"
        )));
    }
    Ok(left)
}

fn unreachable(source: &str, error: reqwest::Error) -> FetchError {
    FetchError(format!("cannot reach {source}: {}", error.without_url()))
}

/// An error answer, with a short excerpt of its body (error bodies carry no credential).
async fn refused_by(source: &str, response: reqwest::Response) -> FetchError {
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    let excerpt: String = body.chars().take(200).collect();
    FetchError(format!("{source} answered HTTP {status}: {excerpt}"))
}

/// Temporary AK/SK from the ECS metadata service, as Huawei's SDKs get them: a metadata API token
/// first (`PUT /meta-data/latest/api/token`; a 404 or 405 means an older service without one),
/// then `GET /openstack/latest/securitykey` with it.
pub struct Metadata {
    http: reqwest::Client,
    url: String,
    token: std::sync::Mutex<Option<SecretString>>,
}

const METADATA_TOKEN_PATH: &str = "/meta-data/latest/api/token";
const SECURITY_KEY_PATH: &str = "/openstack/latest/securitykey";
/// The TTL Huawei's SDKs ask for (6 h).
const METADATA_TOKEN_TTL_SECS: u32 = 6 * 60 * 60;

#[derive(Deserialize)]
struct SecurityKey {
    credential: SecurityKeyCredential,
}

#[derive(Deserialize)]
struct SecurityKeyCredential {
    access: String,
    #[serde(deserialize_with = "secret")]
    secret: SecretString,
    #[serde(deserialize_with = "secret")]
    securitytoken: SecretString,
    expires_at: String,
}

/// Secret text read straight into a [`SecretString`].
fn secret<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<SecretString, D::Error> {
    String::deserialize(deserializer).map(SecretString::from)
}

impl Metadata {
    pub fn new(http: reqwest::Client, url: String) -> Metadata {
        Metadata {
            http,
            url,
            token: std::sync::Mutex::new(None),
        }
    }

    fn source(&self) -> String {
        format!("the metadata service at {}{SECURITY_KEY_PATH}", self.url)
    }

    /// A fresh metadata API token, or `None` from a service that has none.
    async fn renew_token(&self) -> Result<Option<SecretString>, FetchError> {
        let source = format!("the metadata service at {}{METADATA_TOKEN_PATH}", self.url);
        let response = self
            .http
            .put(format!("{}{METADATA_TOKEN_PATH}", self.url))
            .header("X-Metadata-Token-Ttl-Seconds", METADATA_TOKEN_TTL_SECS)
            .send()
            .await
            .map_err(|error| unreachable(&source, error))?;
        let token = match response.status().as_u16() {
            200 => Some(SecretString::from(
                response.text().await.map_err(|e| unreachable(&source, e))?,
            )),
            404 | 405 => None,
            _ => return Err(refused_by(&source, response).await),
        };
        *self.token.lock().expect("metadata token lock") = token.clone();
        Ok(token)
    }

    async fn security_key(
        &self,
        token: Option<&SecretString>,
    ) -> Result<reqwest::Response, FetchError> {
        let mut request = self.http.get(format!("{}{SECURITY_KEY_PATH}", self.url));
        if let Some(token) = token {
            request = request.header("X-Metadata-Token", token.expose_secret());
        }
        request
            .send()
            .await
            .map_err(|error| unreachable(&self.source(), error))
    }
}

#[async_trait]
impl Fetch for Metadata {
    async fn fetch(&self) -> Result<Fetched, FetchError> {
        let known = self.token.lock().expect("metadata token lock").clone();
        let token = match known {
            Some(token) => Some(token),
            None => self.renew_token().await?,
        };
        let mut response = self.security_key(token.as_ref()).await?;
        if response.status() == 401 {
            // The metadata token may have expired: one new one, one more try.
            let token = self.renew_token().await?;
            response = self.security_key(token.as_ref()).await?;
        }
        if response.status() != 200 {
            return Err(refused_by(&self.source(), response).await);
        }
        let date = server_date(response.headers());
        let key: SecurityKey = response
            .json()
            .await
            .map_err(|_| FetchError(format!("{} gave no credential JSON", self.source())))?;
        let key = key.credential;
        Ok(Fetched {
            valid_for: remaining(&key.expires_at, date, &self.source())?,
            credential: Credential::AkSk {
                ak: key.access,
                sk: key.secret,
                security_token: Some(key.securitytoken),
            },
        })
    }
}

/// The IAM user whose password fetches tokens: one [`Iam`] fetcher per project.
pub struct IamUser {
    http: reqwest::Client,
    identity: IamIdentity,
}

impl Scoped for IamUser {
    type Fetcher = Iam;

    fn for_project(self: &Arc<Self>, project_id: &str) -> Iam {
        Iam {
            user: self.clone(),
            project_id: project_id.to_owned(),
        }
    }
}

/// An IAM token for a user and password (`POST /v3/auth/tokens`, password identity, scoped to
/// one project by id: a token is refused on any other project's resources): the
/// `X-Subject-Token` header of a 201, valid until the body's `token.expires_at`.
pub struct Iam {
    user: Arc<IamUser>,
    project_id: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: TokenBody,
}

#[derive(Deserialize)]
struct TokenBody {
    expires_at: String,
}

impl Iam {
    fn url(&self) -> String {
        format!(
            "{}/v3/auth/tokens?nocatalog=true",
            self.user.identity.endpoint
        )
    }

    fn body(&self) -> serde_json::Value {
        let identity = &self.user.identity;
        serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "domain": {"name": identity.domain},
                "name": identity.user,
                "password": identity.password.expose_secret(),
            }}},
            "scope": {"project": {"id": self.project_id}},
        }})
    }
}

#[async_trait]
impl Fetch for Iam {
    async fn fetch(&self) -> Result<Fetched, FetchError> {
        // The project is named: a token IAM will not scope to one project holds every job.
        let source = format!(
            "IAM at {}/v3/auth/tokens (a token for project {})",
            self.user.identity.endpoint, self.project_id
        );
        let response = self
            .user
            .http
            .post(self.url())
            .json(&self.body())
            .send()
            .await
            .map_err(|error| unreachable(&source, error))?;
        if response.status() != 201 {
            return Err(refused_by(&source, response).await);
        }
        let token = response
            .headers()
            .get("x-subject-token")
            .and_then(|value| value.to_str().ok())
            .map(|value| SecretString::from(value.to_owned()))
            .ok_or_else(|| FetchError(format!("{source} answered 201 without X-Subject-Token")))?;
        let date = server_date(response.headers());
        let answer: TokenAnswer = response
            .json()
            .await
            .map_err(|_| FetchError(format!("{source} answered 201 without token.expires_at")))?;
        Ok(Fetched {
            valid_for: remaining(&answer.token.expires_at, date, &source)?,
            credential: Credential::Token(token),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts fetches; each takes `delay` and yields a credential valid for `life`, or fails.
    struct Counting {
        delay: Duration,
        life: Duration,
        fail: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Fetch for Counting {
        async fn fetch(&self) -> Result<Fetched, FetchError> {
            tokio::time::sleep(self.delay).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(FetchError("refused".into()));
            }
            Ok(Fetched {
                credential: Credential::Token(SecretString::from("t")),
                valid_for: self.life,
            })
        }
    }

    fn cache(life: Duration, refresh_before: Duration) -> Arc<Refreshing<Counting>> {
        Arc::new(Refreshing::new(
            Counting {
                delay: Duration::from_millis(50),
                life,
                fail: false.into(),
            },
            refresh_before,
        ))
    }

    /// `n` concurrent leases, spread round-robin over `projects`.
    async fn lease_all<P: Provider + 'static>(
        provider: &Arc<P>,
        n: usize,
        projects: &[&str],
    ) -> Vec<Result<Lease, FetchError>> {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let provider = provider.clone();
                let project = projects[i % projects.len()].to_owned();
                tokio::spawn(async move { provider.lease(&project).await })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.expect("joined"));
        }
        results
    }

    #[tokio::test(start_paused = true)]
    async fn sixty_four_callers_at_expiry_cause_one_fetch() {
        let cache = cache(Duration::from_secs(3), Duration::from_secs(300));
        let first = lease_all(&cache, 64, &["p"]).await;
        assert!(first.iter().all(Result::is_ok));
        assert_eq!(cache.fetches(), 1);
        // Half of a 3 s life is the margin: at 1.4 s the credential is still used...
        tokio::time::advance(Duration::from_millis(1_400)).await;
        lease_all(&cache, 64, &["p"]).await;
        assert_eq!(cache.fetches(), 1);
        // ...and at 1.6 s it is replaced, once.
        tokio::time::advance(Duration::from_millis(200)).await;
        let renewed = lease_all(&cache, 64, &["p"]).await;
        assert_eq!(cache.fetches(), 2);
        let generations: std::collections::BTreeSet<u64> = renewed
            .iter()
            .map(|lease| lease.as_ref().expect("lease").generation)
            .collect();
        assert_eq!(generations.into_iter().collect::<Vec<_>>(), [2]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_margin_is_refresh_before_when_that_is_shorter() {
        let cache = cache(Duration::from_secs(3600), Duration::from_secs(300));
        cache.lease("p").await.expect("lease");
        tokio::time::advance(Duration::from_secs(3600 - 301)).await;
        cache.lease("p").await.expect("lease");
        assert_eq!(cache.fetches(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        cache.lease("p").await.expect("lease");
        assert_eq!(cache.fetches(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_lease_is_fetched_afresh_once() {
        let cache = cache(Duration::from_secs(3600), Duration::from_secs(300));
        let lease = cache.lease("p").await.expect("lease");
        for _ in 0..10 {
            cache.refused("p", &lease);
        }
        let next = cache.lease("p").await.expect("lease");
        assert_eq!(cache.fetches(), 2);
        // A late 401 for the old lease does not drop the new one.
        cache.refused("p", &lease);
        assert_eq!(
            cache.lease("p").await.expect("lease").generation,
            next.generation
        );
        assert_eq!(cache.fetches(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_fetch_is_shared_by_its_waiters_and_keeps_a_valid_credential() {
        let cache = cache(Duration::from_secs(10), Duration::from_secs(300));
        cache.fetcher.fail.store(true, Ordering::SeqCst);
        let failed = lease_all(&cache, 64, &["p"]).await;
        assert!(
            failed
                .iter()
                .all(|r| r.as_ref().err() == Some(&FetchError("refused".into())))
        );
        assert_eq!(attempts(&cache), 1, "the waiters shared the failure");
        assert_eq!(
            cache.fetches(),
            0,
            "the metric counts successful fetches only"
        );

        cache.fetcher.fail.store(false, Ordering::SeqCst);
        cache.lease("p").await.expect("lease");
        assert_eq!((attempts(&cache), cache.fetches()), (2, 1));
        // Past the refresh time (5 s) with IAM refusing: the still-valid one is used meanwhile.
        cache.fetcher.fail.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            lease_all(&cache, 64, &["p"])
                .await
                .iter()
                .all(Result::is_ok)
        );
        assert_eq!((attempts(&cache), cache.fetches()), (3, 1));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(cache.lease("p").await.is_err(), "expired and not renewed");
    }

    fn attempts<F: Fetch>(cache: &Refreshing<F>) -> u64 {
        cache.attempts.load(Ordering::SeqCst)
    }

    /// Hands out fetchers that log the project each fetch was scoped to.
    #[derive(Default)]
    struct ScopedLog(std::sync::Mutex<Vec<String>>);

    struct ProjectFetch {
        log: Arc<ScopedLog>,
        project_id: String,
    }

    impl Scoped for ScopedLog {
        type Fetcher = ProjectFetch;

        fn for_project(self: &Arc<Self>, project_id: &str) -> ProjectFetch {
            ProjectFetch {
                log: self.clone(),
                project_id: project_id.to_owned(),
            }
        }
    }

    #[async_trait]
    impl Fetch for ProjectFetch {
        async fn fetch(&self) -> Result<Fetched, FetchError> {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.log.0.lock().unwrap().push(self.project_id.clone());
            Ok(Fetched {
                credential: Credential::Token(SecretString::from(format!("t-{}", self.project_id))),
                valid_for: Duration::from_secs(3),
            })
        }
    }

    fn token_of(lease: &Lease) -> &str {
        match &lease.credential {
            Credential::Token(token) => token.expose_secret(),
            Credential::AkSk { .. } => panic!("a token"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_project_has_its_own_single_flight_cache() {
        let log = Arc::new(ScopedLog::default());
        let provider = Arc::new(PerProject::new(log.clone(), Duration::from_secs(300)));
        let projects = ["project-a", "project-b"];
        for round in 1..=2 {
            if round == 2 {
                // Past the refresh time (half of 3 s) of both tokens.
                tokio::time::advance(Duration::from_millis(1_600)).await;
            }
            let leases = lease_all(&provider, 64, &projects).await;
            for (i, lease) in leases.iter().enumerate() {
                let expected = format!("t-{}", projects[i % 2]);
                assert_eq!(token_of(lease.as_ref().expect("lease")), expected);
            }
            let mut fetched = log.0.lock().unwrap().clone();
            fetched.sort();
            let once_each: Vec<String> = projects
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.to_string(), round))
                .collect();
            assert_eq!(fetched, once_each, "one fetch per project per expiry");
            assert_eq!(provider.fetches(), 2 * round as u64);
        }
        // A 401 on one project drops that project's token only.
        let a = provider.lease("project-a").await.expect("lease");
        provider.refused("project-a", &a);
        provider.lease("project-b").await.expect("lease");
        assert_eq!(provider.fetches(), 4);
        provider.lease("project-a").await.expect("lease");
        assert_eq!(provider.fetches(), 5);
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn expiry_is_measured_against_the_servers_date_not_a_skewed_local_clock() {
        let date = server_date(&reqwest::header::HeaderMap::from_iter([(
            reqwest::header::DATE,
            "Tue, 03 Jun 2025 10:00:00 GMT".parse().unwrap(),
        )]));
        assert_eq!(date, Some(at("2025-06-03T10:00:00Z")));
        let expires = at("2025-06-03T11:00:00Z");
        // The local clock an hour and a minute fast: without the Date it looks expired.
        let fast = at("2025-06-03T11:01:00Z");
        assert_eq!(valid_for(expires, None, fast), Duration::ZERO);
        assert_eq!(
            valid_for(expires, date, fast),
            Duration::from_millis(3_599_001)
        );
        // Ten minutes slow: without the Date it would be used ten minutes past its expiry.
        let slow = at("2025-06-03T09:50:00Z");
        assert_eq!(valid_for(expires, None, slow), Duration::from_secs(4_200));
        assert_eq!(valid_for(expires, date, slow), Duration::from_secs(3_600));
        // Within the second the Date names, the finer local clock is kept.
        let agreeing = at("2025-06-03T10:00:00.400Z");
        assert_eq!(
            valid_for(expires, date, agreeing),
            Duration::from_millis(3_599_600)
        );
    }

    #[test]
    fn a_credential_expired_on_arrival_names_the_clock() {
        let date = Some(at("2025-06-03T10:00:00Z"));
        let error = remaining("2025-06-03T09:59:00Z", date, "IAM at x").unwrap_err();
        assert!(error.0.contains("already expired"), "{error}");
        assert!(error.0.contains("clocks"), "{error}");
        assert!(error.0.contains("Date header"), "{error}");
        let error = remaining("2020-01-01T00:00:00Z", None, "IAM at x").unwrap_err();
        assert!(error.0.contains("clocks"), "{error}");
    }
}
