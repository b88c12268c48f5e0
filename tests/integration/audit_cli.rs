//! `keyturn audit` and `keyturn audit report` against an audit file written by the real worker
//! (broker, simulator over HTTP, SQLite): every output of the real binary is parsed back (CSV
//! with a CSV reader, JSON as JSON, the HTML page as Chromium renders it) and compared with the
//! store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use keyturn::simulator::Step;
use serde_json::{Value, json};

use crate::helpers::*;

/// A ticket that would run script if the report did not escape it.
const HOSTILE_TICKET: &str = "<script>document.title='pwned'</script>CHG-9";
/// An API error message with markup, a comma and quotes (CSV quoting and HTML escaping).
const HOSTILE_MSG: &str = "<img src=x onerror=alert(1)> denied, \"not yours\"";
const REGIONS: &[&str] = &["cn-north-4", "cn-east-3", "ap-southeast-1"];

impl TestApp {
    fn runs_of(&self, rollout_id: &str) -> usize {
        rows(
            &self.audit_path(),
            &format!("SELECT id FROM toggles WHERE rollout_id = '{rollout_id}'"),
        )
        .len()
    }
}

/// The store after a real rollout: 10 valid jobs across three regions and one invalid one; three
/// instances refuse with a 403 whose message is hostile; `retry_failed` after the fault is
/// fixed reruns those three. 14 runs, 11 jobs, 3 of them run twice.
async fn rollout_store(app: &TestApp, rollout_id: &str, first: u32) {
    let (stop, worker) = app.start_worker();
    let declared = app
        .command(
            json!({"kind": "rollout", "rollout_id": rollout_id, "ticket": HOSTILE_TICKET,
            "expected_jobs": 11, "failure_budget": 5, "requested_by": "ops & co",
            "max_per_second": 50}),
        )
        .await;
    assert!(declared.ok, "{declared:?}");
    let doomed = [first, first + 4, first + 7];
    for n in doomed {
        let forbidden = Step::Error {
            status: 403,
            code: "DBS.200010".into(),
            msg: Some(HOSTILE_MSG.into()),
            retry_after_secs: None,
            apply: false,
        };
        app.simulator.script(&instance(n), vec![forbidden]);
    }
    for (i, n) in (first..first + 10).enumerate() {
        let mut body = job(&format!("{rollout_id}:{}", instance(n)), n, "on");
        body["rollout_id"] = json!(rollout_id);
        body["ticket"] = json!(HOSTILE_TICKET);
        body["region"] = json!(REGIONS[i % REGIONS.len()]);
        app.publish_job(&body).await;
    }
    let mut invalid = job(&format!("{rollout_id}:bad"), first + 10, "maybe");
    invalid["rollout_id"] = json!(rollout_id);
    app.publish_job(&invalid).await;
    wait_until(Duration::from_secs(60), || async {
        app.runs_of(rollout_id) == 11
    })
    .await;
    for n in doomed {
        app.simulator.clear_script(&instance(n));
    }
    let retried = app
        .command(json!({"kind": "retry_failed", "rollout_id": rollout_id}))
        .await;
    assert!(retried.ok, "{retried:?}");
    wait_until(Duration::from_secs(60), || async {
        app.runs_of(rollout_id) == 14
    })
    .await;
    // Read beside the running worker, which holds the file open in WAL mode.
    let beside = audit(
        &app.audit_path(),
        &["--rollout", rollout_id, "--format", "json"],
    );
    assert_eq!(stdout(&beside).lines().count(), 14);
    stop.cancel();
    worker.await.unwrap();
}

fn audit(db: &Path, args: &[&str]) -> Output {
    keyturn_binary()
        .arg("audit")
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// A stored value as CSV shows it: NULL empty, numbers in decimal.
fn as_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[tokio::test]
async fn audit_csv_json_and_table_outputs_parse_back_to_the_store() {
    let app = TestApp::spawn().await;
    let rollout = unique("R-audit");
    rollout_store(&app, &rollout, 2100).await;
    let db = app.audit_path();
    let stored = rows(
        &db,
        &format!("SELECT * FROM toggles WHERE rollout_id = '{rollout}' ORDER BY finished_at, id"),
    );
    assert_eq!(stored.len(), 14);

    // CSV, read back with a CSV reader: a header naming every column, one record per row.
    let csv_text = stdout(&audit(&db, &["--rollout", &rollout, "--format", "csv"]));
    assert!(csv_text.contains("\r\n"), "RFC 4180 lines end in CRLF");
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let columns: Vec<String> = stored[0].as_object().unwrap().keys().cloned().collect();
    let mut sorted_header = header.clone();
    sorted_header.sort();
    let mut sorted_columns = columns.clone();
    sorted_columns.sort();
    assert_eq!(sorted_header, sorted_columns, "every column of toggles");
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), stored.len());
    for (record, row) in records.iter().zip(&stored) {
        for (name, field) in header.iter().zip(record.iter()) {
            assert_eq!(field, as_text(&row[name]), "column {name}");
        }
    }
    assert!(
        records
            .iter()
            .any(|r| r.iter().any(|field| field == HOSTILE_MSG)),
        "a message with a comma and quotes survives quoting"
    );

    // JSON lines: each line one object equal to its stored row.
    let json_text = stdout(&audit(&db, &["--rollout", &rollout, "--format", "json"]));
    let objects: Vec<Value> = json_text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(objects, stored);

    // Filters, each against the same question asked in SQL.
    let count = |args: &[&str]| {
        let mut all = vec!["--rollout", rollout.as_str(), "--format", "json"];
        all.extend_from_slice(args);
        stdout(&audit(&db, &all)).lines().count()
    };
    let sql_count = |clause: &str| {
        rows(
            &db,
            &format!("SELECT id FROM toggles WHERE rollout_id = '{rollout}' AND {clause}"),
        )
        .len()
    };
    assert_eq!(count(&["--outcome", "failed"]), 3);
    assert_eq!(
        count(&["--outcome", "failed"]),
        sql_count("outcome = 'failed'")
    );
    let first = instance(2100);
    assert_eq!(
        count(&["--instance", &first]),
        2,
        "the failed run and its rerun"
    );
    let job_id = format!("{rollout}:{first}");
    assert_eq!(count(&["--job", &job_id]), 2);
    assert_eq!(
        count(&["--ticket", HOSTILE_TICKET]),
        13,
        "the invalid job had none"
    );
    assert_eq!(count(&["--since", "1h"]), 14);
    assert_eq!(count(&["--until", "1h"]), 0);
    let middle = stored[7]["finished_at"].as_str().unwrap();
    assert_eq!(
        count(&["--since", middle]),
        sql_count(&format!("finished_at >= '{middle}'"))
    );
    assert_eq!(count(&["--limit", "4"]), 4);

    // The table: a header, one line per row, nothing wider than 100 columns.
    let table = stdout(&audit(&db, &["--rollout", &rollout]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 15, "{table}");
    assert!(lines[0].starts_with("finished_at"), "{table}");
    assert!(
        lines.iter().all(|line| line.chars().count() <= 100),
        "{table}"
    );
    assert!(table.contains('…'), "long ids are cut with an ellipsis");
    assert_eq!(lines.iter().filter(|l| l.contains(" failed ")).count(), 3);

    // The store path from the settings, and a missing store named with its key (exit 2).
    let by_setting = keyturn_binary()
        .args(["audit", "--rollout", &rollout, "--format", "json"])
        .env("KEYTURN_AUDIT__PATH", &db)
        .output()
        .unwrap();
    assert_eq!(stdout(&by_setting).lines().count(), 14);
    let missing = keyturn_binary()
        .args(["audit", "--format", "json"])
        .env("KEYTURN_AUDIT__PATH", db.with_file_name("nowhere.db"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let error = String::from_utf8_lossy(&missing.stderr);
    assert!(
        error.contains("audit.path") && error.contains("nowhere.db"),
        "{error}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn audit_attempts_lists_every_http_call_of_a_job_joined_on_event_id() {
    let app = TestApp::spawn().await;
    let rollout = unique("R-attempts");
    rollout_store(&app, &rollout, 2200).await;
    let db = app.audit_path();
    let job_id = format!("{rollout}:{}", instance(2200));
    let stored = rows(
        &db,
        &format!(
            "SELECT t.rerun, a.number, a.call, a.started_at, a.latency_ms, a.http_status,
                    a.error_code, a.request_id
             FROM attempts a JOIN toggles t ON t.event_id = a.event_id
             WHERE t.job_id = '{job_id}' ORDER BY t.rerun, t.id, a.number, a.id"
        ),
    );
    assert!(stored.len() >= 2, "a failed run and its rerun: {stored:?}");
    let json_text = stdout(&audit(&db, &["attempts", &job_id, "--format", "json"]));
    let listed: Vec<Value> = json_text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(listed.len(), stored.len());
    for (got, want) in listed.iter().zip(&stored) {
        for key in want.as_object().unwrap().keys() {
            assert_eq!(got[key], want[key], "{key}");
        }
    }
    assert!(
        listed
            .iter()
            .any(|a| a["http_status"] == 403 && a["rerun"] == 0)
    );
    assert!(
        listed
            .iter()
            .any(|a| a["http_status"] == 200 && a["rerun"] == 1)
    );
    let only_rerun = stdout(&audit(
        &db,
        &["attempts", &job_id, "--rerun", "1", "--format", "json"],
    ));
    assert!(only_rerun.lines().all(|l| l.contains("\"rerun\":1")));
    let table = stdout(&audit(&db, &["attempts", &job_id]));
    assert_eq!(table.lines().count(), stored.len() + 1, "{table}");
    assert!(
        table.contains("DBS.200010") && table.contains("403"),
        "{table}"
    );
    assert!(table.lines().all(|line| line.chars().count() <= 100));
    let unknown = audit(&db, &["attempts", "no-such-job"]);
    assert_eq!(unknown.status.code(), Some(1));
    app.cleanup().await;
}

#[tokio::test]
async fn audit_verify_passes_on_a_good_store_and_names_each_problem() {
    let app = TestApp::spawn().await;
    let rollout = unique("R-verify");
    rollout_store(&app, &rollout, 2300).await;
    let db = app.audit_path();
    let good = audit(&db, &["verify"]);
    let text = stdout(&good);
    assert!(text.lines().all(|l| l.starts_with("ok ")), "{text}");
    assert!(text.contains("an UPDATE of toggles is refused"), "{text}");
    assert!(text.contains("migrations applied"), "{text}");
    let toggles_before = rows(&db, "SELECT * FROM toggles ORDER BY id");
    let db_after = keyturn_binary()
        .args(["audit", "verify", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(
        stdout(&db_after),
        text,
        "--db goes before or after the subcommand"
    );
    let mixed = audit(&db, &["--rollout", &rollout, "verify"]);
    assert_eq!(
        mixed.status.code(),
        Some(2),
        "a query option with a subcommand"
    );

    let connection = rusqlite::Connection::open(&db).unwrap();
    connection
        .execute(
            "UPDATE rollouts SET succeeded = succeeded + 1 WHERE rollout_id = ?1",
            [&rollout],
        )
        .unwrap();
    let miscounted = audit(&db, &["verify"]);
    assert_eq!(miscounted.status.code(), Some(1));
    let text = String::from_utf8_lossy(&miscounted.stdout).to_string();
    let problems: Vec<&str> = text.lines().filter(|l| !l.starts_with("ok ")).collect();
    assert_eq!(problems.len(), 1, "{text}");
    assert!(
        problems[0].contains(&rollout) && problems[0].contains("counts"),
        "{text}"
    );

    connection
        .execute_batch("DROP TRIGGER toggles_refuse_update")
        .unwrap();
    let unguarded = audit(&db, &["verify"]);
    assert_eq!(unguarded.status.code(), Some(1));
    let text = String::from_utf8_lossy(&unguarded.stdout).to_string();
    assert!(
        text.contains("trigger toggles_refuse_update is missing"),
        "{text}"
    );
    assert!(text.contains("an UPDATE of toggles was accepted"), "{text}");
    assert_eq!(
        rows(&db, "SELECT * FROM toggles ORDER BY id"),
        toggles_before,
        "verify's trial UPDATE was rolled back"
    );

    // An orphan attempt, as a store written with foreign keys off could hold.
    connection
        .pragma_update(None, "foreign_keys", "OFF")
        .unwrap();
    connection
        .execute(
            "INSERT INTO attempts (event_id, job_id, number, call, started_at, latency_ms)
             VALUES ('no-such-event', 'ghost', 1, 'modify', '2026-01-01T00:00:00.000Z', 1)",
            [],
        )
        .unwrap();
    let orphaned = audit(&db, &["verify"]);
    let text = String::from_utf8_lossy(&orphaned.stdout).to_string();
    assert!(
        text.contains("attempts row ghost attempt 1 (event no-such-event) joins no toggles row"),
        "{text}"
    );
    app.cleanup().await;
}

/// Chromium from the distribution, or a failure saying how to install it (never a skip).
fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser"] {
        if let Ok(output) = std::process::Command::new("which").arg(name).output()
            && output.status.success()
        {
            return PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
        }
    }
    panic!("chromium is missing: `apt-get install -y chromium` (.ci/run installs it)");
}

/// Runs headless Chromium on `page` with every background fetch off; returns (stdout, stderr).
fn headless(page: &Path, profile: &Path, extra: &[&str]) -> (String, String) {
    let output = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The text of the element with `id` in a DOM dump.
fn element_text(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let open_end = start + dom[start..].find('>').unwrap() + 1;
    let close = open_end + dom[open_end..].find("</").unwrap();
    dom[open_end..close].to_owned()
}

#[tokio::test]
async fn audit_report_is_one_offline_page_chromium_renders_with_the_stores_numbers() {
    let app = TestApp::spawn().await;
    let rollout = unique("R-report");
    rollout_store(&app, &rollout, 2400).await;
    let db = app.audit_path();
    let out = tempfile::tempdir().unwrap();
    let html = out.path().join("report.html");
    let csv_file = out.path().join("report.csv");
    let json_file = out.path().join("report.json");
    let written = audit(
        &db,
        &[
            "report",
            &rollout,
            "--html",
            html.to_str().unwrap(),
            "--csv",
            csv_file.to_str().unwrap(),
            "--json",
            json_file.to_str().unwrap(),
        ],
    );
    stdout(&written);
    let page = std::fs::read_to_string(&html).unwrap();

    // Self-contained: no URL, no fetched resource, no script of any kind.
    for needle in ["http://", "https://", "url(", "@import", "<script", "<img"] {
        assert!(!page.contains(needle), "the page holds {needle:?}");
    }
    // Stored text is escaped, so every `<` opens a real tag: none may load anything.
    for tag in page.split('<').skip(1).map(|t| &t[..t.find('>').unwrap()]) {
        for attribute in ["src=", "href=", "action=", "srcset="] {
            assert!(!tag.contains(attribute), "a tag loads something: <{tag}>");
        }
    }
    assert!(
        page.contains("&lt;script&gt;"),
        "the ticket is shown, escaped"
    );

    let profile = out.path().join("profile");
    let net_log = out.path().join("net-log.json");
    let net_log_arg = format!("--log-net-log={}", net_log.display());
    let (dom, log) = headless(&html, &profile, &["--dump-dom", &net_log_arg]);
    for noise in ["net::ERR", "Uncaught", "CONSOLE", "Refused to"] {
        assert!(!log.contains(noise), "chromium logged {noise:?}:\n{log}");
    }
    // Every URL the browser touched, less its own update, clock and account checks (made with
    // no page open at all): the page itself must have asked for nothing.
    let net_log = std::fs::read_to_string(&net_log).unwrap();
    let fetched: Vec<&str> = net_log
        .match_indices("\"url\":\"")
        .map(|(at, m)| {
            let rest = &net_log[at + m.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .filter(|url| {
            let host = url.split('/').nth(2).unwrap_or("");
            !(host.ends_with("google.com") || host.ends_with("googleapis.com"))
        })
        .collect();
    assert!(
        fetched.iter().all(|url| url.starts_with("file://")),
        "the page fetched {fetched:?}"
    );
    assert!(!dom.contains("<script"), "no script element came to life");
    assert!(!dom.contains("<img"), "no image element came to life");
    assert!(
        dom.contains("<title>Rollout "),
        "the title was not rewritten"
    );

    // The numbers on the page are the store's.
    let stored = &rows(
        &db,
        &format!("SELECT * FROM rollouts WHERE rollout_id = '{rollout}'"),
    )[0];
    for outcome in ["succeeded", "failed", "rejected", "cancelled"] {
        assert_eq!(
            element_text(&dom, &format!("count-{outcome}")),
            stored[outcome].to_string(),
            "{outcome}"
        );
    }
    assert_eq!(element_text(&dom, "count-runs"), "14");
    assert_eq!(
        element_text(&dom, "state"),
        stored["state"].as_str().unwrap()
    );
    assert_eq!(
        element_text(&dom, "ticket"),
        HOSTILE_TICKET.replace('<', "&lt;").replace('>', "&gt;")
    );
    assert_eq!(element_text(&dom, "expected"), "11");
    assert_eq!(element_text(&dom, "budget"), "1 used of 5 allowed");
    let failed_runs = rows(
        &db,
        &format!(
            "SELECT * FROM toggles WHERE rollout_id = '{rollout}' AND outcome IN ('failed', 'cancelled')"
        ),
    );
    assert_eq!(failed_runs.len(), 3);
    assert_eq!(element_text(&dom, "failure-count"), "3");
    for run in &failed_runs {
        let request_id = run["request_id"].as_str().unwrap();
        assert!(dom.contains(request_id), "request id {request_id} listed");
    }
    assert_eq!(element_text(&dom, "rerun-count"), "3");
    let per_minute: usize = dom
        .match_indices("data-total=\"")
        .map(|(at, m)| {
            let rest = &dom[at + m.len()..];
            rest[..rest.find('"').unwrap()].parse::<usize>().unwrap()
        })
        .sum();
    assert_eq!(per_minute, 14, "the timeline counts every run once");

    // A screenshot, as a person would see it.
    let png = out.path().join("report.png");
    let screenshot = format!("--screenshot={}", png.display());
    let (_, log) = headless(&html, &profile, &[&screenshot, "--window-size=1200,1600"]);
    assert!(!log.contains("net::ERR"), "{log}");
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000);
    if let Ok(keep) = std::env::var("KEYTURN_REPORT_PNG") {
        std::fs::copy(&png, keep).unwrap();
    }

    // The CSV: one row per run, the store's; the JSON: the same numbers.
    let mut reader = csv::Reader::from_path(&csv_file).unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let runs: Vec<HashMap<String, String>> = reader
        .records()
        .map(|r| {
            header
                .iter()
                .cloned()
                .zip(r.unwrap().iter().map(String::from))
                .collect()
        })
        .collect();
    let stored_runs = rows(
        &db,
        &format!("SELECT * FROM toggles WHERE rollout_id = '{rollout}' ORDER BY finished_at, id"),
    );
    assert_eq!(runs.len(), stored_runs.len());
    for (run, row) in runs.iter().zip(&stored_runs) {
        for (name, value) in run {
            assert_eq!(value, &as_text(&row[name]), "{name}");
        }
    }
    let document: Value = serde_json::from_slice(&std::fs::read(&json_file).unwrap()).unwrap();
    assert_eq!(document["runs"], 14);
    assert_eq!(document["rollout"]["failed"], stored["failed"]);
    assert_eq!(document["failures"].as_array().unwrap().len(), 3);
    assert_eq!(document["reruns"].as_array().unwrap().len(), 3);
    assert_eq!(document["job_runs"].as_array().unwrap().len(), 14);
    app.cleanup().await;
}
