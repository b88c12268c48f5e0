//! The Modify request body and the service's rules for it (API page and SDK model
//! `BackupEncryptRequest`): every rejection names the parameter at fault, as `DBS.200001` does.

use serde_json::{Map, Value};

/// The state a valid Modify body asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Desired {
    pub on: bool,
    /// Present exactly when `on`.
    pub kms_key_id: Option<String>,
}

/// Why a body was refused; the text becomes the `error_msg`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum BodyError {
    #[error("The request body is not valid JSON.")]
    NotJson,
    #[error("The request body must be a JSON object.")]
    NotObject,
    #[error("Parameter {0} is required.")]
    Missing(&'static str),
    #[error("Parameter {field} is invalid: {reason}.")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
    #[error("Parameter {0} must not be specified when encryption_status is off.")]
    NotAllowed(&'static str),
}

/// Reads a Modify body. Unknown fields are ignored and `null` counts as absent, like the service's
/// JSON binding does.
pub(super) fn parse_modify(body: &[u8]) -> Result<Desired, BodyError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| BodyError::NotJson)?;
    let fields = value.as_object().ok_or(BodyError::NotObject)?;
    let on = match text(fields, "encryption_status")? {
        None => return Err(BodyError::Missing("encryption_status")),
        Some(status) if status.eq_ignore_ascii_case("on") => true,
        Some(status) if status.eq_ignore_ascii_case("off") => false,
        Some(_) => return Err(invalid("encryption_status", "must be on or off")),
    };
    if on {
        turning_on(fields)
    } else {
        turning_off(fields)
    }
}

fn turning_on(fields: &Map<String, Value>) -> Result<Desired, BodyError> {
    match text(fields, "type")? {
        None => return Err(BodyError::Missing("type")),
        Some(kind) if kind.eq_ignore_ascii_case("kms") => {}
        Some(_) => return Err(invalid("type", "only kms is supported")),
    }
    let key = text(fields, "kms_key_id")?.ok_or(BodyError::Missing("kms_key_id"))?;
    // KMS key ids are hyphenated UUIDs; `Uuid::try_parse` alone would also take other forms.
    if key.len() != 36 || uuid::Uuid::try_parse(key).is_err() {
        return Err(invalid("kms_key_id", "must be a KMS key id (UUID)"));
    }
    Ok(Desired {
        on: true,
        kms_key_id: Some(key.to_owned()),
    })
}

fn turning_off(fields: &Map<String, Value>) -> Result<Desired, BodyError> {
    for field in ["type", "kms_key_id"] {
        if fields.get(field).is_some_and(|value| !value.is_null()) {
            return Err(BodyError::NotAllowed(field));
        }
    }
    Ok(Desired {
        on: false,
        kms_key_id: None,
    })
}

/// A string field; `Ok(None)` when absent or null, an error when it is another JSON type.
fn text<'v>(
    fields: &'v Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'v str>, BodyError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(invalid(field, "must be a string")),
    }
}

fn invalid(field: &'static str, reason: &'static str) -> BodyError {
    BodyError::Invalid { field, reason }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    fn parse(body: &str) -> Result<Desired, BodyError> {
        parse_modify(body.as_bytes())
    }

    #[test]
    fn accepts_on_and_off_in_any_case_and_ignores_extra_fields() {
        let on =
            format!(r#"{{"encryption_status":"On","type":"KMS","kms_key_id":"{KEY_ID}","x":1}}"#);
        let expected = Desired {
            on: true,
            kms_key_id: Some(KEY_ID.into()),
        };
        assert_eq!(parse(&on), Ok(expected));
        let off = Desired {
            on: false,
            kms_key_id: None,
        };
        assert_eq!(
            parse(r#"{"encryption_status":"oFF","note":"x"}"#),
            Ok(off.clone())
        );
        assert_eq!(parse(r#"{"encryption_status":"off","type":null}"#), Ok(off));
    }

    /// Each rule, with the parameter its message must name.
    const REJECTED: &[(&str, &str)] = &[
        ("", "JSON"),
        ("not json", "JSON"),
        (r#"["on"]"#, "object"),
        (r#"{"type":"kms"}"#, "encryption_status"),
        (r#"{"encryption_status":"maybe"}"#, "encryption_status"),
        (r#"{"encryption_status":true}"#, "encryption_status"),
        (
            r#"{"encryption_status":"on","kms_key_id":"3a0f2a9c-5c7e-4e4e-9a59-1f1a2b3c4d5e"}"#,
            "type",
        ),
        (
            r#"{"encryption_status":"on","type":"aes","kms_key_id":"3a0f2a9c-5c7e-4e4e-9a59-1f1a2b3c4d5e"}"#,
            "type",
        ),
        (r#"{"encryption_status":"on","type":"kms"}"#, "kms_key_id"),
        (
            r#"{"encryption_status":"on","type":"kms","kms_key_id":"not-a-uuid"}"#,
            "kms_key_id",
        ),
        (
            r#"{"encryption_status":"on","type":"kms","kms_key_id":"3a0f2a9c5c7e4e4e9a591f1a2b3c4d5e"}"#,
            "kms_key_id",
        ),
        (r#"{"encryption_status":"off","type":"kms"}"#, "type"),
        (
            r#"{"encryption_status":"off","kms_key_id":"3a0f2a9c-5c7e-4e4e-9a59-1f1a2b3c4d5e"}"#,
            "kms_key_id",
        ),
    ];

    #[test]
    fn every_rule_rejects_and_names_the_parameter() {
        for (body, named) in REJECTED {
            let error = parse(body).expect_err(body);
            assert!(error.to_string().contains(named), "{body}: {error}");
        }
    }

    #[tokio::test]
    async fn bad_bodies_answer_400_dbs_200001_and_change_nothing() {
        let server = Server::start(config()).await;
        for (body, named) in REJECTED {
            let response = server.send(Call::post(modify_path(), body)).await;
            let (status, code, msg) = error_of(response).await;
            assert_eq!((status, code.as_str()), (400, "DBS.200001"), "{body}");
            assert!(msg.contains(named), "{body}: {msg}");
        }
        let stats = server.sim.stats();
        assert_eq!(stats.bad_requests, REJECTED.len() as u64);
        assert_eq!(stats.instances[INSTANCE].toggles_applied, 0);
        assert_eq!(
            server.sim.status_of(PROJECT, INSTANCE).as_deref(),
            Some("off")
        );
        server.stop().await;
    }
}
