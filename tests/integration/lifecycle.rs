//! The `keyturn` binary as an operator meets it: bad configuration, no broker, and SIGTERM with
//! jobs in flight.

use std::time::Duration;

use crate::helpers::*;

#[test]
fn a_bad_setting_exits_2_with_one_line_naming_the_key() {
    for (name, value, key) in [
        ("KEYTURN_WORKER__CONCURRENCY", "0", "worker.concurrency"),
        ("KEYTURN_AMQP__URL", "http://nope", "amqp.url"),
        ("KEYTURN_RETRY__MAX_DELAY", "soon", "retry.max_delay"),
    ] {
        let output = keyturn_binary()
            .args(["worker"])
            .env(name, value)
            .env("CLOUD_SDK_AK", "a")
            .env("CLOUD_SDK_SK", "b")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(key), "{stderr}");
    }
    let output = keyturn_binary().args(["worker"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("CLOUD_SDK_AK"));
}

#[test]
fn the_demo_without_a_broker_says_how_to_start_one() {
    let output = keyturn_binary()
        .args(["demo"])
        .env("KEYTURN_AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("no RabbitMQ reachable") && last.contains("rabbitmq-server -detached"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sigterm_finishes_in_flight_jobs_requeues_the_rest_and_exits_0() {
    let app = TestApp::spawn_with_latency(1_500).await;
    let total = 12;
    for n in 0..total {
        app.publish_job(&job(&format!("J-term-{n}"), 100 + n, "on"))
            .await;
    }
    let mut child = app
        .worker_process(&[
            ("KEYTURN_WORKER__CONCURRENCY", "4"),
            ("KEYTURN_WORKER__GRACE_PERIOD", "10s"),
        ])
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), || async {
        app.stats().requests >= 4
    })
    .await;
    assert_eq!(
        terminate(&mut child, Duration::from_secs(20)).await,
        Some(0),
        "exits 0 within the grace period"
    );

    let finished = app.toggles().len() as u32;
    assert!(
        finished >= 4,
        "the jobs in flight at SIGTERM finished: {finished}"
    );
    assert!(finished < total, "no new jobs were taken after SIGTERM");
    assert_eq!(
        u64::from(finished),
        app.stats().requests,
        "every job that reached the API finished within the grace period"
    );
    wait_until(Duration::from_secs(10), || async {
        app.queue_len(&app.settings.amqp.jobs_queue).await == total - finished
    })
    .await;
    assert_eq!(app.events(finished as usize).await.len() as u32, finished);
    app.cleanup().await;
}
