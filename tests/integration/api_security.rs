//! The API client's transport rules, over real sockets: redirects are not followed, an extra CA
//! bundle is trusted (and only then), bad `api.*` settings stop the real binary with exit 2, and a
//! simulator outage looks to clients like a real one (refused connections, then service again).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, Uri, header};
use axum::response::IntoResponse;
use keyturn::config::{ApiSettings, Credentials, Settings};
use keyturn::gaussdb::{CallError, Client};
use keyturn::job::{Job, ParseContext, Status};
use keyturn::simulator::{Simulator, SimulatorConfig};
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

fn credentials() -> Credentials {
    Credentials::AkSk {
        ak: AK.into(),
        sk: SK.to_owned().into(),
    }
}

fn api_settings(endpoint: &str) -> ApiSettings {
    ApiSettings {
        endpoint: endpoint.to_owned(),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        ..Settings::default().api
    }
}

fn a_job(n: u32) -> Job {
    let body = job(&format!("J-sec-{n}"), n, "on").to_string();
    let context = ParseContext {
        default_region: None,
        any_region: true,
        message_id: None,
        content_type: None,
    };
    keyturn::job::parse(body.as_bytes(), &context).expect("a valid job")
}

/// Serves `router` on a fresh loopback port; the server lives as long as the test's runtime.
async fn serve_plain(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

#[tokio::test]
async fn the_api_client_does_not_follow_a_redirect() {
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = reached.clone();
    let target = serve_plain(Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { axum::Json(serde_json::json!({"encryption_status": "on"})) }
    }))
    .await;
    let redirector = serve_plain(Router::new().fallback(move |uri: Uri| async move {
        let location = format!("http://{target}{}", uri.path());
        (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, location)],
        )
            .into_response()
    }))
    .await;

    let client = Client::new(
        &api_settings(&format!("http://{redirector}")),
        credentials(),
    )
    .expect("client");
    let exchange = client.modify(&a_job(1)).await;

    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
    assert!(
        matches!(exchange.result, Err(CallError::Api { status: 307, .. })),
        "{:?}",
        exchange.result
    );
    assert_eq!(exchange.http_status, Some(307));
}

/// A CA, and a certificate for 127.0.0.1 that it signed: (CA PEM, server config).
fn test_pki() -> (String, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![server_cert.der().clone()], key)
        .unwrap();
    (ca_cert.pem(), config)
}

/// A TCP listener whose connections are TLS, for `axum::serve`; failed handshakes are skipped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[tokio::test]
async fn a_configured_ca_file_is_trusted_and_nothing_else_is() {
    let (ca_pem, server_config) = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();

    let simulator = Simulator::new(SimulatorConfig {
        credentials: vec![(AK.into(), SK.to_owned().into())],
        ..SimulatorConfig::default()
    });
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server_config)),
    };
    let stop = CancellationToken::new();
    let router = keyturn::simulator::router(simulator.clone(), stop.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    let endpoint = format!("https://{addr}");
    let untrusting = Client::new(&api_settings(&endpoint), credentials()).expect("client");
    let refused = untrusting.modify(&a_job(2)).await;
    assert!(
        matches!(refused.result, Err(CallError::Connect(_))),
        "{:?}",
        refused.result
    );
    assert_eq!(simulator.stats().requests, 0);

    let settings = ApiSettings {
        ca_file: ca_file.clone(),
        ..api_settings(&endpoint)
    };
    let trusting = Client::new(&settings, credentials()).expect("client");
    let served = trusting.modify(&a_job(2)).await;
    assert_eq!(served.http_status, Some(200));
    assert_eq!(served.result, Ok(Status::On));
    assert_eq!(
        simulator.status_of(PROJECT, &instance(2)).as_deref(),
        Some("on")
    );
    stop.cancel();
}

/// Runs `keyturn worker` with `vars` and returns (exit code, stderr).
async fn worker_start(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = keyturn_binary();
    command
        .arg("worker")
        .env("CLOUD_SDK_AK", AK)
        .env("CLOUD_SDK_SK", SK);
    for (name, value) in vars {
        command.env(name, value);
    }
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::from(command).output(),
    )
    .await
    .expect("the worker exited within 30 s")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

#[tokio::test]
async fn bad_api_settings_stop_the_worker_with_exit_2_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "no certificate here\n").unwrap();
    let token_file = dir.path().join("token.toml");
    std::fs::write(&token_file, "[api]\ntoken = \"file-token-never-show\"\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let (garbage, missing) = (garbage.display().to_string(), missing.display().to_string());
    let token_file = token_file.display().to_string();

    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("KEYTURN_API__CA_FILE", &missing)], "api.ca_file"),
        (&[("KEYTURN_API__CA_FILE", &garbage)], "api.ca_file"),
        (&[("KEYTURN_CONFIG", &token_file)], "api.token"),
        (
            &[("KEYTURN_API__ENDPOINT", "http://192.0.2.10:8600")],
            "api.endpoint",
        ),
    ];
    for (vars, key) in cases {
        let (code, stderr) = worker_start(vars).await;
        assert_eq!(code, Some(2), "{vars:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{vars:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("keyturn: config key {key}: ")),
            "{vars:?}: {stderr}"
        );
        assert!(!stderr.contains("file-token-never-show"), "{stderr}");
    }
}

#[tokio::test]
async fn the_simulator_goes_down_and_comes_back_on_the_same_address_with_its_state() {
    let app = TestApp::spawn().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let health = format!("{}/_simulator/health", app.simulator_url);
    // One pooled keep-alive connection exists before the outage; it must not survive it.
    let before = client.get(&health).send().await.unwrap();
    assert_eq!(before.status(), 200);
    app.simulator.script(&instance(3), Vec::new());
    let api = Client::new(&app.settings.api, app.credentials()).unwrap();
    assert_eq!(api.modify(&a_job(3)).await.result, Ok(Status::On));

    app.simulator_down().await;
    let during = client.get(&health).send().await;
    assert!(
        during.as_ref().is_err_and(reqwest::Error::is_connect),
        "{during:?}"
    );
    let call = api.describe(&a_job(3)).await;
    assert!(
        matches!(call.result, Err(CallError::Connect(_))),
        "{:?}",
        call.result
    );

    app.simulator_up().await;
    let after = client.get(&health).send().await.unwrap();
    assert_eq!(after.status(), 200);
    assert_eq!(api.describe(&a_job(3)).await.result, Ok(Status::On));
    let stats = app.stats();
    assert_eq!(stats.instances[&instance(3)].modify_calls, 1);
    app.cleanup().await;
}
