//! Result events: one CloudEvents 1.0 document (structured JSON mode) per finished job.
//!
//! The event is built once, stored in the audit row as JSON, and published from that stored form,
//! so a replay for a duplicate delivery sends byte-for-byte the same event with the same id.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// AMQP content type of every result event.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    Rejected,
    /// Its rollout was cancelled before it ran.
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Rejected => "rejected",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// The `data` of a result event: everything a monitor needs about one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub job_id: String,
    /// Which run of `job_id` (0 unless the job said otherwise).
    #[serde(default)]
    pub rerun: u32,
    pub rollout_id: Option<String>,
    pub ticket: Option<String>,
    pub region: Option<String>,
    pub project_id: Option<String>,
    pub instance_id: Option<String>,
    pub requested_status: Option<String>,
    pub resulting_status: Option<String>,
    pub outcome: Outcome,
    pub attempts: u32,
    pub http_status: Option<u16>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    pub request_id: Option<String>,
    pub duration_ms: u64,
}

/// A CloudEvents 1.0 envelope around a [`JobResult`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Optional in CloudEvents: absent, never `null`, when the job names no instance (strict
    /// readers such as the official SDKs refuse a `null` attribute). `data` keeps its nulls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub time: String,
    pub datacontenttype: String,
    /// CloudEvents distributed-tracing extension: the trace and the job's span, so work on the
    /// event joins the job's trace. Absent in events stored before keyturn carried traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The `tracestate` the job arrived with, when it had a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    pub data: JobResult,
}

impl ResultEvent {
    /// Wraps `data` with a fresh time-ordered id (UUIDv7).
    pub fn new(worker_id: &str, data: JobResult, at: DateTime<Utc>) -> ResultEvent {
        ResultEvent {
            specversion: "1.0".into(),
            id: uuid::Uuid::now_v7().to_string(),
            source: format!("/keyturn/worker/{worker_id}"),
            kind: format!("dev.keyturn.job.{}", data.outcome.as_str()),
            subject: data.instance_id.clone(),
            time: at.to_rfc3339_opts(SecondsFormat::Millis, true),
            datacontenttype: "application/json".into(),
            traceparent: None,
            tracestate: None,
            data,
        }
    }

    /// The event as sent on behalf of the job in `trace`.
    pub fn in_trace(self, trace: &crate::trace::TraceContext) -> ResultEvent {
        ResultEvent {
            traceparent: Some(trace.traceparent()),
            tracestate: trace.tracestate.clone(),
            ..self
        }
    }

    /// `job.<outcome>.<region>`; `unknown` stands in for a missing or unusable region.
    pub fn routing_key(&self) -> String {
        let region = self
            .data
            .region
            .as_deref()
            .filter(|region| crate::job::is_region_id(region))
            .unwrap_or("unknown");
        format!("job.{}.{region}", self.data.outcome.as_str())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events serialize")
    }
}

/// A rollout event (contract §6): type `dev.keyturn.rollout.<kind>`, subject the rollout id,
/// data the rollout's snapshot. Returns the event id and the JSON to store and publish.
pub fn rollout_event(
    worker_id: &str,
    kind: &str,
    snapshot: &crate::rollout::Snapshot,
    at: DateTime<Utc>,
) -> (String, String) {
    let id = uuid::Uuid::now_v7().to_string();
    let event = serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("/keyturn/worker/{worker_id}"),
        "type": rollout_event_type(kind),
        "subject": snapshot.rollout_id,
        "time": at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "datacontenttype": "application/json",
        "data": snapshot,
    });
    (id, event.to_string())
}

/// `dev.keyturn.rollout.<kind>`.
pub fn rollout_event_type(kind: &str) -> String {
    format!("dev.keyturn.rollout.{kind}")
}

/// One event as it goes out: its bytes are exactly what is stored, so replays are identical.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// CloudEvents `id` = AMQP `message_id`.
    pub id: &'a str,
    /// CloudEvents `type` = AMQP `type`.
    pub kind: &'a str,
    /// Routing key on `amqp.results_exchange`.
    pub routing_key: &'a str,
    /// The stored JSON bytes.
    pub body: &'a [u8],
    pub correlation_id: &'a str,
    pub reply_to: Option<&'a str>,
    /// The event's own `traceparent` / `tracestate`, also sent as AMQP headers.
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

/// Where result events go (the AMQP publisher in production).
#[async_trait::async_trait]
pub trait EventSink: Send + Sync {
    /// Returns once the broker confirmed the event (and its reply_to copy).
    async fn publish(&self, event: &Outgoing<'_>) -> anyhow::Result<()>;

    /// Succeeds when events could be published now (the connection is up and the results
    /// exchange exists); the health gate asks this while publishing fails.
    async fn probe(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: Outcome, region: Option<&str>) -> JobResult {
        JobResult {
            job_id: "J-1".into(),
            rerun: 0,
            rollout_id: None,
            ticket: None,
            region: region.map(str::to_owned),
            project_id: None,
            instance_id: Some("7033e7c3cf93438797d44ad7ae0a7d95in07".into()),
            requested_status: Some("on".into()),
            resulting_status: Some("on".into()),
            outcome,
            attempts: 1,
            http_status: Some(200),
            error_code: None,
            error_msg: None,
            request_id: Some("r-1".into()),
            duration_ms: 12,
        }
    }

    #[test]
    fn envelope_has_the_cloudevents_shape() {
        let at = DateTime::parse_from_rfc3339("2026-11-28T10:15:00.123Z")
            .unwrap()
            .to_utc();
        let event = ResultEvent::new("w-1", result(Outcome::Succeeded, Some("cn-north-4")), at);
        let json: serde_json::Value = serde_json::from_str(&event.to_json()).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "dev.keyturn.job.succeeded");
        assert_eq!(json["source"], "/keyturn/worker/w-1");
        assert_eq!(json["time"], "2026-11-28T10:15:00.123Z");
        assert_eq!(json["subject"], "7033e7c3cf93438797d44ad7ae0a7d95in07");
        assert_eq!(json["data"]["outcome"], "succeeded");
        assert_eq!(json["data"]["error_code"], serde_json::Value::Null);
        assert_eq!(
            uuid::Uuid::parse_str(json["id"].as_str().unwrap())
                .unwrap()
                .get_version_num(),
            7
        );
        assert_eq!(event.routing_key(), "job.succeeded.cn-north-4");
    }

    /// Parses `json` with the official SDK and checks that the SDK writes it back identically.
    /// The Rust SDK's reader skips a `null` attribute, but its writer never emits one, so the
    /// round trip catches what stricter readers (the Python SDK) refuse.
    fn parse_with_the_sdk(json: &str) -> cloudevents::Event {
        let event: cloudevents::Event =
            serde_json::from_str(json).unwrap_or_else(|error| panic!("{error}: {json}"));
        let ours: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            ours,
            "SDK round trip of {json}"
        );
        event
    }

    #[test]
    fn events_parse_with_the_cloudevents_sdk() {
        use cloudevents::AttributesReader;
        let at = Utc::now();
        let succeeded = ResultEvent::new("w-1", result(Outcome::Succeeded, Some("cn-north-4")), at);
        let parsed = parse_with_the_sdk(&succeeded.to_json());
        assert_eq!(parsed.id(), succeeded.id);
        assert_eq!(parsed.ty(), "dev.keyturn.job.succeeded");
        assert_eq!(parsed.subject(), succeeded.subject.as_deref());

        let mut no_instance = result(Outcome::Rejected, None);
        no_instance.instance_id = None;
        let rejected = ResultEvent::new("w-1", no_instance, at);
        let json = rejected.to_json();
        assert!(
            json.contains("\"instance_id\":null"),
            "data keeps its nulls: {json}"
        );
        let parsed = parse_with_the_sdk(&json);
        assert_eq!(parsed.subject(), None);
        assert_eq!(parsed.ty(), "dev.keyturn.job.rejected");
        // What the audit stores reads back unchanged.
        let back: ResultEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rejected);
    }

    #[test]
    fn trace_context_is_a_top_level_extension_the_sdk_accepts() {
        use crate::trace::{TraceContext, TraceHeaders};
        let headers = TraceHeaders {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: Some("congo=t61rcWkgMzE".into()),
        };
        let trace = TraceContext::continue_with(&headers, 1, 0x1234);
        let event = ResultEvent::new(
            "w-1",
            result(Outcome::Succeeded, Some("cn-north-4")),
            Utc::now(),
        )
        .in_trace(&trace);
        let json = event.to_json();
        let parsed = parse_with_the_sdk(&json);
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000001234-01";
        assert_eq!(
            parsed
                .extension("traceparent")
                .map(ToString::to_string)
                .as_deref(),
            Some(traceparent)
        );
        assert_eq!(
            parsed
                .extension("tracestate")
                .map(ToString::to_string)
                .as_deref(),
            Some("congo=t61rcWkgMzE")
        );
        let back: ResultEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, event);
        // Without a tracestate the attribute is left out, not null.
        let plain = ResultEvent::new("w-1", result(Outcome::Failed, None), Utc::now())
            .in_trace(&TraceContext::continue_with(&TraceHeaders::default(), 3, 4));
        let json = plain.to_json();
        assert!(!json.contains("tracestate"), "{json}");
        parse_with_the_sdk(&json);
    }

    #[test]
    fn unusable_regions_route_as_unknown() {
        let at = Utc::now();
        for region in [None, Some("a.b"), Some("#"), Some("")] {
            let event = ResultEvent::new("w", result(Outcome::Rejected, region), at);
            assert_eq!(event.routing_key(), "job.rejected.unknown");
        }
    }
}
