//! Trace context end to end: a job's W3C `traceparent` / `tracestate` headers become the parent of
//! its span, show in every JSON log line of the job, and come back on its result event (CloudEvents
//! extension attributes and AMQP headers), identically on a replay.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use crate::helpers::{SK, TestApp, job, wait_until};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

fn incoming() -> String {
    format!("00-{TRACE_ID}-{PARENT_ID}-01")
}

/// Publishes `body` as a job with these trace headers.
async fn publish_traced(app: &TestApp, body: &Value, traceparent: &str, tracestate: &str) {
    let mut headers = FieldTable::default();
    for (name, value) in [("traceparent", traceparent), ("tracestate", tracestate)] {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers);
    app.publish(body.to_string().as_bytes(), properties).await;
}

/// A result message as it arrived: its bytes, its JSON and its text headers.
struct Received {
    body: Vec<u8>,
    event: Value,
    headers: HashMap<String, String>,
}

/// Takes `count` result messages off the app's events queue (60 s at most).
async fn received(app: &TestApp, count: usize) -> Vec<Received> {
    let got = std::sync::Mutex::new(Vec::new());
    wait_until(Duration::from_secs(60), || async {
        while let Some(message) = app
            .channel
            .basic_get(
                app.events_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            let delivery = message.delivery;
            let headers = delivery
                .properties
                .headers()
                .as_ref()
                .map(|table| {
                    table
                        .inner()
                        .iter()
                        .filter_map(|(name, value)| match value {
                            AMQPValue::LongString(text) => Some((
                                name.to_string(),
                                String::from_utf8_lossy(text.as_bytes()).into_owned(),
                            )),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            got.lock().unwrap().push(Received {
                event: serde_json::from_slice(&delivery.data).unwrap(),
                body: delivery.data,
                headers,
            });
        }
        got.lock().unwrap().len() >= count
    })
    .await;
    got.into_inner().unwrap()
}

/// `(trace id, parent id, flags)` of a `traceparent`, checked for the W3C version 00 shape.
fn fields_of(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00");
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    };
    assert!(
        hex(parts[1], 32) && hex(parts[2], 16) && hex(parts[3], 2),
        "{traceparent}"
    );
    assert_ne!(parts[2], "0".repeat(16));
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test]
async fn a_jobs_trace_comes_back_on_its_result_event_and_on_its_replay() {
    let app = TestApp::spawn().await;
    let body = job("J-trace-1", 401, "on");
    publish_traced(&app, &body, &incoming(), TRACESTATE).await;
    app.drain().await;
    let first = received(&app, 1).await.remove(0);
    assert_eq!(first.event["data"]["outcome"], "succeeded");
    let traceparent = first.event["traceparent"].as_str().expect("a traceparent");
    let (trace_id, parent_id, flags) = fields_of(traceparent);
    assert_eq!(trace_id, TRACE_ID, "the job joined the sender's trace");
    assert_ne!(
        parent_id, PARENT_ID,
        "the event's parent is the job's span, not the sender's"
    );
    assert_eq!(flags, "01");
    assert_eq!(first.event["tracestate"], TRACESTATE);
    assert_eq!(
        first.headers.get("traceparent").map(String::as_str),
        Some(traceparent)
    );
    assert_eq!(
        first.headers.get("tracestate").map(String::as_str),
        Some(TRACESTATE)
    );

    // The same job again, sent in another trace: the stored result goes out byte for byte,
    // with the headers it had the first time.
    let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    publish_traced(&app, &body, other, "other=1").await;
    app.drain().await;
    let replay = received(&app, 1).await.remove(0);
    assert_eq!(replay.body, first.body, "a replay is the identical event");
    assert_eq!(replay.headers, first.headers);
    assert_eq!(app.toggles().len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_malformed_traceparent_starts_a_new_trace_and_the_job_still_runs() {
    let app = TestApp::spawn().await;
    let upper = format!("00-{}-{PARENT_ID}-01", TRACE_ID.to_uppercase());
    publish_traced(&app, &job("J-trace-2", 402, "on"), &upper, TRACESTATE).await;
    app.publish_job(&job("J-trace-3", 403, "off")).await;
    app.drain().await;
    let events = received(&app, 2).await;
    let mut trace_ids = Vec::new();
    for message in &events {
        assert_eq!(message.event["data"]["outcome"], "succeeded");
        let (trace_id, _, flags) = fields_of(message.event["traceparent"].as_str().unwrap());
        assert_ne!(trace_id, TRACE_ID);
        assert_eq!(flags, "01", "keyturn samples the traces it starts");
        assert!(
            message.event.get("tracestate").is_none(),
            "{}",
            message.event
        );
        assert!(!message.headers.contains_key("tracestate"));
        trace_ids.push(trace_id);
    }
    assert_ne!(trace_ids[0], trace_ids[1], "each job starts its own trace");
    app.cleanup().await;
}

/// The keys of a JSON object in the order written, duplicates included (serde_json's own maps
/// keep only the last of a repeated key).
fn keys_of(line: &str) -> Vec<String> {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some((key, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
                keys.push(key);
            }
            Ok(keys)
        }
    }
    let mut reader = serde_json::Deserializer::from_str(line);
    (&mut reader)
        .deserialize_map(Keys)
        .unwrap_or_else(|error| panic!("{error}: {line}"))
}

#[tokio::test]
async fn json_logs_are_flat_and_every_line_of_a_job_carries_its_trace() {
    let app = TestApp::spawn().await;
    publish_traced(&app, &job("J-log-1", 404, "on"), &incoming(), TRACESTATE).await;
    let output = app
        .worker_process(&[("KEYTURN_LOG__FORMAT", "json")])
        .args(["--exit-when-idle", "1s"])
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(!stderr.contains(SK));
    let event = received(&app, 1).await.remove(0).event;
    let (_, job_span, _) = fields_of(event["traceparent"].as_str().unwrap());

    let mut job_lines = 0;
    for line in stderr.lines() {
        let keys = keys_of(line);
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "a key twice in {line}");
        assert_eq!(
            keys[..4],
            ["timestamp", "level", "target", "message"],
            "{line}"
        );
        let fields: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
        assert!(
            !fields.contains_key("fields") && !fields.contains_key("spans"),
            "{line}"
        );
        if fields.get("job_id") == Some(&Value::from("J-log-1")) {
            job_lines += 1;
            assert_eq!(fields["trace_id"], TRACE_ID, "{line}");
            assert_eq!(fields["span_id"], job_span.as_str(), "{line}");
            assert_eq!(fields["parent_span_id"], PARENT_ID, "{line}");
            assert_eq!(
                fields["instance_id"],
                crate::helpers::instance(404),
                "{line}"
            );
        }
    }
    // At least the API attempt and "job finished".
    assert!(job_lines >= 2, "{stderr}");
    assert!(stderr.contains("\"message\":\"job finished\""), "{stderr}");
    app.cleanup().await;
}

/// With the `otlp` feature, the job span reaches a collector with the job's trace id, its own
/// span id (the one the event names as parent) and the sender's span as its parent.
#[cfg(feature = "otlp")]
#[tokio::test]
async fn the_job_span_is_exported_over_otlp_under_the_incoming_parent() {
    use std::sync::{Arc, Mutex};

    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let kept = bodies.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            kept.lock().unwrap().push(body.to_vec());
            async { axum::http::StatusCode::OK }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let app = TestApp::spawn().await;
    publish_traced(&app, &job("J-otlp-1", 405, "on"), &incoming(), TRACESTATE).await;
    let output = app
        .worker_process(&[("KEYTURN_TRACE__OTLP_ENDPOINT", &endpoint)])
        .args(["--exit-when-idle", "1s"])
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let event = received(&app, 1).await.remove(0).event;
    let (_, job_span, _) = fields_of(event["traceparent"].as_str().unwrap());

    // OTLP protobuf carries ids as raw bytes: the exported job span holds all three.
    let exported = bodies.lock().unwrap().concat();
    let holds = |hex_id: &str| {
        let id = hex::decode(hex_id).unwrap();
        exported
            .windows(id.len())
            .any(|window| window == id.as_slice())
    };
    assert!(!exported.is_empty(), "nothing was exported");
    assert!(holds(TRACE_ID), "the trace id");
    assert!(holds(&job_span), "the job span's id, as the event names it");
    assert!(holds(PARENT_ID), "the sender's span as parent");
    app.cleanup().await;
}
