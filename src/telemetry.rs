//! Logging: tracing to stderr, as text or JSON, filtered by `log.level` (RUST_LOG wins).
//!
//! Colour only for a person at a terminal: escape codes in a log file or a journal are noise,
//! so they are off when stderr is not a terminal, when `NO_COLOR` is set, or when `TERM=dumb`.
//!
//! lapin's own log lines are off unless `log.level` names `lapin`: every lapin error reaches
//! keyturn as a result, which keyturn logs once, in one line that says what to do; lapin's
//! lines repeat it several times over with debug dumps. `RUST_LOG` is taken as given.
//!
//! `log.format = "json"` writes one flat object per line ([`flat_json`]): a job's span fields
//! (`job_id`, `trace_id`, …) at the top level, once.

mod flat_json;
#[cfg(feature = "otlp")]
mod otlp;

use std::io::IsTerminal;

use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogSettings, TraceSettings};
use crate::trace::{TraceContext, TraceHeaders};

/// The layers under the log line writer: the registry and the level filter.
type Filtered = Layered<EnvFilter, Registry>;

/// What keeps telemetry running until the command ends: with `trace.otlp_endpoint`, dropping it
/// flushes the spans not yet exported.
#[derive(Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    _export: Option<otlp::Export>,
}

/// Installs the global subscriber; a second call is a no-op (tests start several workers).
pub fn init(settings: &LogSettings, trace: &TraceSettings, colour: bool) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(configured_filter(&settings.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(log_lines(settings, colour));
    #[cfg(feature = "otlp")]
    {
        let (layer, export) = match trace.otlp_endpoint.as_str() {
            "" => (None, None),
            endpoint => match otlp::layer(endpoint) {
                Ok((layer, export)) => (Some(layer), Some(export)),
                Err(error) => {
                    eprintln!("keyturn: cannot export spans to {endpoint}: {error:#}");
                    (None, None)
                }
            },
        };
        let _ = subscriber.with(layer).try_init();
        Telemetry { _export: export }
    }
    #[cfg(not(feature = "otlp"))]
    {
        // Settings refuse an endpoint in a build without export.
        let _ = trace;
        let _ = subscriber.try_init();
        Telemetry::default()
    }
}

/// Log lines on stderr: text, or flat JSON.
fn log_lines(settings: &LogSettings, colour: bool) -> Box<dyn Layer<Filtered> + Send + Sync> {
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if settings.format == "json" {
        lines
            .fmt_fields(JsonFields::new())
            .event_format(flat_json::FlatJson)
            .boxed()
    } else {
        lines.with_ansi(colour).boxed()
    }
}

/// A job's trace context, from the headers it came with, for its `span`.
pub fn join_trace(span: &tracing::Span, headers: &TraceHeaders) -> TraceContext {
    #[allow(unused_mut)]
    let mut trace = TraceContext::continue_from(headers);
    #[cfg(feature = "otlp")]
    otlp::join(span, &mut trace);
    #[cfg(not(feature = "otlp"))]
    let _ = span;
    trace
}

/// `log.level`, with lapin silenced unless it names lapin itself.
fn configured_filter(level: &str) -> String {
    if level.contains("lapin") {
        level.to_owned()
    } else {
        format!("{level},lapin=off")
    }
}

/// Whether log lines may carry ANSI colour, given the process environment.
pub fn use_colour(env: &[(String, String)]) -> bool {
    colour_allowed(env, std::io::stderr().is_terminal())
}

fn colour_allowed(env: &[(String, String)], terminal: bool) -> bool {
    let var = |name: &str| {
        env.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let no_color = var("NO_COLOR").is_some_and(|value| !value.is_empty());
    terminal && !no_color && var("TERM") != Some("dumb")
}

#[cfg(test)]
mod tests {
    use super::{colour_allowed, configured_filter};

    #[test]
    fn lapin_is_silent_unless_named() {
        assert_eq!(configured_filter("info"), "info,lapin=off");
        assert_eq!(configured_filter("warn,lapin=debug"), "warn,lapin=debug");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color_or_a_dumb_term() {
        assert!(colour_allowed(&env(&[("TERM", "xterm")]), true));
        assert!(colour_allowed(&env(&[("NO_COLOR", "")]), true));
        assert!(!colour_allowed(&env(&[]), false));
        assert!(!colour_allowed(&env(&[("NO_COLOR", "1")]), true));
        assert!(!colour_allowed(&env(&[("TERM", "dumb")]), true));
    }
}
