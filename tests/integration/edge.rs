//! The operator-facing edge, end to end: what the result events look like to a strict consumer,
//! where an event nobody is bound for ends up, and what `keyturn worker` says (and how it exits)
//! when the broker, the audit path or the log level is wrong. Binary tests run the real
//! `keyturn` and read its stderr.

use std::process::Stdio;
use std::time::Duration;

use keyturn::amqp::publisher::ROUTING_KEY_HEADER;
use keyturn::events::ResultEvent;
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::*;

/// Takes `count` raw result events (bytes) from the app's events queue, within 60 s.
async fn raw_events(app: &TestApp, count: usize) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut bodies = Vec::new();
    while bodies.len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} events within 60 s"
        );
        match app
            .channel
            .basic_get(
                app.events_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            Some(message) => bodies.push(message.delivery.data.clone()),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    bodies
}

#[tokio::test]
async fn events_from_the_broker_parse_with_the_cloudevents_sdk() {
    use cloudevents::AttributesReader;
    let app = TestApp::spawn().await;
    app.publish_job(&job("J-ce-ok", 301, "on")).await;
    // Rejected before any instance is known: the event has no `subject` at all.
    app.publish(
        br#"{"job_id":"J-ce-bad"}"#,
        BasicProperties::default().with_content_type("application/json".into()),
    )
    .await;
    let (shutdown, worker) = app.start_worker();
    let bodies = raw_events(&app, 2).await;
    shutdown.cancel();
    worker.await.unwrap();

    let mut subjects = Vec::new();
    for body in &bodies {
        let text = std::str::from_utf8(body).unwrap();
        let event: cloudevents::Event =
            serde_json::from_str(text).unwrap_or_else(|error| panic!("{error}: {text}"));
        // The SDK writes back exactly what it read: no attribute of ours is `null`.
        let ours: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_value(&event).unwrap(), ours, "{text}");
        subjects.push((event.ty().to_owned(), event.subject().map(str::to_owned)));
    }
    subjects.sort();
    assert_eq!(
        subjects,
        vec![
            ("dev.keyturn.job.rejected".to_owned(), None),
            ("dev.keyturn.job.succeeded".to_owned(), Some(instance(301))),
        ]
    );
    app.cleanup().await;
}

#[tokio::test]
async fn an_event_no_queue_is_bound_for_is_kept_and_logged() {
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|settings| {
            settings.amqp.unrouted_queue = format!("{}.unrouted", settings.amqp.results_exchange);
        }),
        ..Options::default()
    })
    .await;
    let unrouted = app.settings.amqp.unrouted_queue.clone();
    let worker = || {
        let mut command = app.worker_process(&[("KEYTURN_AMQP__UNROUTED_QUEUE", &unrouted)]);
        command
            .args(["--exit-when-idle", "1s"])
            .stderr(Stdio::piped());
        command
    };

    // Jobs of no rollout: no rollout events, which nothing binds here either.
    let job = |job_id: &str, n: u32, status: &str| {
        let mut body = job(job_id, n, status);
        body.as_object_mut().unwrap().remove("rollout_id");
        body
    };
    // Bound: the event goes where it is routed and nothing is kept aside.
    app.publish_job(&job("J-un-1", 311, "on")).await;
    let routed = worker().output().await.unwrap();
    assert!(routed.status.success());
    assert_eq!(app.events(1).await.len(), 1);
    assert_eq!(app.queue_len(&unrouted).await, 0);

    // Unbound: the job is still acked and its event waits in the unrouted queue.
    app.channel
        .queue_unbind(
            app.events_queue.as_str().into(),
            app.settings.amqp.results_exchange.as_str().into(),
            "job.#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    app.publish_job(&job("J-un-2", 312, "off")).await;
    let output = worker().output().await.unwrap();
    assert!(output.status.success());
    assert_eq!(
        app.queue_len(&app.settings.amqp.jobs_queue).await,
        0,
        "acked"
    );
    assert_eq!(app.queue_len(&unrouted).await, 1);
    let kept = app
        .channel
        .basic_get(unrouted.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the kept event");
    let event: ResultEvent = serde_json::from_slice(&kept.delivery.data).unwrap();
    assert_eq!(event.data.job_id, "J-un-2");
    let header = kept
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(ROUTING_KEY_HEADER).cloned());
    assert_eq!(
        header,
        Some(AMQPValue::LongString(event.routing_key().as_str().into()))
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let warned: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("unrouted"))
        .collect();
    assert_eq!(warned.len(), 1, "{stderr}");
    assert!(warned[0].contains(&event.id), "{stderr}");
    assert!(warned[0].contains(&event.routing_key()), "{stderr}");
    assert!(app.events(0).await.is_empty());
    app.cleanup().await;
}

/// The unrouted queue is bounded and drops its oldest message, so it can never block
/// publishing (RabbitMQ 3.10, classic queue: `x-overflow = drop-head`).
#[tokio::test]
async fn the_unrouted_queue_keeps_the_newest_ten_thousand() {
    let app = TestApp::spawn().await;
    let mut settings = app.settings.amqp.clone();
    settings.unrouted_queue = unique("kt-unrouted");
    keyturn::amqp::topology::declare_unrouted(&app.channel, &settings)
        .await
        .unwrap();
    let limit = keyturn::amqp::topology::UNROUTED_MAX_LENGTH as usize;
    let mut confirms = Vec::new();
    for n in 0..limit + 3 {
        confirms.push(
            app.channel
                .basic_publish(
                    "".into(),
                    settings.unrouted_queue.as_str().into(),
                    BasicPublishOptions::default(),
                    n.to_string().as_bytes(),
                    BasicProperties::default(),
                )
                .await
                .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }
    assert_eq!(
        app.queue_len(&settings.unrouted_queue).await as usize,
        limit
    );
    let oldest = app
        .channel
        .basic_get(
            settings.unrouted_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(oldest.delivery.data, b"3");
    let _ = app
        .channel
        .queue_delete(settings.unrouted_queue.as_str().into(), Default::default())
        .await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_node_that_refuses_the_login_does_not_keep_the_next_node_from_being_tried() {
    let good = broker_url().await;
    let refusing = broker_with(&good, Some("wrong-password-never-log-me"), None, None);
    let mut settings = keyturn::config::Settings::load(None, &[]).unwrap().amqp;
    settings.urls = vec![refusing.clone(), good.clone()];
    let connection = keyturn::amqp::connect(&settings, "keyturn-test-refusing-node")
        .await
        .expect("the next node takes the connection");
    assert!(connection.status().connected());
    let _ = connection.close(200, "done".into()).await;
    // With no node to connect to, the refusal is the error: bad settings (exit 2 at start).
    settings.urls = vec![broker_with(&good, None, Some(1), None), refusing];
    let Err(error) = keyturn::amqp::connect(&settings, "keyturn-test-refusing-node").await else {
        panic!("no node connects");
    };
    assert!(error.is_permanent(), "{error}");
    assert!(!error.to_string().contains("never-log-me"), "{error}");
}

/// `amqp://user:password@host:port/vhost` of the test broker with parts replaced.
fn broker_with(
    base: &str,
    password: Option<&str>,
    port: Option<u16>,
    vhost: Option<&str>,
) -> String {
    let uri: lapin::uri::AMQPUri = base.parse().unwrap();
    format!(
        "amqp://{}:{}@{}:{}/{}",
        uri.authority.userinfo.username,
        password.unwrap_or(&uri.authority.userinfo.password),
        uri.authority.host,
        port.unwrap_or(uri.authority.port),
        vhost
            .map(str::to_owned)
            .unwrap_or_else(|| uri.vhost.replace('/', "%2f")),
    )
}

/// Runs the worker binary with `extra`, expects exit 2 within 20 s, returns its stderr.
async fn refused_at_start(app: &TestApp, extra: &[(&str, &str)]) -> String {
    let mut command = app.worker_process(extra);
    command.stderr(Stdio::piped());
    let output = tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .expect("exits within 20 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

const WRONG_PASSWORD: &str = "wrong-pw-never-shown-7c1";

#[tokio::test]
async fn a_broker_that_refuses_the_settings_exits_2_with_one_line() {
    let app = TestApp::spawn().await;
    let base = app.settings.amqp.url.clone();
    let simulator_port: u16 = app
        .simulator_url
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let cases = [
        (
            broker_with(&base, Some(WRONG_PASSWORD), None, None),
            "refused the credentials (ACCESS-REFUSED",
            "check the user and password",
        ),
        (
            broker_with(&base, None, None, Some(&unique("no-such-vhost"))),
            "refused the virtual host (NOT-ALLOWED",
            "check the vhost",
        ),
        (
            broker_with(&base, Some(WRONG_PASSWORD), Some(simulator_port), None),
            "does not speak AMQP",
            "check the host and port",
        ),
    ];
    for (url, problem, fix) in cases {
        let stderr = refused_at_start(
            &app,
            &[("KEYTURN_AMQP__URL", &url), ("KEYTURN_LOG__LEVEL", "warn")],
        )
        .await;
        assert!(
            stderr.starts_with("keyturn: config key amqp.url: the broker at amqp://"),
            "{stderr}"
        );
        assert!(stderr.contains(problem) && stderr.contains(fix), "{stderr}");
        assert!(
            !stderr.contains(WRONG_PASSWORD) && !stderr.contains(":guest@"),
            "{stderr}"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn an_unreachable_broker_is_retried_with_one_warn_line_per_attempt() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let app = TestApp::spawn().await;
    let url = broker_with(
        &app.settings.amqp.url,
        Some(WRONG_PASSWORD),
        Some(port),
        None,
    );
    let mut child = app
        .worker_process(&[
            ("KEYTURN_AMQP__URL", &url),
            ("KEYTURN_AMQP__RECONNECT_MAX_BACKOFF", "1s"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut warnings = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while warnings.len() < 2 {
            let line = lines.next_line().await.unwrap().expect("still running");
            assert!(!line.contains(WRONG_PASSWORD), "{line}");
            if line.contains("WARN") {
                warnings.push(line);
            } else {
                assert!(line.contains(" INFO "), "only INFO and WARN lines: {line}");
            }
        }
    })
    .await
    .expect("two WARN lines within 20 s");
    for warning in &warnings {
        assert!(
            warning.contains(&format!(
                "cannot connect to RabbitMQ at amqp://guest@127.0.0.1:{port}/"
            )) && warning.contains("Connection refused"),
            "{warning}"
        );
    }
    assert_eq!(
        terminate(&mut child, Duration::from_secs(10)).await,
        Some(0)
    );
    app.cleanup().await;
}

#[tokio::test]
async fn an_audit_path_that_cannot_be_opened_exits_2_naming_the_absolute_path() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let run_in = |path: &str| {
        let mut command = app.worker_process(&[("KEYTURN_AUDIT__PATH", path)]);
        command.current_dir(dir.path()).stderr(Stdio::piped());
        command
    };
    let missing = run_in("no-such-dir/audit.db").output().await.unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(2), "{stderr}");
    let expected = format!(
        "keyturn: config key audit.path: cannot open the audit log {}: the directory {} does not exist",
        dir.path().join("no-such-dir/audit.db").display(),
        dir.path().join("no-such-dir").display()
    );
    assert_eq!(last_line(&stderr), expected);

    let directory = run_in(".").output().await.unwrap();
    let stderr = String::from_utf8_lossy(&directory.stderr);
    assert_eq!(directory.status.code(), Some(2), "{stderr}");
    assert!(last_line(&stderr).contains("it is a directory"), "{stderr}");
    assert!(
        last_line(&stderr).contains(&dir.path().display().to_string()),
        "{stderr}"
    );
    app.cleanup().await;
}

/// The last line of `stderr` (the start line comes first at INFO).
fn last_line(stderr: &str) -> &str {
    stderr.lines().last().unwrap_or_default()
}

#[tokio::test]
async fn a_bad_log_level_or_ca_file_exits_2_naming_the_key() {
    let app = TestApp::spawn().await;
    for level in ["verbose", "infoo", "debug,,x="] {
        let stderr = refused_at_start(&app, &[("KEYTURN_LOG__LEVEL", level)]).await;
        assert!(
            stderr.starts_with("keyturn: config key log.level: "),
            "{level}: {stderr}"
        );
    }
    let stderr = refused_at_start(&app, &[("KEYTURN_AMQP__CA_FILE", "/no/such/ca.pem")]).await;
    assert!(
        stderr.starts_with("keyturn: config key amqp.ca_file: cannot read /no/such/ca.pem: "),
        "{stderr}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_start_line_says_what_the_worker_runs_with_and_has_no_colour() {
    let app = TestApp::spawn().await;
    app.publish_job(&job("J-start", 321, "on")).await;
    let output = app
        .worker_process(&[("KEYTURN_WORKER__CONCURRENCY", "7")])
        .args(["--exit-when-idle", "1s"])
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        !stderr.contains("\x1b["),
        "no ANSI escapes off a terminal: {stderr:?}"
    );
    let start: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("keyturn worker starting"))
        .collect();
    assert_eq!(start.len(), 1, "{stderr}");
    let line = start[0];
    for part in [
        " INFO ".to_owned(),
        format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        format!(
            "config=\"{}\"",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml")
        ),
        format!("endpoint=\"{}\"", app.simulator_url),
        "auth=aksk".to_owned(),
        "concurrency=7".to_owned(),
        "per_second=1000".to_owned(),
        "per_project_per_second=1000".to_owned(),
        format!("worker_id=\"{}\"", app.settings.worker.id),
    ] {
        assert!(line.contains(&part), "{part} in {line}");
    }
    assert!(
        !stderr.contains(SK) && !stderr.contains(":guest@"),
        "{stderr}"
    );
    assert_eq!(app.events(1).await.len(), 1);
    app.cleanup().await;
}
