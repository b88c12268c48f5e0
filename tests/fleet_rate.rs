//! Fleet-wide rate limits: `keyturn worker` processes on one PostgreSQL store share the global,
//! per-project and per-rollout limits through the store's token buckets.
//!
//! A test binary of its own: cargo runs test binaries one after another, so the rates it measures
//! are not bent by the integration suite's other tests competing for the same two cores; and its
//! tests take turns ([`one_at_a_time`]) for the same reason.

#[allow(dead_code)]
#[path = "integration/helpers.rs"]
mod helpers;

use std::time::Duration;

use helpers::*;
use serde_json::json;

/// Held by each test for its whole run: the rates one measures are not bent by another's load.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// `count` worker processes on `app`, as that many hosts would run them, with `limits` set.
fn spawn_workers(
    app: &TestApp,
    count: usize,
    limits: &[(&str, u32)],
) -> Vec<tokio::process::Child> {
    (0..count)
        .map(|n| {
            let id = format!("{}-{n}", app.settings.worker.id);
            let limits: Vec<(&str, String)> = limits
                .iter()
                .map(|(name, value)| (*name, value.to_string()))
                .collect();
            let mut env: Vec<(&str, &str)> = vec![("KEYTURN_WORKER__ID", id.as_str())];
            env.extend(limits.iter().map(|(name, value)| (*name, value.as_str())));
            app.worker_process(&env).spawn().unwrap()
        })
        .collect()
}

/// Stops every worker with SIGTERM; each must exit 0.
async fn stop_workers(workers: Vec<tokio::process::Child>) {
    for mut worker in workers {
        assert_eq!(
            terminate(&mut worker, Duration::from_secs(30)).await,
            Some(0)
        );
    }
}

/// Modify (POST) answer times by the simulator's clock, sorted, of the instances `instances`.
fn modify_times(app: &TestApp, instances: &std::collections::HashSet<String>) -> Vec<i64> {
    let mut times: Vec<i64> = app
        .stats()
        .recent
        .iter()
        .filter(|request| request.method == "POST")
        .filter(|request| {
            request
                .instance_id
                .as_ref()
                .is_some_and(|id| instances.contains(id))
        })
        .map(|request| request.at_ms)
        .collect();
    times.sort_unstable();
    times
}

/// Calls at `times` (sorted ms) kept to `rate`/s with `burst`: never more than rate + burst in
/// one second of the clock (as a gateway counts them), and after the first `burst` calls at
/// least `floor` × `rate` per second.
fn assert_within_limit(label: &str, times: &[i64], rate: u32, burst: u32, floor: f64) {
    let mut per_second = std::collections::BTreeMap::<i64, usize>::new();
    for at in times {
        *per_second.entry(at / 1_000).or_default() += 1;
    }
    let busiest = per_second.values().copied().max().unwrap_or(0);
    let steady = &times[burst as usize..];
    let span_ms = (steady[steady.len() - 1] - steady[0]) as f64;
    let achieved = (steady.len() - 1) as f64 * 1_000.0 / span_ms;
    eprintln!(
        "{label}: limit {rate}/s burst {burst}: busiest second {busiest}, achieved {achieved:.2}/s ({:.3} of the limit)",
        achieved / f64::from(rate)
    );
    assert!(
        busiest <= (rate + burst) as usize,
        "{label}: {busiest} calls in one second, limit {rate}/s burst {burst}"
    );
    assert!(
        achieved >= floor * f64::from(rate),
        "{label}: achieved {achieved:.2}/s of {rate}/s"
    );
}

// The simulator answers on this test's runtime: with two threads, the store reads the test makes
// while it waits (blocking calls) do not hold its answers back and bunch them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_share_one_global_rate_limit_through_the_store() {
    let _turn = one_at_a_time().await;
    const PER_SECOND: u32 = 60;
    const BURST: u32 = 5;
    let app = TestApp::spawn_with(Options {
        postgres: true,
        tweak: Box::new(|s| {
            s.rate_limit.per_second = PER_SECOND;
            s.rate_limit.burst = BURST;
            s.rate_limit.per_project_per_second = 1_000;
            s.rate_limit.per_project_burst = 100;
        }),
        ..Options::default()
    })
    .await;
    let jobs = publish_fleet(&app, 600, 1_000).await;
    let workers = spawn_workers(
        &app,
        4,
        &[
            ("KEYTURN_RATE_LIMIT__PER_SECOND", PER_SECOND),
            ("KEYTURN_RATE_LIMIT__BURST", BURST),
        ],
    );
    app.wait_for_audit().await;
    // The simulator's count first (no store read while the calls go on), then the records.
    wait_until(Duration::from_secs(60), || async {
        app.stats().recent.len() >= jobs.len()
    })
    .await;
    wait_until(Duration::from_secs(30), || async {
        app.toggles().len() == jobs.len()
    })
    .await;
    let instances = (1_000..1_000 + jobs.len() as u32).map(instance).collect();
    let times = modify_times(&app, &instances);
    assert_eq!(times.len(), jobs.len(), "one Modify per job");
    assert_within_limit(
        "fleet rate, 4 worker processes",
        &times,
        PER_SECOND,
        BURST,
        0.95,
    );
    // The busiest sliding second, for the record.
    let sliding = times
        .iter()
        .enumerate()
        .map(|(i, start)| {
            times[i..]
                .iter()
                .take_while(|t| **t < start + 1_000)
                .count()
        })
        .max()
        .unwrap();
    eprintln!("fleet rate: busiest sliding second {sliding}");
    let workers_seen: std::collections::BTreeSet<_> = app
        .toggles()
        .iter()
        .map(|row| row["worker_id"].to_string())
        .collect();
    assert_eq!(workers_seen.len(), 4, "all four workers called");
    stop_workers(workers).await;
    app.cleanup().await;
}

/// Two workers share a project's limit and a rollout's cap: each worker alone would allow as
/// much again (its own limiter has the same numbers), so only the store's buckets keep the
/// fleet within them. One project's jobs run at 20/s while a declared rollout's jobs, in another
/// project, run at its `max_per_second` of 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_project_limit_and_a_rollout_cap_through_the_store() {
    let _turn = one_at_a_time().await;
    const PROJECT_RATE: u32 = 20;
    const PROJECT_BURST: u32 = 2;
    const ROLLOUT_RATE: u32 = 10;
    const OTHER_PROJECT: &str = "5c0d1e2f3a4b5c6d7e8f90a1b2c3d4e5";
    let app = TestApp::spawn_with(Options {
        postgres: true,
        tweak: Box::new(|s| {
            s.rate_limit.per_second = 1_000;
            s.rate_limit.burst = 100;
            s.rate_limit.per_project_per_second = PROJECT_RATE;
            s.rate_limit.per_project_burst = PROJECT_BURST;
        }),
        ..Options::default()
    })
    .await;
    let workers = spawn_workers(
        &app,
        2,
        &[
            ("KEYTURN_RATE_LIMIT__PER_PROJECT_PER_SECOND", PROJECT_RATE),
            ("KEYTURN_RATE_LIMIT__PER_PROJECT_BURST", PROJECT_BURST),
        ],
    );
    app.wait_for_audit().await;
    let reply = app
        .command(
            json!({"kind": "rollout", "rollout_id": "R-capped", "ticket": "CHG-9",
            "expected_jobs": 80, "requested_by": "ops", "max_per_second": ROLLOUT_RATE}),
        )
        .await;
    assert!(reply.ok, "{reply:?}");
    // 160 jobs of the first project (an undeclared rollout: no cap) and 80 of the capped
    // rollout in the other project, interleaved.
    let (mut project_jobs, mut rollout_jobs) = (Vec::new(), Vec::new());
    for n in 0..160 {
        let id = format!("J-p-{n}");
        app.publish_job(&job(&id, 2_000 + n, "on")).await;
        project_jobs.push(instance(2_000 + n));
        if n % 2 == 0 {
            let n = 3_000 + n / 2;
            let mut body = job(&format!("J-r-{n}"), n, "on");
            body["project_id"] = json!(OTHER_PROJECT);
            body["rollout_id"] = json!("R-capped");
            app.publish_job(&body).await;
            rollout_jobs.push(instance(n));
        }
    }
    let total = project_jobs.len() + rollout_jobs.len();
    wait_until(Duration::from_secs(60), || async {
        app.stats().recent.len() >= total
    })
    .await;
    wait_until(Duration::from_secs(30), || async {
        app.toggles().len() == total
    })
    .await;
    // A rollout's bucket holds one token (burst 1), so it cannot bank the few ms each take comes
    // late by (a store round trip and the timer): it reached 0.966–0.968 of its cap in four
    // runs, where the project's bucket of two reached 1.000–1.006.
    for (label, instances, rate, burst, floor) in [
        ("project", project_jobs, PROJECT_RATE, PROJECT_BURST, 0.95),
        ("rollout", rollout_jobs, ROLLOUT_RATE, 1, 0.9),
    ] {
        let count = instances.len();
        let times = modify_times(&app, &instances.into_iter().collect());
        assert_eq!(times.len(), count, "{label}: one Modify per job");
        assert_within_limit(&format!("{label} on 2 workers"), &times, rate, burst, floor);
    }
    // Each stream ran on both workers: one worker alone would keep its own limiter's numbers.
    let rows = app.toggles();
    for project in [PROJECT, OTHER_PROJECT] {
        let workers_seen: std::collections::BTreeSet<_> = rows
            .iter()
            .filter(|row| row["project_id"] == project)
            .map(|row| row["worker_id"].to_string())
            .collect();
        assert_eq!(workers_seen.len(), 2, "both workers called for {project}");
    }
    stop_workers(workers).await;
    app.cleanup().await;
}
