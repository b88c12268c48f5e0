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
}

#[tokio::test]
#[ignore = "needs the 3-node cluster of tests/cluster.sh"]
async fn losing_the_node_that_leads_the_jobs_queue_moves_the_worker_on_and_loses_nothing() {
    let cluster = Cluster::from_env();
    // Quorum queues get their leader on the node that declares them, classic queues (keyturn's
    // unrouted queue, the test's own) live there. The quorum queues are declared on node 2 and
    // the rest on node 1, so the leader's node can stop while the classic queues stay up.
    let name = unique("kt-cluster");
    let names = {
        let name = name.clone();
        move |settings: &mut keyturn::config::Settings| {
            let amqp = &mut settings.amqp;
            amqp.jobs_queue = format!("{name}.jobs");
            amqp.dead_queue = format!("{name}.jobs.dead");
            amqp.dead_letter_exchange = format!("{name}.dlx");
            amqp.results_exchange = format!("{name}.results");
            amqp.unrouted_queue = format!("{name}.results.unrouted");
            amqp.control_queue = format!("{name}.control");
        }
    };
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
    cluster.ctl(leader, &["stop_app"]);
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
            "job.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}
