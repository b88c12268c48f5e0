//! Fleet-wide rate limits: four `keyturn worker` processes on one PostgreSQL store share one
//! global limit through the store's token buckets.
//!
//! A test binary of its own: cargo runs test binaries one after another, so the rate it measures
//! is not bent by the integration suite's other tests competing for the same two cores.

#[allow(dead_code)]
#[path = "integration/helpers.rs"]
mod helpers;

use std::time::Duration;

use helpers::*;

// The simulator answers on this test's runtime: with two threads, the store reads the test makes
// while it waits (blocking calls) do not hold its answers back and bunch them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_share_one_global_rate_limit_through_the_store() {
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
    // Four worker processes, as four hosts would run them.
    let (per_second, burst) = (PER_SECOND.to_string(), BURST.to_string());
    let mut workers = Vec::new();
    for n in 0..4 {
        let id = format!("{}-{n}", app.settings.worker.id);
        workers.push(
            app.worker_process(&[
                ("KEYTURN_WORKER__ID", id.as_str()),
                ("KEYTURN_RATE_LIMIT__PER_SECOND", per_second.as_str()),
                ("KEYTURN_RATE_LIMIT__BURST", burst.as_str()),
            ])
            .spawn()
            .unwrap(),
        );
    }
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
    let mut times: Vec<i64> = app
        .stats()
        .recent
        .iter()
        .filter(|request| request.method == "POST")
        .map(|request| request.at_ms)
        .collect();
    times.sort_unstable();
    assert_eq!(times.len(), jobs.len(), "one Modify per job");
    // Calls per second of the clock (as a gateway counts them), and the busiest sliding second.
    let mut per_second = std::collections::BTreeMap::<i64, usize>::new();
    for at in &times {
        *per_second.entry(at / 1_000).or_default() += 1;
    }
    let busiest = per_second.values().copied().max().unwrap();
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
    // After the burst, calls come at the configured rate.
    let steady = &times[BURST as usize..];
    let span_ms = (steady[steady.len() - 1] - steady[0]) as f64;
    let achieved = (steady.len() - 1) as f64 * 1_000.0 / span_ms;
    eprintln!(
        "fleet rate: 4 worker processes, limit {PER_SECOND}/s burst {BURST}: calls per second {:?}, busiest sliding second {sliding}, achieved {achieved:.2}/s ({:.3} of the limit)",
        per_second.values().collect::<Vec<_>>(),
        achieved / f64::from(PER_SECOND)
    );
    assert!(
        busiest <= (PER_SECOND + BURST) as usize,
        "{busiest} calls in one second: {per_second:?}"
    );
    assert!(
        achieved >= 0.95 * f64::from(PER_SECOND),
        "achieved {achieved:.2}/s"
    );
    let workers_seen: std::collections::BTreeSet<_> = app
        .toggles()
        .iter()
        .map(|row| row["worker_id"].to_string())
        .collect();
    assert_eq!(workers_seen.len(), 4, "all four workers called");
    for mut worker in workers {
        assert_eq!(
            terminate(&mut worker, Duration::from_secs(30)).await,
            Some(0)
        );
    }
    app.cleanup().await;
}
