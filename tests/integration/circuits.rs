//! Faults of the deployment hold work and heal; they never turn into per-job failures. Each test
//! runs the real `keyturn` binary against the real broker and the simulator over a socket.

use std::process::Stdio;
use std::time::Duration;

use keyturn::events::Outcome;

use crate::helpers::*;

/// ERROR lines of `stderr` that contain `text`.
fn error_lines(stderr: &str, text: &str) -> usize {
    stderr
        .lines()
        .filter(|line| line.contains(" ERROR ") && line.contains(text))
        .count()
}

/// Every job of `jobs` has one final row, succeeded, under its own job id; nothing failed,
/// nothing was dead-lettered, nothing is left parked.
async fn assert_every_job_succeeded(app: &TestApp, jobs: &[(String, u32, &str)]) {
    wait_until(Duration::from_secs(120), || async {
        app.toggles().len() >= jobs.len()
    })
    .await;
    let toggles = app.toggles();
    assert_eq!(toggles.len(), jobs.len());
    for row in &toggles {
        assert_eq!(row["outcome"], "succeeded", "{row}");
    }
    let mut recorded: Vec<&str> = toggles
        .iter()
        .map(|row| row["job_id"].as_str().unwrap())
        .collect();
    recorded.sort_unstable();
    let mut expected: Vec<&str> = jobs.iter().map(|(id, _, _)| id.as_str()).collect();
    expected.sort_unstable();
    assert_eq!(recorded, expected, "every job ran under its own job id");
    for (job_id, n, status) in jobs {
        assert_eq!(
            app.simulator.status_of(PROJECT, &instance(*n)).as_deref(),
            Some(*status),
            "{job_id}"
        );
    }
    assert!(app.dead_letters().await.is_empty(), "nothing dead-lettered");
    assert_eq!(parked(app), 0, "nothing left parked");
}

#[tokio::test]
async fn wrong_keys_hold_every_job_until_the_keys_are_accepted_then_all_succeed() {
    let app = TestApp::spawn().await;
    let jobs = publish_fleet(&app, 30, 500).await;
    let mut worker = app
        .worker_process(&[
            ("CLOUD_SDK_SK", "wrong-secret-3b1f-never-log-me"),
            ("KEYTURN_WORKER__CONCURRENCY", "4"),
            ("KEYTURN_CIRCUIT__PROBE_INTERVAL", "200ms"),
            ("KEYTURN_CIRCUIT__PROBE_MAX_INTERVAL", "1s"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    app.wait_for_audit().await;

    // The first refusal opens the credentials circuit: the jobs already delivered are parked,
    // and the worker stops taking deliveries, so the rest wait in the queue.
    wait_until(Duration::from_secs(30), || async {
        parked(&app) >= 1 && app.consumers(&app.settings.amqp.jobs_queue).await == 0
    })
    .await;
    wait_until(Duration::from_secs(10), || async {
        parked(&app) as u32 + app.queue_len(&app.settings.amqp.jobs_queue).await == 30
    })
    .await;
    let taken = parked(&app);
    eprintln!("parked while the circuit opened: {taken}");
    assert!(
        taken <= 12,
        "the worker stopped taking deliveries: {taken} parked"
    );
    let refused = app.stats().auth_failures;
    wait_until(Duration::from_secs(10), || async {
        app.stats().auth_failures >= refused + 2
    })
    .await;
    assert_eq!(
        parked(&app),
        taken,
        "probes fail, and nothing more is taken meanwhile"
    );
    // Only a job whose Modify went out keeps its in-flight marker; a job that claimed its key
    // and was parked while it waited for a call slot dropped its own.
    let marked = app.store_rows("SELECT job_id FROM in_flight").len();
    let sent = app
        .stats()
        .recent
        .iter()
        .filter(|request| request.method == "POST")
        .count();
    assert!(
        marked <= sent,
        "{marked} markers for {sent} Modify requests sent ({taken} jobs parked)"
    );
    assert!(
        app.toggles().is_empty(),
        "no job ended while the keys were wrong"
    );
    assert_eq!(
        app.stats()
            .instances
            .values()
            .map(|i| i.toggles_applied)
            .sum::<u64>(),
        0
    );

    // The operator fixes the keys (here: the API learns to accept them); the probe passes.
    app.simulator.set_credentials(
        vec![(
            AK.into(),
            "wrong-secret-3b1f-never-log-me".to_owned().into(),
        )],
        vec![TOKEN.to_owned().into()],
    );
    assert_every_job_succeeded(&app, &jobs).await;
    let events = app.events(jobs.len()).await;
    assert!(events.iter().all(|e| e.data.outcome == Outcome::Succeeded));

    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    let stderr = stderr_of(&mut worker).await;
    let opened: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("circuit opened:"))
        .collect();
    assert_eq!(opened.len(), 1, "one ERROR line when it opens: {stderr}");
    assert!(opened[0].contains("ERROR"), "{}", opened[0]);
    assert!(
        opened[0].contains(
            "credentials refused by cn-north-4 (APIGW.0301): check CLOUD_SDK_AK/CLOUD_SDK_SK"
        ),
        "{}",
        opened[0]
    );
    assert_eq!(error_lines(&stderr, "circuit closed:"), 1, "{stderr}");
    assert!(!stderr.contains("never-log-me"), "no secret in the logs");
    app.cleanup().await;
}

#[tokio::test]
async fn an_endpoint_down_for_a_minute_fails_no_job() {
    let app = TestApp::spawn().await;
    let mut worker = app
        .worker_process(&[
            ("KEYTURN_CIRCUIT__PROBE_INTERVAL", "500ms"),
            ("KEYTURN_CIRCUIT__PROBE_MAX_INTERVAL", "2s"),
            ("KEYTURN_RETRY__DEADLINE", "10s"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    app.wait_for_audit().await;
    wait_until(Duration::from_secs(30), || async {
        app.consumers(&app.settings.amqp.jobs_queue).await == 1
    })
    .await;
    app.simulator_down().await;
    let down_at = tokio::time::Instant::now();
    let jobs = publish_fleet(&app, 20, 600).await;

    // The region's circuit opens on the first connect error; every job is parked, none is held
    // in a prefetch slot, none fails.
    wait_until(Duration::from_secs(30), || async { parked(&app) == 20 }).await;
    assert_eq!(app.queue_len(&app.settings.amqp.jobs_queue).await, 0);
    tokio::time::sleep_until(down_at + Duration::from_secs(60)).await;
    assert!(
        app.toggles().is_empty(),
        "a minute of outage failed nothing"
    );

    app.simulator_up().await;
    assert_every_job_succeeded(&app, &jobs).await;
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    let stderr = stderr_of(&mut worker).await;
    let opened: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("circuit opened:"))
        .collect();
    assert_eq!(opened.len(), 1, "{stderr}");
    assert!(
        opened[0].contains("the endpoint of cn-north-4 is unreachable"),
        "{}",
        opened[0]
    );
    assert_eq!(error_lines(&stderr, "circuit closed:"), 1, "{stderr}");
    app.cleanup().await;
}

/// Waiting for rate-limit tokens is not the job's time: 2,000 jobs of one project behind a
/// 20/s limit, with a 10 s deadline, all succeed. With 400 taken at once, each waits up to 20 s
/// for its token: twice the deadline.
#[tokio::test]
async fn two_thousand_jobs_of_one_project_at_20_per_second_fail_none() {
    let app = TestApp::spawn().await;
    let count = 2_000;
    let jobs: Vec<(String, u32, &str)> = (0..count)
        .map(|i| (format!("J-rate-{i}"), 10_000 + i, "on"))
        .collect();
    for (job_id, n, status) in &jobs {
        app.publish_job(&job(job_id, *n, status)).await;
    }
    let mut worker = app
        .worker_process(&[
            ("KEYTURN_WORKER__CONCURRENCY", "400"),
            ("KEYTURN_RATE_LIMIT__PER_PROJECT_PER_SECOND", "20"),
            ("KEYTURN_RATE_LIMIT__PER_PROJECT_BURST", "1"),
            ("KEYTURN_RETRY__DEADLINE", "10s"),
        ])
        .spawn()
        .unwrap();
    app.wait_for_audit().await;
    let started = tokio::time::Instant::now();
    wait_until(Duration::from_secs(300), || async {
        app.toggles().len() == count as usize
    })
    .await;
    let took = started.elapsed();
    let failed = rows(
        &app.audit_path(),
        "SELECT job_id FROM toggles WHERE outcome <> 'succeeded'",
    );
    assert!(failed.is_empty(), "{} jobs did not succeed", failed.len());
    assert!(
        took >= Duration::from_secs(90),
        "the limit held: {took:?} for {count} jobs at 20/s"
    );
    eprintln!("2,000 jobs at 20/s: {took:?}");
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    app.cleanup().await;
}

/// A job that waits longer than `worker.max_hold` goes back to the queue's tail as a fresh
/// message (no delivery spent) and still runs once. It waited after its claim had written the
/// in-flight marker, and drops it on the way back: its next run does not Describe first.
#[tokio::test]
async fn a_job_held_too_long_is_handed_back_and_still_runs_once() {
    let app = TestApp::spawn().await;
    let jobs: Vec<(String, u32, &str)> = (0..8)
        .map(|i| (format!("J-hold-{i}"), 700 + i, "on"))
        .collect();
    for (job_id, n, status) in &jobs {
        app.publish_job(&job(job_id, *n, status)).await;
    }
    let mut worker = app
        .worker_process(&[
            ("KEYTURN_WORKER__CONCURRENCY", "8"),
            ("KEYTURN_WORKER__MAX_HOLD", "1s"),
            ("KEYTURN_RATE_LIMIT__PER_PROJECT_PER_SECOND", "2"),
            ("KEYTURN_RATE_LIMIT__PER_PROJECT_BURST", "1"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    app.wait_for_audit().await;
    assert_every_job_succeeded(&app, &jobs).await;
    let stats = app.stats();
    for (job_id, n, _) in &jobs {
        assert_eq!(stats.instances[&instance(*n)].modify_calls, 1, "{job_id}");
        assert_eq!(
            stats.instances[&instance(*n)].describe_calls,
            0,
            "{job_id}: handed back unsent, it left no marker to make its next run ask first"
        );
    }
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    let stderr = stderr_of(&mut worker).await;
    assert!(
        stderr.contains("handing it back to the queue"),
        "at 2/s, 8 jobs cannot all start within 1 s: {stderr}"
    );
    app.cleanup().await;
}
