//! The ops endpoint as an orchestrator and Prometheus see it: `/metrics` scraped during a run and
//! parsed by a strict OpenMetrics parser, its counters checked against the audit; `/readyz`
//! through a cut broker and an open circuit; `/livez`; a taken port at start.

use std::collections::BTreeMap;
use std::time::Duration;

use keyturn::amqp::worker::RunOptions;
use keyturn::simulator::{Faults, Step};
use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    AK, Options, SK, TOKEN, TestApp, close_connections_named, instance, job, rows, terminate,
    unique, wait_until,
};

/// One scrape of `/metrics`, parsed as a scraper would: malformed text fails the test.
pub struct Scrape(MetricsExposition<OpenMetricsType, OpenMetricsValue>);

impl Scrape {
    pub async fn of(address: &str) -> Scrape {
        let response = reqwest::get(format!("http://{address}/metrics"))
            .await
            .expect("the ops endpoint answers");
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("application/openmetrics-text; version=1.0.0"),
            "{content_type}"
        );
        let text = response.text().await.unwrap();
        let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&text)
            .unwrap_or_else(|error| panic!("/metrics is not valid OpenMetrics: {error:?}\n{text}"));
        Scrape(parsed)
    }

    /// Every sample of `family`: its labels and its value (a histogram's count).
    fn samples(&self, family: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let Some(family) = self.0.families.get(family) else {
            return Vec::new();
        };
        family
            .iter_samples()
            .map(|sample| {
                let labels = sample
                    .get_labelset()
                    .unwrap()
                    .iter()
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect();
                let value = match &sample.value {
                    OpenMetricsValue::Counter(counter) => counter.value.as_f64(),
                    OpenMetricsValue::Gauge(number) => number.as_f64(),
                    OpenMetricsValue::Histogram(histogram) => histogram.count.unwrap() as f64,
                    OpenMetricsValue::Info => 1.0,
                    other => panic!("unexpected sample {other:?}"),
                };
                (labels, value)
            })
            .collect()
    }

    /// The value of the sample of `family` with exactly these labels.
    pub fn value(&self, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples(family)
            .into_iter()
            .find(|(labels, _)| *labels == wanted)
            .map(|(_, value)| value)
    }

    pub fn sum(&self, family: &str) -> f64 {
        self.samples(family).iter().map(|(_, value)| value).sum()
    }
}

/// Scrapes until `enough` holds (within 30 s) and returns that scrape.
async fn scrape_until(address: &str, enough: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let scrape = Scrape::of(address).await;
        if enough(&scrape) {
            return scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "scrapes never showed it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves the ops endpoint of an in-process worker on a free port; returns its address. It
/// stops with the test's runtime.
pub async fn serve_ops(pipeline: std::sync::Arc<keyturn::pipeline::Pipeline>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(keyturn::ops::serve(
        listener,
        pipeline,
        CancellationToken::new(),
    ));
    address
}

pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

pub async fn readyz(address: &str) -> (u16, Value) {
    let response = reqwest::get(format!("http://{address}/readyz"))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// A job of rollout `R-ops`.
fn rollout_job(job_id: &str, n: u32) -> Value {
    let mut body = job(job_id, n, "on");
    body["rollout_id"] = json!("R-ops");
    body
}

#[tokio::test]
async fn metrics_scraped_during_a_run_are_valid_and_match_the_audit() {
    let app = TestApp::spawn_with(Options {
        faults: Faults {
            latency_ms: 150,
            ..Faults::default()
        },
        ..Options::default()
    })
    .await;
    let address = free_address();
    let mut worker = app
        .worker_process(&[
            ("KEYTURN_OPS__LISTEN", address.as_str()),
            ("KEYTURN_WORKER__CONCURRENCY", "4"),
        ])
        .spawn()
        .unwrap();
    let declared = app
        .command(
            json!({"kind": "rollout", "rollout_id": "R-ops", "expected_jobs": 30,
                        "failure_budget": 5, "requested_by": "ops-test"}),
        )
        .await;
    assert!(declared.ok, "{declared:?}");

    // Two instances refuse for good (403), one fails once (503) and then succeeds.
    let refused = Step::Error {
        status: 403,
        code: "DBS.200010".into(),
        msg: None,
        retry_after_secs: None,
        apply: false,
    };
    app.simulator.script(&instance(900), vec![refused.clone()]);
    app.simulator.script(&instance(901), vec![refused]);
    app.simulator.script(
        &instance(902),
        vec![Step::Error {
            status: 503,
            code: "DBS.05000000".into(),
            msg: None,
            retry_after_secs: None,
            apply: false,
        }],
    );
    // One job stays in flight for 2 s, so the rollout is still running when the scrape comes.
    app.simulator.script(
        &instance(929),
        vec![Step::Hang {
            ms: 2_000,
            apply: true,
        }],
    );
    for i in 0..30 {
        app.publish_job(&rollout_job(&format!("J-ops-{i}"), 900 + i))
            .await;
    }
    for i in 0..2 {
        let mut bad = job(&format!("J-ops-bad-{i}"), 990 + i, "on");
        bad["kms_key_id"] = json!("not-a-key");
        app.publish_job(&bad).await;
    }

    // Scraped while jobs are in flight: the rollout's gauges are there.
    let during = scrape_until(&address, |scrape| {
        scrape.value("keyturn_jobs_in_flight", &[]).unwrap() >= 1.0
    })
    .await;
    assert_eq!(
        during.value("keyturn_rollout_expected_jobs", &[("rollout", "R-ops")]),
        Some(30.0)
    );
    assert_eq!(
        during.value("keyturn_rollout_failure_budget", &[("rollout", "R-ops")]),
        Some(5.0)
    );
    assert!(
        during
            .value("keyturn_rollout_progress_ratio", &[("rollout", "R-ops")])
            .is_some()
    );

    // Then two duplicates of finished jobs, answered from the audit.
    wait_until(Duration::from_secs(60), || async {
        app.toggles().len() == 32
    })
    .await;
    app.publish_job(&rollout_job("J-ops-3", 903)).await;
    app.publish_job(&rollout_job("J-ops-4", 904)).await;
    let after = scrape_until(&address, |scrape| {
        // Durations are taken before the ack, the in-flight count drops after it.
        scrape.value("keyturn_job_duration_seconds", &[]) == Some(34.0)
            && scrape.value("keyturn_jobs_in_flight", &[]) == Some(0.0)
    })
    .await;

    let audit = app.audit_path();
    let by_outcome = rows(
        &audit,
        "SELECT outcome, COUNT(*) AS n FROM toggles GROUP BY outcome",
    );
    assert_eq!(by_outcome.len(), 3, "{by_outcome:?}");
    for row in &by_outcome {
        let outcome = row["outcome"].as_str().unwrap();
        assert_eq!(
            after.value("keyturn_jobs_finished", &[("outcome", outcome)]),
            row["n"].as_f64(),
            "{outcome}"
        );
    }
    assert_eq!(
        after.value("keyturn_jobs_finished", &[("outcome", "failed")]),
        Some(2.0)
    );
    let attempts = rows(&audit, "SELECT call FROM attempts").len() as f64;
    assert_eq!(after.sum("keyturn_api_calls"), attempts);
    let call = |status_class| {
        after.value(
            "keyturn_api_calls",
            &[
                ("call", "modify"),
                ("status_class", status_class),
                ("region", "cn-north-4"),
            ],
        )
    };
    assert_eq!(call("4xx"), Some(2.0));
    assert_eq!(call("5xx"), Some(1.0));
    assert_eq!(call("2xx"), Some(28.0));
    assert_eq!(after.value("keyturn_api_retries", &[]), Some(1.0));
    assert_eq!(after.value("keyturn_deliveries_received", &[]), Some(34.0));
    assert_eq!(after.value("keyturn_jobs_replayed", &[]), Some(2.0));
    assert_eq!(after.value("keyturn_store_commit_seconds", &[]), Some(32.0));
    assert_eq!(
        after.value("keyturn_publish_confirm_seconds", &[]),
        Some(34.0)
    );
    assert_eq!(after.value("keyturn_jobs_in_flight", &[]), Some(0.0));
    assert_eq!(after.value("keyturn_jobs_parked", &[]), Some(0.0));
    assert_eq!(after.value("keyturn_broker_connected", &[]), Some(1.0));
    assert_eq!(after.value("keyturn_broker_reconnects", &[]), Some(0.0));
    assert_eq!(
        after.value("keyturn_build", &[("version", env!("CARGO_PKG_VERSION"))]),
        Some(1.0)
    );
    // The rollout completed: its gauges are gone.
    assert_eq!(
        after.value("keyturn_rollout_expected_jobs", &[("rollout", "R-ops")]),
        None
    );
    assert_eq!(
        after.value("keyturn_rollout_finished_jobs", &[("rollout", "R-ops")]),
        None
    );
    // The ad-hoc rollout of the two rejected jobs runs on (nobody declared how many to expect).
    assert_eq!(
        after.value("keyturn_rollout_finished_jobs", &[("rollout", "R-1")]),
        Some(2.0)
    );
    assert_eq!(
        after.value("keyturn_rollout_failures", &[("rollout", "R-1")]),
        Some(2.0)
    );

    let (status, body) = readyz(&address).await;
    assert_eq!((status, &body), (200, &json!({"ready": true})));
    let live = reqwest::get(format!("http://{address}/livez"))
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    // The container's healthcheck command agrees with the real endpoint.
    let healthcheck = app
        .binary()
        .arg("healthcheck")
        .env("KEYTURN_OPS__LISTEN", &address)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&healthcheck.stdout);
    assert_eq!(healthcheck.status.code(), Some(0), "{said}");
    assert!(said.starts_with("ready: "), "{said}");
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    app.cleanup().await;
}

/// Runs `rabbitmqctl` with `args`; it must succeed.
async fn rabbitmqctl(args: &[&str]) {
    let status = tokio::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .expect("rabbitmqctl is installed with the broker");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test]
async fn readyz_is_503_while_the_broker_is_cut_and_while_a_circuit_is_open() {
    // A vhost of its own, so cutting this worker off the broker touches no other test.
    let vhost = unique("kt-ops");
    rabbitmqctl(&["add_vhost", &vhost]).await;
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]).await;
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(move |settings| {
            settings.amqp.url = url;
            settings.amqp.reconnect_max_backoff = Duration::from_millis(500);
            settings.circuit.probe_interval = Duration::from_millis(200);
            settings.circuit.probe_max_interval = Duration::from_millis(500);
        }),
        ..Options::default()
    })
    .await;
    let (shutdown, handle, pipeline) = app.start_worker_watched(
        app.settings.clone(),
        app.credentials(),
        RunOptions::default(),
    );
    let address = serve_ops(pipeline).await;
    let ready = || async { readyz(&address).await.0 == 200 };
    wait_until(Duration::from_secs(20), ready).await;

    // Refused credentials open the credentials circuit: not ready, and the gauge says why.
    app.simulator.set_credentials(
        vec![(AK.into(), "another-secret-never-log-me".to_owned().into())],
        vec![TOKEN.to_owned().into()],
    );
    app.publish_job(&job("J-ready-1", 1, "on")).await;
    wait_until(Duration::from_secs(20), || async {
        readyz(&address).await.0 == 503
    })
    .await;
    let (_, body) = readyz(&address).await;
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("circuit credentials open"), "{body}");
    let scrape = Scrape::of(&address).await;
    assert_eq!(
        scrape.value("keyturn_circuit_open", &[("scope", "credentials")]),
        Some(1.0)
    );
    assert_eq!(scrape.value("keyturn_jobs_parked", &[]), Some(1.0));
    app.simulator.set_credentials(
        vec![(AK.into(), SK.to_owned().into())],
        vec![TOKEN.to_owned().into()],
    );
    wait_until(Duration::from_secs(20), ready).await;
    wait_until(Duration::from_secs(20), || async {
        app.toggles().len() == 1
    })
    .await;
    let scrape = Scrape::of(&address).await;
    assert_eq!(
        scrape.value("keyturn_circuit_open", &[("scope", "credentials")]),
        Some(0.0)
    );

    // The broker cuts the worker off (its connection closed, the vhost refused): not ready
    // until it can connect again.
    rabbitmqctl(&["clear_permissions", "-p", &vhost, "guest"]).await;
    assert!(close_connections_named(&app.settings.worker.id).await >= 1);
    wait_until(Duration::from_secs(20), || async {
        let (status, body) = readyz(&address).await;
        status == 503 && body["reasons"].to_string().contains("no broker session")
    })
    .await;
    let scrape = Scrape::of(&address).await;
    assert_eq!(scrape.value("keyturn_broker_connected", &[]), Some(0.0));
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]).await;
    wait_until(Duration::from_secs(30), ready).await;
    let scrape = Scrape::of(&address).await;
    assert!(scrape.value("keyturn_broker_reconnects", &[]).unwrap() >= 1.0);

    shutdown.cancel();
    handle.await.unwrap();
    app.cleanup().await;
    rabbitmqctl(&["delete_vhost", &vhost]).await;
}

#[tokio::test]
async fn a_taken_ops_port_stops_the_worker_at_start_with_the_key_named() {
    let app = TestApp::spawn().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let output = app
        .worker_process(&[("KEYTURN_OPS__LISTEN", address.as_str())])
        .stderr(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "config key ops.listen: cannot listen on {address}"
        )),
        "{stderr}"
    );
    app.cleanup().await;
}
