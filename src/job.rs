//! Jobs: the one place where bytes from the queue become a valid [`Job`], or a [`Rejection`] that
//! names the field at fault.
//!
//! Every field is a newtype built by parsing, so code past this module never re-checks a value.
//! The rules are the contract's table (README, "Jobs in"); nothing here knows about AMQP.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::gaussdb::regions;

/// Largest body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

macro_rules! newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(pub(crate) String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

newtype!(
    /// The idempotency key: 1–128 of `A-Za-z0-9._:-`.
    JobId
);
newtype!(
    /// Groups the jobs of one rollout; same alphabet as [`JobId`].
    RolloutId
);
newtype!(
    /// A region id such as `cn-north-4`.
    Region
);
newtype!(
    /// 32 hex characters.
    ProjectId
);
newtype!(
    /// 32 hex characters followed by `in` and two digits.
    InstanceId
);
newtype!(
    /// A KMS key id (UUID, kept in the case it was given).
    KmsKeyId
);
newtype!(
    /// Free text echoed to events and audit: printable, no control characters.
    Label
);

/// What a job asks the API to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    On { key: KmsKeyId },
    Off,
}

/// Encryption state as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    On,
    Off,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::On => "on",
            Status::Off => "off",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        match text.to_ascii_lowercase().as_str() {
            "on" => Some(Status::On),
            "off" => Some(Status::Off),
            _ => None,
        }
    }
}

impl Change {
    pub fn status(&self) -> Status {
        match self {
            Change::On { .. } => Status::On,
            Change::Off => Status::Off,
        }
    }

    pub fn kms_key_id(&self) -> Option<&KmsKeyId> {
        match self {
            Change::On { key } => Some(key),
            Change::Off => None,
        }
    }
}

/// A valid encryption change for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    /// Which run of `id` this is: (`id`, `rerun`) is the idempotency key, so a failed job runs
    /// again only under a higher `rerun`.
    pub rerun: u32,
    pub rollout_id: Option<RolloutId>,
    pub ticket: Option<Label>,
    pub region: Region,
    pub project_id: ProjectId,
    pub instance_id: InstanceId,
    pub change: Change,
    pub requested_by: Option<Label>,
}

/// One thing wrong with a job: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub reason: String,
}

/// Why a job was refused: every field at fault, in the contract's field order (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    problems: Vec<Problem>,
}

impl Rejection {
    /// A rejection listing `problems` (at least one).
    pub(crate) fn of(problems: Vec<Problem>) -> Rejection {
        Rejection { problems }
    }

    /// A rejection with one problem.
    pub fn single(field: &str, reason: impl Into<String>) -> Rejection {
        reject(field, reason)
    }

    /// The first field at fault; it names the rejection's error code.
    pub fn field(&self) -> &str {
        &self.problems[0].field
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, problem) in self.problems.iter().enumerate() {
            let separator = if n == 0 { "" } else { "; " };
            write!(f, "{separator}{}: {}", problem.field, problem.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for Rejection {}

pub(crate) fn reject(field: &str, reason: impl Into<String>) -> Rejection {
    Rejection {
        problems: vec![Problem {
            field: field.to_owned(),
            reason: reason.into(),
        }],
    }
}

/// Collects the problems of every field, so one rejection names them all.
#[derive(Default)]
pub(crate) struct Problems(pub(crate) Vec<Problem>);

impl Problems {
    pub(crate) fn check<T>(&mut self, result: Result<T, Rejection>) -> Option<T> {
        result.map_err(|r| self.0.extend(r.problems)).ok()
    }
}

/// What the worker knows besides the body: the deployment's region rules and the AMQP properties.
#[derive(Debug, Clone, Default)]
pub struct ParseContext<'a> {
    /// Region used when a job names none.
    pub default_region: Option<&'a str>,
    /// With an explicit endpoint any well-formed region id is accepted.
    pub any_region: bool,
    /// AMQP `message_id`, the fallback for `job_id`.
    pub message_id: Option<&'a str>,
    /// AMQP `content_type`, when the publisher set one.
    pub content_type: Option<&'a str>,
}

/// The body's fields before validation; `Value` so a wrong type is reported per field.
/// `deny_unknown_fields` refuses typos, and serde's derive refuses duplicate keys.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawJob {
    job_id: Option<Value>,
    rerun: Option<Value>,
    rollout_id: Option<Value>,
    ticket: Option<Value>,
    region: Option<Value>,
    project_id: Option<Value>,
    instance_id: Option<Value>,
    encryption_status: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<Value>,
    kms_key_id: Option<Value>,
    requested_by: Option<Value>,
}

/// Best-effort identity of a message, kept for the audit record of a rejected job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub job_id: String,
    pub rerun: u32,
    pub rollout_id: Option<String>,
    pub ticket: Option<String>,
    pub region: Option<String>,
    pub project_id: Option<String>,
    pub instance_id: Option<String>,
    pub requested_status: Option<String>,
    pub requested_by: Option<String>,
}

/// Hex SHA-256 of a body: tells a redelivery of the same bytes from a corrected resubmission.
pub fn body_digest(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Parses a delivery body into a [`Job`], or a [`Rejection`] naming every field at fault.
pub fn parse(body: &[u8], ctx: &ParseContext<'_>) -> Result<Job, Rejection> {
    check_envelope(body, ctx)?;
    let raw = decode(body)?;
    let mut problems = Problems::default();
    let id = problems.check(match (&raw.job_id, ctx.message_id) {
        (Some(value), _) => token("job_id", value).map(JobId),
        (None, Some(message_id)) => token("message_id", &Value::from(message_id)).map(JobId),
        (None, None) => Err(reject("job_id", "is required (or set the AMQP message_id)")),
    });
    let rerun = problems.check(optional(&raw.rerun, rerun));
    let rollout_id = problems.check(optional(&raw.rollout_id, |v| {
        token("rollout_id", v).map(RolloutId)
    }));
    let ticket = problems.check(optional(&raw.ticket, |v| label("ticket", v, 256)));
    let region = problems.check(region(raw.region.as_ref(), ctx));
    let project_id = problems.check(
        required("project_id", &raw.project_id)
            .and_then(|v| hex_id("project_id", v))
            .map(ProjectId),
    );
    let instance_id =
        problems.check(required("instance_id", &raw.instance_id).and_then(instance_id));
    let change = problems.check(change(&raw));
    let requested_by = problems.check(optional(&raw.requested_by, |v| {
        label("requested_by", v, 128)
    }));
    match (
        id,
        rerun,
        rollout_id,
        ticket,
        region,
        project_id,
        instance_id,
        change,
        requested_by,
    ) {
        (
            Some(id),
            Some(rerun),
            Some(rollout_id),
            Some(ticket),
            Some(region),
            Some(project_id),
            Some(instance_id),
            Some(change),
            Some(requested_by),
        ) if problems.0.is_empty() => Ok(Job {
            id,
            rerun: rerun.unwrap_or(0),
            rollout_id,
            ticket,
            region,
            project_id,
            instance_id,
            change,
            requested_by,
        }),
        _ => Err(Rejection {
            problems: problems.0,
        }),
    }
}

/// What is wrong with a message's AMQP `reply_to`, if anything: it may not name one of
/// keyturn's own queues (`reserved`: a reply there would inject into jobs or commands), and
/// must start with `prefix` when one is configured.
pub fn reply_to_problem(
    reply_to: Option<&str>,
    reserved: &[&str],
    prefix: &str,
) -> Option<Problem> {
    let reply_to = reply_to.filter(|r| !r.is_empty())?;
    let reason = if reserved.contains(&reply_to) {
        format!("names keyturn's own queue {}", sanitize(reply_to))
    } else if !reply_to.starts_with(prefix) {
        format!("must start with {prefix:?} (amqp.reply_to_prefix)")
    } else {
        return None;
    };
    Some(Problem {
        field: "reply_to".into(),
        reason,
    })
}

impl Job {
    /// A digest of what the job asks for, independent of JSON spelling (key order, spaces,
    /// case of `on`/`kms`): two deliveries of one key with different digests are a conflict.
    pub fn digest(&self) -> String {
        let text = |value: Option<&str>| value.unwrap_or("\u{1}").to_owned();
        let parts = [
            "keyturn-job-v1".to_owned(),
            self.id.to_string(),
            self.rerun.to_string(),
            text(self.rollout_id.as_ref().map(RolloutId::as_str)),
            text(self.ticket.as_ref().map(Label::as_str)),
            self.region.to_string(),
            self.project_id.to_string(),
            self.instance_id.to_string(),
            self.change.status().as_str().to_owned(),
            text(self.change.kms_key_id().map(KmsKeyId::as_str)),
            text(self.requested_by.as_ref().map(Label::as_str)),
        ];
        body_digest(parts.join("\u{0}").as_bytes())
    }
}

/// Highest `rerun` accepted: far beyond any real retry count, small enough for every store.
pub const MAX_RERUN: u64 = 1_000_000;

fn rerun(value: &Value) -> Result<u32, Rejection> {
    value
        .as_u64()
        .filter(|n| *n <= MAX_RERUN)
        .map(|n| n as u32)
        .ok_or_else(|| reject("rerun", format!("must be an integer from 0 to {MAX_RERUN}")))
}

/// What can be salvaged from any body for the audit trail, without trusting it: strings only,
/// control characters dropped, each cut to 256 characters.
pub fn identify(body: &[u8], message_id: Option<&str>) -> Identity {
    let object = std::str::from_utf8(body)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Map<String, Value>>(text).ok())
        .unwrap_or_default();
    let field = |name: &str| object.get(name).and_then(Value::as_str).map(sanitize);
    let job_id = field("job_id")
        .or_else(|| message_id.map(sanitize))
        .unwrap_or_else(|| format!("sha256:{}", &body_digest(body)[..16]));
    Identity {
        job_id,
        rerun: object
            .get("rerun")
            .and_then(Value::as_u64)
            .filter(|n| *n <= MAX_RERUN)
            .map_or(0, |n| n as u32),
        rollout_id: field("rollout_id"),
        ticket: field("ticket"),
        region: field("region"),
        project_id: field("project_id"),
        instance_id: field("instance_id"),
        requested_status: field("encryption_status").map(|s| s.to_ascii_lowercase()),
        requested_by: field("requested_by"),
    }
}

pub(crate) fn sanitize(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(256).collect()
}

fn check_envelope(body: &[u8], ctx: &ParseContext<'_>) -> Result<(), Rejection> {
    if let Some(content_type) = ctx.content_type {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(reject("content_type", "must be application/json"));
        }
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(reject(
            "body",
            format!("is {} bytes; the limit is {MAX_BODY_BYTES}", body.len()),
        ));
    }
    Ok(())
}

fn decode(body: &[u8]) -> Result<RawJob, Rejection> {
    let text = std::str::from_utf8(body).map_err(|_| reject("body", "is not UTF-8"))?;
    if !text.trim_start().starts_with('{') {
        return Err(reject("body", "must be a JSON object"));
    }
    serde_json::from_str(text).map_err(|error| {
        let message = error.to_string();
        match backticked(&message) {
            Some(_) if message.starts_with("unknown field") => unknown_fields(text),
            Some(name) if message.starts_with("duplicate field") => {
                reject(name, "appears more than once")
            }
            _ => reject("body", format!("is not valid JSON: {message}")),
        }
    })
}

/// Every field of the object that is not a job field (serde stops at the first).
fn unknown_fields(text: &str) -> Rejection {
    const KNOWN: &[&str] = &[
        "job_id",
        "rerun",
        "rollout_id",
        "ticket",
        "region",
        "project_id",
        "instance_id",
        "encryption_status",
        "type",
        "kms_key_id",
        "requested_by",
    ];
    let object: serde_json::Map<String, Value> = serde_json::from_str(text).unwrap_or_default();
    let problems: Vec<Problem> = object
        .keys()
        .filter(|key| !KNOWN.contains(&key.as_str()))
        .map(|key| Problem {
            field: sanitize(key),
            reason: "is not a job field".into(),
        })
        .collect();
    if problems.is_empty() {
        return reject("body", "has a field that is not a job field");
    }
    Rejection { problems }
}

fn backticked(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

pub(crate) fn required<'v>(field: &str, value: &'v Option<Value>) -> Result<&'v Value, Rejection> {
    value.as_ref().ok_or_else(|| reject(field, "is required"))
}

pub(crate) fn optional<T>(
    value: &Option<Value>,
    parse: impl FnOnce(&Value) -> Result<T, Rejection>,
) -> Result<Option<T>, Rejection> {
    value.as_ref().map(parse).transpose()
}

pub(crate) fn string<'v>(field: &str, value: &'v Value) -> Result<&'v str, Rejection> {
    value
        .as_str()
        .ok_or_else(|| reject(field, "must be a string"))
}

/// 1–128 of `A-Za-z0-9._:-`: the alphabet of job and rollout ids.
pub fn is_token(text: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    !text.is_empty() && text.len() <= 128 && text.chars().all(allowed)
}

pub(crate) fn token(field: &str, value: &Value) -> Result<String, Rejection> {
    let text = string(field, value)?;
    if !is_token(text) {
        return Err(reject(
            field,
            "must be 1-128 characters of A-Z a-z 0-9 . _ : -",
        ));
    }
    Ok(text.to_owned())
}

pub(crate) fn label(field: &str, value: &Value, max_chars: usize) -> Result<Label, Rejection> {
    let text = string(field, value)?;
    if text.chars().count() > max_chars {
        return Err(reject(
            field,
            format!("is longer than {max_chars} characters"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(reject(field, "must not contain control characters"));
    }
    if text.chars().any(is_format_char) {
        return Err(reject(
            field,
            "must not contain invisible format or bidirectional characters",
        ));
    }
    Ok(Label(text.to_owned()))
}

/// Unicode format characters (general category Cf): bidirectional overrides and isolates,
/// zero-width characters, tags. They make a ticket or a name read differently than it compares
/// ("Trojan Source"), so free text refuses them.
fn is_format_char(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

fn hex_id(field: &str, value: &Value) -> Result<String, Rejection> {
    let text = string(field, value)?;
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(reject(field, "must be 32 hexadecimal characters"));
    }
    Ok(text.to_owned())
}

fn instance_id(value: &Value) -> Result<InstanceId, Rejection> {
    const FIELD: &str = "instance_id";
    let text = string(FIELD, value)?;
    let shape_ok = text.len() == 36
        && text.is_ascii()
        && text[..32].bytes().all(|b| b.is_ascii_hexdigit())
        && &text[32..34] == "in"
        && text[34..].bytes().all(|b| b.is_ascii_digit());
    if !shape_ok {
        return Err(reject(
            FIELD,
            "must be 32 hexadecimal characters followed by 'in' and two digits",
        ));
    }
    Ok(InstanceId(text.to_owned()))
}

/// The shape of a region id (`cn-north-4`): 1–32 of `a-z 0-9 -`. Whether the service is
/// offered there is the region table's question.
pub fn is_region_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 32
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn region(value: Option<&Value>, ctx: &ParseContext<'_>) -> Result<Region, Rejection> {
    let text = match (value, ctx.default_region) {
        (Some(value), _) => string("region", value)?,
        (None, Some(default)) => default,
        (None, None) => {
            return Err(reject(
                "region",
                "is required (no default region is configured)",
            ));
        }
    };
    if !is_region_id(text) {
        return Err(reject("region", "must be a region id such as cn-north-4"));
    }
    if !ctx.any_region && regions::host_prefix(text).is_none() {
        return Err(reject(
            "region",
            "is not a region this service is offered in",
        ));
    }
    Ok(Region(text.to_owned()))
}

fn change(raw: &RawJob) -> Result<Change, Rejection> {
    let status = string(
        "encryption_status",
        required("encryption_status", &raw.encryption_status)?,
    )?;
    match Status::parse(status) {
        Some(Status::On) => {
            let kind = string("type", required("type", &raw.kind)?)?;
            if !kind.eq_ignore_ascii_case("kms") {
                return Err(reject("type", "must be kms"));
            }
            let key = string("kms_key_id", required("kms_key_id", &raw.kms_key_id)?)?;
            uuid::Uuid::try_parse(key)
                .ok()
                .filter(|_| key.len() == 36)
                .ok_or_else(|| reject("kms_key_id", "must be a UUID"))?;
            Ok(Change::On {
                key: KmsKeyId(key.to_owned()),
            })
        }
        Some(Status::Off) => {
            if raw.kind.is_some() {
                return Err(reject(
                    "type",
                    "must be absent when encryption_status is off",
                ));
            }
            if raw.kms_key_id.is_some() {
                return Err(reject(
                    "kms_key_id",
                    "must be absent when encryption_status is off",
                ));
            }
            Ok(Change::Off)
        }
        None => Err(reject("encryption_status", "must be on or off")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: &str = r#"{"job_id":"CHG-1042-0001","rollout_id":"CHG-1042","ticket":"CHG-1042","region":"cn-north-4","project_id":"619d3e78f61b4be68bc5aa0b59edcf7b","instance_id":"7033e7c3cf93438797d44ad7ae0a7d95in07","encryption_status":"on","type":"kms","kms_key_id":"b82fa43f-f6e8-4ec4-9c31-231bc547c526"}"#;

    fn with(field: &str, value: Value) -> Vec<u8> {
        let mut object: serde_json::Map<String, Value> = serde_json::from_str(ON).unwrap();
        if value.is_null() {
            object.remove(field);
        } else {
            object.insert(field.into(), value);
        }
        serde_json::to_vec(&object).unwrap()
    }

    fn field_of(body: &[u8]) -> String {
        parse(body, &ParseContext::default())
            .unwrap_err()
            .field()
            .to_owned()
    }

    #[test]
    fn parses_the_contract_example() {
        let job = parse(ON.as_bytes(), &ParseContext::default()).unwrap();
        assert_eq!(job.id.as_str(), "CHG-1042-0001");
        assert_eq!(job.region.as_str(), "cn-north-4");
        assert_eq!(job.change.status(), Status::On);
        assert_eq!(
            job.change.kms_key_id().unwrap().as_str(),
            "b82fa43f-f6e8-4ec4-9c31-231bc547c526"
        );
    }

    #[test]
    fn status_and_type_are_case_insensitive() {
        let body = with("encryption_status", "ON".into());
        let body: Vec<u8> = String::from_utf8(body)
            .unwrap()
            .replace("\"kms\"", "\"KMS\"")
            .into();
        assert_eq!(
            parse(&body, &ParseContext::default())
                .unwrap()
                .change
                .status(),
            Status::On
        );
    }

    #[test]
    fn off_forbids_type_and_key() {
        let off = with("encryption_status", "Off".into());
        assert_eq!(field_of(&off), "type");
        let mut object: serde_json::Map<String, Value> = serde_json::from_slice(&off).unwrap();
        object.remove("type");
        assert_eq!(
            field_of(&serde_json::to_vec(&object).unwrap()),
            "kms_key_id"
        );
        object.remove("kms_key_id");
        let job = parse(
            &serde_json::to_vec(&object).unwrap(),
            &ParseContext::default(),
        )
        .unwrap();
        assert_eq!(job.change, Change::Off);
    }

    #[test]
    fn every_rule_names_its_field() {
        let cases: Vec<(&str, Value)> = vec![
            ("job_id", "has space".into()),
            ("job_id", "../etc".into()),
            ("job_id", Value::from(7)),
            ("rollout_id", "a/b".into()),
            ("ticket", "x".repeat(257).into()),
            ("ticket", "CHG-1\r\nX-Injected: 1".into()),
            ("requested_by", "x".repeat(129).into()),
            ("ticket", "CHG-1\u{202E}2401".into()),
            ("requested_by", "jdoe\u{200B}".into()),
            ("ticket", "CHG\u{2066}1\u{2069}".into()),
            ("rerun", Value::from(-1)),
            ("rerun", "1".into()),
            ("rerun", Value::from(1.5)),
            ("region", "mars-1".into()),
            ("region", "CN-NORTH-4".into()),
            ("project_id", "619d3e78f61b4be68bc5aa0b59edcf7".into()),
            ("project_id", Value::Null),
            ("instance_id", "7033e7c3cf93438797d44ad7ae0a7d95in7".into()),
            (
                "instance_id",
                "7033e7c3cf93438797d44ad7ae0a7d95%2F07".into(),
            ),
            ("instance_id", "7033e7c3cf93438797d44ad7ae0a7d95іn07".into()),
            ("encryption_status", "enabled".into()),
            ("encryption_status", Value::Null),
            ("type", "aes".into()),
            ("kms_key_id", "not-a-uuid".into()),
            ("kms_key_id", Value::Null),
        ];
        for (field, value) in cases {
            assert_eq!(
                field_of(&with(field, value.clone())),
                field,
                "{field} = {value}"
            );
        }
    }

    #[test]
    fn unknown_and_duplicate_fields_are_refused() {
        let typo = ON.replace("\"ticket\"", "\"tikcet\"");
        assert_eq!(field_of(typo.as_bytes()), "tikcet");
        let dup = ON.replace("\"rollout_id\":\"CHG-1042\"", "\"ticket\":\"A\"");
        assert_eq!(field_of(dup.as_bytes()), "ticket");
    }

    #[test]
    fn envelope_problems_name_body_or_content_type() {
        assert_eq!(field_of(b"\xff\xfe"), "body");
        assert_eq!(field_of(b"[1,2]"), "body");
        assert_eq!(field_of(b"{\"job_id\":"), "body");
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(
            field_of(format!("{{\"ticket\":{deep}}}").as_bytes()),
            "body"
        );
        assert_eq!(field_of(&vec![b' '; MAX_BODY_BYTES + 1]), "body");
        let ctx = ParseContext {
            content_type: Some("text/plain"),
            ..Default::default()
        };
        assert_eq!(
            parse(ON.as_bytes(), &ctx).unwrap_err().field(),
            "content_type"
        );
        let ctx = ParseContext {
            content_type: Some("application/json; charset=utf-8"),
            ..Default::default()
        };
        assert!(parse(ON.as_bytes(), &ctx).is_ok());
    }

    #[test]
    fn job_id_falls_back_to_message_id_and_region_to_default() {
        let body = with("job_id", Value::Null);
        assert_eq!(field_of(&body), "job_id");
        let body = with("region", Value::Null);
        let mut object: serde_json::Map<String, Value> = serde_json::from_slice(&body).unwrap();
        object.remove("job_id");
        let body = serde_json::to_vec(&object).unwrap();
        let ctx = ParseContext {
            message_id: Some("msg-1"),
            default_region: Some("ap-southeast-1"),
            ..Default::default()
        };
        let job = parse(&body, &ctx).unwrap();
        assert_eq!(
            (job.id.as_str(), job.region.as_str()),
            ("msg-1", "ap-southeast-1")
        );
    }

    #[test]
    fn any_region_accepts_well_formed_unknown_regions() {
        let body = with("region", "my-private-1".into());
        let ctx = ParseContext {
            any_region: true,
            ..Default::default()
        };
        assert_eq!(parse(&body, &ctx).unwrap().region.as_str(), "my-private-1");
    }

    #[test]
    fn identify_salvages_strings_without_control_characters() {
        let identity = identify(b"{\"job_id\":\"a\\nb\",\"region\":7}", None);
        assert_eq!(identity.job_id, "ab");
        assert_eq!(identity.region, None);
        assert!(identify(b"\xff", Some("m-1")).job_id == "m-1");
        assert!(identify(b"\xff", None).job_id.starts_with("sha256:"));
    }

    #[test]
    fn a_rejection_names_every_field_at_fault() {
        let body = ON
            .replace("cn-north-4", "mars-1")
            .replace("619d3e78", "zzzz")
            .replace("b82fa43f-", "nope-");
        let rejection = parse(body.as_bytes(), &ParseContext::default()).unwrap_err();
        let fields: Vec<&str> = rejection
            .problems()
            .iter()
            .map(|p| p.field.as_str())
            .collect();
        assert_eq!(fields, ["region", "project_id", "kms_key_id"]);
        let text = rejection.to_string();
        assert!(text.starts_with("region: ") && text.contains("; kms_key_id: must be a UUID"));
        let typos = ON
            .replace("\"ticket\"", "\"tikcet\"")
            .replace("\"region\"", "\"regoin\"");
        let rejection = parse(typos.as_bytes(), &ParseContext::default()).unwrap_err();
        let mut fields: Vec<&str> = rejection
            .problems()
            .iter()
            .map(|p| p.field.as_str())
            .collect();
        fields.sort();
        assert_eq!(fields, ["regoin", "tikcet"]);
    }

    #[test]
    fn rerun_defaults_to_zero_and_changes_the_digest_but_spelling_does_not() {
        let job = parse(ON.as_bytes(), &ParseContext::default()).unwrap();
        assert_eq!(job.rerun, 0);
        let rerun = parse(&with("rerun", Value::from(2)), &ParseContext::default()).unwrap();
        assert_eq!(rerun.rerun, 2);
        assert_ne!(job.digest(), rerun.digest());
        let respelled = parse(
            &with("encryption_status", "ON".into()),
            &ParseContext::default(),
        )
        .unwrap();
        assert_eq!(
            job.digest(),
            respelled.digest(),
            "key order and case are spelling"
        );
        let other_key = parse(
            &with("kms_key_id", "c82fa43f-f6e8-4ec4-9c31-231bc547c526".into()),
            &ParseContext::default(),
        )
        .unwrap();
        assert_ne!(job.digest(), other_key.digest());
    }
}
