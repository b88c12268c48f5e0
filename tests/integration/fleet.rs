//! Fleet mode: workers sharing one PostgreSQL store. Each test makes a database of its own on the
//! machine's PostgreSQL (or `KEYTURN_TEST_POSTGRES_URL`) and drops it.

use std::process::Stdio;
use std::time::Duration;

use keyturn::amqp::worker::RunOptions;
use keyturn::audit::{AuditOptions, AuditStore, Location};
use keyturn::events::Outcome;
use keyturn::simulator::{Faults, Step};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::*;

/// Every final row in the store is a success (`why` says what that shows).
fn assert_every_row_succeeded(app: &TestApp, why: &str) {
    assert!(
        app.toggles()
            .iter()
            .all(|row| row["outcome"] == json!("succeeded")),
        "{why}"
    );
}

fn on_postgres(tweak: impl FnOnce(&mut keyturn::config::Settings) + Send + 'static) -> Options {
    Options {
        postgres: true,
        tweak: Box::new(tweak),
        ..Options::default()
    }
}

#[tokio::test]
async fn a_worker_on_postgres_finishes_every_job_once_and_the_audit_reads_the_store() {
    let app = TestApp::spawn_with(Options {
        faults: Faults {
            apply_then_error_rate: 0.2,
            ..Faults::default()
        },
        ..on_postgres(|_| {})
    })
    .await;
    let jobs = publish_fleet(&app, 40, 100).await;
    app.publish_job(&job(&jobs[0].0, 100, jobs[0].2)).await;
    app.drain().await;
    assert_one_outcome_per_job(&app, &jobs).await;
    assert_every_row_succeeded(&app, "every fault was retried or settled with Describe");
    assert!(app.stats().faults_injected > 0, "faults were injected");

    // `keyturn audit` reads the same rows from PostgreSQL (store.url), and verify passes there.
    let listed = app
        .binary()
        .args(["audit", "--format", "json"])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");
    let lines: Vec<Value> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), jobs.len());
    let attempts = app
        .binary()
        .args(["audit", "attempts", &jobs[1].0, "--format", "json"])
        .output()
        .unwrap();
    assert!(attempts.status.success(), "{attempts:?}");
    let verified = app.binary().args(["audit", "verify"]).output().unwrap();
    let findings = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success(), "{findings}");
    assert!(
        findings.contains("ok an UPDATE of toggles is refused"),
        "{findings}"
    );
    let out = tempfile::tempdir().unwrap();
    let report = out.path().join("report.json");
    let reported = app
        .binary()
        .args(["audit", "report", "R-1", "--json"])
        .arg(&report)
        .output()
        .unwrap();
    assert!(reported.status.success(), "{reported:?}");
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(
        report["rollout"]["succeeded"],
        json!(jobs.len()),
        "{report}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn two_workers_on_one_store_never_run_a_job_or_an_instance_twice() {
    let app = TestApp::spawn_with(Options {
        faults: Faults {
            latency_ms: 5,
            apply_then_error_rate: 0.1,
            ..Faults::default()
        },
        ..on_postgres(|s| s.worker.concurrency = 8)
    })
    .await;
    // Every job twice, and a second job for a third of the instances: the copies race between
    // the workers, and the instance's jobs must take turns across them.
    let jobs = publish_fleet(&app, 60, 300).await;
    for (job_id, n, status) in &jobs {
        app.publish_job(&job(job_id, *n, status)).await;
    }
    let mut second = Vec::new();
    for (_, n, status) in jobs.iter().filter(|(_, n, _)| n % 3 == 0) {
        let flipped = if *status == "on" { "off" } else { "on" };
        let job_id = format!("J-second-{n}");
        app.publish_job(&job(&job_id, *n, flipped)).await;
        second.push((job_id, *n, flipped));
    }
    let mut workers = Vec::new();
    for name in ["a", "b"] {
        let mut settings = app.settings.clone();
        settings.worker.id = format!("{}-{name}", app.settings.worker.id);
        workers.push(app.start_worker_on(settings, app.credentials(), Default::default()));
    }
    wait_until(Duration::from_secs(90), || async {
        app.toggles().len() == jobs.len() + second.len()
    })
    .await;
    let events = app
        .events_until(|events| events.len() >= 2 * jobs.len() + second.len())
        .await;
    let grouped = by_job(&events);
    for (job_id, _, _) in jobs.iter().chain(&second) {
        let copies = &grouped[job_id];
        assert!(
            copies.iter().all(|e| e.id == copies[0].id),
            "{job_id}: every copy carries the one stored event"
        );
    }
    let rows = app.toggles();
    let workers_seen: std::collections::BTreeSet<_> = rows
        .iter()
        .map(|row| row["worker_id"].to_string())
        .collect();
    assert_eq!(
        workers_seen.len(),
        2,
        "both workers ran jobs: {workers_seen:?}"
    );
    let stats = app.stats();
    for (_, n, _) in &jobs {
        let seen = &stats.instances[&instance(*n)];
        let expected = if n % 3 == 0 { 2 } else { 1 };
        assert_eq!(
            seen.toggles_applied, expected,
            "instance {n}: one toggle per job, none twice"
        );
        assert_eq!(seen.max_in_flight, 1, "instance {n}: one call at a time");
    }
    for (shutdown, handle) in workers {
        shutdown.cancel();
        handle.await.unwrap();
    }
    assert!(
        app.store_rows("SELECT job_id FROM leases").is_empty(),
        "a worker that stopped holds no lease"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_dead_workers_job_waits_for_its_lease_then_another_worker_describes_first() {
    let app = TestApp::spawn_with(on_postgres(|s| {
        s.store.lease = Duration::from_secs(3);
        s.api.request_timeout = Duration::from_secs(1);
    }))
    .await;
    // The Modify lands and the answer never comes in time: the worker is killed meanwhile.
    app.simulator.script(
        &instance(7),
        vec![Step::Hang {
            ms: 60_000,
            apply: true,
        }],
    );
    let mut doomed = app
        .worker_process(&[
            ("KEYTURN_STORE__LEASE", "3s"),
            ("KEYTURN_API__REQUEST_TIMEOUT", "1s"),
            ("KEYTURN_WORKER__ID", "doomed"),
        ])
        .spawn()
        .unwrap();
    app.publish_job(&job("J-dead", 7, "on")).await;
    wait_until(Duration::from_secs(30), || async {
        app.stats()
            .instances
            .get(&instance(7))
            .is_some_and(|i| i.toggles_applied == 1)
    })
    .await;
    doomed.start_kill().unwrap();
    doomed.wait().await.unwrap();
    let killed_at = chrono::Utc::now();

    let (shutdown, handle) = app.start_worker();
    let event = app.events(1).await.remove(0);
    assert_eq!(event.data.outcome, Outcome::Succeeded);
    let calls: Vec<Value> = app
        .attempts("J-dead")
        .iter()
        .map(|a| json!(a["call"]))
        .collect();
    assert_eq!(calls, vec![json!("describe")], "the next worker asks first");
    let stats = &app.stats().instances[&instance(7)];
    assert_eq!((stats.modify_calls, stats.toggles_applied), (1, 1));
    // The Describe waited for the dead worker's lease (3 s from its last renewal) to expire.
    let described: chrono::DateTime<chrono::Utc> = app.attempts("J-dead")[0]["started_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Renewed every second, the lease outlived its worker by at least two.
    assert!(
        described - killed_at >= chrono::Duration::milliseconds(1_500),
        "no call before the lease could have expired: killed {killed_at}, described {described}"
    );
    let rows = app.toggles();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["worker_id"], json!(app.settings.worker.id));
    shutdown.cancel();
    handle.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn a_worker_refuses_a_store_whose_schema_is_newer_and_never_shows_the_password() {
    let db = keyturn::audit::test_support::TestDatabase::create("newer");
    let url = db.url.replacen(
        "postgres://postgres@",
        "postgres://postgres:pw-never-shown@",
        1,
    );
    let location = Location::Postgres(url.clone());
    let options = AuditOptions {
        busy_timeout: Duration::from_secs(1),
        synchronous_full: true,
    };
    let opened = std::thread::spawn(move || AuditStore::open_at(&location, &options).is_ok())
        .join()
        .unwrap();
    assert!(opened, "a fresh database is migrated");
    db.with_client(|client| {
        client
            .execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ('0099_next', '')",
                &[],
            )
            .unwrap()
    });
    let output = keyturn_binary()
        .arg("worker")
        .env("KEYTURN_STORE__URL", &url)
        .env("KEYTURN_OPS__LISTEN", "")
        .env("CLOUD_SDK_AK", AK)
        .env("CLOUD_SDK_SK", SK)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("store.url"), "{stderr}");
    assert!(stderr.contains("0099_next"), "{stderr}");
    assert!(!stderr.contains("pw-never-shown"), "{stderr}");

    for (bad, why) in [
        ("mysql://root:pw-never-shown@127.0.0.1/x", "not PostgreSQL"),
        (
            "postgres://root:pw-never-shown@127.0.0.1:99999/x",
            "no such port",
        ),
        (
            "postgres://root:pw-never-shown@127.0.0.1/x?sslmode=prefer",
            "a TLS mode that may fall back to plain text",
        ),
        (
            "postgres://root:pw-never-shown@127.0.0.1/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "a root certificate file that is not there",
        ),
    ] {
        let output = keyturn_binary()
            .arg("worker")
            .env("KEYTURN_STORE__URL", bad)
            .env("CLOUD_SDK_AK", AK)
            .env("CLOUD_SDK_SK", SK)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{why}: {stderr}");
        assert!(stderr.contains("store.url"), "{why}: {stderr}");
        assert!(!stderr.contains("pw-never-shown"), "{why}: {stderr}");
    }
}

/// A worker started while PostgreSQL cannot be reached holds its jobs (it takes no delivery and
/// fails none) and says so, retrying; once the store answers it runs them all. The store is
/// reached through a TCP forwarder of the test's that is not listening at first.
#[tokio::test]
async fn a_worker_started_while_the_store_is_unreachable_holds_its_jobs_until_it_answers() {
    let app = TestApp::spawn_with(on_postgres(|_| {})).await;
    let mut direct = reqwest::Url::parse(&app.settings.store.url).unwrap();
    let target = format!(
        "{}:{}",
        direct.host_str().unwrap(),
        direct.port().unwrap_or(5432)
    );
    // A port bound but not listening: connections to it are refused, and no other socket can
    // take it, until the forwarder listens on it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    direct.set_host(Some("127.0.0.1")).unwrap();
    direct.set_port(Some(port)).unwrap();
    let jobs = publish_fleet(&app, 3, 4100).await;

    let mut worker = app
        .worker_process(&[("KEYTURN_STORE__URL", direct.as_str())])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut stderr = BufReader::new(worker.stderr.take().unwrap()).lines();
    let collected = lines.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            collected.lock().unwrap().push(line);
        }
    });
    let retries = || {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains("the store does not answer yet; retrying"))
            .count()
    };
    wait_until(Duration::from_secs(30), || async { retries() >= 2 }).await;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker waits for its store instead of exiting"
    );
    assert_eq!(
        app.queue_len(&app.settings.amqp.jobs_queue).await,
        3,
        "no job was taken while the store was away"
    );

    // The store comes back: the forwarder binds the port and passes connections through.
    let listener = socket.listen(64).unwrap();
    let forwarder = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    assert_one_outcome_per_job(&app, &jobs).await;
    assert_every_row_succeeded(&app, "the wait failed no job");
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    reader.await.unwrap();
    forwarder.abort();
    app.cleanup().await;
}

/// The local server's certificate file, which the TLS test trusts. The test fails (it never
/// skips) when the server offers no TLS.
fn local_server_certificate() -> String {
    let url = keyturn::audit::test_support::server_url();
    let (ssl, certificate) = std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("the test server");
        let row = client
            .query_one(
                "SELECT current_setting('ssl'), current_setting('ssl_cert_file')",
                &[],
            )
            .unwrap();
        (row.get::<_, String>(0), row.get::<_, String>(1))
    })
    .join()
    .unwrap();
    assert!(
        ssl == "on" && std::fs::metadata(&certificate).is_ok(),
        "the TLS store test needs the local PostgreSQL with ssl = on and its certificate file \
         readable here, self-signed for the name localhost (Debian's package sets up both with \
         its snakeoil certificate); ssl is {ssl}, the certificate file {certificate}"
    );
    certificate
}

/// The test database's URL on `host` over TLS, trusting `certificate`.
fn over_tls(url: &str, host: &str, certificate: &str) -> String {
    assert!(
        url.contains("@127.0.0.1:"),
        "the TLS store test runs on the local server at 127.0.0.1: {url}"
    );
    let joint = if url.contains('?') { '&' } else { '?' };
    url.replacen("@127.0.0.1:", &format!("@{host}:"), 1)
        + &format!("{joint}sslmode=verify-full&sslrootcert={certificate}")
}

/// Counts of the store's connections to the database (`application_name` keyturn), by whether
/// they use TLS.
fn keyturn_connections(db: &keyturn::audit::test_support::TestDatabase) -> (i64, i64) {
    let rows = pg_rows(
        db,
        "SELECT count(*) FILTER (WHERE s.ssl) AS tls, count(*) FILTER (WHERE NOT s.ssl) AS plain \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = current_database() AND a.application_name = 'keyturn'",
    );
    (
        rows[0]["tls"].as_i64().unwrap(),
        rows[0]["plain"].as_i64().unwrap(),
    )
}

/// `store.url` with `sslmode=verify-full` and `sslrootcert`: the worker runs its jobs and the
/// audit reads them over TLS, and every connection of the store is encrypted. A server whose
/// certificate is not trusted, or not issued for the host named, is not connected to: the store
/// says why and holds (an unreachable store), never falls back to plain text.
#[tokio::test]
async fn the_store_is_reached_over_verified_tls_and_never_over_an_unchecked_one() {
    let certificate = local_server_certificate();
    let trusted = certificate.clone();
    let app = TestApp::spawn_with(on_postgres(move |settings| {
        settings.store.url = over_tls(&settings.store.url, "localhost", &trusted);
    }))
    .await;
    let jobs = publish_fleet(&app, 12, 300).await;
    app.drain().await;
    assert_one_outcome_per_job(&app, &jobs).await;
    assert_every_row_succeeded(&app, "every job ran with the store over TLS");
    assert_eq!(app.toggles().len(), jobs.len(), "the audit reads over TLS");

    let db = app.postgres.clone().expect("a PostgreSQL test");
    let options = AuditOptions {
        busy_timeout: Duration::from_secs(1),
        synchronous_full: true,
    };
    let open = |url: String| {
        let options = options.clone();
        std::thread::spawn(move || AuditStore::open_at(&Location::Postgres(url), &options))
            .join()
            .unwrap()
    };
    // The workers' and the audit reads' connections are gone first: what is counted next is the
    // store opened here.
    wait_until(Duration::from_secs(30), || async {
        keyturn_connections(&db) == (0, 0)
    })
    .await;
    let encrypted = open(app.settings.store.url.clone()).expect("the store over TLS");
    assert_eq!(
        Location::Postgres(app.settings.store.url.clone()).describe(),
        format!("postgres database {} on localhost over TLS", db.name)
    );
    let (tls, plain) = keyturn_connections(&db);
    assert!(tls >= 3, "writer, reader and token connections: {tls}");
    assert_eq!(plain, 0, "no connection of the store is in plain text");
    // The count tells the two apart: a store without sslmode connects in plain text.
    let unencrypted = open(db.url.clone()).expect("the store in plain text");
    let (_, plain) = keyturn_connections(&db);
    assert!(plain >= 3, "the plain store's connections: {plain}");
    drop((encrypted, unencrypted));

    // A root of another CA (the system's roots may hold the server's certificate itself, as
    // Debian's do with its snakeoil certificate).
    let other_root = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .unwrap()
        .cert
        .pem();
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_root).unwrap();
    for (url, why, words) in [
        (
            over_tls(&db.url, "localhost", other.to_str().unwrap()),
            "a certificate no trusted root vouches for",
            "invalid peer certificate",
        ),
        (
            over_tls(&db.url, "127.0.0.1", &certificate),
            "a certificate for another name",
            "invalid peer certificate: certificate not valid for name \"127.0.0.1\"",
        ),
    ] {
        match open(url) {
            Err(keyturn::audit::AuditError::Unreachable(problem)) => {
                assert!(problem.contains(words), "{why}: {problem}");
            }
            Err(other) => panic!("{why}: held as unreachable, not {other}"),
            Ok(_) => panic!("{why}: connected"),
        }
    }
}

/// A 429 pauses the project's calls for the whole fleet, not only for the worker that met it:
/// the project's bucket in the store grants no token until the pause is over, and another
/// project's calls go on meanwhile. Two workers on one store, projects limited to 20 calls/s;
/// 60 jobs of one project with 20 of another between them. The third job's first Modify is answered 429 (no `Retry-After`, as the
/// real gateway sends none, so `rate_limit.throttle_pause`, 1.5 s, holds). From 300 ms after the
/// 429 (calls already granted when it came may still land) until the pause's end, the simulator
/// hears no Modify for the paused project from either worker, and some for the other one (a
/// paused job gives its call slot back while it waits). Afterwards every job succeeds, and each
/// worker finished jobs after the pause.
#[tokio::test]
async fn a_429_pauses_the_projects_calls_on_every_worker_of_the_store() {
    const OTHER_PROJECT: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let pause = Duration::from_millis(1_500);
    let app = TestApp::spawn_with(on_postgres(move |s| {
        s.rate_limit.throttle_pause = pause;
        // Slow enough that the other project's 20 jobs take about a second: they are still
        // there to run during the pause.
        s.rate_limit.per_project_per_second = 20;
        s.rate_limit.per_project_burst = 2;
        // Every job is delivered at once (half to each worker), so the other project's jobs are
        // held while the paused ones wait: they need the call slots (4) the paused ones do not.
        s.worker.prefetch = 40;
    }))
    .await;
    app.simulator.script(
        &instance(402),
        vec![Step::Error {
            status: 429,
            code: "APIGW.0308".into(),
            msg: Some("The throttling threshold has been reached".into()),
            retry_after_secs: None,
            apply: false,
        }],
    );
    // (job_id, instance number, status, project)
    let mut jobs = Vec::new();
    for i in 0..80u32 {
        let (n, project) = if i % 4 == 3 {
            (700 + i / 4, OTHER_PROJECT)
        } else {
            (400 + i - i / 4, PROJECT)
        };
        let status = if i % 3 == 0 { "off" } else { "on" };
        let job_id = format!("J-{n}");
        let mut body = job(&job_id, n, status);
        body["project_id"] = json!(project);
        app.publish_job(&body).await;
        jobs.push((job_id, n, status, project));
    }
    let idle = || RunOptions {
        exit_when_idle: Some(Duration::from_millis(600)),
    };
    let mut second = app.settings.clone();
    second.worker.id = "second".into();
    let (_, first_run) = app.start_worker_with(app.credentials(), idle());
    let (_, second_run) = app.start_worker_on(second, app.credentials(), idle());
    for run in [first_run, second_run] {
        tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("both workers drained in time")
            .unwrap();
    }
    // Every job once, as `assert_one_outcome_per_job` checks, but for the throttled one, whose
    // 429 was a Modify sent and not applied: it was sent again after the pause.
    let events = app
        .events_until(|events| by_job(events).len() >= jobs.len())
        .await;
    assert_eq!(by_job(&events).len(), jobs.len());
    let rows = app.toggles();
    assert_eq!(rows.len(), jobs.len(), "one final audit row per job");
    assert_every_row_succeeded(&app, "the throttled job ran once the pause was over");
    let stats = app.stats();
    for (job_id, n, status, project) in &jobs {
        assert_eq!(
            app.simulator.status_of(project, &instance(*n)).as_deref(),
            Some(*status),
            "{job_id}"
        );
        let calls = &stats.instances[&instance(*n)];
        let sent = if *n == 402 { 2 } else { 1 };
        assert_eq!(
            (calls.modify_calls, calls.toggles_applied),
            (sent, 1),
            "{job_id}"
        );
    }

    let recent = stats.recent;
    let throttled = recent
        .iter()
        .find(|request| request.status == 429)
        .expect("the scripted 429")
        .at_ms;
    let paused: std::collections::HashSet<String> = jobs
        .iter()
        .filter(|job| job.3 == PROJECT)
        .map(|job| instance(job.1))
        .collect();
    let modifies = |from: i64, to: i64, of_paused: bool| {
        recent
            .iter()
            .filter(|r| r.method == "POST" && r.at_ms > from && r.at_ms < to)
            .filter(|r| r.instance_id.as_ref().is_some_and(|id| paused.contains(id)) == of_paused)
            .count()
    };
    let pause_ms = pause.as_millis() as i64;
    let (from, to) = (throttled + 300, throttled + pause_ms - 100);
    assert_eq!(
        modifies(from, to, true),
        0,
        "no Modify of the paused project from any worker while it is paused"
    );
    let others = modifies(from, to, false);
    assert!(
        others > 0,
        "the other project's calls went on during the pause"
    );
    let after = modifies(to, i64::MAX, true);
    assert!(
        after >= 30,
        "the project's calls went on after the pause: {after}"
    );
    eprintln!(
        "429 pause: in the window, {others} Modify calls of the other project; {after} of the paused one after it"
    );
    // Both workers had the project's jobs to run after the pause, so both were held by it.
    let resumed = chrono::DateTime::from_timestamp_millis(throttled + pause_ms).unwrap();
    for worker in [app.settings.worker.id.as_str(), "second"] {
        assert!(
            rows.iter().any(|row| row["worker_id"] == json!(worker)
                && row["finished_at"]
                    .as_str()
                    .unwrap()
                    .parse::<chrono::DateTime<chrono::Utc>>()
                    .unwrap()
                    > resumed),
            "{worker} finished jobs after the pause"
        );
    }
    app.cleanup().await;
}
