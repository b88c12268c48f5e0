//! `keyturn watch` across a broker restart (`rabbitmqctl stop_app` / `start_app`): it reconnects,
//! takes the snapshot again and still ends on the rollout's completion.
//!
//! A test binary of its own, as `tests/restart.rs`: cargo runs test binaries one after another,
//! so stopping the broker here never cuts another test's connections.

#[allow(dead_code)]
#[path = "integration/helpers.rs"]
mod helpers;

#[path = "common/broker_app.rs"]
mod broker_app;

use std::process::Stdio;
use std::time::Duration;

use broker_app::{start_broker, stop_broker};
use helpers::*;
use keyturn::amqp::control::ControlClient;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn watch_reconnects_after_a_broker_restart_and_sees_the_rollout_complete() {
    let mut app = TestApp::spawn_with_latency(100).await;
    let mut worker = app
        .worker_process(&[
            ("KEYTURN_WORKER__CONCURRENCY", "4"),
            ("KEYTURN_AMQP__RECONNECT_MAX_BACKOFF", "1s"),
        ])
        .spawn()
        .unwrap();
    let declaration = keyturn::rollout::parse_command(
        json!({"kind": "rollout", "rollout_id": "R-restart", "expected_jobs": 120})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let mut client = ControlClient::connect(&app.settings.amqp, "watch-restart-test")
        .await
        .unwrap();
    let reply = client
        .request(&declaration, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(reply.ok, "{reply:?}");
    client.close().await;

    let names = &app.settings.amqp;
    let mut watch = tokio::process::Command::from({
        let mut command = keyturn_binary();
        command
            .args(["watch", "R-restart", "--timeout", "5s"])
            .env("KEYTURN_AMQP__URL", &names.url)
            .env("KEYTURN_AMQP__RESULTS_EXCHANGE", &names.results_exchange)
            .env("KEYTURN_AMQP__CONTROL_QUEUE", &names.control_queue)
            .env("KEYTURN_AMQP__RECONNECT_MAX_BACKOFF", "1s");
        command
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(watch.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        "rollout R-restart: running 0/120 final, failures 0 (no budget)"
    );

    for n in 0..120 {
        let mut body = job(&format!("R-restart:{}", instance(n)), n, "on");
        body["rollout_id"] = json!("R-restart");
        app.publish_job(&body).await;
    }
    wait_until(Duration::from_secs(60), || async {
        app.toggles().len() >= 20
    })
    .await;

    let stopped = stop_broker(&app.settings.amqp.url).await;
    let done_at_stop = app.toggles().len();
    // The outage itself: long enough for watch's reconnect attempts to fail a few times.
    tokio::time::sleep(Duration::from_secs(3)).await;
    start_broker(stopped);
    app.reconnect().await;

    let mut rest = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("watch ends when the rollout completes")
        .unwrap()
    {
        rest.push(line);
    }
    let output = tokio::time::timeout(Duration::from_secs(10), watch.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = rest.join("\n");
    eprintln!("{first}\n{stderr}\n{done_at_stop} of 120 done when the broker stopped");
    assert_eq!(output.status.code(), Some(0), "completed, nothing failed");
    assert!(
        stderr.contains("broker connection lost"),
        "it saw the restart:\n{stderr}"
    );
    assert!(
        done_at_stop < 120,
        "the broker stopped mid-rollout ({done_at_stop} done)"
    );
    assert_eq!(
        rest.last().map(String::as_str),
        Some("rollout R-restart: completed 120/120 final, failures 0 (no budget)"),
        "{stderr}"
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains("120 succeeded, 0 failed, 0 rejected, 0 cancelled"),
        "{stdout}"
    );
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    app.cleanup().await;
}
