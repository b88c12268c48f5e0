//! What `store.url` asks of the connection to PostgreSQL: the URL for the `postgres` crate, and
//! TLS when the URL's `sslmode` asks for it.
//!
//! The TLS parameters are libpq's, read here because the `postgres` crate knows neither
//! `verify-full` nor `sslrootcert`:
//! - no `sslmode`, or `sslmode=disable`: plain TCP, as before;
//! - `sslmode=verify-full` or `sslmode=require`: TLS or no connection, with the server's
//!   certificate checked against the trusted roots and the URL's host name. keyturn checks the
//!   certificate under `require` too (libpq does not): a connection that an attacker on the path
//!   could read is not what `require` is asked for;
//! - `sslrootcert=/path/ca.pem`: the PEM certificates to trust instead of the system's roots;
//! - `sslrootcert=system`: the system's roots, as in libpq;
//! - refused: `prefer`, `allow` and `verify-ca` (the first two may fall back to plain text, and
//!   keyturn always checks the host name), TLS to a socket path (no host name to check),
//!   `channel_binding=require` (not offered) and `sslnegotiation=direct`.
//!
//! Problems are told without the URL, which may hold a password.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use postgres::Socket;
use postgres::config::{Host, SslMode};
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls;

/// A `store.url` read: the crate's configuration, and TLS when asked for.
pub(super) struct Target {
    pub config: postgres::Config,
    pub tls: Option<Tls>,
}

/// The store's connection over TLS, as `store.url` asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tls {
    /// `sslrootcert`: the certificates to trust; `None`: the system's roots.
    root_file: Option<PathBuf>,
}

/// Reads `url` without reading the files it names (for words about it).
pub(super) fn parse(url: &str) -> Result<Target, String> {
    let (base, query) = split_query(url);
    let mut passed = Vec::new();
    let mut mode = None;
    let mut root_file = None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match (
            percent_decoded(key)?.as_str(),
            percent_decoded(value)?.as_str(),
        ) {
            ("sslmode", mode_given) => mode = Some(mode_given.to_owned()),
            // libpq's word for the system's roots.
            ("sslrootcert", "system") => root_file = None,
            ("sslrootcert", path) => root_file = Some(PathBuf::from(path)),
            ("channel_binding", "require") => {
                return Err("has channel_binding=require, which keyturn does not offer: leave it out (SCRAM authenticates without it)".into());
            }
            ("sslnegotiation", "direct") => {
                return Err("has sslnegotiation=direct: keyturn asks the server for TLS the PostgreSQL way (leave it out)".into());
            }
            _ => passed.push(pair),
        }
    }
    let tls = match mode.as_deref() {
        None | Some("disable") if root_file.is_some() => {
            return Err(
                "has sslrootcert without sslmode=verify-full or require: the certificate would not be used"
                    .into(),
            );
        }
        None | Some("disable") => None,
        Some("require" | "verify-full") => Some(Tls { root_file }),
        Some(other) => {
            return Err(format!(
                "has sslmode={other}: keyturn connects in plain text (sslmode=disable, the default) or over TLS with the certificate checked (sslmode=verify-full)"
            ));
        }
    };
    let rest = if passed.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", passed.join("&"))
    };
    let mut config: postgres::Config = rest
        .parse()
        .map_err(|_| super::postgres::NOT_A_POSTGRES_URL.to_owned())?;
    match tls {
        Some(_) => {
            let hosts = config.get_hosts();
            if hosts.is_empty() || hosts.iter().any(|host| !matches!(host, Host::Tcp(_))) {
                return Err("asks for TLS without a host name to check the certificate against (a socket path, or no host)".into());
            }
            config.ssl_mode(SslMode::Require);
        }
        // Any other TLS setting reached the crate: refuse it rather than connect without TLS.
        None if config.get_ssl_mode() != SslMode::Prefer => {
            return Err("has a TLS setting keyturn does not read: use sslmode=verify-full".into());
        }
        None => {}
    }
    Ok(Target { config, tls })
}

/// The URL before its query, and the query. The query starts at the first `?` after the user
/// and password, which end at the first `@` (as the `postgres` crate reads them): a password may
/// hold a `?`.
fn split_query(url: &str) -> (&str, &str) {
    let credentials_end = url.find('@').map_or(0, |at| at + 1);
    match url[credentials_end..].find('?') {
        Some(at) => (
            &url[..credentials_end + at],
            &url[credentials_end + at + 1..],
        ),
        None => (url, ""),
    }
}

/// Reads `url` and the certificates it names: what a worker checks at start.
pub(super) fn check(url: &str) -> Result<(), String> {
    if let Some(tls) = parse(url)?.tls {
        tls.connector()?;
    }
    Ok(())
}

impl Tls {
    /// A connector trusting `sslrootcert`'s certificates, or the system's roots. The file is
    /// read at each connection, so a replaced file is taken up at the next reconnect.
    pub fn connector(&self) -> Result<RustlsConnect, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.root_file {
            Some(path) => {
                for certificate in read_certificates(path)? {
                    roots.add(certificate).map_err(|_| {
                        format!(
                            "has sslrootcert {}, which holds a certificate that cannot be a trusted root",
                            path.display()
                        )
                    })?;
                }
            }
            None => {
                let (added, _) =
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if added == 0 {
                    return Err(
                        "asks for TLS, and this system has no trusted root certificates: name the server's CA with sslrootcert"
                            .into(),
                    );
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("cannot set up TLS: {error}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(RustlsConnect(Arc::new(config)))
    }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let pem = std::fs::read(path)
        .map_err(|error| format!("has sslrootcert {shown}, which cannot be read: {error}"))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("has sslrootcert {shown}, which is not a PEM certificate bundle"))?;
    if certificates.is_empty() {
        return Err(format!(
            "has sslrootcert {shown}, which holds no PEM certificate"
        ));
    }
    Ok(certificates)
}

/// `%XX` escapes decoded (a path in a URL may hold them).
fn percent_decoded(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = value
                .get(index + 1..index + 3)
                .filter(|hex| hex.bytes().all(|digit| digit.is_ascii_hexdigit()))
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or("has a broken %-escape in its parameters")?;
            out.push(hex);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "has a parameter that is not UTF-8".into())
}

/// Makes TLS connections for the `postgres` crate with rustls (ring), as the broker's and the
/// API's clients do.
#[derive(Clone)]
pub(super) struct RustlsConnect(Arc<rustls::ClientConfig>);

impl MakeTlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnector;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<RustlsConnector> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not a TLS server name"))?;
        Ok(RustlsConnector {
            config: self.0.clone(),
            name,
        })
    }
}

pub(super) struct RustlsConnector {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnector {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, socket)
                .await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// A TLS connection to the server.
pub(super) struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

impl TlsStream for RustlsStream {
    // No channel binding: SCRAM-SHA-256 authenticates without it (libpq would use it when the
    // server offers it; `channel_binding=require` is refused when the URL is read).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(context, buffer)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(context, bytes)
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_parameters_are_read_out_of_the_url() {
        let plain = parse("postgres://u:pw@db:5432/kt").unwrap();
        assert!(plain.tls.is_none());
        assert_eq!(plain.config.get_ssl_mode(), SslMode::Prefer);

        let verified = parse(
            "postgres://u:pw@db:5432/kt?connect_timeout=3&sslmode=verify-full&sslrootcert=/etc/a%20b.pem",
        )
        .unwrap();
        assert_eq!(
            verified.tls,
            Some(Tls {
                root_file: Some(PathBuf::from("/etc/a b.pem"))
            })
        );
        assert_eq!(verified.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(verified.config.get_dbname(), Some("kt"));
        assert_eq!(
            verified.config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        let required = parse("postgres://u@db/kt?sslmode=require").unwrap();
        assert_eq!(required.tls, Some(Tls { root_file: None }));
        assert!(
            parse("postgres://u@db/kt?sslmode=disable")
                .unwrap()
                .tls
                .is_none()
        );
        let system = parse("postgres://u@db/kt?sslmode=verify-full&sslrootcert=system").unwrap();
        assert_eq!(system.tls, Some(Tls { root_file: None }), "libpq's word");

        // A password may hold `?` and `&`: the query starts after it, and keys are decoded.
        let odd = parse("postgres://u:p?w&d@db/kt?ssl%6Dode=verify-full").unwrap();
        assert_eq!(odd.config.get_password(), Some(&b"p?w&d"[..]));
        assert_eq!(odd.tls, Some(Tls { root_file: None }));
        assert_eq!(odd.config.get_dbname(), Some("kt"));
    }

    #[test]
    fn weaker_tls_modes_and_bad_urls_are_refused_without_showing_the_url() {
        for (url, words) in [
            (
                "postgres://u:secret-pw@db/kt?sslmode=prefer",
                "sslmode=prefer",
            ),
            (
                "postgres://u:secret-pw@db/kt?sslmode=verify-ca",
                "sslmode=verify-ca",
            ),
            (
                "postgres://u:secret-pw@db/kt?sslmode=allow",
                "sslmode=allow",
            ),
            (
                "postgres://u:secret-pw@db/kt?sslrootcert=/ca.pem",
                "sslrootcert without sslmode=verify-full",
            ),
            (
                "postgres://u:secret-pw@db/kt?sslmode=verify-full&sslrootcert=%4",
                "%-escape",
            ),
            (
                "postgres://u:secret-pw@db/kt?nonsense=1",
                "is not a PostgreSQL URL",
            ),
            (
                "postgres://u:secret-pw@db/kt?sslmode=verify-full&sslrootcert=%+1",
                "%-escape",
            ),
            (
                "postgres://u:secret-pw@db/kt?sslmode=verify-full&channel_binding=require",
                "channel_binding=require",
            ),
            (
                "postgres://u:secret-pw@db/kt?sslmode=verify-full&sslnegotiation=direct",
                "sslnegotiation=direct",
            ),
            (
                "postgres://u:secret-pw@%2Frun%2Fpostgresql/kt?sslmode=verify-full",
                "without a host name",
            ),
            (
                "postgres://u:s?cret-pw@db/kt?sslmode=verify-ca",
                "sslmode=verify-ca",
            ),
        ] {
            let problem = parse(url).err().unwrap_or_else(|| panic!("{url} parsed"));
            assert!(problem.contains(words), "{url}: {problem}");
            assert!(!problem.contains("cret-pw"), "{problem}");
        }
    }

    #[test]
    fn a_root_file_must_be_a_readable_pem_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let missing = dir.path().join("missing.pem");
        for (path, words) in [
            (&empty, "holds no PEM certificate"),
            (&missing, "cannot be read"),
        ] {
            let url = format!(
                "postgres://u@db/kt?sslmode=verify-full&sslrootcert={}",
                path.display()
            );
            let problem = check(&url).unwrap_err();
            assert!(problem.contains(words), "{problem}");
            assert!(problem.contains(&path.display().to_string()), "{problem}");
        }
    }
}
