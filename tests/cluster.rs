//! A worker with `amqp.urls` = the three nodes of a local RabbitMQ cluster, while the node that
//! leads the jobs queue (a quorum queue replicated on all three) is stopped mid-run.
//!
//! `tests/cluster.sh` forms the cluster and runs this test with `--ignored`, passing the nodes in
//! `KEYTURN_TEST_CLUSTER_URLS`, `KEYTURN_TEST_CLUSTER_NODES` and the cluster's `rabbitmqctl` in
//! `KEYTURN_TEST_CLUSTER_CTL`. Without them the test fails (it is ignored by a plain `cargo
//! test`, which has no cluster).

#[allow(dead_code)]
#[path = "integration/helpers.rs"]
mod helpers;

use std::time::Duration;

use helpers::*;
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};

/// The cluster `tests/cluster.sh` formed: node `i` listens at `urls[i]`.
struct Cluster {
    urls: Vec<String>,
    nodes: Vec<String>,
    ctl: String,
}

impl Cluster {
    fn from_env() -> Cluster {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is unset: run this test through tests/cluster.sh, which forms the cluster")
            })
        };
        let list = |name: &str| var(name).split(',').map(str::to_owned).collect::<Vec<_>>();
        let cluster = Cluster {
            urls: list("KEYTURN_TEST_CLUSTER_URLS"),
            nodes: list("KEYTURN_TEST_CLUSTER_NODES"),
            ctl: var("KEYTURN_TEST_CLUSTER_CTL"),
        };
        assert_eq!(cluster.urls.len(), 3, "three node URLs");
        assert_eq!(cluster.nodes.len(), 3, "three node names");
        cluster
    }

    /// `rabbitmqctl -n <node> args...`; its stdout, or a panic with its stderr.
    fn ctl(&self, node: usize, args: &[&str]) -> String {
        let output = std::process::Command::new(&self.ctl)
            .args(["-q", "-n", &self.nodes[node]])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?} on {}: {}",
            self.nodes[node],
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// The index of the node that leads `queue`, and the queue's members, as node `asked` sees
    /// them.
    fn leader(&self, asked: usize, queue: &str) -> (Option<usize>, Vec<String>) {
        let listed = self.ctl(
            asked,
            &[
                "list_queues",
                "name",
                "leader",
                "members",
                "--formatter",
                "json",
            ],
        );
        let queues: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
        let row = queues
            .iter()
            .find(|row| row["name"] == queue)
            .unwrap_or_else(|| panic!("{queue} is not listed: {listed}"));
        let leader = row["leader"].as_str().unwrap_or_default();
        let members = row["members"]
            .as_array()
            .map(|members| {
                let names = members.iter().filter_map(|member| member.as_str());
                names.map(str::to_owned).collect()
            })
            .unwrap_or_default();
        (self.nodes.iter().position(|node| node == leader), members)
    }

    /// Stops node `node`'s RabbitMQ application; it starts again when the guard drops, so the
    /// next test finds three nodes whatever happened in this one.
    fn stop(&self, node: usize) -> StoppedNode<'_> {
        self.ctl(node, &["stop_app"]);
        StoppedNode {
            cluster: self,
            node,
        }
    }
}

struct StoppedNode<'a> {
    cluster: &'a Cluster,
    node: usize,
}

impl Drop for StoppedNode<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.cluster.ctl)
            .args(["-q", "-n", &self.cluster.nodes[self.node], "start_app"])
            .status();
    }
}

#[tokio::test]
#[ignore = "needs the 3-node cluster of tests/cluster.sh"]
async fn losing_the_node_that_leads_the_jobs_queue_moves_the_worker_on_and_loses_nothing() {
    let cluster = Cluster::from_env();
    // Quorum queues get their leader on the node that declares them, classic queues (keyturn's
    // unrouted queue, the test's own) live there. The quorum queues are declared on node 2 and
    // the rest on node 1, so the leader's node can stop while the classic queues stay up.
    let name = unique("kt-cluster");
    let names = queue_names(&name);
    declare_quorum_queues_on(&cluster.urls[1], &name, &names).await;
    let first = cluster.urls[0].clone();
    let app = TestApp::spawn_with(Options {
        faults: keyturn::simulator::Faults {
            latency_ms: 100,
            ..Default::default()
        },
        tweak: Box::new(move |settings| {
            names(settings);
            settings.amqp.url = first;
        }),
        ..Options::default()
    })
    .await;
    quorum_events_queue(&app).await;
    let jobs_queue = app.settings.amqp.jobs_queue.clone();
    let (leader, members) = cluster.leader(0, &jobs_queue);
    let leader = leader.expect("the jobs queue has a leader");
    assert_eq!(
        leader, 1,
        "the jobs queue is led by the node that declared it"
    );
    let mut all = cluster.nodes.clone();
    all.sort();
    let mut members = members;
    members.sort();
    assert_eq!(members, all, "the jobs queue is replicated on every node");

    // The worker's list starts with the leader's node, so stopping it cuts the worker's own
    // connection: the reconnect must move on to the next node of the list.
    let order: Vec<usize> = (0..3).map(|offset| (leader + offset) % 3).collect();
    let urls: Vec<&str> = order.iter().map(|&i| cluster.urls[i].as_str()).collect();
    let jobs = publish_fleet(&app, 200, 30_000).await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut worker = app.worker_process(&[
        ("KEYTURN_AMQP__URLS", &urls.join(",")),
        ("KEYTURN_AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ("KEYTURN_WORKER__CONCURRENCY", "8"),
        ("KEYTURN_AMQP__RECONNECT_MAX_BACKOFF", "2s"),
        ("KEYTURN_LOG__LEVEL", "info"),
    ]);
    let mut worker = worker.stderr(log.reopen().unwrap()).spawn().unwrap();
    wait_until(Duration::from_secs(60), || async {
        app.stats().requests >= 50
    })
    .await;

    // Counted before the stop, which takes seconds: the jobs done by then were done before it.
    let done_when_stopped = app.toggles().len();
    let _stopped = cluster.stop(leader);
    let survivor = order[1];
    wait_until(Duration::from_secs(60), || async {
        matches!(cluster.leader(survivor, &jobs_queue).0, Some(new) if new != leader)
    })
    .await;

    assert_fleet_recovers(&app, &jobs, done_when_stopped).await;
    let rows = app.toggles();
    assert!(
        rows.iter().all(|row| row["outcome"] == "succeeded"),
        "every job succeeded: {rows:?}"
    );
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0),
        "the worker stops cleanly on SIGTERM"
    );

    let logged = std::fs::read_to_string(log.path()).unwrap();
    let connected: Vec<&str> = logged
        .lines()
        .filter(|line| line.contains("connected to RabbitMQ"))
        .collect();
    let shown = |i: usize| keyturn::amqp::redacted_url(&cluster.urls[i]);
    assert!(
        connected
            .first()
            .is_some_and(|line| line.contains(&shown(leader))),
        "the worker first connected to the leader's node: {connected:?}"
    );
    assert!(
        connected.iter().any(|line| line.contains(&shown(survivor))),
        "after the leader's node stopped, the worker moved to the next node: {connected:?}"
    );
    assert!(!logged.contains(":guest@"), "no password in the log");
    eprintln!(
        "cluster: {done_when_stopped} of {} jobs done when {} stopped; {} Describe reconciliations",
        jobs.len(),
        cluster.nodes[leader],
        app.describe_calls()
    );
    app.cleanup().await;
}

/// Sets every queue and exchange name of keyturn's topology to one under `name`.
fn queue_names(name: &str) -> impl Fn(&mut keyturn::config::Settings) + Clone + Send + 'static {
    let name = name.to_owned();
    move |settings: &mut keyturn::config::Settings| {
        settings.amqp.name_under(&name);
    }
}

/// keyturn's topology declared through node `url` (the unrouted queue under a throwaway name,
/// deleted again), with the names `names` gives.
async fn declare_quorum_queues_on(
    url: &str,
    name: &str,
    names: &impl Fn(&mut keyturn::config::Settings),
) {
    let mut settings = keyturn::config::Settings::default();
    names(&mut settings);
    settings.amqp.url = url.to_owned();
    settings.amqp.unrouted_queue = format!("{name}.throwaway");
    let connection = keyturn::amqp::connect(&settings.amqp, "keyturn-cluster-test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    keyturn::amqp::topology::declare(&channel, &settings.amqp)
        .await
        .unwrap();
    channel
        .queue_delete(
            settings.amqp.unrouted_queue.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "declared".into()).await;
}

/// The app's events queue, redeclared as a quorum queue: a classic queue lives on one node, and
/// the test must read events whichever node stops.
async fn quorum_events_queue(app: &TestApp) {
    let queue = app.events_queue.as_str();
    app.channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    quorum_queue_bound(app, queue, "job.#").await;
}

/// A quorum queue named `queue`, bound to the app's results exchange with `key`.
async fn quorum_queue_bound(app: &TestApp, queue: &str, key: &str) {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    app.channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments)
        .await
        .unwrap();
    app.channel
        .queue_bind(
            queue.into(),
            app.settings.amqp.results_exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// The failover proof of fleet mode: three worker processes on one PostgreSQL store and the
/// three-node cluster run a declared rollout of 2,000 jobs with API faults; one worker is killed
/// with SIGKILL twice (and started again each time) and the node leading the jobs queue is stopped.
// The simulator answers on this test's runtime: two threads, so the test's blocking store reads
// while it watches the count do not hold the simulator's answers back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-node cluster of tests/cluster.sh"]
async fn a_fleet_survives_killed_workers_and_a_lost_node_with_every_job_recorded_once() {
    const JOBS: u32 = 2_000;
    let cluster = Cluster::from_env();
    let name = unique("kt-failover");
    let names = queue_names(&name);
    // Quorum queues led by node 2 (index 1), classic ones on node 1 (index 0), as above.
    declare_quorum_queues_on(&cluster.urls[1], &name, &names).await;
    let first = cluster.urls[0].clone();
    let app = TestApp::spawn_with(Options {
        faults: keyturn::simulator::Faults {
            latency_ms: 10,
            apply_then_error_rate: 0.03,
            error_rate: 0.03,
            timeout_rate: 0.01,
            hang_ms: 3_000,
            ..Default::default()
        },
        tweak: Box::new(move |settings| {
            names(settings);
            settings.amqp.url = first;
        }),
        postgres: true,
        ..Options::default()
    })
    .await;
    quorum_events_queue(&app).await;
    let rollout_events = format!("{name}.rollout-events");
    quorum_queue_bound(&app, &rollout_events, "rollout.#").await;
    let (leader, _) = cluster.leader(0, &app.settings.amqp.jobs_queue);
    let leader = leader.expect("the jobs queue has a leader");
    let urls = |start: usize| {
        (0..3)
            .map(|offset| cluster.urls[(start + offset) % 3].as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let spawn = |n: usize, life: u32| {
        let id = format!("{name}-w{n}-{life}");
        app.worker_process(&[
            ("KEYTURN_WORKER__ID", id.as_str()),
            ("KEYTURN_AMQP__URLS", urls(n).as_str()),
            ("KEYTURN_WORKER__CONCURRENCY", "8"),
            ("KEYTURN_AMQP__RECONNECT_MAX_BACKOFF", "2s"),
            ("KEYTURN_STORE__LEASE", "3s"),
            ("KEYTURN_API__REQUEST_TIMEOUT", "1s"),
        ])
        .spawn()
        .unwrap()
    };
    let mut workers: Vec<_> = (0..3).map(|n| spawn(n, 0)).collect();
    app.wait_for_audit().await;
    let declared = app
        .command(
            serde_json::json!({"kind": "rollout", "rollout_id": "R-1", "ticket": "CHG-9",
            "expected_jobs": JOBS, "requested_by": "ops"}),
        )
        .await;
    assert!(declared.ok, "{declared:?}");
    let done = || {
        app.store_rows("SELECT COUNT(*) AS n FROM toggles")[0]["n"]
            .as_i64()
            .unwrap()
    };
    let mut faults = Vec::new();
    let mut struck_at = Vec::new();
    // The faults follow the finished count, not the publishing: publishing 2,000 confirmed
    // messages can take longer than the first 800 jobs (on a loaded machine it took until 1,467,
    // and both kills came then, one right after the other).
    let strikes = async {
        for (life, at) in [(1, 300), (2, 800)] {
            wait_until(Duration::from_secs(120), || async { done() >= at }).await;
            workers[0].start_kill().unwrap();
            workers[0].wait().await.unwrap();
            let at = done();
            struck_at.push(at);
            faults.push(format!("worker 0 killed at {at} jobs"));
            workers[0] = spawn(0, life);
        }
        wait_until(Duration::from_secs(120), || async { done() >= 1_300 }).await;
        let at = done();
        struck_at.push(at);
        faults.push(format!("{} stopped at {at} jobs", cluster.nodes[leader]));
        cluster.stop(leader)
    };
    let (jobs, _stopped) = tokio::join!(publish_fleet(&app, JOBS, 50_000), strikes);
    assert!(
        struck_at.iter().all(|at| *at < i64::from(JOBS)),
        "every fault struck mid-run: {faults:?}"
    );

    wait_until(Duration::from_secs(240), || async {
        done() == i64::from(JOBS)
    })
    .await;
    // Exactly one final record per (job_id, rerun), across the fleet: 2,000 rows, one for each
    // job published (a second row of one key the store's unique index refuses outright).
    let rows = app.toggles();
    assert_eq!(rows.len(), JOBS as usize);
    let recorded: std::collections::BTreeSet<(&str, i64)> = rows
        .iter()
        .map(|row| {
            (
                row["job_id"].as_str().unwrap(),
                row["rerun"].as_i64().unwrap(),
            )
        })
        .collect();
    let published: std::collections::BTreeSet<(&str, i64)> = jobs
        .iter()
        .map(|(job_id, _, _)| (job_id.as_str(), 0))
        .collect();
    assert_eq!(recorded, published, "every job published has its row");
    // No instance toggled twice; every job that succeeded left its instance as it asked.
    let stats = app.stats();
    let outcomes: std::collections::HashMap<&str, &str> = rows
        .iter()
        .map(|row| {
            (
                row["job_id"].as_str().unwrap(),
                row["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    for (job_id, n, status) in &jobs {
        let applied = stats
            .instances
            .get(&instance(*n))
            .map_or(0, |i| i.toggles_applied);
        assert!(applied <= 1, "{job_id}: toggled {applied} times");
        if outcomes[job_id.as_str()] == "succeeded" {
            assert_eq!(
                app.simulator.status_of(PROJECT, &instance(*n)).as_deref(),
                Some(*status),
                "{job_id}"
            );
            // Instances start "off": an "off" job that asked Describe first (after a timeout or
            // a dead worker's marker) may find nothing to do; an "on" job toggled once.
            if *status == "on" {
                assert_eq!(applied, 1, "{job_id}: toggled {applied} times");
            }
        }
    }
    // Every event of a job (replays included) carries the id of its one stored record.
    let stored: std::collections::HashMap<String, String> = rows
        .iter()
        .map(|row| {
            (
                row["job_id"].as_str().unwrap().to_owned(),
                row["event_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let events = app
        .events_until(|events| by_job(events).len() >= jobs.len())
        .await;
    for event in &events {
        assert_eq!(
            stored[&event.data.job_id], event.id,
            "{}: a replay keeps the stored event id",
            event.data.job_id
        );
    }
    // The rollout's counts equal the rows, and it completed once.
    let rollout = &app.store_rows("SELECT * FROM rollouts WHERE rollout_id = 'R-1'")[0];
    let count = |outcome: &str| rows.iter().filter(|row| row["outcome"] == outcome).count();
    assert_eq!(rollout["state"], "completed", "{rollout}");
    for outcome in ["succeeded", "failed", "rejected", "cancelled"] {
        assert_eq!(
            rollout[outcome].as_i64().unwrap() as usize,
            count(outcome),
            "{outcome}: {rollout}"
        );
    }
    let verified = app.binary().args(["audit", "verify"]).output().unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    let mut completed = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while completed.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rollout.completed within 30 s"
        );
        let got = drain_queue(&app, &rollout_events).await;
        completed.extend(
            got.into_iter()
                .filter(|(key, _)| key == "rollout.completed"),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once the store marks it published no worker sends it again; whatever was sent by then is
    // in the queue.
    wait_until(Duration::from_secs(30), || async {
        !app.store_rows(
            "SELECT id FROM rollout_events WHERE kind = 'completed' AND published_at IS NOT NULL",
        )
        .is_empty()
    })
    .await;
    assert_eq!(
        app.store_rows("SELECT id FROM rollout_events WHERE kind = 'completed'")
            .len(),
        1,
        "one rollout.completed in the outbox"
    );
    completed.extend(
        drain_queue(&app, &rollout_events)
            .await
            .into_iter()
            .filter(|(key, _)| key == "rollout.completed"),
    );
    let ids: std::collections::BTreeSet<_> = completed.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids.len(), 1, "rollout.completed once: {completed:?}");
    assert_eq!(completed.len(), 1, "and delivered once: {completed:?}");
    for worker in &mut workers {
        assert_eq!(terminate(worker, Duration::from_secs(30)).await, Some(0));
    }
    // A job fails only when its attempts run out (three server errors in a row, at 3% a call,
    // about 0.1 jobs a run): a fault of the deployment never fails one.
    let failed: Vec<_> = rows
        .iter()
        .filter(|row| row["outcome"] == "failed")
        .collect();
    assert!(failed.len() <= 3, "{} jobs failed", failed.len());
    for row in &failed {
        assert_eq!(
            row["error_msg"]
                .as_str()
                .map(|m| m.ends_with("(keyturn.attempts_exhausted)")),
            Some(true),
            "{row}"
        );
    }
    let failures: Vec<String> = failed
        .iter()
        .map(|row| {
            let attempts: Vec<String> = app
                .store_rows(&format!(
                    "SELECT call, started_at, latency_ms, http_status, error_code FROM attempts \
                     WHERE event_id = '{}' ORDER BY number",
                    row["event_id"].as_str().unwrap()
                ))
                .iter()
                .map(|a| {
                    format!(
                        "{} {} {}ms {} {}",
                        a["call"],
                        a["started_at"],
                        a["latency_ms"],
                        a["http_status"],
                        a["error_code"]
                    )
                })
                .collect();
            format!(
                "{} after {} attempts: {} {} {attempts:?}",
                row["job_id"], row["attempts"], row["error_code"], row["error_msg"]
            )
        })
        .collect();
    eprintln!(
        "failover: {JOBS} jobs, {} succeeded, {} failed {failures:?}; {}; {} Describe reconciliations, {} faults injected",
        count("succeeded"),
        failed.len(),
        faults.join(", "),
        app.describe_calls(),
        stats.faults_injected
    );
    app.cleanup().await;
}

/// Every message waiting in `queue`: (routing key, CloudEvents id).
async fn drain_queue(app: &TestApp, queue: &str) -> Vec<(String, String)> {
    app.take_waiting(queue)
        .await
        .iter()
        .map(|delivery| {
            let value: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
            (
                delivery.routing_key.to_string(),
                value["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}
