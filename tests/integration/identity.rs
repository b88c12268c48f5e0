//! Exact job identity, per-instance order and the retry rules that keep an instance from being
//! toggled twice: real broker, simulator over a socket, real SQLite.

use std::process::Stdio;
use std::time::Duration;

use keyturn::events::Outcome;
use keyturn::simulator::{Faults, Step};
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_reused_job_id_with_another_body_is_rejected_naming_when_it_was_first_seen() {
    let app = TestApp::spawn().await;
    app.publish_job(&job("J-reuse", 40, "on")).await;
    app.drain().await;
    // The same job spelled differently (keys reordered, status in capitals) is the same job.
    let mut respelled = job("J-reuse", 40, "on");
    respelled["encryption_status"] = json!("ON");
    app.publish(
        respelled.to_string().as_bytes(),
        lapin::BasicProperties::default().with_content_type("application/json".into()),
    )
    .await;
    // The same key asking for something else is refused, not answered with the old result.
    app.publish_job(&job("J-reuse", 40, "off")).await;
    app.drain().await;

    let events = app.events(3).await;
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].data.outcome, Outcome::Succeeded);
    assert_eq!(
        events[1].id, events[0].id,
        "a respelled duplicate is a replay"
    );
    let conflict = &events[2];
    assert_eq!(conflict.data.outcome, Outcome::Rejected);
    assert_eq!(
        conflict.data.error_code.as_deref(),
        Some("keyturn.invalid.job_id")
    );
    let first_seen = app.toggles()[0]["received_at"].as_str().unwrap().to_owned();
    let message = conflict.data.error_msg.as_deref().unwrap();
    assert!(
        message.starts_with("job_id: J-reuse (rerun 0) was first seen at ")
            && message.contains(&first_seen)
            && message.contains("with a different body"),
        "{message}"
    );
    assert_eq!(
        app.dead_letters().await.len(),
        1,
        "the conflicting body is kept"
    );
    assert_eq!(
        app.simulator.status_of(PROJECT, &instance(40)).as_deref(),
        Some("on"),
        "the off request never reached the API"
    );
    assert_eq!(app.stats().instances[&instance(40)].modify_calls, 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_failed_job_runs_again_only_under_a_higher_rerun() {
    let app = TestApp::spawn().await;
    app.simulator.script(
        &instance(41),
        vec![Step::Error {
            status: 403,
            code: "DBS.200010".into(),
            msg: Some("not authorised".into()),
            retry_after_secs: None,
            apply: false,
        }],
    );
    app.publish_job(&job("J-rerun", 41, "on")).await;
    app.drain().await;
    app.publish_job(&job("J-rerun", 41, "on")).await;
    let mut rerun = job("J-rerun", 41, "on");
    rerun["rerun"] = json!(1);
    app.publish_job(&rerun).await;
    app.drain().await;

    let events = app.events(3).await;
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].data.outcome, Outcome::Failed);
    assert_eq!(
        events[1].id, events[0].id,
        "the same key replays its failure"
    );
    assert_eq!(events[2].data.outcome, Outcome::Succeeded);
    assert_eq!(events[2].data.rerun, 1);
    let runs = rows(
        &app.audit_path(),
        "SELECT rerun, outcome FROM toggles WHERE job_id = 'J-rerun' ORDER BY rerun",
    );
    assert_eq!(
        runs,
        vec![
            json!({"rerun": 0, "outcome": "failed"}),
            json!({"rerun": 1, "outcome": "succeeded"})
        ],
        "the audit keeps every run"
    );
    assert_eq!(app.stats().instances[&instance(41)].modify_calls, 2);
    app.cleanup().await;
}

/// `on` then `off` for one instance: the `on` meets a 504 that in fact landed. Without
/// per-instance order the `off` would run beside it and the `on` could land last.
#[tokio::test]
async fn jobs_of_one_instance_never_overlap_and_run_in_delivery_order() {
    let app = TestApp::spawn_with(Options {
        faults: Faults {
            latency_ms: 150,
            ..Faults::default()
        },
        tweak: Box::new(|settings| settings.worker.concurrency = 8),
        ..Options::default()
    })
    .await;
    app.simulator.script(
        &instance(42),
        vec![Step::Error {
            status: 504,
            code: "APIGW.0201".into(),
            msg: None,
            retry_after_secs: None,
            apply: true,
        }],
    );
    app.publish_job(&job("J-order-on", 42, "on")).await;
    app.publish_job(&job("J-order-off", 42, "off")).await;
    for n in 0..6 {
        app.publish_job(&job(&format!("J-order-other-{n}"), 43 + n, "on"))
            .await;
    }
    app.drain().await;

    let stats = app.stats();
    let instance_stats = &stats.instances[&instance(42)];
    assert_eq!(instance_stats.max_in_flight, 1, "never two calls at once");
    assert_eq!(instance_stats.status, "off", "the later job landed last");
    assert!(
        stats.instances.values().any(|i| i.max_in_flight == 1),
        "other instances ran beside it"
    );
    let events = app.events(8).await;
    let on = events
        .iter()
        .find(|e| e.data.job_id == "J-order-on")
        .unwrap();
    let off = events
        .iter()
        .find(|e| e.data.job_id == "J-order-off")
        .unwrap();
    assert_eq!(on.data.outcome, Outcome::Succeeded);
    assert_eq!(off.data.outcome, Outcome::Succeeded);
    assert!(on.time < off.time, "finished in delivery order");
    assert_eq!(
        instance_stats.modify_calls, 2,
        "the landed 504 was not sent again"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_500_that_landed_is_settled_by_describe_not_sent_twice() {
    let app = TestApp::spawn().await;
    app.simulator.script(
        &instance(50),
        vec![Step::Error {
            status: 500,
            code: "DBS.05000000".into(),
            msg: None,
            retry_after_secs: None,
            apply: true,
        }],
    );
    app.publish_job(&job("J-landed", 50, "on")).await;
    app.drain().await;

    let event = &app.events(1).await[0];
    assert_eq!(event.data.outcome, Outcome::Succeeded);
    let calls: Vec<_> = app
        .attempts("J-landed")
        .iter()
        .map(|a| (a["call"].clone(), a["http_status"].clone()))
        .collect();
    assert_eq!(
        calls,
        vec![
            (json!("modify"), json!(500)),
            (json!("describe"), json!(200))
        ]
    );
    let stats = &app.stats().instances[&instance(50)];
    assert_eq!((stats.modify_calls, stats.toggles_applied), (1, 1));
    app.cleanup().await;
}

#[tokio::test]
async fn a_200_reporting_another_state_is_settled_by_describe() {
    let app = TestApp::spawn().await;
    app.simulator.script(
        &instance(51),
        vec![Step::Answer {
            status: "off".into(),
        }],
    );
    app.publish_job(&job("J-lie", 51, "on")).await;
    app.drain().await;

    let event = &app.events(1).await[0];
    assert_eq!(event.data.outcome, Outcome::Succeeded);
    assert_eq!(event.data.resulting_status.as_deref(), Some("on"));
    let calls: Vec<_> = app
        .attempts("J-lie")
        .iter()
        .map(|a| a["call"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        calls,
        ["modify", "describe", "modify"],
        "the disagreeing 200 was checked, then the change sent"
    );
    assert_eq!(
        app.simulator.status_of(PROJECT, &instance(51)).as_deref(),
        Some("on")
    );
    app.cleanup().await;
}

/// A bug that panics while a job is processed returns its delivery to the queue (so the
/// delivery limit ends a job that always panics) and frees its slot: the worker goes on.
#[tokio::test]
async fn a_panicking_job_neither_leaks_its_slot_nor_stalls_the_worker() {
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|settings| settings.amqp.delivery_limit = 2),
        ..Options::default()
    })
    .await;
    let mut worker = app
        .worker_process(&[
            ("KEYTURN_DEBUG_PANIC_JOB", "J-panic"),
            ("KEYTURN_WORKER__CONCURRENCY", "1"),
            ("KEYTURN_AMQP__DELIVERY_LIMIT", "2"),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    app.wait_for_audit().await;
    app.publish_job(&job("J-panic", 60, "on")).await;
    let jobs: Vec<(String, u32, &str)> = (0..5)
        .map(|i| (format!("J-after-panic-{i}"), 61 + i, "on"))
        .collect();
    for (job_id, n, status) in &jobs {
        app.publish_job(&job(job_id, *n, status)).await;
    }
    // One slot: had the panic leaked it, nothing after the first panic would run.
    wait_until(Duration::from_secs(60), || async {
        app.toggles().len() == jobs.len()
    })
    .await;
    let dead_queue = app.settings.amqp.dead_queue.clone();
    wait_until(Duration::from_secs(30), || async {
        app.queue_len(&dead_queue).await > 0
    })
    .await;
    let dead = app.dead_letters().await;
    assert_eq!(dead.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&dead[0]).unwrap();
    assert_eq!(body["job_id"], "J-panic");
    assert_eq!(
        app.stats()
            .instances
            .get(&instance(60))
            .map(|i| i.modify_calls),
        None
    );
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_reply_to_naming_keyturns_own_queues_or_outside_the_prefix_is_rejected() {
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|settings| settings.amqp.reply_to_prefix = "ticketing.".into()),
        ..Options::default()
    })
    .await;
    let reply_queue = format!("ticketing.{}", unique("replies"));
    app.channel
        .queue_declare(
            reply_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let with_reply_to = |reply_to: &str| {
        lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(reply_to.into())
    };
    let jobs_queue = app.settings.amqp.jobs_queue.clone();
    for (job_id, n, reply_to) in [
        ("J-reply-own", 80, jobs_queue.as_str()),
        ("J-reply-other", 81, "elsewhere.replies"),
        ("J-reply-ok", 82, reply_queue.as_str()),
    ] {
        app.publish(
            job(job_id, n, "on").to_string().as_bytes(),
            with_reply_to(reply_to),
        )
        .await;
    }
    app.drain().await;

    let events = app.events(3).await;
    let outcome = |job_id: &str| {
        events
            .iter()
            .find(|e| e.data.job_id == job_id)
            .map(|e| (e.data.outcome, e.data.error_msg.clone()))
            .unwrap()
    };
    let (own, own_msg) = outcome("J-reply-own");
    assert_eq!(own, Outcome::Rejected);
    assert!(
        own_msg
            .unwrap()
            .contains("reply_to: names keyturn's own queue")
    );
    let (other, other_msg) = outcome("J-reply-other");
    assert_eq!(other, Outcome::Rejected);
    assert!(
        other_msg
            .unwrap()
            .contains(r#"reply_to: must start with "ticketing.""#)
    );
    assert_eq!(outcome("J-reply-ok").0, Outcome::Succeeded);
    // The copy goes out after the event's confirm (and before the ack): wait for it.
    wait_until(Duration::from_secs(10), || async {
        app.queue_len(&reply_queue).await == 1
    })
    .await;
    assert_eq!(
        app.queue_len(&jobs_queue).await,
        0,
        "nothing injected into the jobs queue"
    );
    assert!(!app.stats().instances.contains_key(&instance(80)));
    app.cleanup().await;
}

/// The last allowed attempt is not followed by a backoff sleep, and a failed job is logged at
/// WARN with its code, attempts and rollout.
#[tokio::test]
async fn the_last_attempt_sleeps_no_backoff_and_a_failure_is_logged_at_warn() {
    let app = TestApp::spawn().await;
    let server_error = Step::Error {
        status: 500,
        code: "DBS.05000000".into(),
        msg: None,
        retry_after_secs: None,
        apply: false,
    };
    app.simulator.script(&instance(90), vec![server_error; 4]);
    app.publish_job(&job("J-last", 90, "on")).await;
    let started = std::time::Instant::now();
    let output = app
        .worker_process(&[
            ("KEYTURN_RETRY__MAX_ATTEMPTS", "1"),
            // A backoff would sleep up to a minute.
            ("KEYTURN_RETRY__BASE_DELAY", "60s"),
            ("KEYTURN_RETRY__MAX_DELAY", "60s"),
            ("KEYTURN_LOG__LEVEL", "warn"),
        ])
        .args(["--exit-when-idle", "500ms"])
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "no sleep after the last attempt: {:?}",
        started.elapsed()
    );
    let event = &app.events(1).await[0];
    assert_eq!(event.data.outcome, Outcome::Failed);
    assert_eq!(event.data.attempts, 1);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("job failed"))
        .unwrap_or_else(|| panic!("no failure line: {stderr}"));
    for part in [
        " WARN ",
        "error_code=\"DBS.05000000\"",
        "attempts=1",
        "rollout_id=\"R-1\"",
        "job_id=\"J-last\"",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    app.cleanup().await;
}

/// A job's own API time runs out: it ends `failed` with the last error and why the loop
/// stopped.
#[tokio::test]
async fn a_job_out_of_its_own_time_fails_with_deadline_exceeded() {
    let app = TestApp::spawn_with(Options {
        faults: Faults {
            latency_ms: 400,
            error_rate: 1.0,
            ..Faults::default()
        },
        tweak: Box::new(|settings| {
            settings.retry.deadline = Duration::from_secs(1);
            settings.retry.max_attempts = 50;
            settings.circuit.strikes_to_open = 1000;
        }),
        ..Options::default()
    })
    .await;
    app.publish_job(&job("J-deadline", 95, "on")).await;
    app.drain().await;
    let event = &app.events(1).await[0];
    assert_eq!(event.data.outcome, Outcome::Failed);
    assert!(
        event
            .data
            .error_msg
            .as_deref()
            .unwrap()
            .ends_with("(keyturn.deadline_exceeded)"),
        "{:?}",
        event.data.error_msg
    );
    assert!(event.data.attempts >= 2 && event.data.attempts <= 4);
    app.cleanup().await;
}

/// With `api.confirm_after`, a 200 that did not land is caught by the read-back.
#[tokio::test]
async fn confirm_after_catches_a_modify_that_did_not_land() {
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|settings| settings.api.confirm_after = true),
        ..Options::default()
    })
    .await;
    app.simulator.script(
        &instance(96),
        vec![Step::Answer {
            status: "on".into(),
        }],
    );
    app.publish_job(&job("J-confirm", 96, "on")).await;
    app.publish_job(&job("J-confirmed", 97, "on")).await;
    app.drain().await;
    let events = app.events(2).await;
    let unconfirmed = events
        .iter()
        .find(|e| e.data.job_id == "J-confirm")
        .unwrap();
    assert_eq!(unconfirmed.data.outcome, Outcome::Failed);
    assert_eq!(
        unconfirmed.data.error_code.as_deref(),
        Some("keyturn.not_confirmed")
    );
    let confirmed = events
        .iter()
        .find(|e| e.data.job_id == "J-confirmed")
        .unwrap();
    assert_eq!(confirmed.data.outcome, Outcome::Succeeded);
    assert_eq!(confirmed.data.attempts, 2, "Modify, then the read-back");
    app.cleanup().await;
}
