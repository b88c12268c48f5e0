//! `amqp.ca_file`: the worker reaches the broker over `amqps://` through a TLS-terminating proxy
//! whose certificate a throwaway CA signed. With the CA bundle configured, jobs flow; without
//! it the TLS handshake fails.

use std::sync::Arc;
use std::time::Duration;

use keyturn::amqp::worker::RunOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// A CA and a server certificate for 127.0.0.1 it signed: (CA PEM, server cert DER, key DER).
fn test_pki() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "keyturn test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    (
        ca_cert.pem(),
        server_cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
    )
}

/// Accepts TLS on a local port and relays each connection to `upstream` in plain TCP.
async fn tls_proxy(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    upstream: String,
    stop: CancellationToken,
) -> u16 {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (socket, _) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => accepted.unwrap(),
            };
            let acceptor = acceptor.clone();
            let upstream = upstream.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let mut broker = TcpStream::connect(upstream).await.unwrap();
                tokio::select! {
                    () = stop.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut tls, &mut broker) => {}
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn an_amqps_broker_is_trusted_through_amqp_ca_file() {
    let app = TestApp::spawn().await;
    let (ca_pem, cert, key) = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let broker: lapin::uri::AMQPUri = app.settings.amqp.url.parse().unwrap();
    let stop = CancellationToken::new();
    let port = tls_proxy(
        cert,
        key,
        format!("{}:{}", broker.authority.host, broker.authority.port),
        stop.clone(),
    )
    .await;
    let mut settings = app.settings.clone();
    settings.amqp.url = format!(
        "amqps://{}:{}@127.0.0.1:{port}/{}",
        broker.authority.userinfo.username,
        broker.authority.userinfo.password,
        broker.vhost.replace('/', "%2f")
    );

    // Without the CA the proxy's certificate is not trusted.
    let refused = keyturn::amqp::connect(&settings.amqp, "kt-test-untrusted")
        .await
        .expect_err("an untrusted certificate");
    assert!(
        refused.to_string().to_lowercase().contains("certificate"),
        "{refused}"
    );

    settings.amqp.ca_file = ca_file;
    app.publish_job(&job("J-tls", 331, "on")).await;
    let (shutdown, worker) =
        app.start_worker_on(settings, app.credentials(), RunOptions::default());
    let events = app.events(1).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data.job_id, "J-tls");
    stop.cancel();
    app.cleanup().await;
}
