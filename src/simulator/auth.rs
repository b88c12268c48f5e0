//! The API gateway's authentication: an accepted `X-Auth-Token`, or an `SDK-HMAC-SHA256`
//! signature recomputed with the project's [`signer`] over exactly what was received.
//!
//! Issued credentials ([`Issued`]: fetched IAM tokens, temporary AK/SK) pass only until their
//! expiry; a temporary AK must come with its own security token in a signed `X-Security-Token`;
//! a fetched IAM token only on the path of the project it was scoped to.

use std::time::Duration;

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};

use super::issuer::Issued;
use crate::gaussdb::signer;

const TOKEN_HEADER: &str = "x-auth-token";
const AUTHORIZATION_HEADER: &str = "authorization";
const DATE_SIGNED_NAME: &str = "x-sdk-date";
const SECURITY_TOKEN_HEADER: &str = "x-security-token";
const IAM_PREFIX: &str = "Incorrect IAM authentication information";

/// The keys the gateway accepts right now; [`super::Simulator::set_credentials`] swaps them whole.
pub(super) struct Keys {
    pub credentials: Vec<(String, SecretString)>,
    pub tokens: Vec<SecretString>,
}

/// A request as it arrived, in the shape the signer reads.
pub(super) struct Received<'a> {
    pub method: &'a str,
    /// The path as sent (still percent-encoded).
    pub raw_path: &'a str,
    pub raw_query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// Why the gateway refused a request; the text becomes the `error_msg`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum AuthError {
    #[error("Incorrect token or token resolution failed")]
    BadToken,
    #[error("{IAM_PREFIX}: the token is not scoped to the project in the path")]
    OtherProject,
    #[error("{IAM_PREFIX}: Authorization not found")]
    Missing,
    #[error("{IAM_PREFIX}: {0}")]
    Malformed(signer::ParseError),
    #[error("{IAM_PREFIX}: access key not found")]
    UnknownKey,
    #[error("{IAM_PREFIX}: the temporary access key has expired")]
    KeyExpired,
    #[error(
        "{IAM_PREFIX}: x-security-token is missing, not signed or not the one issued with the access key"
    )]
    SecurityToken,
    #[error("{IAM_PREFIX}: x-sdk-date must be among the SignedHeaders")]
    DateNotSigned,
    #[error("{IAM_PREFIX}: x-sdk-date is missing or not YYYYMMDDTHHMMSSZ")]
    BadDate,
    #[error(
        "Signature expired: x-sdk-date {date} is more than {skew_secs} s from server time {now}"
    )]
    Expired {
        date: String,
        now: String,
        skew_secs: u64,
    },
    #[error("{IAM_PREFIX}: verify aksk signature fail, CanonicalRequest: {0}")]
    Mismatch(String),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Expired { .. } => "APIGW.0303",
            _ => "APIGW.0301",
        }
    }
}

/// The verdict, with the SignedHeaders (kept for the stats) whether or not it passed.
pub(super) struct Verdict {
    pub signed_headers: Option<Vec<String>>,
    /// The AK of a signed request (not a secret).
    pub access_key: Option<String>,
    pub result: Result<(), AuthError>,
}

/// Checks a token when one is sent, else the signature. `project_id` is the one in the path.
pub(super) fn authenticate(
    keys: &Keys,
    issued: &Issued,
    max_skew: Duration,
    request: &Received<'_>,
    project_id: &str,
    now: DateTime<Utc>,
) -> Verdict {
    if let Some(token) = request.headers.get(TOKEN_HEADER) {
        return Verdict {
            signed_headers: None,
            access_key: None,
            result: check_token(keys, issued, token.as_bytes(), project_id, now),
        };
    }
    let Some(value) = request.headers.get(AUTHORIZATION_HEADER) else {
        return Verdict {
            signed_headers: None,
            access_key: None,
            result: Err(AuthError::Missing),
        };
    };
    let parsed = match signer::parse_authorization(&String::from_utf8_lossy(value.as_bytes())) {
        Ok(parsed) => parsed,
        Err(error) => {
            return Verdict {
                signed_headers: None,
                access_key: None,
                result: Err(AuthError::Malformed(error)),
            };
        }
    };
    let sk = secret_key(keys, issued, request.headers, &parsed, now);
    Verdict {
        signed_headers: Some(parsed.signed_headers.clone()),
        access_key: Some(parsed.access.clone()),
        result: sk.and_then(|sk| check_signature(&sk, max_skew, request, &parsed, now)),
    }
}

/// A configured token passes on any project; a fetched one until its expiry, on its project only.
fn check_token(
    keys: &Keys,
    issued: &Issued,
    offered: &[u8],
    project_id: &str,
    now: DateTime<Utc>,
) -> Result<(), AuthError> {
    if keys.tokens.iter().any(|known| same_secret(known, offered)) {
        return Ok(());
    }
    let fetched = issued
        .tokens
        .iter()
        .find(|token| now < token.expires_at && same_secret(&token.token, offered))
        .ok_or(AuthError::BadToken)?;
    match &fetched.project_id {
        Some(scope) if scope == project_id => Ok(()),
        _ => Err(AuthError::OtherProject),
    }
}

/// The SK of the signing AK: a permanent one, or a temporary one that has not expired and came
/// with its own security token, signed.
fn secret_key(
    keys: &Keys,
    issued: &Issued,
    headers: &HeaderMap,
    authorization: &signer::Authorization,
    now: DateTime<Utc>,
) -> Result<SecretString, AuthError> {
    let access = &authorization.access;
    if let Some((_, sk)) = keys.credentials.iter().find(|(ak, _)| ak == access) {
        return Ok(sk.clone());
    }
    let key = issued
        .temporary
        .iter()
        .find(|key| &key.ak == access)
        .ok_or(AuthError::UnknownKey)?;
    if now >= key.expires_at {
        return Err(AuthError::KeyExpired);
    }
    let signed = authorization
        .signed_headers
        .iter()
        .any(|name| name == SECURITY_TOKEN_HEADER);
    let sent = headers
        .get(SECURITY_TOKEN_HEADER)
        .is_some_and(|token| same_secret(&key.security_token, token.as_bytes()));
    if !(signed && sent) {
        return Err(AuthError::SecurityToken);
    }
    Ok(key.sk.clone())
}

fn check_signature(
    sk: &SecretString,
    max_skew: Duration,
    request: &Received<'_>,
    authorization: &signer::Authorization,
    now: DateTime<Utc>,
) -> Result<(), AuthError> {
    if !authorization
        .signed_headers
        .iter()
        .any(|name| name == DATE_SIGNED_NAME)
    {
        return Err(AuthError::DateNotSigned);
    }
    check_date(request.headers, now, max_skew)?;
    let headers = header_pairs(request.headers);
    let query = decode_query(request.raw_query.unwrap_or_default());
    let path = percent_decode(request.raw_path);
    let signed = signer::Request {
        method: request.method,
        path: &path,
        query: &query,
        headers: &headers,
        body: request.body,
    };
    if signer::verify(&signed, authorization, sk.expose_secret().as_bytes()) {
        return Ok(());
    }
    let canonical = signer::canonical_request(&signed, &authorization.signed_headers);
    Err(AuthError::Mismatch(canonical.replace('\n', "|")))
}

fn check_date(
    headers: &HeaderMap,
    now: DateTime<Utc>,
    max_skew: Duration,
) -> Result<(), AuthError> {
    let raw = headers
        .get(signer::DATE_HEADER)
        .and_then(|value| value.to_str().ok())
        .ok_or(AuthError::BadDate)?;
    let date = signer::parse_date(raw).ok_or(AuthError::BadDate)?;
    let skew = (now - date).abs().to_std().unwrap_or(Duration::MAX);
    if skew > max_skew {
        return Err(AuthError::Expired {
            date: raw.to_owned(),
            now: signer::format_date(now),
            skew_secs: max_skew.as_secs(),
        });
    }
    Ok(())
}

/// Every received header as text; non-UTF-8 bytes can only make the signature fail.
fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value)
        })
        .collect()
}

/// Splits and decodes a query string; `+` is a space, as in the SDKs' and Go's parsers.
fn decode_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |part: &str| percent_decode(&part.replace('+', " "));
            (decode(key), decode(value))
        })
        .collect()
}

/// Undoes `%XX` escapes; malformed escapes stay as they are.
pub(super) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|hex| bytes[i] == b'%' && hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Compares without an early exit, so timing does not reveal how much of a token matched.
pub(super) fn same_secret(known: &SecretString, offered: &[u8]) -> bool {
    let known = known.expose_secret().as_bytes();
    known.len() == offered.len()
        && known
            .iter()
            .zip(offered)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[tokio::test]
    async fn token_auth_accepts_known_tokens_only() {
        let server = Server::start(config()).await;
        let client = reqwest::Client::new();
        let url = server.url(modify_path());
        let good = client
            .post(&url)
            .header("X-Auth-Token", TOKEN)
            .body(on_body())
            .send()
            .await;
        assert_eq!(good.expect("sent").status(), 200);
        let bad = client.get(&url).header("X-Auth-Token", "nope").send().await;
        let (status, code, msg) = error_of(bad.expect("sent")).await;
        assert_eq!((status, code.as_str()), (401, "APIGW.0301"));
        assert_eq!(msg, "Incorrect token or token resolution failed");
        let stats = server.sim.stats();
        assert_eq!(stats.auth_failures, 1);
        assert_eq!(stats.recent[0].signed_headers, None);
        server.stop().await;
    }

    #[tokio::test]
    async fn wrong_sk_answers_0301_with_the_canonical_request() {
        let server = Server::start(config()).await;
        let body = on_body();
        let response = server
            .send(Call {
                sk: "not-the-key",
                ..Call::post(modify_path(), &body)
            })
            .await;
        let (status, code, msg) = error_of(response).await;
        assert_eq!((status, code.as_str()), (401, "APIGW.0301"));
        let canonical_start = format!("CanonicalRequest: POST|{}/||content-type:", modify_path());
        assert!(msg.contains(&canonical_start), "{msg}");
        assert!(
            msg.contains("|content-type;host;x-project-id;x-sdk-date|"),
            "{msg}"
        );
        assert_eq!(
            server.sim.status_of(PROJECT, INSTANCE),
            None,
            "never reached the instance"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn skewed_date_answers_0303() {
        let server = Server::start(config()).await;
        let at = Utc::now() - chrono::Duration::minutes(16);
        let response = server
            .send(Call {
                at,
                ..Call::get(modify_path())
            })
            .await;
        let (status, code, _) = error_of(response).await;
        assert_eq!((status, code.as_str()), (401, "APIGW.0303"));
        let at = Utc::now() + chrono::Duration::minutes(14);
        let response = server
            .send(Call {
                at,
                ..Call::get(modify_path())
            })
            .await;
        assert_eq!(response.status(), 200, "within the allowed skew");
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_ak_missing_or_garbled_authorization_answer_0301() {
        let server = Server::start(config()).await;
        let response = server
            .send(Call {
                ak: "OTHERAK",
                ..Call::get(modify_path())
            })
            .await;
        assert_eq!(error_of(response).await.1, "APIGW.0301");
        let client = reqwest::Client::new();
        let url = server.url(modify_path());
        let unsigned = client.get(&url).send().await.expect("sent");
        assert_eq!(error_of(unsigned).await.1, "APIGW.0301");
        let garbled = client
            .get(&url)
            .header("Authorization", "SDK-HMAC-SHA256 x")
            .send()
            .await;
        assert_eq!(error_of(garbled.expect("sent")).await.1, "APIGW.0301");
        assert_eq!(server.sim.stats().auth_failures, 3);
        server.stop().await;
    }

    #[tokio::test]
    async fn date_must_be_signed() {
        let server = Server::start(config()).await;
        let client = reqwest::Client::new();
        let date = signer::format_date(Utc::now());
        let authorization = format!(
            "{} Access={AK}, SignedHeaders=host, Signature=00",
            signer::ALGORITHM
        );
        let response = client
            .get(server.url(modify_path()))
            .header(signer::DATE_HEADER, date)
            .header("Authorization", authorization)
            .send()
            .await;
        let (_, code, msg) = error_of(response.expect("sent")).await;
        assert_eq!(code, "APIGW.0301");
        assert!(msg.contains("SignedHeaders"), "{msg}");
        server.stop().await;
    }

    #[tokio::test]
    async fn verifies_whatever_headers_were_signed_and_the_query() {
        let server = Server::start(config()).await;
        let minimal = Call {
            minimal: true,
            ..Call::get(modify_path())
        };
        assert_eq!(server.send(minimal).await.status(), 200);
        let query = [("lang", "en us"), ("a", "x+y/z")];
        let with_query = Call {
            query: &query,
            ..Call::get(modify_path())
        };
        assert_eq!(server.send(with_query).await.status(), 200);
        let signed = server.sim.stats().recent[0].signed_headers.clone();
        assert_eq!(signed, Some(vec!["x-sdk-date".to_owned()]));
        server.stop().await;
    }

    #[test]
    fn percent_decoding_and_query_splitting() {
        assert_eq!(percent_decode("/a%20b/%7e%zz%+1%4"), "/a b/~%zz%+1%4");
        let query = decode_query("b=2&a=x+y%2B&flag");
        let expected = [("b", "2"), ("a", "x y+"), ("flag", "")];
        let expected: Vec<_> = expected
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(query, expected);
    }
}
