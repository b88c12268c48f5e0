//! Rollouts as first-class objects (contract §6): declarations and commands over the real control
//! queue, budgets, canaries, parking, cancel, reruns and rollout events, against the real broker,
//! the simulator over a socket and a real SQLite store.

use std::collections::HashSet;
use std::time::Duration;

use keyturn::events::Outcome;
use keyturn::rollout::{Snapshot, State};
use keyturn::simulator::{Faults, Step};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use crate::helpers::*;

/// A rollout event as taken from the broker.
#[derive(Debug, Clone)]
struct RolloutEvent {
    kind: String,
    id: String,
    data: Snapshot,
    time: String,
}

impl TestApp {
    async fn wait_for_state(&self, rollout_id: &str, state: State) -> Snapshot {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let snapshot = self.status(rollout_id).await;
            if snapshot.state == state {
                return snapshot;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{rollout_id} never reached {state}: {snapshot:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A queue of this app's rollout events (`rollout.#`).
    async fn follow_rollout_events(&self) -> String {
        let queue = format!("{}.rollout-events", self.settings.amqp.jobs_queue);
        self.channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.channel
            .queue_bind(
                queue.as_str().into(),
                self.settings.amqp.results_exchange.as_str().into(),
                "rollout.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        queue
    }

    async fn rollout_events(&self, queue: &str) -> Vec<RolloutEvent> {
        let mut events = Vec::new();
        for delivery in self.take_waiting(queue).await {
            let routing_key = delivery.routing_key.to_string();
            let value: Value = serde_json::from_slice(&delivery.data).unwrap();
            let kind = routing_key.strip_prefix("rollout.").unwrap().to_owned();
            assert_eq!(value["type"], format!("dev.keyturn.rollout.{kind}"));
            assert_eq!(value["specversion"], "1.0");
            assert_eq!(value["subject"], value["data"]["rollout_id"]);
            events.push(RolloutEvent {
                kind,
                id: value["id"].as_str().unwrap().to_owned(),
                data: serde_json::from_value(value["data"].clone()).unwrap(),
                time: value["time"].as_str().unwrap().to_owned(),
            });
        }
        events
    }
}

fn declare(rollout_id: &str, expected: u32, extra: Value) -> Value {
    let mut command = json!({"kind": "rollout", "rollout_id": rollout_id, "ticket": "CHG-7",
        "expected_jobs": expected, "requested_by": "ops"});
    for (key, value) in extra.as_object().unwrap() {
        command[key] = value.clone();
    }
    command
}

fn rollout_job(rollout_id: &str, n: u32) -> Value {
    let mut body = job(&format!("{rollout_id}:{}", instance(n)), n, "on");
    body["rollout_id"] = json!(rollout_id);
    body
}

fn doom(app: &TestApp, n: u32) {
    let forbidden = Step::Error {
        status: 403,
        code: "DBS.200010".into(),
        msg: Some("not authorised for this instance".into()),
        retry_after_secs: None,
        apply: false,
    };
    app.simulator.script(&instance(n), vec![forbidden; 5]);
}

fn outcomes(app: &TestApp, rollout_id: &str) -> Vec<Value> {
    rows(
        &app.audit_path(),
        &format!(
            "SELECT job_id, rerun, outcome FROM toggles WHERE rollout_id = '{rollout_id}' ORDER BY id"
        ),
    )
}

/// Polls `condition` every 5 ms (60 s at most): for catching a worker in the middle of a step.
async fn poll_until(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `progress` events of one rollout come at least a second apart (one worker or several).
fn assert_progress_at_most_once_a_second(events: &[RolloutEvent]) {
    let times: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "progress")
        .map(|e| chrono::DateTime::parse_from_rfc3339(&e.time).unwrap())
        .collect();
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= chrono::Duration::milliseconds(990),
            "progress at most 1/s: {pair:?}"
        );
    }
}

fn kinds(events: &[RolloutEvent], kind: &str) -> usize {
    events.iter().filter(|e| e.kind == kind).count()
}

#[tokio::test]
async fn the_failure_budget_halts_once_parks_the_rest_and_resume_finishes_every_job() {
    let app = TestApp::spawn_with(Options {
        faults: Faults {
            latency_ms: 10,
            ..Faults::default()
        },
        ..Options::default()
    })
    .await;
    let events_queue = app.follow_rollout_events().await;
    let (stop, worker) = app.start_worker();
    let reply = app
        .command(declare("R-budget", 200, json!({"failure_budget": 5})))
        .await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.rollouts[0].budget.allowed, Some(5));
    let doomed: Vec<u32> = (0..12).map(|i| 1000 + i * 10).collect();
    for n in &doomed {
        doom(&app, *n);
    }
    for n in 1000..1200 {
        app.publish_job(&rollout_job("R-budget", n)).await;
    }

    let halted = app.wait_for_state("R-budget", State::Halted).await;
    assert_eq!(
        halted.reason.as_deref(),
        Some("failure budget exceeded: 6 failures, 5 allowed")
    );
    // Let the jobs in flight at the halt finish and the rest park.
    wait_until(Duration::from_secs(30), || async {
        let s = app.status("R-budget").await;
        s.counts.in_flight == 0 && s.counts.finished() + s.counts.parked == 200
    })
    .await;
    let at_halt = app.status("R-budget").await;
    // A job whose call ended gives its slot back before its record commits: the deliveries held
    // (the prefetch), not the call slots, bound the jobs that may fail beside the 6th.
    let held = u64::from(app.settings.worker.prefetch());
    assert!(
        (6..=6 + held).contains(&at_halt.counts.failed),
        "the 6th failure halts, plus at most the jobs held: {:?}",
        at_halt.counts
    );
    assert!(at_halt.counts.parked > 0);
    let stats = app.stats();
    let called = stats
        .instances
        .values()
        .filter(|i| i.modify_calls > 0)
        .count() as u64;
    assert_eq!(
        called,
        at_halt.counts.finished(),
        "parked jobs never reached the API"
    );

    // The operator fixes the grants and resumes.
    for n in &doomed {
        app.simulator.clear_script(&instance(*n));
    }
    let resumed = app
        .command(json!({"kind": "resume", "rollout_id": "R-budget", "reason": "grants fixed", "requested_by": "ops"}))
        .await;
    assert!(resumed.ok);
    let completed = app.wait_for_state("R-budget", State::Completed).await;
    assert_eq!(completed.counts.finished(), 200);
    assert_eq!(completed.counts.parked, 0);
    let rows = outcomes(&app, "R-budget");
    let job_ids: HashSet<&str> = rows.iter().map(|r| r["job_id"].as_str().unwrap()).collect();
    assert_eq!(
        (rows.len(), job_ids.len()),
        (200, 200),
        "one final row per job"
    );
    assert_eq!(
        completed.counts.failed, at_halt.counts.failed,
        "after the fix nothing else failed"
    );

    wait_until(Duration::from_secs(10), || async {
        app.queue_len(&events_queue).await > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // the outbox drains every second
    let events = app.rollout_events(&events_queue).await;
    assert_eq!(kinds(&events, "declared"), 1);
    assert_eq!(kinds(&events, "started"), 1);
    assert_eq!(kinds(&events, "halted"), 1, "halted happens once");
    assert_eq!(kinds(&events, "resumed"), 1);
    assert_eq!(kinds(&events, "completed"), 1, "completed is sent once");
    let halted_event = events.iter().find(|e| e.kind == "halted").unwrap();
    assert_eq!(halted_event.data.state, State::Halted);
    assert_eq!(halted_event.data.budget.allowed, Some(5));
    assert_progress_at_most_once_a_second(&events);
    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), events.len());
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn an_auto_canary_runs_alone_first_then_the_rest_follows() {
    let app = TestApp::spawn().await;
    let (stop, worker) = app.start_worker();
    assert!(
        app.command(declare("R-canary", 20, json!({"canary": 5})))
            .await
            .ok
    );
    for n in 1300..1320 {
        app.publish_job(&rollout_job("R-canary", n)).await;
    }
    let done = app.wait_for_state("R-canary", State::Completed).await;
    assert_eq!(done.counts.succeeded, 20);
    let canary: HashSet<String> = rows(
        &app.audit_path(),
        "SELECT job_id FROM rollout_canary WHERE rollout_id = 'R-canary'",
    )
    .iter()
    .map(|r| {
        r["job_id"]
            .as_str()
            .unwrap()
            .split(':')
            .nth(1)
            .unwrap()
            .to_owned()
    })
    .collect();
    assert_eq!(canary.len(), 5);
    let first_modifies: HashSet<String> = app
        .stats()
        .recent
        .iter()
        .filter(|r| r.method == "POST")
        .take(5)
        .map(|r| r.instance_id.clone().unwrap())
        .collect();
    assert_eq!(first_modifies, canary, "the canary's calls came first");
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn a_manual_canary_waits_for_resume_and_a_failing_canary_halts() {
    let app = TestApp::spawn().await;
    let (stop, worker) = app.start_worker();
    assert!(
        app.command(declare(
            "R-manual",
            10,
            json!({"canary": 3, "canary_gate": "manual"})
        ))
        .await
        .ok
    );
    for n in 1400..1410 {
        app.publish_job(&rollout_job("R-manual", n)).await;
    }
    let gated = app.wait_for_state("R-manual", State::Paused).await;
    assert_eq!(
        gated.reason.as_deref(),
        Some("the canary of 3 passed; resume to continue")
    );
    wait_until(Duration::from_secs(20), || async {
        app.status("R-manual").await.counts.parked == 7
    })
    .await;
    assert_eq!(
        app.stats()
            .instances
            .values()
            .filter(|i| i.modify_calls > 0)
            .count(),
        3
    );
    assert!(
        app.command(json!({"kind": "resume", "rollout_id": "R-manual"}))
            .await
            .ok
    );
    assert_eq!(
        app.wait_for_state("R-manual", State::Completed)
            .await
            .counts
            .succeeded,
        10
    );

    doom(&app, 1500);
    assert!(
        app.command(declare("R-bad-canary", 10, json!({"canary": 2})))
            .await
            .ok
    );
    app.publish_job(&rollout_job("R-bad-canary", 1500)).await;
    for n in 1501..1510 {
        app.publish_job(&rollout_job("R-bad-canary", n)).await;
    }
    let halted = app.wait_for_state("R-bad-canary", State::Halted).await;
    assert!(
        halted
            .reason
            .as_deref()
            .unwrap()
            .starts_with("canary job R-bad-canary:"),
        "{halted:?}"
    );
    wait_until(Duration::from_secs(20), || async {
        let s = app.status("R-bad-canary").await;
        s.counts.finished() + s.counts.parked == 10 && s.counts.in_flight == 0
    })
    .await;
    assert!(app.status("R-bad-canary").await.counts.finished() <= 2);
    // Resuming a halted canary accepts it: the rest runs.
    app.simulator.clear_script(&instance(1500));
    assert!(
        app.command(json!({"kind": "resume", "rollout_id": "R-bad-canary"}))
            .await
            .ok
    );
    let done = app.wait_for_state("R-bad-canary", State::Completed).await;
    assert_eq!((done.counts.succeeded, done.counts.failed), (9, 1));
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn cancel_ends_parked_and_later_jobs_cancelled_without_calling_the_api() {
    let app = TestApp::spawn().await;
    let events_queue = app.follow_rollout_events().await;
    let (stop, worker) = app.start_worker();
    assert!(app.command(declare("R-cancel", 13, json!({}))).await.ok);
    assert!(
        app.command(json!({"kind": "pause", "rollout_id": "R-cancel", "reason": "change freeze"}))
            .await
            .ok
    );
    for n in 1600..1610 {
        app.publish_job(&rollout_job("R-cancel", n)).await;
    }
    wait_until(Duration::from_secs(20), || async {
        app.status("R-cancel").await.counts.parked == 10
    })
    .await;
    let cancelled = app
        .command(json!({"kind": "cancel", "rollout_id": "R-cancel", "requested_by": "ops"}))
        .await;
    assert!(cancelled.ok);
    assert_eq!(cancelled.rollouts[0].state, State::Cancelled);
    for n in 1610..1613 {
        app.publish_job(&rollout_job("R-cancel", n)).await;
    }
    wait_until(Duration::from_secs(30), || async {
        outcomes(&app, "R-cancel").len() == 13
    })
    .await;
    assert!(
        outcomes(&app, "R-cancel")
            .iter()
            .all(|r| r["outcome"] == "cancelled")
    );
    let events = app.events(13).await;
    assert!(events.iter().all(|e| e.data.outcome == Outcome::Cancelled
        && e.routing_key().starts_with("job.cancelled.")
        && e.data.error_code.as_deref() == Some("keyturn.cancelled")));
    assert_eq!(app.stats().requests, 0, "no job reached the API");
    let snapshot = app.status("R-cancel").await;
    assert_eq!((snapshot.counts.cancelled, snapshot.counts.parked), (13, 0));
    let refused = app
        .command(json!({"kind": "resume", "rollout_id": "R-cancel"}))
        .await;
    assert!(!refused.ok);
    assert_eq!(
        refused.error.as_deref(),
        Some("rollout R-cancel is cancelled")
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = app.rollout_events(&events_queue).await;
    assert_eq!(kinds(&events, "paused"), 1);
    assert_eq!(kinds(&events, "cancelled"), 1);
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn retry_failed_reruns_only_the_failed_jobs_under_the_next_rerun() {
    let app = TestApp::spawn().await;
    let (stop, worker) = app.start_worker();
    assert!(app.command(declare("R-rerun", 10, json!({}))).await.ok);
    for n in [1700, 1703, 1706] {
        doom(&app, n);
    }
    for n in 1700..1710 {
        app.publish_job(&rollout_job("R-rerun", n)).await;
    }
    let done = app.wait_for_state("R-rerun", State::Completed).await;
    assert_eq!((done.counts.succeeded, done.counts.failed), (7, 3));
    for n in [1700, 1703, 1706] {
        app.simulator.clear_script(&instance(n));
    }
    let retried = app
        .command(json!({"kind": "retry_failed", "rollout_id": "R-rerun"}))
        .await;
    assert!(retried.ok, "{retried:?}");
    wait_until(Duration::from_secs(30), || async {
        app.status("R-rerun").await.counts.succeeded == 10
    })
    .await;
    let rows = outcomes(&app, "R-rerun");
    assert_eq!(rows.len(), 13, "the audit keeps every run");
    let reruns: Vec<&Value> = rows.iter().filter(|r| r["rerun"] == 1).collect();
    assert_eq!(reruns.len(), 3);
    assert!(reruns.iter().all(|r| r["outcome"] == "succeeded"));
    let snapshot = app.status("R-rerun").await;
    assert_eq!(
        (snapshot.counts.failed, snapshot.counts.finished()),
        (0, 10)
    );
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn commands_are_applied_once_and_bad_ones_are_dead_lettered_with_a_reason() {
    let app = TestApp::spawn().await;
    let (stop, worker) = app.start_worker();
    let plan = declare("R-plan", 5, json!({"failure_budget": "20%"}));
    assert!(app.command(plan.clone()).await.ok);
    let again = app.command(plan).await;
    assert!(again.ok, "re-declaring the same plan is idempotent");
    let changed = app.command(declare("R-plan", 6, json!({}))).await;
    assert!(!changed.ok);
    assert!(
        changed
            .error
            .as_deref()
            .unwrap()
            .contains("was declared with another plan"),
        "{changed:?}"
    );
    let malformed = app
        .command(json!({"kind": "pause", "rollout_id": "R plan", "colour": "red"}))
        .await;
    assert!(!malformed.ok);
    assert_eq!(
        malformed.error.as_deref(),
        Some("colour: is not a field of a control command")
    );
    // A pause delivered twice (same message id) is applied once: one paused event.
    let events_queue = app.follow_rollout_events().await;
    let pause = json!({"kind": "pause", "rollout_id": "R-plan"});
    app.send_command(&pause, "pause-1", None).await;
    app.send_command(&pause, "pause-1", None).await;
    assert!(
        app.command(json!({"kind": "resume", "rollout_id": "R-plan"}))
            .await
            .ok
    );
    app.send_command(&pause, "pause-1", None).await;
    let status = app.status("R-plan").await;
    assert_eq!(
        status.state,
        State::Running,
        "the replayed pause was not applied again"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(kinds(&app.rollout_events(&events_queue).await, "paused"), 1);

    let dead_queue = app.settings.amqp.dead_queue.clone();
    wait_until(Duration::from_secs(10), || async {
        app.queue_len(&dead_queue).await == 2
    })
    .await;
    let mut reasons = Vec::new();
    while let Some(message) = app
        .channel
        .basic_get(dead_queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let headers = message.delivery.properties.headers().clone().unwrap();
        match headers.inner().get("keyturn-error") {
            Some(lapin::types::AMQPValue::LongString(text)) => {
                reasons.push(String::from_utf8_lossy(text.as_bytes()).into_owned());
            }
            other => panic!("no keyturn-error header: {other:?}"),
        }
    }
    assert!(
        reasons.iter().any(|r| r.contains("another plan")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("colour")), "{reasons:?}");
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn two_workers_on_one_store_see_the_same_pause() {
    let app = TestApp::spawn().await;
    let events_queue = app.follow_rollout_events().await;
    let (stop_a, worker_a) = app.start_worker();
    let (stop_b, worker_b) = app.start_worker();
    assert!(app.command(declare("R-two", 20, json!({}))).await.ok);
    assert!(
        app.command(json!({"kind": "pause", "rollout_id": "R-two"}))
            .await
            .ok
    );
    for n in 1800..1820 {
        app.publish_job(&rollout_job("R-two", n)).await;
    }
    wait_until(Duration::from_secs(20), || async {
        app.status("R-two").await.counts.parked == 20
    })
    .await;
    assert_eq!(app.stats().requests, 0, "neither worker called the API");
    let parkers = rows(&app.audit_path(), "SELECT DISTINCT reason FROM parked");
    assert_eq!(parkers, vec![json!({"reason": "rollout paused"})]);
    assert!(
        app.command(json!({"kind": "resume", "rollout_id": "R-two"}))
            .await
            .ok
    );
    assert_eq!(
        app.wait_for_state("R-two", State::Completed)
            .await
            .counts
            .succeeded,
        20
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // the outboxes drain every second
    let events = app.rollout_events(&events_queue).await;
    assert_eq!(
        kinds(&events, "completed"),
        1,
        "completed once, with two workers"
    );
    assert_eq!(kinds(&events, "paused"), 1);
    assert_progress_at_most_once_a_second(&events);
    stop_a.cancel();
    stop_b.cancel();
    worker_a.await.unwrap();
    worker_b.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn undeclared_rollouts_run_ad_hoc_or_wait_for_their_declaration() {
    let app = TestApp::spawn().await;
    let (stop, worker) = app.start_worker();
    app.publish_job(&rollout_job("R-adhoc", 1900)).await;
    wait_until(Duration::from_secs(20), || async {
        outcomes(&app, "R-adhoc").len() == 1
    })
    .await;
    let adhoc = app.status("R-adhoc").await;
    assert!(!adhoc.declared);
    assert_eq!((adhoc.state, adhoc.counts.succeeded), (State::Running, 1));
    // A rejection of a reused key does not count toward the rollout.
    let mut reused = rollout_job("R-adhoc", 1900);
    reused["encryption_status"] = json!("off");
    reused.as_object_mut().unwrap().remove("type");
    reused.as_object_mut().unwrap().remove("kms_key_id");
    app.publish_job(&reused).await;
    wait_until(Duration::from_secs(20), || async {
        outcomes(&app, "R-adhoc").len() == 2
    })
    .await;
    assert_eq!(outcomes(&app, "R-adhoc")[1]["outcome"], "rejected");
    let counts = app.status("R-adhoc").await.counts;
    assert_eq!((counts.succeeded, counts.rejected), (1, 0));
    // Declaring it later keeps what it counted.
    assert!(app.command(declare("R-adhoc", 2, json!({}))).await.ok);
    let declared = app.status("R-adhoc").await;
    assert!(declared.declared);
    assert_eq!(declared.counts.succeeded, 1);
    stop.cancel();
    worker.await.unwrap();

    let mut strict = app.settings.clone();
    strict.rollouts.require_declaration = true;
    let (stop, worker) = app.start_worker_on(strict, app.credentials(), Default::default());
    for n in 1901..1904 {
        app.publish_job(&rollout_job("R-strict", n)).await;
    }
    wait_until(Duration::from_secs(20), || async {
        rows(
            &app.audit_path(),
            "SELECT job_id FROM parked WHERE scope = 'rollout:R-strict'",
        )
        .len()
            == 3
    })
    .await;
    assert_eq!(app.stats().instances.get(&instance(1901)), None);
    assert!(app.command(declare("R-strict", 3, json!({}))).await.ok);
    assert_eq!(
        app.wait_for_state("R-strict", State::Completed)
            .await
            .counts
            .succeeded,
        3
    );
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn max_per_second_caps_a_rollouts_calls() {
    let app = TestApp::spawn().await;
    let (stop, worker) = app.start_worker();
    assert!(
        app.command(declare("R-slow", 12, json!({"max_per_second": 4})))
            .await
            .ok
    );
    let started = tokio::time::Instant::now();
    for n in 2000..2012 {
        app.publish_job(&rollout_job("R-slow", n)).await;
    }
    app.wait_for_state("R-slow", State::Completed).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2700),
        "12 calls at 4/s take at least 2.75 s: {took:?}"
    );
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

/// SIGKILL while jobs are being parked, then while the resume publishes them back: every job
/// ends in exactly one final row, no instance gets a second Modify, replays keep their ids.
#[tokio::test]
async fn sigkill_while_parking_and_while_resuming_loses_nothing_and_sends_nothing_twice() {
    // Enough jobs that parking and releasing them take longer than noticing 20 of them.
    const FIRST: u32 = 2100;
    const TOTAL: u32 = 600;
    let app = TestApp::spawn_with(Options {
        faults: Faults {
            latency_ms: 20,
            ..Faults::default()
        },
        ..Options::default()
    })
    .await;
    let spawn = || {
        app.worker_process(&[("KEYTURN_WORKER__CONCURRENCY", "8")])
            .spawn()
            .unwrap()
    };
    let parked = || parked(&app);
    let mut worker = spawn();
    app.wait_for_audit().await;
    assert!(app.command(declare("R-kill", TOTAL, json!({}))).await.ok);
    assert!(
        app.command(json!({"kind": "pause", "rollout_id": "R-kill"}))
            .await
            .ok
    );
    // A full queue for the next worker, so the kill lands while it parks.
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    for n in FIRST..FIRST + TOTAL {
        app.publish_job(&rollout_job("R-kill", n)).await;
    }
    worker = spawn();
    poll_until(|| parked() >= 20).await;
    worker.kill().await.unwrap();
    let killed_at = parked();
    assert!(
        killed_at < TOTAL as usize,
        "killed while parking: {killed_at} of {TOTAL} parked"
    );

    worker = spawn();
    wait_until(Duration::from_secs(60), || async {
        parked() == TOTAL as usize
    })
    .await;
    assert_eq!(app.stats().requests, 0, "nothing parked reached the API");
    assert!(
        app.command(json!({"kind": "resume", "rollout_id": "R-kill"}))
            .await
            .ok
    );
    // The release publishes and forgets in batches: kill between two.
    poll_until(|| parked() < TOTAL as usize).await;
    worker.kill().await.unwrap();
    let left = parked();
    assert!(left > 0, "killed while releasing: {left} still parked");

    worker = spawn();
    let completed = app.wait_for_state("R-kill", State::Completed).await;
    assert_eq!(completed.counts.succeeded, u64::from(TOTAL));
    let rows = outcomes(&app, "R-kill");
    let job_ids: HashSet<&str> = rows.iter().map(|r| r["job_id"].as_str().unwrap()).collect();
    assert_eq!(
        (rows.len(), job_ids.len()),
        (TOTAL as usize, TOTAL as usize),
        "one final row per job"
    );
    let stats = app.stats();
    for n in FIRST..FIRST + TOTAL {
        let instance_stats = &stats.instances[&instance(n)];
        assert_eq!(
            instance_stats.toggles_applied, 1,
            "instance {n} toggled once"
        );
        assert!(instance_stats.modify_calls <= 1, "instance {n} sent twice");
    }
    let events = app
        .events_until(|events| by_job(events).len() >= TOTAL as usize)
        .await;
    for (job_id, copies) in by_job(&events) {
        assert!(
            copies.iter().all(|e| e.id == copies[0].id),
            "replays of {job_id} keep the event id"
        );
    }
    assert_eq!(parked(), 0);
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    app.cleanup().await;
}

/// A canary that finishes while the rollout is paused is judged on resume: the rest runs.
#[tokio::test]
async fn a_canary_that_finishes_during_a_pause_lets_the_rest_run_after_resume() {
    let app = TestApp::spawn_with(Options {
        faults: Faults {
            latency_ms: 300,
            ..Faults::default()
        },
        ..Options::default()
    })
    .await;
    let (stop, worker) = app.start_worker();
    assert!(
        app.command(declare("R-pause-canary", 8, json!({"canary": 2})))
            .await
            .ok
    );
    for n in 2800..2808 {
        app.publish_job(&rollout_job("R-pause-canary", n)).await;
    }
    wait_until(Duration::from_secs(20), || async {
        app.status("R-pause-canary").await.counts.in_flight == 2
    })
    .await;
    assert!(
        app.command(json!({"kind": "pause", "rollout_id": "R-pause-canary"}))
            .await
            .ok
    );
    wait_until(Duration::from_secs(20), || async {
        let s = app.status("R-pause-canary").await;
        s.counts.succeeded == 2 && s.counts.parked == 6
    })
    .await;
    assert!(!app.status("R-pause-canary").await.canary_done);
    assert!(
        app.command(json!({"kind": "resume", "rollout_id": "R-pause-canary"}))
            .await
            .ok
    );
    let done = app.wait_for_state("R-pause-canary", State::Completed).await;
    assert_eq!(done.counts.succeeded, 8);
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

/// A stray invalid message naming a finished job does not rewrite that job's outcome, and a
/// redelivered retry_failed does not retry a second time.
#[tokio::test]
async fn stray_rejections_and_redelivered_commands_leave_the_counts_alone() {
    let app = TestApp::spawn().await;
    let (stop, worker) = app.start_worker();
    assert!(
        app.command(declare("R-stray", 3, json!({"failure_budget": 1})))
            .await
            .ok
    );
    doom(&app, 2900);
    for n in 2900..2903 {
        app.publish_job(&rollout_job("R-stray", n)).await;
    }
    app.wait_for_state("R-stray", State::Completed).await;
    let mut stray = rollout_job("R-stray", 2901);
    stray["kms_key_id"] = json!("not-a-uuid");
    app.publish_job(&stray).await;
    wait_until(Duration::from_secs(20), || async {
        outcomes(&app, "R-stray").len() == 4
    })
    .await;
    let counts = app.status("R-stray").await.counts;
    assert_eq!(
        (counts.succeeded, counts.failed, counts.rejected),
        (2, 1, 0),
        "the stray rejection changed nothing"
    );

    // A retry whose delivery comes twice (same message id) is applied once, even after its
    // rerun failed again.
    let retry = json!({"kind": "retry_failed", "rollout_id": "R-stray"});
    app.send_command(&retry, "retry-1", None).await;
    wait_until(Duration::from_secs(20), || async {
        outcomes(&app, "R-stray").len() == 5
    })
    .await;
    app.send_command(&retry, "retry-1", None).await;
    let status = app.status("R-stray").await; // answered after the redelivery, in order
    assert_eq!(status.counts.failed, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = rows(
        &app.audit_path(),
        "SELECT rerun FROM toggles WHERE rollout_id = 'R-stray' AND outcome <> 'rejected' ORDER BY rerun DESC LIMIT 1",
    );
    assert_eq!(runs, vec![json!({"rerun": 1})], "no second retry");
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

/// Commands sent back to back are applied in the order sent.
#[tokio::test]
async fn commands_are_applied_in_the_order_they_were_sent() {
    let app = TestApp::spawn().await;
    let (stop, worker) = app.start_worker();
    assert!(app.command(declare("R-order", 5, json!({}))).await.ok);
    for round in 0..10 {
        app.send_command(
            &json!({"kind": "pause", "rollout_id": "R-order"}),
            &format!("p-{round}"),
            None,
        )
        .await;
        app.send_command(
            &json!({"kind": "resume", "rollout_id": "R-order"}),
            &format!("r-{round}"),
            None,
        )
        .await;
    }
    assert_eq!(app.status("R-order").await.state, State::Running);
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

/// A failure that both halts and completes a rollout sends `halted` (state halted), then
/// `completed` (state completed).
#[tokio::test]
async fn each_rollout_event_carries_the_state_its_change_made() {
    let app = TestApp::spawn().await;
    let events_queue = app.follow_rollout_events().await;
    let (stop, worker) = app.start_worker();
    assert!(
        app.command(declare("R-last", 1, json!({"failure_budget": 0})))
            .await
            .ok
    );
    doom(&app, 3100);
    app.publish_job(&rollout_job("R-last", 3100)).await;
    app.wait_for_state("R-last", State::Completed).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = app.rollout_events(&events_queue).await;
    let states: Vec<(String, State)> = events
        .iter()
        .filter(|e| matches!(e.kind.as_str(), "halted" | "completed"))
        .map(|e| (e.kind.clone(), e.data.state))
        .collect();
    assert_eq!(
        states,
        vec![
            ("halted".to_owned(), State::Halted),
            ("completed".to_owned(), State::Completed)
        ]
    );
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

/// Jobs admitted before a pause but still waiting for the rollout's rate cap check the rollout
/// again before their first Modify, and park.
#[tokio::test]
async fn a_pause_stops_jobs_already_admitted_before_their_first_call() {
    let app = TestApp::spawn().await;
    let (stop, worker) = app.start_worker();
    assert!(
        app.command(declare("R-late", 4, json!({"max_per_second": 1})))
            .await
            .ok
    );
    for n in 3200..3204 {
        app.publish_job(&rollout_job("R-late", n)).await;
    }
    wait_until(Duration::from_secs(20), || async {
        outcomes(&app, "R-late").len() == 1
    })
    .await;
    assert!(
        app.command(json!({"kind": "pause", "rollout_id": "R-late"}))
            .await
            .ok
    );
    wait_until(Duration::from_secs(20), || async {
        let s = app.status("R-late").await;
        s.counts.parked + s.counts.finished() == 4 && s.counts.in_flight == 0
    })
    .await;
    let snapshot = app.status("R-late").await;
    assert!(snapshot.counts.parked >= 2, "{snapshot:?}");
    assert_eq!(
        app.stats()
            .instances
            .values()
            .map(|i| i.modify_calls)
            .sum::<u64>(),
        snapshot.counts.finished(),
        "no call after the pause"
    );
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

/// Jobs that claimed their key and wait for a call slot when the worker stops leave no in-flight
/// marker: nothing was sent under it, so their rollout does not count them in flight and a later
/// cancel would record them cancelled unsent rather than run them.
#[tokio::test]
async fn jobs_waiting_for_a_call_slot_at_shutdown_leave_no_marker() {
    let app = TestApp::spawn_with(Options {
        faults: Faults {
            latency_ms: 1_500,
            ..Faults::default()
        },
        tweak: Box::new(|settings| {
            settings.worker.concurrency = 1;
            settings.worker.prefetch = 4;
        }),
        ..Options::default()
    })
    .await;
    let (stop, worker) = app.start_worker();
    assert!(app.command(declare("R-slots", 4, json!({}))).await.ok);
    for n in 3400..3404 {
        app.publish_job(&rollout_job("R-slots", n)).await;
    }
    // One job is in its call; the other three claimed their keys and wait for the slot.
    wait_until(Duration::from_secs(20), || async {
        app.stats().requests == 1 && app.status("R-slots").await.counts.in_flight == 4
    })
    .await;
    stop.cancel();
    worker.await.unwrap();
    assert_eq!(
        app.store_rows("SELECT job_id FROM in_flight"),
        Vec::<Value>::new(),
        "the call in flight finished within the grace period; the waiting jobs dropped their markers"
    );
    assert_eq!(app.stats().requests, 1, "one call only");
    app.cleanup().await;
}

/// A worker whose every job slot is busy still reads and answers commands.
#[tokio::test]
async fn commands_are_answered_while_every_job_slot_is_busy() {
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|settings| settings.worker.concurrency = 1),
        ..Options::default()
    })
    .await;
    app.simulator.script(
        &instance(3300),
        vec![Step::Hang {
            ms: 4_000,
            apply: true,
        }],
    );
    let (stop, worker) = app.start_worker();
    app.publish_job(&job("J-busy", 3300, "on")).await;
    wait_until(Duration::from_secs(10), || async {
        app.stats().instances.contains_key(&instance(3300))
    })
    .await;
    let asked = tokio::time::Instant::now();
    let reply = app.command(json!({"kind": "status"})).await;
    assert!(reply.ok);
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "answered while the only slot hangs: {:?}",
        asked.elapsed()
    );
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

/// Commands without a message id are applied every time; one whose `reply_to` names keyturn's
/// own queue is dead-lettered with the reason, unanswered.
#[tokio::test]
async fn commands_without_an_id_apply_each_time_and_a_bad_reply_to_is_refused() {
    let app = TestApp::spawn().await;
    let (stop, worker) = app.start_worker();
    assert!(app.command(declare("R-noid", 2, json!({}))).await.ok);
    let pause = json!({"kind": "pause", "rollout_id": "R-noid"});
    app.send_command(&pause, "", None).await;
    app.send_command(&json!({"kind": "resume", "rollout_id": "R-noid"}), "", None)
        .await;
    app.send_command(&pause, "", None).await;
    assert_eq!(app.status("R-noid").await.state, State::Paused);

    let jobs_queue = app.settings.amqp.jobs_queue.clone();
    app.send_command(
        &json!({"kind": "status", "rollout_id": "R-noid"}),
        "bad-reply",
        Some(&jobs_queue),
    )
    .await;
    let dead_queue = app.settings.amqp.dead_queue.clone();
    wait_until(Duration::from_secs(10), || async {
        app.queue_len(&dead_queue).await == 1
    })
    .await;
    let dead = app
        .channel
        .basic_get(dead_queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    let headers = dead.delivery.properties.headers().clone().unwrap();
    let Some(lapin::types::AMQPValue::LongString(reason)) = headers.inner().get("keyturn-error")
    else {
        panic!("no reason")
    };
    assert!(
        String::from_utf8_lossy(reason.as_bytes()).contains("reply_to: names keyturn's own queue")
    );
    assert_eq!(app.queue_len(&jobs_queue).await, 0, "nothing injected");
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

/// SIGKILL while a cancel ends hundreds of parked jobs: the next worker finishes the cancel,
/// each job ends `cancelled` once, and nothing reaches the API.
#[tokio::test]
async fn sigkill_while_cancelling_loses_nothing_and_calls_nothing() {
    const FIRST: u32 = 3400;
    const TOTAL: u32 = 600;
    let app = TestApp::spawn().await;
    let spawn = || {
        app.worker_process(&[("KEYTURN_WORKER__CONCURRENCY", "8")])
            .spawn()
            .unwrap()
    };
    let parked = || parked(&app);
    let mut worker = spawn();
    app.wait_for_audit().await;
    assert!(
        app.command(declare("R-kill-cancel", TOTAL, json!({})))
            .await
            .ok
    );
    assert!(
        app.command(json!({"kind": "pause", "rollout_id": "R-kill-cancel"}))
            .await
            .ok
    );
    for n in FIRST..FIRST + TOTAL {
        app.publish_job(&rollout_job("R-kill-cancel", n)).await;
    }
    wait_until(Duration::from_secs(60), || async {
        parked() == TOTAL as usize
    })
    .await;
    assert!(
        app.command(json!({"kind": "cancel", "rollout_id": "R-kill-cancel"}))
            .await
            .ok
    );
    poll_until(|| outcomes(&app, "R-kill-cancel").len() >= 20).await;
    worker.kill().await.unwrap();
    let done = outcomes(&app, "R-kill-cancel").len();
    assert!(
        done < TOTAL as usize,
        "killed while cancelling: {done} done"
    );

    worker = spawn();
    wait_until(Duration::from_secs(90), || async {
        outcomes(&app, "R-kill-cancel").len() == TOTAL as usize
    })
    .await;
    let rows = outcomes(&app, "R-kill-cancel");
    assert!(rows.iter().all(|r| r["outcome"] == "cancelled"));
    let job_ids: HashSet<&str> = rows.iter().map(|r| r["job_id"].as_str().unwrap()).collect();
    assert_eq!(job_ids.len(), TOTAL as usize, "one row per job");
    assert_eq!(app.stats().requests, 0, "nothing reached the API");
    wait_until(Duration::from_secs(30), || async { parked() == 0 }).await;
    let snapshot = app.status("R-kill-cancel").await;
    assert_eq!(snapshot.counts.cancelled, u64::from(TOTAL));
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    app.cleanup().await;
}
