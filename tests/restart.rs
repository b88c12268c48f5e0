//! The broker itself restarted (`rabbitmqctl stop_app` / `start_app`) under a running worker.
//!
//! A test binary of its own: cargo runs test binaries one after another, so stopping the broker
//! here never cuts another test's connections. It needs the local broker's `rabbitmqctl`, like the
//! force-close test in `tests/integration`.

#[allow(dead_code)]
#[path = "integration/helpers.rs"]
mod helpers;

#[path = "common/broker_app.rs"]
mod broker_app;

use std::time::Duration;

use broker_app::{start_broker, stop_broker};
use helpers::*;

#[tokio::test]
async fn a_broker_restart_mid_run_loses_nothing_and_toggles_nothing_twice() {
    let mut app = TestApp::spawn_with_latency(100).await;
    let jobs = publish_fleet(&app, 200, 20_000).await;
    let mut worker = app
        .worker_process(&[
            ("KEYTURN_WORKER__CONCURRENCY", "8"),
            ("KEYTURN_AMQP__RECONNECT_MAX_BACKOFF", "2s"),
        ])
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), || async {
        app.stats().requests >= 50
    })
    .await;

    let stopped = stop_broker(&app.settings.amqp.url).await;
    let done_before_restart = app.toggles().len();
    // The outage itself: long enough for the worker's reconnect attempts to fail a few times.
    tokio::time::sleep(Duration::from_secs(3)).await;
    start_broker(stopped);
    app.reconnect().await;

    assert_fleet_recovers(&app, &jobs, done_before_restart).await;

    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0),
        "the worker stops cleanly on SIGTERM after the restart"
    );
    let reconciled = app.describe_calls();
    eprintln!(
        "broker restart: {done_before_restart} of {} jobs done when the broker stopped; \
         {reconciled} Describe reconciliations",
        jobs.len()
    );
    app.cleanup().await;
}
