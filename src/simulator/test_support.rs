//! Test helpers: a simulator on an ephemeral loopback port and a client that signs like the SDKs.

use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{Simulator, SimulatorConfig, Step, serve};
use crate::gaussdb::signer;

pub const AK: &str = "SIMTESTAK0123456789";
pub const SK: &str = "SimTestSecretKey0123456789abcdefghijklmn";
pub const TOKEN: &str = "MIIsimulated-token-value";
pub const PROJECT: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
pub const INSTANCE: &str = "7033e7c3cf93438797d44ad7ae0a7d95in07";
pub const KEY_ID: &str = "3a0f2a9c-5c7e-4e4e-9a59-1f1a2b3c4d5e";

pub fn config() -> SimulatorConfig {
    SimulatorConfig {
        credentials: vec![(AK.into(), SecretString::from(SK))],
        tokens: vec![SecretString::from(TOKEN)],
        seed: 7,
        ..SimulatorConfig::default()
    }
}

/// The Modify/Describe path of the default instance, `'static` so a [`Call`] can outlive a statement.
pub fn modify_path() -> &'static str {
    static PATH: LazyLock<String> = LazyLock::new(|| path_for(PROJECT, INSTANCE));
    &PATH
}

pub fn path_for(project: &str, instance: &str) -> String {
    format!("/v3/{project}/instances/{instance}/backups/encryption")
}

pub fn on_body() -> String {
    format!(r#"{{"encryption_status":"on","type":"kms","kms_key_id":"{KEY_ID}"}}"#)
}

pub fn busy_step() -> Step {
    Step::Error {
        status: 409,
        code: "DBS.200019".into(),
        msg: None,
        retry_after_secs: None,
        apply: false,
    }
}

/// One signed API call; `Call::post`/`Call::get` fill in valid defaults to override.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a [(&'a str, &'a str)],
    pub body: &'a str,
    pub ak: &'a str,
    pub sk: &'a str,
    pub at: DateTime<Utc>,
    /// Sign only `x-sdk-date` instead of every header sent.
    pub minimal: bool,
    /// Sent (and signed unless `minimal`) as `X-Security-Token`.
    pub security_token: Option<&'a str>,
}

impl<'a> Call<'a> {
    pub fn post(path: &'a str, body: &'a str) -> Self {
        Self {
            method: "POST",
            path,
            query: &[],
            body,
            ak: AK,
            sk: SK,
            at: Utc::now(),
            minimal: false,
            security_token: None,
        }
    }

    pub fn get(path: &'a str) -> Self {
        Self {
            method: "GET",
            body: "",
            ..Self::post(path, "")
        }
    }
}

pub struct Server {
    pub sim: Arc<Simulator>,
    base: String,
    host: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    pub async fn start(config: SimulatorConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let host = listener.local_addr().expect("local addr").to_string();
        let sim = Simulator::new(config);
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve(listener, sim.clone(), shutdown));
        Self {
            sim,
            base: format!("http://{host}"),
            host,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = (&mut self.task).await.expect("serve task joins");
        served.expect("serve ends cleanly");
    }

    /// Waits (up to 10 s, for a loaded machine) until the simulator has recorded `count` API
    /// requests: a client that timed out may have given up before its request was decided.
    pub async fn wait_for_requests(&self, count: u64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.sim.stats().requests < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "request {count} never arrived"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn send(&self, call: Call<'_>) -> reqwest::Response {
        self.request(&reqwest::Client::new(), call)
            .send()
            .await
            .expect("request sent")
    }

    /// Builds the signed request the way the SDKs do: sign what is sent, send what was signed.
    pub fn request(&self, client: &reqwest::Client, call: Call<'_>) -> reqwest::RequestBuilder {
        let headers = self.headers(&call);
        let query: Vec<(String, String)> = call
            .query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let request = signer::Request {
            method: call.method,
            path: call.path,
            query: &query,
            headers: &headers,
            body: call.body.as_bytes(),
        };
        let signed = if call.minimal {
            vec!["x-sdk-date".to_owned()]
        } else {
            signer::signable_headers(&headers)
        };
        let authorization = signer::sign(&request, &signed, call.ak, call.sk.as_bytes());
        let method = reqwest::Method::from_bytes(call.method.as_bytes()).expect("method");
        let mut builder = client
            .request(method, self.url_with_query(call.path, &query))
            .header("Authorization", authorization)
            .body(call.body.to_owned());
        // reqwest sets Host itself, to the same value that was signed.
        for (name, value) in headers.iter().filter(|(name, _)| name != "Host") {
            builder = builder.header(name, value);
        }
        builder
    }

    /// Encodes the query like the SDKs (`%20`, not `+`), which reqwest's `query` would not.
    fn url_with_query(&self, path: &str, query: &[(String, String)]) -> String {
        let pairs: Vec<String> = query
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    signer::percent_encode(k),
                    signer::percent_encode(v)
                )
            })
            .collect();
        match pairs.is_empty() {
            true => self.url(path),
            false => format!("{}?{}", self.url(path), pairs.join("&")),
        }
    }

    fn headers(&self, call: &Call<'_>) -> Vec<(String, String)> {
        let mut headers = vec![
            ("Host".to_owned(), self.host.clone()),
            (signer::DATE_HEADER.to_owned(), signer::format_date(call.at)),
            ("X-Project-Id".to_owned(), PROJECT.to_owned()),
        ];
        if !call.body.is_empty() {
            headers.push((
                "Content-Type".to_owned(),
                "application/json;charset=UTF-8".to_owned(),
            ));
        }
        if let Some(token) = call.security_token {
            headers.push(("X-Security-Token".to_owned(), token.to_owned()));
        }
        headers
    }
}

pub async fn json_of(response: reqwest::Response) -> serde_json::Value {
    response.json().await.expect("json body")
}

/// (status, error_code, error_msg) of an error answer.
pub async fn error_of(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body = json_of(response).await;
    let text = |key: &str| body[key].as_str().unwrap_or_default().to_owned();
    (status, text("error_code"), text("error_msg"))
}

pub fn request_id_of(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}
