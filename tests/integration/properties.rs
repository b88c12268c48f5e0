//! Property tests: no byte sequence crashes job decoding or the signature parser, and every valid
//! job survives a round trip through its JSON form.

use keyturn::gaussdb::signer;
use keyturn::job::{self, Change, ParseContext};
use proptest::prelude::*;
use serde_json::json;

fn hex(len: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(b"0123456789abcdef".to_vec()), len)
        .prop_map(|bytes| String::from_utf8(bytes).unwrap())
}

prop_compose! {
    fn valid_job()(
        job_id in "[A-Za-z0-9._:-]{1,128}",
        rollout_id in proptest::option::of("[A-Za-z0-9._:-]{1,128}"),
        ticket in proptest::option::of("[^\\p{Cc}\\p{Cf}]{0,256}"),
        region in proptest::sample::select(keyturn::gaussdb::regions::all().collect::<Vec<_>>()),
        project_id in hex(32),
        instance in hex(32),
        digits in 0u8..100,
        on in any::<bool>(),
        upper in any::<bool>(),
        key in any::<u128>(),
        requested_by in proptest::option::of("[^\\p{Cc}\\p{Cf}]{0,128}"),
    ) -> serde_json::Value {
        let status = match (on, upper) { (true, true) => "ON", (true, false) => "on", (false, true) => "Off", (false, false) => "off" };
        let mut body = json!({
            "job_id": job_id, "region": region, "project_id": project_id,
            "instance_id": format!("{instance}in{digits:02}"), "encryption_status": status,
        });
        if on {
            body["type"] = json!(if upper { "KMS" } else { "kms" });
            body["kms_key_id"] = json!(uuid::Uuid::from_u128(key).to_string());
        }
        if let Some(r) = rollout_id { body["rollout_id"] = json!(r); }
        if let Some(t) = ticket { body["ticket"] = json!(t); }
        if let Some(r) = requested_by { body["requested_by"] = json!(r); }
        body
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_and_rejections_name_a_field(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Err(rejection) = job::parse(&bytes, &ParseContext::default()) {
            for problem in rejection.problems() {
                prop_assert!(!problem.field.is_empty());
                prop_assert!(!problem.field.chars().any(char::is_control));
            }
        }
        let _ = job::identify(&bytes, None);
    }

    #[test]
    fn json_shaped_noise_never_panics(value in any::<Option<bool>>().prop_flat_map(|_| proptest::collection::hash_map("[a-z_]{1,20}", any::<i64>().prop_map(|n| json!(n)), 0..12))) {
        let body = serde_json::to_vec(&value).unwrap();
        let _ = job::parse(&body, &ParseContext::default());
    }

    #[test]
    fn every_valid_job_round_trips(body in valid_job()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        let parsed = job::parse(&bytes, &ParseContext::default()).map_err(|r| TestCaseError::fail(r.to_string()))?;
        prop_assert_eq!(parsed.id.as_str(), body["job_id"].as_str().unwrap());
        prop_assert_eq!(parsed.instance_id.as_str(), body["instance_id"].as_str().unwrap());
        prop_assert_eq!(parsed.ticket.as_ref().map(|t| t.as_str()), body["ticket"].as_str());
        match &parsed.change {
            Change::On { key } => prop_assert_eq!(key.as_str(), body["kms_key_id"].as_str().unwrap()),
            Change::Off => prop_assert!(body.get("kms_key_id").is_none()),
        }
        // The Modify body the client would send parses back to the same change.
        let sent: serde_json::Value = serde_json::from_str(&keyturn::gaussdb::client::modify_body(&parsed.change)).unwrap();
        let asked = body["encryption_status"].as_str().unwrap().to_ascii_lowercase();
        prop_assert_eq!(sent["encryption_status"].as_str().unwrap(), asked.as_str());
        prop_assert_eq!(sent.get("kms_key_id").and_then(|k| k.as_str()), body.get("kms_key_id").and_then(|k| k.as_str()));
    }

    #[test]
    fn authorization_parsing_never_panics(text in ".{0,300}") {
        let _ = signer::parse_authorization(&text);
        let _ = signer::parse_date(&text);
    }

    #[test]
    fn authorization_like_headers_never_panic(access in ".{0,40}", signed in "[a-z;_-]{0,60}", signature in ".{0,80}") {
        let header = format!("SDK-HMAC-SHA256 Access={access}, SignedHeaders={signed}, Signature={signature}");
        if let Ok(parsed) = signer::parse_authorization(&header) {
            prop_assert!(parsed.signed_headers.iter().all(|h| !h.is_empty()));
        }
    }
}
