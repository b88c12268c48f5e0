//! `keyturn submit` and `keyturn rollout`, as the real binary against the real broker. The
//! worker's side of the control protocol is played by a small fake worker here: it consumes the
//! control queue, records each command, and answers `reply_to` with the reply a test chose.

use std::collections::BTreeSet;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keyturn::rollout::{BudgetUse, CanaryGate, Counts, Reply, Snapshot, State};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;

use crate::helpers::{KEY, PROJECT, TestApp, instance};

/// A command as the fake worker received it.
#[derive(Debug, Clone)]
struct Received {
    body: Value,
    message_id: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    content_type: Option<String>,
    delivery_mode: Option<u8>,
    /// Jobs already in the jobs queue when the command arrived.
    jobs_waiting: u32,
}

/// Answers every control command with `answer(command)`; returns what it received.
async fn fake_worker(
    app: &TestApp,
    answer: impl Fn(&Value) -> Reply + Send + 'static,
) -> Arc<Mutex<Vec<Received>>> {
    let received = Arc::new(Mutex::new(Vec::new()));
    let connection = Connection::connect(&app.settings.amqp.url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            app.settings.amqp.control_queue.as_str().into(),
            "fake-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let jobs_queue = app.settings.amqp.jobs_queue.clone();
    let log = received.clone();
    tokio::spawn(async move {
        let _connection = connection;
        while let Some(Ok(delivery)) = consumer.next().await {
            let body: Value = serde_json::from_slice(&delivery.data).unwrap();
            let props = &delivery.properties;
            let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.to_string());
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let jobs_waiting = channel
                .queue_declare(jobs_queue.as_str().into(), passive, FieldTable::default())
                .await
                .unwrap()
                .message_count();
            let entry = Received {
                body: body.clone(),
                message_id: text(props.message_id()),
                correlation_id: text(props.correlation_id()),
                reply_to: text(props.reply_to()),
                content_type: text(props.content_type()),
                delivery_mode: *props.delivery_mode(),
                jobs_waiting,
            };
            if let Some(reply_to) = &entry.reply_to {
                let reply = serde_json::to_vec(&answer(&body)).unwrap();
                let properties = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_correlation_id(entry.correlation_id.clone().unwrap_or_default().into());
                channel
                    .basic_publish(
                        "".into(),
                        reply_to.as_str().into(),
                        BasicPublishOptions::default(),
                        &reply,
                        properties,
                    )
                    .await
                    .unwrap();
            }
            log.lock().unwrap().push(entry);
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
    });
    received
}

fn snapshot(rollout_id: &str, state: State, reason: Option<&str>) -> Snapshot {
    Snapshot {
        rollout_id: rollout_id.into(),
        declared: true,
        ticket: Some("CHG-9".into()),
        state,
        reason: reason.map(Into::into),
        expected_jobs: Some(3),
        counts: Counts {
            succeeded: 1,
            parked: 2,
            ..Counts::default()
        },
        budget: BudgetUse {
            allowed: Some(1),
            used: 0,
        },
        canary: 0,
        canary_gate: CanaryGate::Auto,
        canary_admitted: 0,
        canary_done: true,
        max_per_second: None,
        requested_by: Some("jdoe".into()),
        created_at: "2026-11-29T10:00:00Z".into(),
        updated_at: "2026-11-29T10:01:00Z".into(),
        started_at: Some("2026-11-29T10:00:01Z".into()),
        finished_at: None,
    }
}

fn accept(command: &Value) -> Reply {
    let id = command["rollout_id"].as_str().unwrap_or("R");
    let state = match command["kind"].as_str() {
        Some("pause") => State::Paused,
        _ => State::Running,
    };
    Reply {
        kind: command["kind"].as_str().unwrap_or("?").into(),
        ok: true,
        error: None,
        rollouts: vec![snapshot(id, state, command["reason"].as_str())],
    }
}

fn refuse(command: &Value) -> Reply {
    Reply {
        kind: command["kind"].as_str().unwrap_or("?").into(),
        ok: false,
        error: Some(format!(
            "unknown rollout {}",
            command["rollout_id"].as_str().unwrap_or("?")
        )),
        rollouts: Vec::new(),
    }
}

/// The binary wired to this app's queues and simulator, as an operator's shell would be.
async fn keyturn(app: &TestApp, args: &[&str]) -> Output {
    keyturn_with(app, args, &[]).await
}

async fn keyturn_with(app: &TestApp, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let mut command = app.binary();
    command.args(args);
    for (name, value) in extra {
        command.env(name, value);
    }
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("keyturn finished within 60 s")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A CSV of `count` valid lines (instances 1..=count) in a temporary directory.
fn fleet_file(dir: &tempfile::TempDir, lines: &[String]) -> String {
    let path = dir.path().join("fleet.csv");
    let mut text = String::from("region,project_id,instance_id,encryption_status\n");
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn good_line(n: u32, status: &str) -> String {
    format!("cn-north-4,{PROJECT},{},{status}", instance(n))
}

/// Every message of the jobs queue (taken and acked): (message_id, body).
async fn take_jobs(app: &TestApp) -> Vec<(String, Value)> {
    let mut jobs = Vec::new();
    while let Some(message) = app
        .channel
        .basic_get(
            app.settings.amqp.jobs_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let id = message
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        jobs.push((id, serde_json::from_slice(&message.delivery.data).unwrap()));
    }
    jobs
}

async fn nothing_published(app: &TestApp) {
    assert_eq!(app.queue_len(&app.settings.amqp.jobs_queue).await, 0);
    assert_eq!(app.queue_len(&app.settings.amqp.control_queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_one_bad_line_publishes_nothing_and_names_the_line_and_field() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let file = fleet_file(
        &dir,
        &[
            good_line(1, "on"),
            good_line(2, "on"),
            format!("cn-north-4,not-a-project,{},on", instance(3)),
            good_line(4, "on"),
        ],
    );
    let output = keyturn(
        &app,
        &["submit", &file, "--rollout", "R-bad", "--kms-key", KEY],
    )
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line 4: project_id:"), "{stderr}");
    assert!(stderr.contains("nothing was published"), "{stderr}");
    nothing_published(&app).await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_instance_is_refused_naming_both_lines() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let file = fleet_file(&dir, &[good_line(1, "off"), good_line(1, "off")]);
    let output = keyturn(&app, &["submit", &file, "--rollout", "R-dup"]).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 3: instance_id: names the same instance as line 2"),
        "{stderr}"
    );
    nothing_published(&app).await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_failure_budget_exits_1_naming_it_and_publishes_nothing() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let file = fleet_file(&dir, &[good_line(1, "off")]);
    let output = keyturn(
        &app,
        &[
            "submit",
            &file,
            "--rollout",
            "R-b",
            "--failure-budget",
            "lots",
        ],
    )
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("failure_budget"), "{stderr}");
    nothing_published(&app).await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_the_plan_and_publishes_nothing() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> = (1..=30).map(|n| good_line(n, "on")).collect();
    lines.extend((31..=40).map(|n| format!("ap-southeast-1,{PROJECT},{},off", instance(n))));
    let file = fleet_file(&dir, &lines);
    let output = keyturn(
        &app,
        &[
            "submit",
            &file,
            "--rollout",
            "R-dry",
            "--kms-key",
            KEY,
            "--failure-budget",
            "10%",
            "--canary",
            "5",
            "--max-per-second",
            "2",
            "--dry-run",
        ],
    )
    .await;
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    for part in [
        "rollout R-dry: 40 jobs",
        "dry run: nothing was published",
        "target: 30 on, 10 off",
        "cn-north-4",
        "ap-southeast-1",
        "10% = 4 failed jobs allowed; failure 5 halts",
        "the first 5 jobs run alone",
        // 40 jobs at max_per_second=2 is the slowest limit of the shipped defaults.
        "estimated duration: about 20s",
    ] {
        assert!(stdout.contains(part), "{part:?} in\n{stdout}");
    }
    nothing_published(&app).await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_declares_first_then_publishes_every_job_under_its_deterministic_id() {
    let app = TestApp::spawn().await;
    let received = fake_worker(&app, accept).await;
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (1..=5).map(|n| good_line(n, "on")).collect();
    let file = fleet_file(&dir, &lines);
    let args = [
        "submit",
        &file,
        "--rollout",
        "CHG-9",
        "--kms-key",
        KEY,
        "--ticket",
        "CHG-9",
        "--requested-by",
        "jdoe",
        "--failure-budget",
        "1",
        "--canary",
        "2",
        "--canary-gate",
        "manual",
    ];
    let output = keyturn(&app, &args).await;
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(stdout.contains("5 jobs published"), "{stdout}");
    assert!(stdout.contains("keyturn rollout status CHG-9"), "{stdout}");

    let commands = received.lock().unwrap().clone();
    assert_eq!(commands.len(), 1, "{commands:?}");
    let declaration = &commands[0];
    assert_eq!(
        declaration.body,
        serde_json::json!({"kind":"rollout","rollout_id":"CHG-9","ticket":"CHG-9",
            "expected_jobs":5,"failure_budget":1,"canary":2,"canary_gate":"manual",
            "requested_by":"jdoe"})
    );
    assert_eq!(declaration.jobs_waiting, 0, "no job before the declaration");
    assert!(declaration.message_id.is_some());
    assert_eq!(declaration.message_id, declaration.correlation_id);
    assert!(declaration.reply_to.is_some());
    assert_eq!(
        declaration.content_type.as_deref(),
        Some("application/json")
    );
    assert_eq!(declaration.delivery_mode, Some(2));

    let wanted: BTreeSet<String> = (1..=5).map(|n| format!("CHG-9:{}", instance(n))).collect();
    let jobs = take_jobs(&app).await;
    assert_eq!(jobs.len(), 5);
    let ids: BTreeSet<String> = jobs.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, wanted);
    for (id, body) in &jobs {
        assert_eq!(body["job_id"], id.as_str());
        assert_eq!(body["rollout_id"], "CHG-9");
        assert_eq!(body["kms_key_id"], KEY);
        assert_eq!(body["requested_by"], "jdoe");
    }

    // Again: the same declaration and the same job ids, so the worker sees replays only.
    let again = keyturn(&app, &args).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    let ids: BTreeSet<String> = take_jobs(&app)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, wanted);
    let commands = received.lock().unwrap().clone();
    assert_eq!(commands[1].body, commands[0].body);
    assert_ne!(commands[1].message_id, commands[0].message_id);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_declaration_exits_1_and_publishes_no_job() {
    let app = TestApp::spawn().await;
    let received = fake_worker(&app, |command| Reply {
        error: Some("the plan differs from the declared one: expected_jobs 5, was 2".into()),
        ..refuse(command)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = fleet_file(&dir, &[good_line(1, "off"), good_line(2, "off")]);
    let output = keyturn(&app, &["submit", &file, "--rollout", "R-ref"]).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the plan differs"), "{stderr}");
    assert_eq!(received.lock().unwrap().len(), 1);
    nothing_published(&app).await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_without_a_worker_exits_3_within_the_timeout_and_publishes_no_job() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let file = fleet_file(&dir, &[good_line(1, "off")]);
    let started = Instant::now();
    let output = keyturn(
        &app,
        &["submit", &file, "--rollout", "R-none", "--timeout", "1s"],
    )
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        stderr.contains(&format!(
            "no worker answered within 1s; is a worker running on {}?",
            app.settings.amqp.control_queue
        )),
        "{stderr}"
    );
    assert_eq!(app.queue_len(&app.settings.amqp.jobs_queue).await, 0);
    // The unanswered declaration expires from the control queue instead of being applied later.
    crate::helpers::wait_until(Duration::from_secs(10), || async {
        app.queue_len(&app.settings.amqp.control_queue).await == 0
            && app.queue_len(&app.settings.amqp.dead_queue).await == 1
    })
    .await;
    let dead: Value = serde_json::from_slice(&app.dead_letters().await[0]).unwrap();
    assert_eq!(dead["kind"], "rollout");
    assert_eq!(dead["rollout_id"], "R-none");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_pause_prints_the_answered_snapshot() {
    let app = TestApp::spawn().await;
    let received = fake_worker(&app, accept).await;
    let output = keyturn(
        &app,
        &[
            "rollout",
            "pause",
            "CHG-9",
            "--reason",
            "error rate too high",
            "--requested-by",
            "oncall",
        ],
    )
    .await;
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    for part in [
        "rollout CHG-9: paused",
        "1 of 3 final: 1 succeeded, 0 failed, 0 rejected, 0 cancelled",
        "0 in flight, 2 parked",
        "0 of 1 failures used",
        "error rate too high",
    ] {
        assert!(stdout.contains(part), "{part:?} in\n{stdout}");
    }
    let commands = received.lock().unwrap().clone();
    assert_eq!(
        commands[0].body,
        serde_json::json!({"kind":"pause","rollout_id":"CHG-9",
            "reason":"error rate too high","requested_by":"oncall"})
    );

    let listed = keyturn(&app, &["rollout", "list", "--json"]).await;
    assert_eq!(listed.status.code(), Some(0));
    let reply: Reply = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(reply.kind, "status");
    assert_eq!(
        received.lock().unwrap()[1].body,
        serde_json::json!({"kind":"status"})
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_commands_exit_1_when_refused_2_on_bad_arguments_3_without_an_answer() {
    let app = TestApp::spawn().await;
    let bad = keyturn(&app, &["rollout", "cancel", "not a rollout id"]).await;
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    assert!(text(&bad.stderr).contains("rollout_id"));

    let started = Instant::now();
    let silent = keyturn(&app, &["rollout", "status", "R-x", "--timeout", "1s"]).await;
    assert_eq!(silent.status.code(), Some(3), "{}", text(&silent.stderr));
    assert!(started.elapsed() < Duration::from_secs(15));

    let _received = fake_worker(&app, refuse).await;
    let refused = keyturn(&app, &["rollout", "resume", "R-unknown"]).await;
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("unknown rollout R-unknown"), "{stderr}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_leaves_out_instances_already_in_their_target_state() {
    // The simulator's instances start "off".
    let app = TestApp::spawn().await;
    let received = fake_worker(&app, accept).await;
    let dir = tempfile::tempdir().unwrap();
    let file = fleet_file(
        &dir,
        &[good_line(1, "off"), good_line(2, "on"), good_line(3, "off")],
    );
    let output = keyturn(
        &app,
        &[
            "submit",
            &file,
            "--rollout",
            "R-pre",
            "--kms-key",
            KEY,
            "--preflight",
        ],
    )
    .await;
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(
        stdout.contains(&format!("already off: {} (line 2); left out", instance(1))),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("already off: {} (line 4)", instance(3))));
    assert_eq!(app.describe_calls(), 3);
    assert_eq!(received.lock().unwrap()[0].body["expected_jobs"], 1);
    let jobs = take_jobs(&app).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].0, format!("R-pre:{}", instance(2)));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_for_a_queue_that_does_not_exist_are_an_error_not_a_silent_loss() {
    let app = TestApp::spawn().await;
    let _received = fake_worker(&app, accept).await;
    let dir = tempfile::tempdir().unwrap();
    let file = fleet_file(&dir, &[good_line(1, "off")]);
    let missing = format!("{}.typo", app.settings.amqp.jobs_queue);
    let output = keyturn_with(
        &app,
        &["submit", &file, "--rollout", "R-typo"],
        &[("KEYTURN_AMQP__JOBS_QUEUE", &missing)],
    )
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("no queue named {missing} took the jobs")),
        "{stderr}"
    );
    app.cleanup().await;
}

/// End to end against the real worker: submit a file, watch the rollout complete through
/// `keyturn rollout status`, submit it again and see no second API call.
#[tokio::test]
async fn a_submitted_rollout_runs_on_the_real_worker_and_a_second_submit_calls_nothing() {
    let app = TestApp::spawn().await;
    let mut worker = app.worker_process(&[]).spawn().unwrap();
    app.wait_for_audit().await;
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (3000..3020).map(|n| good_line(n, "on")).collect();
    let file = fleet_file(&dir, &lines);
    let args = [
        "submit",
        &file,
        "--rollout",
        "R-e2e",
        "--kms-key",
        KEY,
        "--failure-budget",
        "2",
        "--ticket",
        "CHG-9",
        "--timeout",
        "20s",
    ];
    let first = keyturn(&app, &args).await;
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    let snapshot = loop {
        let status = keyturn(&app, &["rollout", "status", "R-e2e", "--json"]).await;
        assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
        let reply: Reply = serde_json::from_slice(&status.stdout).unwrap();
        let snapshot = reply.rollouts.into_iter().next().unwrap();
        if snapshot.state == State::Completed {
            break snapshot;
        }
        assert!(Instant::now() < deadline, "never completed: {snapshot:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(snapshot.counts.succeeded, 20);
    assert_eq!(snapshot.budget.allowed, Some(2));

    let again = keyturn(&app, &args).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    let events = app.events(40).await;
    assert_eq!(events.len(), 40, "every job answered twice");
    let stats = app.stats();
    for n in 3000..3020 {
        assert_eq!(
            stats.instances[&instance(n)].modify_calls,
            1,
            "one call per instance"
        );
    }
    assert_eq!(
        crate::helpers::rows(&app.audit_path(), "SELECT job_id FROM toggles").len(),
        20
    );
    assert_eq!(
        crate::helpers::terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    app.cleanup().await;
}
