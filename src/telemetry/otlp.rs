//! OTLP export of spans (cargo feature `otlp`, setting `trace.otlp_endpoint`): the job span goes
//! to an OpenTelemetry collector over OTLP/HTTP (protobuf), as a child of the job's incoming
//! `traceparent`, with the same ids keyturn logs and puts on the result event.
//!
//! Spans are sent in batches from the SDK's own thread; [`Export`] flushes what is left when the
//! command ends.

use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

use crate::trace::TraceContext;

/// The running export; dropping it flushes and stops it.
pub struct Export {
    provider: SdkTracerProvider,
}

impl Drop for Export {
    fn drop(&mut self) {
        // Shutdown waits for the last batch; off the async runtime, whose threads must not block
        // on the blocking HTTP client.
        let provider = self.provider.clone();
        let _ = std::thread::spawn(move || provider.shutdown()).join();
    }
}

/// The layer exporting spans to the collector at `endpoint` (its base URL).
pub fn layer<S>(endpoint: &str) -> anyhow::Result<(impl Layer<S> + use<S>, Export)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let exporter = SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("keyturn").build())
        .build();
    let tracer = provider.tracer("keyturn");
    let layer = tracing_opentelemetry::layer().with_tracer(tracer);
    Ok((layer, Export { provider }))
}

/// Makes the job's incoming parent the parent of `span`, and takes the ids the exported span
/// has, so that logs, the result event and the collector agree. Without an export layer the
/// span has no OpenTelemetry context and `trace` is kept as it is.
pub fn join(span: &tracing::Span, trace: &mut TraceContext) {
    if let Some(parent) = trace.parent_id {
        let state = trace
            .tracestate
            .as_deref()
            .and_then(|state| state.parse::<TraceState>().ok())
            .unwrap_or_default();
        let remote = SpanContext::new(
            TraceId::from_bytes(trace.trace_id.to_be_bytes()),
            SpanId::from_bytes(parent.to_be_bytes()),
            TraceFlags::new(trace.flags),
            true,
            state,
        );
        span.set_parent(Context::new().with_remote_span_context(remote));
    }
    let context = span.context();
    let exported = context.span().span_context().clone();
    if exported.is_valid() {
        trace.trace_id = u128::from_be_bytes(exported.trace_id().to_bytes());
        trace.span_id = u64::from_be_bytes(exported.span_id().to_bytes());
    }
}
