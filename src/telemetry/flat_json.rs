//! `log.format = "json"`: one flat JSON object per line, the shape Loki and Elasticsearch index
//! without a pipeline to unnest it.
//!
//! tracing-subscriber's own JSON nests an event's fields under `fields` and repeats every span's
//! fields under `span` and `spans`, so a job's `job_id` sits at three paths, none at the top.
//! Here a line is `timestamp`, `level`, `target`, `message`, then the fields of every span in
//! scope (outermost first, an inner span's value winning a clash) and the event's own fields
//! (winning over the spans'), each key once. Span fields are the ones the fmt layer already keeps
//! as JSON ([`JsonFields`]), so nothing is recorded twice; no field appears here that the text
//! format would not show.

use std::fmt;

use chrono::{SecondsFormat, Utc};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

#[cfg(doc)]
use tracing_subscriber::fmt::format::JsonFields;

/// Keys every line starts with; a field of the same name is left out rather than repeated.
const LEADING: [&str; 4] = ["timestamp", "level", "target", "message"];

/// The flat JSON event format; pair it with [`JsonFields`] for span fields.
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = span_fields(ctx);
        let mut own = Fields::default();
        event.record(&mut own);
        let message = own.0.remove("message").unwrap_or_default();
        // A line from a crate that logs through `log` arrives with target `log` and its real
        // target, module and file as `log.*` fields: show it as the text format does.
        let log_target = own.0.remove("log.target");
        own.0.retain(|key, _| !key.starts_with("log."));
        fields.extend(own.0);
        let meta = event.metadata();
        let target = log_target.unwrap_or_else(|| Value::from(meta.target()));
        let leading = [
            Value::from(Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)),
            Value::from(meta.level().as_str()),
            target,
            message,
        ];
        let mut line = String::with_capacity(256);
        for (key, value) in LEADING.iter().copied().zip(leading.iter()) {
            push(&mut line, key, value);
        }
        for (key, value) in &fields {
            if !LEADING.contains(&key.as_str()) {
                push(&mut line, key, value);
            }
        }
        line.push('}');
        writeln!(writer, "{line}")
    }
}

/// The fields of every span in the event's scope, outermost first so inner spans win.
fn span_fields<S, N>(ctx: &FmtContext<'_, S, N>) -> Map<String, Value>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let mut fields = Map::new();
    let Some(scope) = ctx.event_scope() else {
        return fields;
    };
    for span in scope.from_root() {
        let extensions = span.extensions();
        let Some(stored) = extensions.get::<FormattedFields<N>>() else {
            continue;
        };
        // A span without fields stores an empty string, not `{}`.
        if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(stored) {
            fields.extend(map);
        }
    }
    fields
}

/// Appends `"key":value` to the object being written (opening it on the first call).
fn push(line: &mut String, key: &str, value: &Value) {
    line.push(if line.is_empty() { '{' } else { ',' });
    line.push_str(&Value::from(key).to_string());
    line.push(':');
    line.push_str(&value.to_string());
}

/// An event's fields as JSON values: numbers and booleans stay typed, the rest is text.
#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::fmt::format::JsonFields;

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn lines_of(log: impl FnOnce()) -> Vec<String> {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn span_and_event_fields_sit_at_the_top_level_once() {
        let lines = lines_of(|| {
            let job = tracing::warn_span!(
                "process",
                job_id = "j-1",
                rerun = 0u32,
                rollout_id = tracing::field::Empty,
                trace_id = "abc"
            );
            let _job = job.enter();
            job.record("rollout_id", "R-outer");
            let call = tracing::info_span!("call", rollout_id = "R-inner", target = "spoofed");
            let _call = call.enter();
            tracing::info!(event_id = "e-1", ok = true, "job finished");
            tracing::warn!(rollout_id = "R-event", error = %"boom", "job failed: {}", 42);
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        let first: Map<String, Value> = serde_json::from_str(&lines[0]).unwrap();
        assert!(lines[0].starts_with("{\"timestamp\":"), "{}", lines[0]);
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["message"], "job finished");
        assert_eq!(
            first["target"],
            module_path!(),
            "a field never replaces a leading key"
        );
        assert_eq!(first["job_id"], "j-1");
        assert_eq!(first["rerun"], 0);
        assert_eq!(first["trace_id"], "abc");
        assert_eq!(first["rollout_id"], "R-inner", "the inner span wins");
        assert_eq!(first["event_id"], "e-1");
        assert_eq!(first["ok"], true);
        assert!(!first.contains_key("fields") && !first.contains_key("spans"));
        assert_eq!(
            lines[0].matches("\"rollout_id\":").count(),
            1,
            "{}",
            lines[0]
        );
        let second: Map<String, Value> = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["message"], "job failed: 42");
        assert_eq!(
            second["rollout_id"], "R-event",
            "the event's own field wins"
        );
        assert_eq!(second["error"], "boom");
    }

    #[test]
    fn a_line_outside_any_span_has_only_its_own_fields() {
        let lines = lines_of(|| tracing::info!(queue = "q", prefetch = 16, "consuming"));
        let line: Map<String, Value> = serde_json::from_str(&lines[0]).unwrap();
        let keys: Vec<&str> = line.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "level",
                "message",
                "prefetch",
                "queue",
                "target",
                "timestamp"
            ]
        );
    }
}
