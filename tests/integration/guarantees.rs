//! Nothing lost, nothing applied twice: crashes, lost connections, failing infrastructure and
//! secrets, each provoked for real.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyturn::amqp::worker::RunOptions;
use keyturn::events::Outcome;
use keyturn::pipeline::{Delivery, Disposition, Pipeline};
use keyturn::simulator::{Faults, Step};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

#[tokio::test]
async fn sigkill_at_random_moments_loses_nothing_and_toggles_nothing_twice() {
    let app = TestApp::spawn_with_latency(30).await;
    let jobs = publish_fleet(&app, 240, 10_000).await;
    let mut killed_at = Vec::new();
    for round in 0..4u32 {
        let mut child = app
            .worker_process(&[
                ("KEYTURN_WORKER__CONCURRENCY", "8"),
                // A restarted run takes the killed run's leases back a request timeout after it
                // starts.
                ("KEYTURN_API__REQUEST_TIMEOUT", "2s"),
            ])
            .spawn()
            .unwrap();
        let target = (round as usize + 1) * 40 + rand::random_range(0..20);
        wait_until(Duration::from_secs(60), || async {
            app.stats().requests as usize >= target
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..150))).await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        killed_at.push(app.toggles().len());
    }
    let status = app
        .worker_process(&[
            ("KEYTURN_WORKER__CONCURRENCY", "8"),
            // A restarted run takes the killed run's leases back a request timeout after it
            // starts.
            ("KEYTURN_API__REQUEST_TIMEOUT", "2s"),
        ])
        .arg("--exit-when-idle")
        .arg("1s")
        .status()
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // The last kill came before the end, so every kill came mid-run (rows only grow).
    assert_fleet_recovers(&app, &jobs, killed_at[killed_at.len() - 1]).await;
    let reconciled = app.describe_calls();
    eprintln!(
        "SIGKILL test: rows when killed {killed_at:?}, Describe reconciliations {reconciled}"
    );
    assert!(
        reconciled > 0,
        "jobs killed after their Modify went out were checked with Describe on redelivery"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn force_closed_broker_connections_are_survived_without_loss_or_double_toggles() {
    // 120 jobs at 300 ms, 4 at a time, take ~9 s: longer than rabbitmqctl's few calls, even on a
    // busy machine.
    let app = TestApp::spawn_with_latency(300).await;
    let jobs = publish_fleet(&app, 120, 20_000).await;
    let (shutdown, handle) = app.start_worker();
    wait_until(Duration::from_secs(60), || async {
        app.toggles().len() >= 8
    })
    .await;
    let closed = close_connections_named(&app.settings.worker.id).await;
    let done_at_close = app.toggles().len();
    assert!(
        closed >= 2,
        "closed the worker's consumer and publisher connections ({closed})"
    );
    assert_fleet_recovers(&app, &jobs, done_at_close).await;
    assert_eq!(
        prefetch_of_consumers(&app.settings.amqp.jobs_queue).await,
        vec![app.settings.worker.prefetch()],
        "one consumer again, with its prefetch re-applied"
    );
    shutdown.cancel();
    handle.await.unwrap();
    app.cleanup().await;
}

/// `worker.concurrency` bounds the API calls in flight; the prefetch (`worker.prefetch`) holds
/// more deliveries, so finished jobs' writes, events and acks go on beside the next calls.
#[tokio::test]
async fn calls_in_flight_stay_within_concurrency_while_the_prefetch_holds_more() {
    let app = TestApp::spawn_with(Options {
        faults: Faults {
            latency_ms: 1_000,
            ..Faults::default()
        },
        tweak: Box::new(|settings| {
            settings.worker.concurrency = 2;
            settings.worker.prefetch = 6;
            // The read-back after each Modify takes a call slot too.
            settings.api.confirm_after = true;
        }),
        ..Options::default()
    })
    .await;
    let jobs = publish_fleet(&app, 12, 21_000).await;
    let (shutdown, handle) = app.start_worker();
    let queue = app.settings.amqp.jobs_queue.clone();
    // While the first two calls take their second, the worker holds six deliveries: six wait
    // ready in the queue (ten if the prefetch were the call slots).
    wait_until(Duration::from_secs(30), || async {
        app.queue_len(&queue).await == 6
    })
    .await;
    let finished = app.toggles().len();
    assert!(
        finished <= 2,
        "six deliveries held before a second round of calls ended ({finished} finished)"
    );
    assert_eq!(prefetch_of_consumers(&queue).await, vec![6]);
    wait_until(Duration::from_secs(60), || async {
        app.toggles().len() == jobs.len()
    })
    .await;
    let stats = app.stats();
    assert_eq!(
        stats.max_in_flight, 2,
        "never more calls at once than worker.concurrency, and that many were reached"
    );
    for (job_id, n, status) in &jobs {
        assert_eq!(
            app.simulator.status_of(PROJECT, &instance(*n)).as_deref(),
            Some(*status),
            "{job_id}"
        );
    }
    shutdown.cancel();
    handle.await.unwrap();
    app.cleanup().await;
}

/// Once the worker has seen an infrastructure fault (its health gate is closed), a job
/// published now is delivered but sends no Modify. Delivery is awaited, then the time a call
/// would take.
async fn assert_a_new_job_is_held_before_the_api(
    app: &TestApp,
    pipeline: &Pipeline,
    (job_id, n): (&str, u32),
    fault: &str,
) {
    wait_until(Duration::from_secs(20), || async {
        !pipeline.health.is_healthy()
    })
    .await;
    app.publish_job(&job(job_id, n, "on")).await;
    wait_until(Duration::from_secs(20), || async {
        app.queue_len(&app.settings.amqp.jobs_queue).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        app.stats()
            .instances
            .get(&instance(n))
            .is_none_or(|i| i.modify_calls == 0),
        "no new toggles while {fault}"
    );
}

/// A TCP relay to the broker that can go silent: `freeze` stops relaying on every connection
/// open at that moment without closing it (a dead peer, a partitioned network: no FIN, no RST);
/// connections made later relay normally.
struct SilentRelay {
    url: String,
    cutoff: Arc<tokio::sync::watch::Sender<usize>>,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl SilentRelay {
    async fn start(broker_url: &str) -> SilentRelay {
        let mut uri: AMQPUri = broker_url.parse().unwrap();
        let upstream = format!("{}:{}", uri.authority.host, uri.authority.port);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        uri.authority.host = "127.0.0.1".into();
        uri.authority.port = listener.local_addr().unwrap().port();
        let relay = SilentRelay {
            url: uri.to_string(),
            cutoff: Arc::new(tokio::sync::watch::Sender::new(0)),
            accepted: Arc::new(AtomicUsize::new(0)),
            stop: CancellationToken::new(),
        };
        let (cutoff, accepted, stop) = (
            relay.cutoff.clone(),
            relay.accepted.clone(),
            relay.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let mut client = tokio::select! {
                    () = stop.cancelled() => return,
                    incoming = listener.accept() => incoming.unwrap().0,
                };
                let number = accepted.fetch_add(1, Ordering::SeqCst);
                let mut frozen = cutoff.subscribe();
                let (upstream, stop) = (upstream.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut broker = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut broker) => return,
                        _ = frozen.wait_for(|cutoff| *cutoff > number) => {}
                    }
                    // Silent from here on: both sockets stay open and nothing moves.
                    stop.cancelled().await;
                    drop((client, broker));
                });
            }
        });
        relay
    }

    /// Goes silent on every connection open now.
    fn freeze(&self) {
        self.cutoff.send_replace(self.connections());
    }

    /// Connections accepted so far.
    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for SilentRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The broker goes silent without closing anything: only heartbeats can tell. The worker must
/// notice within a few heartbeat intervals, reconnect, and lose or double nothing.
#[tokio::test]
async fn a_silent_broker_is_noticed_by_heartbeats_and_nothing_is_lost() {
    let app = TestApp::spawn_with_latency(100).await;
    let relay = SilentRelay::start(&app.settings.amqp.url).await;
    let mut settings = app.settings.clone();
    settings.amqp.url = relay.url.clone();
    settings.amqp.heartbeat_secs = 2;
    settings.amqp.reconnect_max_backoff = Duration::from_secs(1);
    let jobs = publish_fleet(&app, 60, 30_000).await;
    let (shutdown, handle) =
        app.start_worker_on(settings, app.credentials(), RunOptions::default());
    wait_until(Duration::from_secs(30), || async {
        app.toggles().len() >= 10
    })
    .await;

    let before = relay.connections();
    relay.freeze();
    let frozen_at = std::time::Instant::now();
    let done_at_freeze = app.toggles().len();
    // Consumer and publisher both reconnect through the relay once heartbeats give them up.
    wait_until(Duration::from_secs(30), || async {
        relay.connections() >= before + 2
    })
    .await;
    let noticed_after = frozen_at.elapsed();
    assert_fleet_recovers(&app, &jobs, done_at_freeze).await;
    eprintln!(
        "silent broker: noticed and reconnected after {noticed_after:?} (heartbeat 2 s); \
         {done_at_freeze} of {} jobs done when it went silent",
        jobs.len()
    );
    shutdown.cancel();
    handle.await.unwrap();
    app.cleanup().await;
}

/// The prefetch of every consumer of `queue`, as `rabbitmqctl` reports it.
async fn prefetch_of_consumers(queue: &str) -> Vec<u16> {
    let listing = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_consumers",
            "--no-table-headers",
            "queue_name",
            "prefetch_count",
        ])
        .output()
        .await
        .expect("rabbitmqctl is installed with the broker");
    String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(name, _)| *name == queue)
        .map(|(_, prefetch)| prefetch.trim().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn a_locked_audit_store_holds_jobs_unacked_and_stops_new_toggles_until_it_heals() {
    let app = TestApp::spawn_with(Options {
        faults: Faults {
            latency_ms: 1_500,
            ..Faults::default()
        },
        tweak: Box::new(|s| s.audit.busy_timeout = Duration::from_millis(100)),
        ..Options::default()
    })
    .await;
    let (shutdown, handle, pipeline) = app.start_worker_watched(
        app.settings.clone(),
        app.credentials(),
        RunOptions::default(),
    );
    let ops = crate::ops::serve_ops(pipeline.clone()).await;
    wait_until(Duration::from_secs(20), || async {
        crate::ops::readyz(&ops).await.0 == 200
    })
    .await;
    app.publish_job(&job("J-held", 30, "on")).await;
    // Lock the file while the Modify is in flight: its marker is written, its final row cannot be.
    wait_until(Duration::from_secs(20), || async {
        app.stats()
            .instances
            .get(&instance(30))
            .is_some_and(|i| i.modify_calls == 1)
    })
    .await;
    let blocker = rusqlite::Connection::open(app.audit_path()).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // J-held's Modify answers, its final row cannot be written: the worker holds it.
    assert_a_new_job_is_held_before_the_api(
        &app,
        &pipeline,
        ("J-waiting", 31),
        "the audit log fails",
    )
    .await;
    assert!(
        app.events(0).await.is_empty(),
        "no event before the record is safe"
    );
    assert_eq!(
        app.queue_len(&app.settings.amqp.jobs_queue).await,
        0,
        "both jobs are held, unacked"
    );
    // An orchestrator sees it: the worker is not ready while its store refuses writes.
    let (status, body) = crate::ops::readyz(&ops).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["reasons"].to_string().contains("store"), "{body}");

    blocker.execute_batch("ROLLBACK").unwrap();
    let events = app.events(2).await;
    assert_eq!(events.len(), 2);
    assert!(
        events.iter().all(|e| e.data.outcome == Outcome::Succeeded),
        "a transient fault never fails a job"
    );
    assert_eq!(app.stats().instances[&instance(30)].modify_calls, 1);
    assert_eq!(app.toggles().len(), 2);
    assert!(app.dead_letters().await.is_empty());
    wait_until(Duration::from_secs(20), || async {
        crate::ops::readyz(&ops).await.0 == 200
    })
    .await;
    shutdown.cancel();
    handle.await.unwrap();
    app.cleanup().await;
}

/// A job that kills every worker that takes it (here: SIGKILL while its Modify hangs) must not
/// loop forever: the queue's delivery limit dead-letters it, and the job behind it proceeds.
#[tokio::test]
async fn a_message_that_kills_every_worker_is_dead_lettered_by_the_delivery_limit() {
    let limit = 2u32;
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(move |s| s.amqp.delivery_limit = limit),
        ..Options::default()
    })
    .await;
    let poison = instance(60);
    app.simulator.script(
        &poison,
        (0..10)
            .map(|_| Step::Hang {
                ms: 120_000,
                apply: false,
            })
            .collect(),
    );
    let poison_job = job("J-poison", 60, "on");
    app.publish_job(&poison_job).await;
    app.publish_job(&job("J-behind", 61, "on")).await;
    let limit_setting = limit.to_string();
    let worker = || {
        // A restarted run takes the killed run's lease back a request timeout after it starts.
        app.worker_process(&[
            ("KEYTURN_WORKER__CONCURRENCY", "1"),
            // One delivery at a time: the job behind waits in the queue behind the poison.
            ("KEYTURN_WORKER__PREFETCH", "1"),
            ("KEYTURN_AMQP__DELIVERY_LIMIT", &limit_setting),
            ("KEYTURN_API__REQUEST_TIMEOUT", "3s"),
        ])
    };
    let dead_queue = app.settings.amqp.dead_queue.clone();
    let mut deliveries = 0;
    while app.queue_len(&dead_queue).await == 0 {
        assert!(
            deliveries <= limit + 1,
            "still not dead-lettered after {deliveries} deliveries"
        );
        let mut child = worker().spawn().unwrap();
        wait_until(Duration::from_secs(30), || async {
            app.stats()
                .instances
                .get(&poison)
                .is_some_and(|i| i.modify_calls > u64::from(deliveries))
        })
        .await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        deliveries += 1;
        wait_until(Duration::from_secs(10), || async {
            app.queue_len(&app.settings.amqp.jobs_queue).await == 2
                || app.queue_len(&dead_queue).await == 1
        })
        .await;
    }
    assert_eq!(
        deliveries,
        limit + 1,
        "the first delivery plus `limit` redeliveries"
    );

    let status = worker()
        .arg("--exit-when-idle")
        .arg("1s")
        .status()
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let toggles = app.toggles();
    assert_eq!(toggles.len(), 1, "only the job behind it finished");
    assert_eq!(toggles[0]["job_id"], "J-behind");
    assert_eq!(toggles[0]["outcome"], "succeeded");
    assert_eq!(app.stats().instances[&poison].toggles_applied, 0);
    let marker = rows(
        &app.audit_path(),
        "SELECT job_id FROM in_flight WHERE job_id = 'J-poison'",
    );
    assert_eq!(
        marker.len(),
        1,
        "the audit file says its Modify may have gone out"
    );

    let dead = app
        .channel
        .basic_get(dead_queue.as_str().into(), Default::default())
        .await
        .unwrap()
        .expect("the poison message is in the dead queue");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&dead.delivery.data).unwrap(),
        poison_job
    );
    let headers = dead
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let reason = headers.inner().get("x-first-death-reason").cloned();
    assert_eq!(
        reason
            .as_ref()
            .and_then(|r| r.as_long_string())
            .map(|r| r.to_string()),
        Some("delivery_limit".to_owned()),
        "dead-lettered by the limit, not rejected: {headers:?}"
    );
    app.cleanup().await;
}

/// After a reconnect the broker may hand a worker a job whose first delivery it is still
/// working on. The per-job lock makes the second wait and then replay the first one's result.
#[tokio::test]
async fn a_redelivery_beside_its_first_delivery_waits_and_replays() {
    let app = TestApp::spawn_with_latency(300).await;
    let (pipeline, publisher) =
        keyturn::cli::build_pipeline(app.settings.clone(), app.credentials()).unwrap();
    let delivery = |redelivered| Delivery {
        body: job("J-twice", 90, "on").to_string().into_bytes(),
        message_id: None,
        correlation_id: None,
        reply_to: None,
        content_type: Some("application/json".into()),
        redelivered,
        received_at: chrono::Utc::now(),
        trace: Default::default(),
    };
    let stop = CancellationToken::new();
    let (first, second) = tokio::join!(
        pipeline.process(pipeline.admit(delivery(false)), &stop),
        pipeline.process(pipeline.admit(delivery(true)), &stop)
    );
    assert_eq!((first, second), (Disposition::Ack, Disposition::Ack));
    assert_eq!(app.stats().instances[&instance(90)].modify_calls, 1);
    assert_eq!(app.toggles().len(), 1);
    let events = app.events(2).await;
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[0].id, events[1].id,
        "the replay carries the same event id"
    );
    publisher.close().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_refused_result_publish_is_retried_until_the_broker_takes_it() {
    let app = TestApp::spawn().await;
    let exchange = app.settings.amqp.results_exchange.clone();
    app.channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await
        .unwrap();
    let (shutdown, handle, pipeline) = app.start_worker_watched(
        app.settings.clone(),
        app.credentials(),
        RunOptions::default(),
    );
    // The worker declares the exchange on connect, before it consumes; delete it again once it
    // consumes, or the worker's declaration (without the test's binding) would swallow the event.
    let jobs_queue = app.settings.amqp.jobs_queue.clone();
    wait_until(Duration::from_secs(20), || async {
        app.consumers(&jobs_queue).await > 0
    })
    .await;
    app.channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await
        .unwrap();
    app.publish_job(&job("J-publish", 40, "on")).await;
    wait_until(Duration::from_secs(20), || async {
        app.toggles().len() == 1
    })
    .await;
    assert_a_new_job_is_held_before_the_api(&app, &pipeline, ("J-after", 41), "result events fail")
        .await;

    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    app.channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
    app.channel
        .queue_bind(
            app.events_queue.as_str().into(),
            exchange.as_str().into(),
            "job.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let events = app.events(2).await;
    let mut finished: Vec<_> = events.iter().map(|e| e.data.job_id.as_str()).collect();
    finished.sort_unstable();
    assert_eq!(finished, ["J-after", "J-publish"]);
    assert_eq!(app.stats().instances[&instance(40)].modify_calls, 1);
    shutdown.cancel();
    handle.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn a_429_pauses_only_its_region_and_project() {
    let pause = Duration::from_secs(3);
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(move |s| s.rate_limit.throttle_pause = pause),
        ..Options::default()
    })
    .await;
    app.simulator.script(
        &instance(50),
        vec![Step::Error {
            status: 429,
            code: "APIGW.0308".into(),
            msg: None,
            retry_after_secs: None,
            apply: false,
        }],
    );
    let (shutdown, handle) = app.start_worker();
    app.publish_job(&job("J-throttled", 50, "on")).await;
    // Only once the pause has begun: jobs for another region, and for another project in the
    // same region, must not wait for it.
    wait_until(Duration::from_secs(20), || async {
        app.stats()
            .instances
            .get(&instance(50))
            .is_some_and(|i| i.modify_calls >= 1)
    })
    .await;
    let mut other_region = job("J-other-region", 51, "on");
    other_region["region"] = json!("ap-southeast-1");
    app.publish_job(&other_region).await;
    let mut other_project = job("J-other-project", 52, "on");
    other_project["project_id"] = json!("0a1b2c3d4e5f60718293a4b5c6d7e8f9");
    app.publish_job(&other_project).await;

    let events = app.events(3).await;
    let duration_of = |job_id: &str| {
        let event = events.iter().find(|e| e.data.job_id == job_id).unwrap();
        assert_eq!(event.data.outcome, Outcome::Succeeded, "{job_id}");
        Duration::from_millis(event.data.duration_ms)
    };
    let throttled = duration_of("J-throttled");
    assert!(
        throttled >= pause,
        "paused for throttle_pause: {throttled:?}"
    );
    for free in ["J-other-region", "J-other-project"] {
        let took = duration_of(free);
        assert!(
            took < pause / 2,
            "{free} carried on during the pause: {took:?}"
        );
    }
    shutdown.cancel();
    handle.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn retries_stop_at_the_attempt_limit_with_the_last_error() {
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|s| s.retry.max_attempts = 3),
        ..Options::default()
    })
    .await;
    let busy = || Step::Error {
        status: 409,
        code: "DBS.200019".into(),
        msg: Some("busy".into()),
        retry_after_secs: None,
        apply: false,
    };
    app.simulator
        .script(&instance(60), vec![busy(), busy(), busy(), Step::Ok]);
    app.publish_job(&job("J-busy", 60, "on")).await;
    app.drain().await;

    let event = &app.events(1).await[0];
    assert_eq!(
        (
            event.data.outcome,
            event.data.attempts,
            event.data.http_status
        ),
        (Outcome::Failed, 3, Some(409))
    );
    assert_eq!(event.data.error_code.as_deref(), Some("DBS.200019"));
    assert_eq!(
        event.data.error_msg.as_deref(),
        Some("busy (keyturn.attempts_exhausted)")
    );
    assert!(event.data.request_id.is_some());
    app.cleanup().await;
}

#[tokio::test]
async fn hostile_messages_are_dead_lettered_and_the_jobs_around_them_proceed() {
    let app = TestApp::spawn().await;
    let hostile: Vec<Vec<u8>> = vec![
        b"\xc3\x28\xa0\xa1".to_vec(),
        b"null".to_vec(),
        b"{\"job_id\": 1e999999}".to_vec(),
        // Deep nesting within the size cap, so it is the JSON depth limit that refuses it.
        format!("{{\"ticket\": {}}}", "[".repeat(30_000)).into_bytes(),
        vec![b'{'; 70_000],
        br#"{"job_id":"a","job_id":"b"}"#.to_vec(),
        job("J-\u{0456}", 70, "on").to_string().into_bytes(),
        json!({"job_id": "J-path", "region": "cn-north-4", "project_id": PROJECT, "instance_id": "../../../etc/passwdin07", "encryption_status": "off"}).to_string().into_bytes(),
        json!({"job_id": "J-enc", "region": "cn-north-4", "project_id": PROJECT, "instance_id": "7033e7c3cf93438797d44ad7ae0a7d95%2F07", "encryption_status": "off"}).to_string().into_bytes(),
        json!({"job_id": "J-hdr", "region": "cn-north-4", "project_id": PROJECT, "instance_id": instance(71), "encryption_status": "off", "requested_by": "eve\r\nX-Auth-Token: stolen"}).to_string().into_bytes(),
        json!({"job_id": "J-num", "region": "cn-north-4", "project_id": 12345678901234567890u64, "instance_id": instance(72), "encryption_status": "off"}).to_string().into_bytes(),
    ];
    for (i, body) in hostile.iter().enumerate() {
        app.publish_job(&job(&format!("J-good-{i}"), 80 + i as u32, "on"))
            .await;
        app.publish(body, lapin::BasicProperties::default()).await;
    }
    app.publish(
        &job("J-xml", 73, "on").to_string().into_bytes(),
        lapin::BasicProperties::default().with_content_type("application/xml".into()),
    )
    .await;
    app.drain().await;

    let events = app.events(2 * hostile.len() + 1).await;
    let good: Vec<_> = events
        .iter()
        .filter(|e| e.data.job_id.starts_with("J-good-"))
        .collect();
    assert_eq!(good.len(), hostile.len());
    assert!(good.iter().all(|e| e.data.outcome == Outcome::Succeeded));
    let rejected: Vec<_> = events
        .iter()
        .filter(|e| e.data.outcome == Outcome::Rejected)
        .collect();
    assert_eq!(rejected.len(), hostile.len() + 1);
    for event in &rejected {
        let code = event.data.error_code.as_deref().unwrap();
        assert!(code.starts_with("keyturn.invalid."), "{code}");
        assert!(!event.data.error_msg.as_deref().unwrap().contains('\n'));
    }
    let code_of = |job_id: &str| {
        let event = rejected.iter().find(|e| e.data.job_id == job_id).unwrap();
        event.data.error_code.clone().unwrap()
    };
    assert_eq!(code_of("J-xml"), "keyturn.invalid.content_type");
    assert_eq!(code_of("J-hdr"), "keyturn.invalid.requested_by");
    assert!(
        rejected.iter().any(|e| e
            .data
            .error_msg
            .as_deref()
            .is_some_and(|m| m.contains("recursion limit"))),
        "deep nesting is refused by the parser's depth limit"
    );
    assert_eq!(app.dead_letters().await.len(), hostile.len() + 1);
    let calls: u64 = app.stats().instances.values().map(|i| i.modify_calls).sum();
    assert_eq!(
        calls,
        hostile.len() as u64,
        "only the good jobs reached the API"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn secrets_never_appear_in_logs_events_audit_or_errors() {
    let app = TestApp::spawn().await;
    app.simulator.script(
        &instance(90),
        vec![Step::Error {
            status: 500,
            code: "DBS.05000000".into(),
            msg: None,
            retry_after_secs: None,
            apply: false,
        }],
    );
    app.publish_job(&job("J-s1", 90, "on")).await;
    app.publish_job(&job("J-s2", 91, "off")).await;
    app.publish(b"{not json", lapin::BasicProperties::default())
        .await;
    let aksk = app
        .worker_process(&[("RUST_LOG", "trace")])
        .arg("--exit-when-idle")
        .arg("1s")
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    app.publish_job(&job("J-s3", 92, "on")).await;
    let token = app
        .worker_process(&[
            ("RUST_LOG", "trace"),
            ("KEYTURN_API__AUTH", "token"),
            ("KEYTURN_API__TOKEN", TOKEN),
        ])
        .arg("--exit-when-idle")
        .arg("1s")
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    let bad_config = app
        .worker_process(&[
            ("KEYTURN_API__AUTH", "token"),
            ("KEYTURN_API__TOKEN", TOKEN),
            ("KEYTURN_WORKER__CONCURRENCY", "0"),
        ])
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(aksk.status.success() && token.status.success());
    assert_eq!(bad_config.status.code(), Some(2));

    let events = app.events(4).await;
    assert_eq!(events.len(), 4);
    let mut haystacks: Vec<(String, Vec<u8>)> = vec![
        ("aksk worker log".into(), aksk.stderr.clone()),
        ("token worker log".into(), token.stderr.clone()),
        ("config error".into(), bad_config.stderr.clone()),
        ("events".into(), serde_json::to_vec(&events).unwrap()),
    ];
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", app.audit_path().display());
        if let Ok(bytes) = std::fs::read(&path) {
            haystacks.push((path, bytes));
        }
    }
    assert!(
        aksk.stderr.len() > 10_000,
        "trace logging was on: {} bytes",
        aksk.stderr.len()
    );
    for (name, bytes) in &haystacks {
        let text = String::from_utf8_lossy(bytes);
        for secret in [SK, TOKEN, AK] {
            assert!(!text.contains(secret), "{name} contains a secret");
        }
    }
    app.cleanup().await;
}
