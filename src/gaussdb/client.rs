//! HTTP client for Modify (`POST .../backups/encryption`) and Describe (`GET` on the same path).
//!
//! Each call is one attempt: signed afresh (a retry gets a new `X-Sdk-Date`), timed, and returned
//! as an [`Exchange`] that says what happened, including the `X-Request-Id` support asks for.
//! Whether to try again is the pipeline's decision, not this module's.
//!
//! Redirects are never followed: a 3xx would carry a signed request (or a token) to a host the
//! operator did not configure, so it ends the attempt as an API error instead. Extra trusted roots
//! come from `api.ca_file`, on top of the built-in ones.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use secrecy::ExposeSecret;
use serde::Deserialize;

use super::credentials::{self, Credential, Provider};
use super::{regions, signer};
use crate::config::{ApiSettings, ConfigError, Credentials};
use crate::job::{Change, Job, Status};

/// Which API operation an attempt used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Modify,
    Describe,
}

impl Call {
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Modify => "modify",
            Call::Describe => "describe",
        }
    }
}

/// Why an attempt produced no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("HTTP {status} {}: {}", code.as_deref().unwrap_or("-"), msg.as_deref().unwrap_or("-"))]
    Api {
        status: u16,
        code: Option<String>,
        msg: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("no answer within the request timeout")]
    Timeout,
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("unusable answer: {0}")]
    Protocol(String),
    /// No credential to send: fetching one failed (the text names the source). Nothing was sent.
    #[error("no credentials: {0}")]
    Credentials(String),
}

impl CallError {
    /// True when the request may have reached the API although no answer came back.
    pub fn may_have_landed(&self) -> bool {
        matches!(
            self,
            CallError::Timeout | CallError::Connect(_) | CallError::Protocol(_)
        )
    }
}

/// Carries the security token of temporary AK/SK.
const SECURITY_TOKEN_HEADER: &str = "X-Security-Token";

/// One attempt and what came of it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub call: Call,
    pub started_at: DateTime<Utc>,
    pub latency: Duration,
    pub http_status: Option<u16>,
    pub request_id: Option<String>,
    pub result: Result<Status, CallError>,
}

/// Why a [`Client`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A setting (`api.ca_file`) that cannot be used; `main` exits 2 on it like on any other.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Http(#[from] reqwest::Error),
}

/// Reads the PEM bundle at `path` and checks that every certificate in it can be a trusted root,
/// so a bad file stops the worker at start rather than at its first call.
pub fn read_ca_bundle(path: &Path) -> Result<Vec<reqwest::Certificate>, ConfigError> {
    let problem = |problem: String| ConfigError {
        key: "api.ca_file".into(),
        problem,
    };
    let shown = path.display();
    let pem =
        std::fs::read(path).map_err(|error| problem(format!("cannot read {shown}: {error}")))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|_| problem(format!("{shown} is not a PEM certificate bundle")))?;
    if certificates.is_empty() {
        return Err(problem(format!("{shown} holds no PEM certificate")));
    }
    let mut trial = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false);
    for certificate in &certificates {
        trial = trial.add_root_certificate(certificate.clone());
    }
    trial.build().map_err(|_| {
        problem(format!(
            "{shown} holds a certificate that cannot be a trusted root"
        ))
    })?;
    Ok(certificates)
}

/// Signed client for one deployment (one credential source, one endpoint rule).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    endpoint: Option<String>,
    provider: Arc<dyn Provider>,
    language: String,
}

#[derive(Deserialize)]
struct Answer {
    encryption_status: Option<String>,
    error_code: Option<String>,
    error_msg: Option<String>,
    request_id: Option<String>,
}

impl Client {
    pub fn new(settings: &ApiSettings, credentials: Credentials) -> Result<Client, ClientError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .user_agent(concat!("keyturn/", env!("CARGO_PKG_VERSION")));
        if !settings.ca_file.as_os_str().is_empty() {
            for certificate in read_ca_bundle(&settings.ca_file)? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder.build()?;
        let endpoint =
            Some(settings.endpoint.trim_end_matches('/').to_owned()).filter(|e| !e.is_empty());
        let provider = credentials::provider(credentials, http.clone(), settings.refresh_before);
        Ok(Client {
            http,
            endpoint,
            provider,
            language: settings.language.clone(),
        })
    }

    /// Credentials fetched successfully so far (metadata or IAM; 0 for static ones), for metrics.
    pub fn credential_fetches(&self) -> u64 {
        self.provider.fetches()
    }

    /// Sets the state `job` asks for.
    pub async fn modify(&self, job: &Job) -> Exchange {
        let body = modify_body(&job.change);
        self.send(Call::Modify, job, body.into_bytes()).await
    }

    /// Reads the instance's current state.
    pub async fn describe(&self, job: &Job) -> Exchange {
        self.send(Call::Describe, job, Vec::new()).await
    }

    async fn send(&self, call: Call, job: &Job, body: Vec<u8>) -> Exchange {
        let started_at = Utc::now();
        let clock = Instant::now();
        let outcome = self.attempt(call, job, body).await;
        let (http_status, request_id, result) = match outcome {
            Ok(answer) => answer,
            Err(error) => (None, None, Err(error)),
        };
        Exchange {
            call,
            started_at,
            latency: clock.elapsed(),
            http_status,
            request_id,
            result,
        }
    }

    async fn attempt(
        &self,
        call: Call,
        job: &Job,
        body: Vec<u8>,
    ) -> Result<(Option<u16>, Option<String>, Result<Status, CallError>), CallError> {
        let url = self.url(job)?;
        let method = match call {
            Call::Modify => reqwest::Method::POST,
            Call::Describe => reqwest::Method::GET,
        };
        let project_id = job.project_id.as_str();
        let lease = self
            .provider
            .lease(project_id)
            .await
            .map_err(|error| CallError::Credentials(error.0))?;
        let headers = self.headers(&method, &url, job, &body, &lease.credential)?;
        let response = self
            .http
            .request(method, url)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status().as_u16();
        if status == 401 {
            self.provider.refused(project_id, &lease);
        }
        let request_id = header_text(response.headers(), "x-request-id");
        let retry_after = header_text(response.headers(), "retry-after")
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = response.bytes().await.map_err(transport_error)?;
        let answer: Option<Answer> = serde_json::from_slice(&bytes).ok();
        let request_id = request_id.or_else(|| answer.as_ref().and_then(|a| a.request_id.clone()));
        let result = interpret(status, answer, retry_after);
        Ok((Some(status), request_id, result))
    }

    fn url(&self, job: &Job) -> Result<reqwest::Url, CallError> {
        let base = match &self.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => regions::endpoint(job.region.as_str()).ok_or_else(|| {
                CallError::Protocol(format!("no endpoint for region {}", job.region))
            })?,
        };
        let path = format!(
            "/v3/{}/instances/{}/backups/encryption",
            job.project_id, job.instance_id
        );
        reqwest::Url::parse(&format!("{base}{path}"))
            .map_err(|error| CallError::Protocol(error.to_string()))
    }

    /// The headers of one attempt, signed when the credential is AK/SK.
    fn headers(
        &self,
        method: &reqwest::Method,
        url: &reqwest::Url,
        job: &Job,
        body: &[u8],
        credential: &Credential,
    ) -> Result<HeaderMap, CallError> {
        let content_type = match *method {
            reqwest::Method::POST => "application/json;charset=UTF-8",
            _ => "application/json",
        };
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        let mut pairs: Vec<(String, String)> = vec![
            ("Content-Type".into(), content_type.into()),
            ("Host".into(), host),
            ("X-Language".into(), self.language.clone()),
            ("X-Project-Id".into(), job.project_id.to_string()),
        ];
        match credential {
            Credential::AkSk {
                ak,
                sk,
                security_token,
            } => {
                // Added before signing, so it is among the SignedHeaders, as the official SDKs do.
                if let Some(token) = security_token {
                    pairs.push((
                        SECURITY_TOKEN_HEADER.into(),
                        token.expose_secret().to_owned(),
                    ));
                }
                pairs.push((signer::DATE_HEADER.into(), signer::format_date(Utc::now())));
                let request = signer::Request {
                    method: method.as_str(),
                    path: url.path(),
                    query: &[],
                    headers: &pairs,
                    body,
                };
                let signed = signer::signable_headers(&pairs);
                let authorization =
                    signer::sign(&request, &signed, ak, sk.expose_secret().as_bytes());
                pairs.push(("Authorization".into(), authorization));
            }
            Credential::Token(token) => {
                pairs.push(("X-Auth-Token".into(), token.expose_secret().to_owned()));
            }
        }
        to_header_map(pairs)
    }
}

fn to_header_map(pairs: Vec<(String, String)>) -> Result<HeaderMap, CallError> {
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| CallError::Protocol(format!("bad header name {name}")))?;
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| CallError::Protocol(format!("bad value for header {name}")))?;
        if ["authorization", "x-auth-token", "x-security-token"].contains(&name.as_str()) {
            value.set_sensitive(true);
        }
        map.insert(name, value);
    }
    Ok(map)
}

/// The JSON body of Modify, built from the validated change.
pub fn modify_body(change: &Change) -> String {
    let body = match change {
        Change::On { key } => serde_json::json!({
            "encryption_status": "on", "type": "kms", "kms_key_id": key.as_str()
        }),
        Change::Off => serde_json::json!({ "encryption_status": "off" }),
    };
    body.to_string()
}

fn interpret(
    status: u16,
    answer: Option<Answer>,
    retry_after: Option<Duration>,
) -> Result<Status, CallError> {
    if status == 200 {
        return answer
            .and_then(|a| a.encryption_status)
            .and_then(|s| Status::parse(&s))
            .ok_or_else(|| CallError::Protocol("200 without a valid encryption_status".into()));
    }
    let (code, msg) = answer
        .map(|a| (a.error_code, a.error_msg))
        .unwrap_or_default();
    Err(CallError::Api {
        status,
        code,
        msg: msg.map(|m| m.chars().take(1024).collect()),
        retry_after,
    })
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(|text| text.chars().take(128).collect())
}

fn transport_error(error: reqwest::Error) -> CallError {
    if error.is_timeout() {
        CallError::Timeout
    } else if error.is_connect() {
        CallError::Connect(error.without_url().to_string())
    } else {
        CallError::Protocol(error.without_url().to_string())
    }
}
