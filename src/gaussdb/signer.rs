//! SDK-HMAC-SHA256, the AK/SK request signature of Huawei Cloud's API gateway, as pure functions.
//!
//! The client signs every attempt with [`sign`]; the simulator checks requests with [`verify`]. Both
//! go through [`canonical_request`], so a mismatch between them is impossible by construction, and
//! the vectors published by the official SDK pin the algorithm itself (see the unit tests).
//! Time is passed in as the `X-Sdk-Date` header value: nothing here reads a clock.

use chrono::{DateTime, NaiveDateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The algorithm name that opens the `Authorization` header and the string to sign.
pub const ALGORITHM: &str = "SDK-HMAC-SHA256";
/// The header carrying the signing time, `YYYYMMDDTHHMMSSZ`.
pub const DATE_HEADER: &str = "X-Sdk-Date";
const DATE_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// What the signature covers: one HTTP request as it goes on the wire.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path as sent, not yet percent-encoded (`/v3/{project}/instances/...`).
    pub path: &'a str,
    /// Decoded query parameters, in any order.
    pub query: &'a [(String, String)],
    /// Every header sent, including `X-Sdk-Date`; names in any case.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// The parts of an `Authorization: SDK-HMAC-SHA256 ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

/// Why an `Authorization` header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("authorization does not use {ALGORITHM}")]
    Algorithm,
    #[error("authorization lacks the {0} part")]
    Missing(&'static str),
    #[error("authorization has a malformed part: {0}")]
    Malformed(String),
}

/// Formats a signing time the way `X-Sdk-Date` carries it.
pub fn format_date(at: DateTime<Utc>) -> String {
    at.format(DATE_FORMAT).to_string()
}

/// Reads an `X-Sdk-Date` value; `None` when it is not exactly `YYYYMMDDTHHMMSSZ`.
pub fn parse_date(value: &str) -> Option<DateTime<Utc>> {
    if value.len() != 16 {
        return None;
    }
    NaiveDateTime::parse_from_str(value, DATE_FORMAT)
        .ok()
        .map(|naive| naive.and_utc())
}

/// The headers a client should sign: every header it sends whose name has no `_`,
/// lower-cased and sorted bytewise (the SDKs' choice).
pub fn signable_headers(headers: &[(String, String)]) -> Vec<String> {
    let mut names: Vec<String> = headers
        .iter()
        .map(|(name, _)| name.to_ascii_lowercase())
        .filter(|name| !name.contains('_'))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Signs `request` over `signed_headers` (lower-case, sorted) and returns the `Authorization` value.
pub fn sign(request: &Request<'_>, signed_headers: &[String], ak: &str, sk: &[u8]) -> String {
    let signature = signature(request, signed_headers, sk);
    format!(
        "{ALGORITHM} Access={ak}, SignedHeaders={}, Signature={signature}",
        signed_headers.join(";")
    )
}

/// Recomputes the signature of a received request from the headers its `Authorization` names and
/// compares it in constant time.
pub fn verify(request: &Request<'_>, authorization: &Authorization, sk: &[u8]) -> bool {
    let expected = signature(request, &authorization.signed_headers, sk);
    constant_time_eq(expected.as_bytes(), authorization.signature.as_bytes())
}

/// Parses `SDK-HMAC-SHA256 Access=..., SignedHeaders=a;b, Signature=hex`.
pub fn parse_authorization(value: &str) -> Result<Authorization, ParseError> {
    let rest = value
        .trim()
        .strip_prefix(ALGORITHM)
        .filter(|rest| rest.starts_with(' '))
        .ok_or(ParseError::Algorithm)?;
    let (mut access, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (key, val) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| ParseError::Malformed(truncate(part)))?;
        let slot = match key {
            "Access" => &mut access,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => return Err(ParseError::Malformed(truncate(key))),
        };
        *slot = Some(val.to_owned());
    }
    let signed_headers: Vec<String> = signed
        .ok_or(ParseError::Missing("SignedHeaders"))?
        .split(';')
        .map(str::to_owned)
        .collect();
    if signed_headers.iter().any(String::is_empty) {
        return Err(ParseError::Malformed("SignedHeaders".into()));
    }
    Ok(Authorization {
        access: access.ok_or(ParseError::Missing("Access"))?,
        signed_headers,
        signature: signature.ok_or(ParseError::Missing("Signature"))?,
    })
}

/// The canonical request of steps 4–8 of the algorithm; `|`-joined, it is what the gateway echoes
/// in an `APIGW.0301` error to explain a mismatch.
pub fn canonical_request(request: &Request<'_>, signed_headers: &[String]) -> String {
    let canonical_headers: String = signed_headers
        .iter()
        .map(|name| format!("{name}:{}\n", header_value(request.headers, name).trim()))
        .collect();
    [
        request.method.to_ascii_uppercase(),
        canonical_uri(request.path),
        canonical_query(request.query),
        canonical_headers,
        signed_headers.join(";"),
        hex::encode(Sha256::digest(request.body)),
    ]
    .join("\n")
}

/// The string the HMAC covers: algorithm, signing time and the hashed canonical request.
pub fn string_to_sign(request: &Request<'_>, signed_headers: &[String]) -> String {
    let hashed = hex::encode(Sha256::digest(canonical_request(request, signed_headers)));
    let date = header_value(request.headers, DATE_HEADER);
    format!("{ALGORITHM}\n{date}\n{hashed}")
}

fn signature(request: &Request<'_>, signed_headers: &[String], sk: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(sk).expect("HMAC accepts a key of any length");
    mac.update(string_to_sign(request, signed_headers).as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The value of the first header named `name` (any case); empty when absent, as the SDKs do.
fn header_value<'h>(headers: &'h [(String, String)], name: &str) -> &'h str {
    headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map_or("", |(_, value)| value.as_str())
}

fn canonical_uri(path: &str) -> String {
    let mut uri: String = path
        .split('/')
        .map(percent_encode)
        .collect::<Vec<_>>()
        .join("/");
    if !uri.ends_with('/') {
        uri.push('/');
    }
    uri
}

fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(key, value)| (percent_encode(key), percent_encode(value)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// RFC 3986 encoding: unreserved characters stay, every other byte becomes `%XX`.
pub fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn truncate(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Vectors {
        ak: String,
        sk: String,
        vectors: Vec<Vector>,
    }

    #[derive(Deserialize)]
    struct Vector {
        name: String,
        method: String,
        path: String,
        query: Vec<(String, String)>,
        headers: serde_json::Map<String, serde_json::Value>,
        body: String,
        ak: Option<String>,
        sk: Option<String>,
        canonical_request_sha256: Option<String>,
        authorization: String,
    }

    fn vectors() -> Vectors {
        serde_json::from_str(include_str!("../../tests/data/signing-vectors.json"))
            .expect("signing vectors parse")
    }

    fn headers_of(vector: &Vector) -> Vec<(String, String)> {
        vector
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect()
    }

    #[test]
    fn reproduces_every_official_sdk_vector() {
        let all = vectors();
        assert!(all.vectors.len() >= 10, "vector file lost entries");
        for vector in &all.vectors {
            let headers = headers_of(vector);
            let request = Request {
                method: &vector.method,
                path: &vector.path,
                query: &vector.query,
                headers: &headers,
                body: vector.body.as_bytes(),
            };
            let ak = vector.ak.as_deref().unwrap_or(&all.ak);
            let sk = vector.sk.as_deref().unwrap_or(&all.sk);
            let signed = signable_headers(&headers);
            if let Some(hash) = &vector.canonical_request_sha256 {
                let canonical = canonical_request(&request, &signed);
                assert_eq!(
                    &hex::encode(Sha256::digest(canonical)),
                    hash,
                    "{}",
                    vector.name
                );
            }
            let got = sign(&request, &signed, ak, sk.as_bytes());
            assert_eq!(got, vector.authorization, "vector {}", vector.name);
            let parsed = parse_authorization(&got).expect("own header parses");
            assert!(verify(&request, &parsed, sk.as_bytes()), "{}", vector.name);
        }
    }

    #[test]
    fn verify_fails_on_any_changed_byte() {
        let all = vectors();
        let vector = &all.vectors[0];
        let headers = headers_of(vector);
        let parsed = parse_authorization(&vector.authorization).unwrap();
        let tampered = vector.body.replace("on", "of");
        let request = Request {
            method: &vector.method,
            path: &vector.path,
            query: &vector.query,
            headers: &headers,
            body: tampered.as_bytes(),
        };
        assert!(!verify(&request, &parsed, all.sk.as_bytes()));
        let request = Request {
            body: vector.body.as_bytes(),
            ..request
        };
        assert!(verify(&request, &parsed, all.sk.as_bytes()));
        assert!(!verify(&request, &parsed, b"OtherKey"));
    }

    #[test]
    fn canonical_uri_encodes_segments_and_appends_slash() {
        assert_eq!(
            canonical_uri("/v1/resources/ab:c@d+e"),
            "/v1/resources/ab%3Ac%40d%2Be/"
        );
        assert_eq!(canonical_uri("/a b/"), "/a%20b/");
    }

    #[test]
    fn parse_authorization_rejects_garbage() {
        assert_eq!(parse_authorization("Basic abc"), Err(ParseError::Algorithm));
        assert_eq!(
            parse_authorization("SDK-HMAC-SHA256 Access=a, Signature=b"),
            Err(ParseError::Missing("SignedHeaders"))
        );
        assert!(
            parse_authorization("SDK-HMAC-SHA256 Access=a, SignedHeaders=;, Signature=b").is_err()
        );
        assert!(parse_authorization("SDK-HMAC-SHA256X Access=a").is_err());
    }

    #[test]
    fn dates_round_trip_and_reject_other_shapes() {
        let date = parse_date("20261128T101500Z").unwrap();
        assert_eq!(format_date(date), "20261128T101500Z");
        assert!(parse_date("2026-11-28T10:15:00Z").is_none());
        assert!(parse_date("20261128T101500").is_none());
    }
}
