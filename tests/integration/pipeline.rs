//! One delivery end to end: queue → validated job → signed call → audit → event → ack.

use std::time::Duration;

use keyturn::amqp::worker::RunOptions;
use keyturn::config::Credentials;
use keyturn::events::Outcome;
use keyturn::simulator::Step;
use lapin::BasicProperties;
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn jobs_turn_encryption_on_and_off_and_leave_a_full_record() {
    let app = TestApp::spawn().await;
    app.publish_job(&job("J-on", 1, "on")).await;
    app.publish_job(&job("J-off", 2, "OFF")).await;
    app.drain().await;

    let events = app.events(2).await;
    assert_eq!(events.len(), 2);
    assert_eq!(
        app.simulator.status_of(PROJECT, &instance(1)).as_deref(),
        Some("on")
    );
    assert_eq!(
        app.simulator.status_of(PROJECT, &instance(2)).as_deref(),
        Some("off")
    );
    let on = events.iter().find(|e| e.data.job_id == "J-on").unwrap();
    assert_eq!(on.data.outcome, Outcome::Succeeded);
    assert_eq!(on.kind, "dev.keyturn.job.succeeded");
    assert_eq!(on.subject.as_deref(), Some(instance(1).as_str()));
    assert_eq!(on.data.requested_status.as_deref(), Some("on"));
    assert_eq!(on.data.resulting_status.as_deref(), Some("on"));
    assert_eq!((on.data.attempts, on.data.http_status), (1, Some(200)));
    assert!(
        on.data
            .request_id
            .as_deref()
            .is_some_and(|id| !id.is_empty())
    );
    assert_eq!(on.routing_key(), "job.succeeded.cn-north-4");

    let rows = app.toggles();
    assert_eq!(rows.len(), 2);
    let row = rows.iter().find(|r| r["job_id"] == "J-on").unwrap();
    for (column, expected) in [
        ("rollout_id", json!("R-1")),
        ("ticket", json!("CHG-1042")),
        ("region", json!("cn-north-4")),
        ("project_id", json!(PROJECT)),
        ("instance_id", json!(instance(1))),
        ("requested_status", json!("on")),
        ("kms_key_id", json!(KEY)),
        ("requested_by", json!("alice")),
        ("outcome", json!("succeeded")),
        ("resulting_status", json!("on")),
        ("http_status", json!(200)),
        ("error_code", Value::Null),
        ("attempts", json!(1)),
        ("event_id", json!(on.id)),
        ("request_id", json!(on.data.request_id)),
    ] {
        assert_eq!(row[column], expected, "column {column}");
    }
    let off_row = rows.iter().find(|r| r["job_id"] == "J-off").unwrap();
    assert_eq!(off_row["kms_key_id"], Value::Null);
    assert_eq!(app.attempts("J-on").len(), 1);
    assert_eq!(app.queue_len(&app.settings.amqp.jobs_queue).await, 0);
    assert!(app.dead_letters().await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn every_invalid_job_is_rejected_naming_its_field_audited_and_dead_lettered() {
    let app = TestApp::spawn().await;
    let mut cases: Vec<(String, Vec<u8>, String)> = Vec::new();
    let mut add =
        |id: &str, body: Vec<u8>, field: &str| cases.push((id.to_owned(), body, field.to_owned()));
    let edit = |id: &str, field: &str, value: Value| {
        let mut body = job(id, 7, "on");
        if value.is_null() {
            body.as_object_mut().unwrap().remove(field);
        } else {
            body[field] = value;
        }
        body.to_string().into_bytes()
    };
    add(
        "X-jobid",
        edit("X-jobid", "job_id", json!("bad id/../")),
        "job_id",
    );
    add(
        "X-region",
        edit("X-region", "region", json!("Mars 1")),
        "region",
    );
    add(
        "X-project",
        edit("X-project", "project_id", json!("xyz")),
        "project_id",
    );
    add(
        "X-instance",
        edit(
            "X-instance",
            "instance_id",
            json!("7033e7c3cf93438797d44ad7ae0a7d95"),
        ),
        "instance_id",
    );
    add(
        "X-status",
        edit("X-status", "encryption_status", json!("maybe")),
        "encryption_status",
    );
    add("X-type", edit("X-type", "type", json!("aes")), "type");
    add(
        "X-key",
        edit("X-key", "kms_key_id", Value::Null),
        "kms_key_id",
    );
    add(
        "X-ticket",
        edit("X-ticket", "ticket", json!("a\r\nInjected: yes")),
        "ticket",
    );
    add(
        "X-by",
        edit("X-by", "requested_by", json!("x".repeat(200))),
        "requested_by",
    );
    add(
        "X-unknown",
        edit("X-unknown", "encryption", json!("on")),
        "encryption",
    );
    let mut off_with_key = job("X-offkey", 7, "off");
    off_with_key["kms_key_id"] = json!(KEY);
    add(
        "X-offkey",
        off_with_key.to_string().into_bytes(),
        "kms_key_id",
    );
    add("X-json", b"{\"job_id\": \"X-json\", ".to_vec(), "body");
    add("X-utf8", vec![0xff, 0xfe, 0x00], "body");
    for (id, body, _) in &cases {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(id.as_str().into());
        app.publish(body, properties).await;
    }
    app.publish_job(&job("ok-between", 8, "on")).await;
    app.drain().await;

    let events = app.events(cases.len() + 1).await;
    assert_eq!(events.len(), cases.len() + 1);
    assert_eq!(
        app.stats()
            .instances
            .get(&instance(7))
            .map_or(0, |i| i.modify_calls),
        0,
        "the API is never called for invalid jobs"
    );
    assert_eq!(
        app.simulator.status_of(PROJECT, &instance(8)).as_deref(),
        Some("on")
    );
    let rows = app.toggles();
    for (id, _, field) in &cases {
        // An unusable job_id is recorded as given (sanitised); the others fall back to message_id.
        let recorded_id = if id == "X-jobid" {
            "bad id/../"
        } else {
            id.as_str()
        };
        let event = events.iter().find(|e| e.data.job_id == recorded_id);
        let event = event.unwrap_or_else(|| panic!("no event for {id}"));
        assert_eq!(event.data.outcome, Outcome::Rejected, "{id}");
        assert_eq!(
            event.data.error_code.as_deref(),
            Some(format!("keyturn.invalid.{field}").as_str()),
            "{id}"
        );
        assert!(
            event
                .data
                .error_msg
                .as_deref()
                .unwrap()
                .starts_with(&format!("{field}:")),
            "{id}: {:?}",
            event.data.error_msg
        );
        assert!(event.routing_key().starts_with("job.rejected."));
        let row = rows
            .iter()
            .find(|r| r["event_id"] == event.id.as_str())
            .unwrap();
        assert_eq!(row["outcome"], "rejected");
        assert_eq!(row["attempts"], 0);
    }
    let dead = app.dead_letters().await;
    assert_eq!(
        dead.len(),
        cases.len(),
        "the dead queue holds exactly the rejected messages"
    );
    for (_, body, _) in &cases {
        assert!(dead.contains(body));
    }
    assert_eq!(app.queue_len(&app.settings.amqp.jobs_queue).await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_500_is_checked_with_describe_then_retried_with_each_attempt_recorded() {
    let app = TestApp::spawn().await;
    app.simulator.script(
        &instance(3),
        vec![
            Step::Error {
                status: 500,
                code: "DBS.05000000".into(),
                msg: None,
                retry_after_secs: None,
                apply: false,
            },
            Step::Ok,
        ],
    );
    app.publish_job(&job("J-500", 3, "on")).await;
    app.drain().await;

    let event = &app.events(1).await[0];
    assert_eq!(event.data.outcome, Outcome::Succeeded);
    assert_eq!(event.data.attempts, 3);
    let attempts = app.attempts("J-500");
    assert_eq!(
        attempts
            .iter()
            .map(|a| (a["call"].clone(), a["http_status"].clone()))
            .collect::<Vec<_>>(),
        vec![
            (json!("modify"), json!(500)),
            // A 500 may have landed: ask before sending it again.
            (json!("describe"), json!(200)),
            (json!("modify"), json!(200)),
        ]
    );
    assert_eq!(attempts[0]["error_code"], "DBS.05000000");
    assert_ne!(attempts[0]["request_id"], attempts[2]["request_id"]);
    assert_eq!(app.stats().instances[&instance(3)].modify_calls, 2);
    app.cleanup().await;
}

#[tokio::test]
async fn a_400_is_not_retried_and_fails_with_the_api_error() {
    let app = TestApp::spawn().await;
    app.simulator.script(
        &instance(4),
        vec![Step::Error {
            status: 400,
            code: "DBS.200001".into(),
            msg: Some("Invalid parameter".into()),
            retry_after_secs: None,
            apply: false,
        }],
    );
    app.publish_job(&job("J-400", 4, "on")).await;
    app.drain().await;

    let event = &app.events(1).await[0];
    assert_eq!(event.data.outcome, Outcome::Failed);
    assert_eq!(event.routing_key(), "job.failed.cn-north-4");
    assert_eq!(
        (event.data.attempts, event.data.http_status),
        (1, Some(400))
    );
    assert_eq!(event.data.error_code.as_deref(), Some("DBS.200001"));
    assert_eq!(event.data.error_msg.as_deref(), Some("Invalid parameter"));
    assert!(event.data.request_id.is_some());
    assert_eq!(app.stats().instances[&instance(4)].modify_calls, 1);
    assert_eq!(app.toggles()[0]["outcome"], "failed");
    assert_eq!(
        app.queue_len(&app.settings.amqp.jobs_queue).await,
        0,
        "a failed job is acked, not redelivered"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_429_burst_pauses_the_project_for_retry_after() {
    let app = TestApp::spawn().await;
    let throttled = || Step::Error {
        status: 429,
        code: "APIGW.0308".into(),
        msg: None,
        retry_after_secs: Some(1),
        apply: false,
    };
    app.simulator
        .script(&instance(5), vec![throttled(), throttled(), Step::Ok]);
    app.publish_job(&job("J-429", 5, "on")).await;
    app.drain().await;

    let event = &app.events(1).await[0];
    assert_eq!(event.data.outcome, Outcome::Succeeded);
    assert_eq!(event.data.attempts, 3);
    let starts: Vec<chrono::DateTime<chrono::Utc>> = app
        .attempts("J-429")
        .iter()
        .map(|a| a["started_at"].as_str().unwrap().parse().unwrap())
        .collect();
    for pair in starts.windows(2) {
        assert!(
            pair[1] - pair[0] >= chrono::Duration::milliseconds(990),
            "Retry-After: 1 must be honoured: {starts:?}"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_timed_out_modify_is_checked_with_describe_not_sent_twice() {
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|s| s.api.request_timeout = Duration::from_millis(500)),
        ..Options::default()
    })
    .await;
    app.simulator.script(
        &instance(6),
        vec![Step::Hang {
            ms: 2_000,
            apply: true,
        }],
    );
    app.publish_job(&job("J-timeout", 6, "on")).await;
    app.drain().await;

    let event = &app.events(1).await[0];
    assert_eq!(event.data.outcome, Outcome::Succeeded);
    let calls: Vec<Value> = app
        .attempts("J-timeout")
        .iter()
        .map(|a| json!([a["call"], a["error_code"]]))
        .collect();
    assert_eq!(
        calls,
        vec![
            json!(["modify", "keyturn.timeout"]),
            json!(["describe", null])
        ]
    );
    let stats = &app.stats().instances[&instance(6)];
    assert_eq!(
        (
            stats.modify_calls,
            stats.toggles_applied,
            stats.describe_calls
        ),
        (1, 1, 1)
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_duplicate_job_id_replays_the_stored_event_without_calling_the_api() {
    let app = TestApp::spawn().await;
    app.publish_job(&job("J-dup", 9, "on")).await;
    app.publish_job(&job("J-dup", 9, "on")).await;
    app.drain().await;

    let events = app.events(2).await;
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[0], events[1],
        "a replay is the same event, id included"
    );
    assert_eq!(app.stats().instances[&instance(9)].modify_calls, 1);
    assert_eq!(app.toggles().len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn reply_to_and_correlation_id_are_honoured() {
    let app = TestApp::spawn().await;
    let reply_queue = unique("kt-reply");
    app.channel
        .queue_declare(
            reply_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_reply_to(reply_queue.as_str().into())
        .with_correlation_id("corr-77".into());
    app.publish(job("J-reply", 10, "off").to_string().as_bytes(), properties)
        .await;
    app.drain().await;

    let event = &app.events(1).await[0];
    let reply = app
        .channel
        .basic_get(
            reply_queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("a reply");
    assert_eq!(
        reply
            .delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("corr-77")
    );
    let replied: keyturn::events::ResultEvent =
        serde_json::from_slice(&reply.delivery.data).unwrap();
    assert_eq!(&replied, event);
    let _ = app
        .channel
        .queue_delete(reply_queue.as_str().into(), Default::default())
        .await;
    app.cleanup().await;
}

#[tokio::test]
async fn token_auth_works_and_a_wrong_token_parks_the_job_until_a_good_one_runs_it() {
    let app = TestApp::spawn().await;
    app.publish_job(&job("J-token", 11, "on")).await;
    app.drain_with(Credentials::Token(TOKEN.to_owned().into()))
        .await;
    assert_eq!(app.events(1).await[0].data.outcome, Outcome::Succeeded);

    // A refused token is the deployment's fault: the job is parked, not failed.
    app.publish_job(&job("J-badtoken", 12, "on")).await;
    let (stop, worker) = app.start_worker_with(
        Credentials::Token("wrong-token".to_owned().into()),
        RunOptions::default(),
    );
    wait_until(Duration::from_secs(30), || async { parked(&app) == 1 }).await;
    stop.cancel();
    worker.await.unwrap();
    assert_eq!(app.toggles().len(), 1, "no record for the held job");
    assert_eq!(
        app.stats().auth_failures,
        1,
        "one refused call, then nothing"
    );

    // A worker with a good token releases it at start, under its own job id.
    app.drain_with(Credentials::Token(TOKEN.to_owned().into()))
        .await;
    let events = app.events(2).await;
    let held = events
        .iter()
        .find(|e| e.data.job_id == "J-badtoken")
        .unwrap();
    assert_eq!(held.data.outcome, Outcome::Succeeded);
    assert_eq!(parked(&app), 0);
    assert!(app.dead_letters().await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn an_unknown_instance_in_a_fixed_fleet_fails_with_404() {
    let app = TestApp::spawn_with(Options {
        fleet: Some(vec![(PROJECT.into(), instance(13))]),
        ..Options::default()
    })
    .await;
    app.publish_job(&job("J-known", 13, "on")).await;
    app.publish_job(&job("J-unknown", 14, "on")).await;
    app.drain().await;

    let events = app.events(2).await;
    let unknown = events
        .iter()
        .find(|e| e.data.job_id == "J-unknown")
        .unwrap();
    assert_eq!(
        (unknown.data.outcome, unknown.data.http_status),
        (Outcome::Failed, Some(404))
    );
    assert_eq!(unknown.data.error_code.as_deref(), Some("DBS.200002"));
    assert_eq!(
        events
            .iter()
            .find(|e| e.data.job_id == "J-known")
            .unwrap()
            .data
            .outcome,
        Outcome::Succeeded
    );
    app.cleanup().await;
}
