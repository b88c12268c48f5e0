//! Credential providers against the simulator's IAM and metadata endpoints over a socket: fetched
//! credentials are renewed before they expire, one fetch at a time; a refused fetch holds jobs
//! (the credentials circuit) and never fails them; secrets stay out of logs and the audit log.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use keyturn::amqp::worker::RunOptions;
use keyturn::config::{Credentials, Settings};
use keyturn::simulator::{Faults, FetchRecord};

use crate::helpers::*;

/// The settings of `credentials = "iam"` against the app's simulator.
fn use_iam(settings: &mut Settings, endpoint: &str) {
    settings.api.credentials = "iam".into();
    settings.api.iam_endpoint = endpoint.into();
    settings.api.iam_domain = IAM_DOMAIN.into();
    settings.api.iam_user = IAM_USER.into();
    settings.api.iam_password = IAM_PASSWORD.to_owned().into();
}

/// An app whose simulator issues credentials living `life` and answers after `latency_ms`.
async fn app_with(life: Duration, latency_ms: u64, concurrency: u16) -> TestApp {
    TestApp::spawn_with(Options {
        credential_life: life,
        faults: Faults {
            latency_ms,
            ..Faults::default()
        },
        tweak: Box::new(move |settings| {
            settings.worker.concurrency = concurrency;
            settings.circuit.probe_interval = Duration::from_millis(200);
            settings.circuit.probe_max_interval = Duration::from_millis(500);
        }),
        ..Options::default()
    })
    .await
}

fn fetches(app: &TestApp, kind: &str) -> Vec<FetchRecord> {
    app.stats()
        .credential_fetches
        .into_iter()
        .filter(|fetch| fetch.kind == kind)
        .collect()
}

/// Every job ended succeeded under its own id, and nothing was left parked or dead-lettered.
async fn assert_all_succeeded(app: &TestApp, jobs: &[(String, u32, &str)]) {
    wait_until(Duration::from_secs(120), || async {
        app.toggles().len() >= jobs.len()
    })
    .await;
    let toggles = app.toggles();
    let ids: BTreeSet<&str> = toggles
        .iter()
        .map(|r| r["job_id"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = jobs.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids, expected, "one final row per job, under its own id");
    assert_eq!(toggles.len(), jobs.len());
    for row in &toggles {
        assert_eq!(row["outcome"], "succeeded", "{row}");
    }
    assert!(app.dead_letters().await.is_empty(), "nothing dead-lettered");
    assert_eq!(parked(app), 0);
}

#[tokio::test]
async fn a_three_second_iam_token_is_fetched_once_per_refresh_with_64_jobs_in_flight() {
    let app = app_with(Duration::from_secs(3), 150, 64).await;
    let mut settings = app.settings.clone();
    use_iam(&mut settings, &app.simulator_url);
    let credentials = settings.credentials(&[]).unwrap();
    assert!(matches!(credentials, Credentials::Iam(_)));
    // 600 jobs of one project at its limit of 100 calls/s: about 6 s, four refresh intervals.
    let jobs = publish_fleet(&app, 600, 1000).await;
    let started = Instant::now();
    let (stop, worker, pipeline) =
        app.start_worker_watched(settings, credentials, RunOptions::default());
    assert_all_succeeded(&app, &jobs).await;
    let elapsed = started.elapsed().as_secs_f64();
    let ops = crate::ops::serve_ops(pipeline).await;
    let scrape = crate::ops::Scrape::of(&ops).await;
    stop.cancel();
    worker.await.unwrap();

    assert_eq!(
        app.stats().auth_failures,
        0,
        "no call went out with an expired token"
    );
    let fetched = fetches(&app, "iam");
    assert!(fetched.iter().all(|fetch| !fetch.refused));
    // A 3 s token is renewed at half its life: 1.5 s apart, never sooner (single-flight).
    for pair in fetched.windows(2) {
        let gap = pair[1].at_ms - pair[0].at_ms;
        assert!(gap >= 1_400, "two fetches {gap} ms apart: {fetched:?}");
    }
    let expected = elapsed / 1.5;
    eprintln!("{} fetches in {elapsed:.1} s", fetched.len());
    assert!(
        (fetched.len() as f64) <= expected + 1.0 && (fetched.len() as f64) >= expected - 2.0,
        "{} fetches in {elapsed:.1} s",
        fetched.len()
    );
    assert!(fetched.len() >= 3, "the run spanned several expiries");
    assert_eq!(
        scrape.value("keyturn_credential_fetches", &[]),
        Some(fetched.len() as f64),
        "the metric counts the fetches the simulator saw"
    );
    app.cleanup().await;
}

/// A second project of the same account, besides `PROJECT`.
const OTHER_PROJECT: &str = "5d3c1b2a0f9e8d7c6b5a4f3e2d1c0b9a";

#[tokio::test]
async fn iam_tokens_are_scoped_per_project_one_fetch_each_for_jobs_of_two_projects() {
    let app = app_with(Duration::from_secs(3600), 100, 64).await;
    let mut settings = app.settings.clone();
    use_iam(&mut settings, &app.simulator_url);
    let credentials = settings.credentials(&[]).unwrap();
    // 64 in flight from the first moment, interleaved: both projects want a token at once.
    let mut jobs = Vec::new();
    for i in 0..200u32 {
        let job_id = format!("J-6000-{i}");
        let mut body = job(&job_id, 6000 + i, "on");
        if i % 2 == 1 {
            body["project_id"] = serde_json::json!(OTHER_PROJECT);
        }
        app.publish_job(&body).await;
        jobs.push((job_id, 6000 + i, "on"));
    }
    let (stop, worker, pipeline) =
        app.start_worker_watched(settings, credentials, RunOptions::default());
    assert_all_succeeded(&app, &jobs).await;
    let ops = crate::ops::serve_ops(pipeline).await;
    let scrape = crate::ops::Scrape::of(&ops).await;
    stop.cancel();
    worker.await.unwrap();

    let stats = app.stats();
    assert_eq!(
        stats.auth_failures, 0,
        "no token was used on another project"
    );
    for i in 0..200u32 {
        let project = if i % 2 == 1 { OTHER_PROJECT } else { PROJECT };
        assert_eq!(
            app.simulator
                .status_of(project, &instance(6000 + i))
                .as_deref(),
            Some("on")
        );
    }
    let mut scoped: Vec<String> = fetches(&app, "iam")
        .into_iter()
        .map(|fetch| {
            assert!(!fetch.refused, "{fetch:?}");
            fetch.project_id.expect("scoped by project id")
        })
        .collect();
    scoped.sort();
    let mut expected = vec![PROJECT.to_owned(), OTHER_PROJECT.to_owned()];
    expected.sort();
    assert_eq!(scoped, expected, "exactly one fetch per project");
    assert_eq!(scrape.value("keyturn_credential_fetches", &[]), Some(2.0));
    app.cleanup().await;
}

#[tokio::test]
async fn metadata_keys_rotate_during_a_run_each_used_with_its_own_security_token() {
    let app = app_with(Duration::from_secs(2), 50, 16).await;
    let mut settings = app.settings.clone();
    settings.api.credentials = "metadata".into();
    settings.api.metadata_url = app.simulator_url.clone();
    let credentials = settings.credentials(&[]).unwrap();
    let jobs = publish_fleet(&app, 400, 2000).await;
    let (stop, worker) = app.start_worker_on(settings, credentials, RunOptions::default());
    assert_all_succeeded(&app, &jobs).await;
    stop.cancel();
    worker.await.unwrap();

    let stats = app.stats();
    assert_eq!(stats.auth_failures, 0);
    let issued: BTreeSet<String> = fetches(&app, "metadata")
        .into_iter()
        .filter_map(|fetch| fetch.access_key)
        .collect();
    let used: BTreeSet<String> = stats
        .recent
        .iter()
        .filter(|request| request.status == 200)
        .map(|request| request.access_key.clone().expect("signed"))
        .collect();
    assert!(
        used.len() >= 3,
        "several temporary keys were used: {used:?}"
    );
    assert!(
        used.is_subset(&issued),
        "only keys the metadata service issued"
    );
    for request in &stats.recent {
        let signed = request.signed_headers.clone().unwrap_or_default();
        assert!(
            signed.iter().any(|h| h == "x-security-token"),
            "{request:?}"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn temporary_keys_from_the_environment_sign_their_security_token() {
    let app = TestApp::spawn().await;
    let (ak, sk, token, _) = app.simulator.issue_temporary();
    let env: Vec<(String, String)> = [
        ("CLOUD_SDK_AK", ak.clone()),
        (
            "CLOUD_SDK_SK",
            secrecy::ExposeSecret::expose_secret(&sk).to_owned(),
        ),
        (
            "CLOUD_SDK_SECURITY_TOKEN",
            secrecy::ExposeSecret::expose_secret(&token).to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let credentials = app.settings.credentials(&env).unwrap();
    assert!(matches!(credentials, Credentials::TemporaryAkSk { .. }));
    let jobs = publish_fleet(&app, 5, 3000).await;
    app.drain_with(credentials).await;
    assert_all_succeeded(&app, &jobs).await;
    let stats = app.stats();
    assert_eq!(stats.auth_failures, 0);
    assert!(!stats.recent.is_empty());
    for request in &stats.recent {
        assert_eq!(request.access_key.as_deref(), Some(ak.as_str()));
        let signed = request.signed_headers.clone().unwrap_or_default();
        assert!(signed.iter().any(|h| h == "x-security-token"), "{signed:?}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn refused_iam_fetches_hold_jobs_until_iam_answers_then_all_succeed_and_nothing_leaks() {
    let app = app_with(Duration::from_secs(3), 0, 4).await;
    app.simulator.set_faults(Faults {
        refuse_credential_fetches: true,
        ..Faults::default()
    });
    let jobs = publish_fleet(&app, 20, 4000).await;
    let ops = crate::ops::free_address();
    let mut worker = app
        .worker_process(&[
            ("KEYTURN_OPS__LISTEN", &ops),
            ("KEYTURN_API__CREDENTIALS", "iam"),
            ("KEYTURN_API__IAM_ENDPOINT", &app.simulator_url),
            ("KEYTURN_API__IAM_DOMAIN", IAM_DOMAIN),
            ("KEYTURN_API__IAM_USER", IAM_USER),
            ("KEYTURN_API__IAM_PASSWORD", IAM_PASSWORD),
            ("KEYTURN_WORKER__CONCURRENCY", "4"),
            ("KEYTURN_CIRCUIT__PROBE_INTERVAL", "200ms"),
            ("KEYTURN_CIRCUIT__PROBE_MAX_INTERVAL", "500ms"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    app.wait_for_audit().await;

    // Nothing can be sent: the first jobs are parked and the probes keep asking IAM.
    wait_until(Duration::from_secs(30), || async {
        let parked = parked(&app);
        parked >= 1 && fetches(&app, "iam").len() >= 3
    })
    .await;
    assert!(app.toggles().is_empty(), "no job ended while IAM refused");
    assert_eq!(app.stats().requests, 0, "nothing reached the API");
    assert!(fetches(&app, "iam").iter().all(|fetch| fetch.refused));
    let scrape = crate::ops::Scrape::of(&ops).await;
    assert_eq!(
        scrape.sum("keyturn_api_calls"),
        0.0,
        "attempts that sent nothing are not API calls"
    );
    assert_eq!(scrape.value("keyturn_credential_fetches", &[]), Some(0.0));

    app.simulator.set_faults(Faults::default());
    assert_all_succeeded(&app, &jobs).await;
    let scrape = crate::ops::Scrape::of(&ops).await;
    let stats = app.stats();
    assert_eq!(
        scrape.sum("keyturn_api_calls"),
        stats.requests as f64,
        "one API call per request the API saw"
    );
    let issued = fetches(&app, "iam").iter().filter(|f| !f.refused).count();
    assert_eq!(
        scrape.value("keyturn_credential_fetches", &[]),
        Some(issued as f64),
        "refused fetches are not counted"
    );
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    let stderr = stderr_of(&mut worker).await;
    let opened: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("circuit opened:"))
        .collect();
    assert_eq!(opened.len(), 1, "{stderr}");
    let source = format!(
        "IAM at {}/v3/auth/tokens (a token for project {PROJECT}) answered HTTP 401",
        app.simulator_url
    );
    assert!(opened[0].contains(&source), "{}", opened[0]);
    assert!(
        opened[0].contains("check api.iam_endpoint"),
        "{}",
        opened[0]
    );

    // No password or fetched token in the logs or in any audit row.
    let audit = format!(
        "{:?}{:?}",
        app.toggles(),
        rows(&app.audit_path(), "SELECT * FROM attempts")
    );
    for text in [&stderr, &audit] {
        assert!(!text.contains("never-log-me"), "the password leaked");
        assert!(!text.contains("MIIissued-"), "a fetched token leaked");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn metadata_security_tokens_never_reach_the_logs_or_the_audit() {
    let app = app_with(Duration::from_secs(2), 20, 4).await;
    let jobs = publish_fleet(&app, 30, 5000).await;
    let mut worker = app
        .worker_process(&[
            ("KEYTURN_API__CREDENTIALS", "metadata"),
            ("KEYTURN_API__METADATA_URL", &app.simulator_url),
            ("KEYTURN_LOG__LEVEL", "debug"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    app.wait_for_audit().await;
    assert_all_succeeded(&app, &jobs).await;
    assert_eq!(
        terminate(&mut worker, Duration::from_secs(30)).await,
        Some(0)
    );
    let stderr = stderr_of(&mut worker).await;
    assert!(!fetches(&app, "metadata").is_empty());
    let audit = format!("{:?}", rows(&app.audit_path(), "SELECT * FROM attempts"));
    for text in [&stderr, &audit] {
        // Every security token the simulator issues starts with this.
        assert!(
            !text.contains("gQpjbi1ub3J0aC00"),
            "a security token leaked"
        );
    }
    app.cleanup().await;
}
