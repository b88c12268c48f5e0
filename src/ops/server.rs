//! The ops endpoint on `ops.listen`: `/metrics`, `/livez` and `/readyz` (contract §7).
//!
//! `/livez` answers while the process can answer at all. `/readyz` answers 200 only while the
//! broker session is up, the store takes a write and no circuit is open; otherwise 503 with the
//! reasons as JSON, so an orchestrator stops routing work to (or restarts) a worker that holds
//! jobs it cannot serve.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Pipeline;

/// How long `/readyz` and `/metrics` wait for the store before calling it unavailable.
const STORE_WAIT: Duration = Duration::from_secs(2);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the ops endpoint on `listener` until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    pipeline: Arc<Pipeline>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(pipeline);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn metrics(State(pipeline): State<Arc<Pipeline>>) -> Response {
    refresh(&pipeline).await;
    let text = pipeline.metrics.render();
    ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
}

/// Brings the metrics that mirror state kept elsewhere up to date.
async fn refresh(pipeline: &Pipeline) {
    let metrics = &pipeline.metrics;
    metrics.circuits(&pipeline.circuits.open());
    metrics.credentials_fetched(pipeline.client.credential_fetches());
    if let Ok(Ok(scopes)) = tokio::time::timeout(STORE_WAIT, pipeline.audit.parked_scopes()).await {
        let parked: u64 = scopes.iter().map(|(_, count)| count).sum();
        metrics
            .parked
            .set(i64::try_from(parked).unwrap_or(i64::MAX));
    }
    if let Ok(Ok(snapshots)) =
        tokio::time::timeout(STORE_WAIT, pipeline.audit.snapshots(None)).await
    {
        metrics.rollouts(&snapshots);
    }
}

async fn readyz(State(pipeline): State<Arc<Pipeline>>) -> Response {
    let reasons = unready(&pipeline).await;
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({ "ready": true }))).into_response()
    } else {
        let body = json!({ "ready": false, "reasons": reasons });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Why the worker is not ready; empty when it is.
pub async fn unready(pipeline: &Pipeline) -> Vec<String> {
    let mut reasons = Vec::new();
    if pipeline.metrics.broker_connected.get() == 0 {
        reasons.push("no broker session".to_owned());
    }
    match tokio::time::timeout(STORE_WAIT, pipeline.audit.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => reasons.push(format!("the store refuses writes: {error}")),
        Err(_) => reasons.push("the store did not take a write within 2 s".to_owned()),
    }
    reasons.extend(pipeline.health.failing().into_iter().map(str::to_owned));
    for (scope, cause) in pipeline.circuits.open() {
        reasons.push(format!("circuit {scope} open: {cause}"));
    }
    reasons.dedup();
    reasons
}
