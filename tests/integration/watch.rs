//! `keyturn watch`: the real binary against a real worker and the real broker, in a real
//! terminal (tmux) and with piped stderr.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use keyturn::amqp::control::ControlClient;
use keyturn::events::{JobResult, Outcome, ResultEvent};
use keyturn::rollout::{Snapshot, State};
use keyturn::simulator::Step;
use lapin::BasicProperties;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::*;

/// Sends a control command over the control queue and returns the worker's answer.
async fn command(app: &TestApp, value: Value) -> keyturn::rollout::Reply {
    let command = keyturn::rollout::parse_command(value.to_string().as_bytes()).unwrap();
    let mut client = ControlClient::connect(&app.settings.amqp, "watch-test")
        .await
        .unwrap();
    let reply = client
        .request(&command, Duration::from_secs(30))
        .await
        .unwrap();
    client.close().await;
    reply
}

async fn declare(app: &TestApp, rollout_id: &str, expected: u32, extra: Value) {
    let mut value = json!({"kind": "rollout", "rollout_id": rollout_id, "expected_jobs": expected});
    for (key, field) in extra.as_object().unwrap() {
        value[key] = field.clone();
    }
    let reply = command(app, value).await;
    assert!(reply.ok, "{reply:?}");
}

async fn status(app: &TestApp, rollout_id: &str) -> Snapshot {
    let reply = command(app, json!({"kind": "status", "rollout_id": rollout_id})).await;
    assert!(reply.ok, "{reply:?}");
    reply.rollouts.into_iter().next().unwrap()
}

async fn publish_jobs(app: &TestApp, rollout_id: &str, numbers: std::ops::Range<u32>) {
    for n in numbers {
        let mut body = job(&format!("{rollout_id}:{}", instance(n)), n, "on");
        body["rollout_id"] = json!(rollout_id);
        app.publish_job(&body).await;
    }
}

fn doom(app: &TestApp, n: u32) {
    let forbidden = Step::Error {
        status: 403,
        code: "DBS.200010".into(),
        msg: Some("not authorised for this instance".into()),
        retry_after_secs: None,
        apply: false,
    };
    app.simulator.script(&instance(n), vec![forbidden; 5]);
}

/// `keyturn watch ARGS` wired to this app's queues.
fn watch_command(app: &TestApp, args: &[&str]) -> std::process::Command {
    let names = &app.settings.amqp;
    let mut command = keyturn_binary();
    command
        .arg("watch")
        .args(args)
        .args(["--timeout", "10s"])
        .env("KEYTURN_AMQP__URL", &names.url)
        .env("KEYTURN_AMQP__RESULTS_EXCHANGE", &names.results_exchange)
        .env("KEYTURN_AMQP__CONTROL_QUEUE", &names.control_queue)
        .env("KEYTURN_AMQP__RECONNECT_MAX_BACKOFF", "1s");
    command
}

/// `keyturn watch` in a 120×30 tmux pane on a tmux server of its own; the exit code goes to a
/// file and the pane stays open so its last screen can be read.
struct Tmux {
    socket: String,
    dir: tempfile::TempDir,
}

impl Tmux {
    fn start(app: &TestApp, args: &[&str]) -> Tmux {
        let dir = tempfile::tempdir().unwrap();
        let command = watch_command(app, args);
        let mut script = String::from("cd /\n");
        for (name, value) in command.get_envs() {
            let value = value.unwrap().to_str().unwrap();
            script.push_str(&format!("export {}='{value}'\n", name.to_str().unwrap()));
        }
        script.push_str("export TERM=xterm-256color\n");
        let program = command.get_program().to_str().unwrap().to_owned();
        let args: Vec<String> = command
            .get_args()
            .map(|a| format!("'{}'", a.to_str().unwrap()))
            .collect();
        let code = dir.path().join("code");
        let (args, code) = (args.join(" "), code.display());
        script.push_str(&format!(
            "'{program}' {args}\necho $? > '{code}.tmp' && mv '{code}.tmp' '{code}'\nread -r _\n"
        ));
        let script_path = dir.path().join("watch.sh");
        std::fs::write(&script_path, script).unwrap();
        let socket = unique("kt-watch");
        let started = std::process::Command::new("tmux")
            .args(["-L", &socket, "new-session", "-d", "-x", "120", "-y", "30"])
            .arg(format!("bash '{}'", script_path.display()))
            .status()
            .expect("tmux is installed (.ci/run installs it)");
        assert!(started.success());
        Tmux { socket, dir }
    }

    fn screen(&self) -> String {
        let output = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    async fn wait_for_screen(&self, text: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{text:?} never appeared on the screen:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn code_file(&self) -> PathBuf {
        self.dir.path().join("code")
    }

    /// The exit code, once `keyturn watch` ended (within 60 s).
    async fn exit_code(&self) -> i32 {
        let file = self.code_file();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !file.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "watch still running after 60 s:\n{}",
                self.screen()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::fs::read_to_string(&file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn keys(&self, keys: &str) {
        let sent = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", keys])
            .status()
            .unwrap();
        assert!(sent.success());
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

#[tokio::test]
async fn watch_in_a_terminal_draws_the_live_view_and_exits_1_when_jobs_failed() {
    let app = TestApp::spawn_with_latency(20).await;
    let (stop, worker) = app.start_worker();
    declare(
        &app,
        "R-tty",
        40,
        json!({"failure_budget": 5, "ticket": "CHG-9"}),
    )
    .await;
    doom(&app, 3);
    doom(&app, 17);
    let tmux = Tmux::start(&app, &["R-tty"]);
    let first = tmux.wait_for_screen("0/40 final").await;
    assert!(first.contains("RUNNING"), "{first}");
    publish_jobs(&app, "R-tty", 0..40).await;

    assert_eq!(tmux.exit_code().await, 1, "two jobs failed");
    let screen = tmux.screen();
    eprintln!("{screen}");
    for part in [
        "R-tty [========================================] 40/40 final",
        "failures 2/5",
        "COMPLETED",
        "rollout R-tty: completed 40/40 final, failures 2/5",
        "38 succeeded, 2 failed, 0 rejected, 0 cancelled",
        "latest failures:",
        &format!(
            "{}  DBS.200010  not authorised for this instance",
            instance(3)
        ),
        &instance(17),
    ] {
        assert!(
            screen.contains(part),
            "{part:?} on the final screen:\n{screen}"
        );
    }
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn watch_without_a_terminal_prints_one_line_per_state_and_exits_0() {
    let app = TestApp::spawn_with_latency(10).await;
    let (stop, worker) = app.start_worker();
    declare(&app, "R-plain", 15, json!({"failure_budget": 1})).await;
    let mut child = tokio::process::Command::from(watch_command(&app, &["R-plain"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The first line comes once watch has its snapshot; only then do the jobs go out.
    let mut stderr_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), stderr_lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, "rollout R-plain: running 0/15 final, failures 0/1");
    publish_jobs(&app, "R-plain", 0..15).await;
    let mut rest = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), stderr_lines.next_line())
        .await
        .expect("watch ends when the rollout completes")
        .unwrap()
    {
        rest.push(line);
    }
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = format!("{first}\n{}\n", rest.join("\n"));
    let stdout = String::from_utf8(output.stdout).unwrap();
    eprintln!("stderr:\n{stderr}stdout:\n{stdout}");
    assert_eq!(output.status.code(), Some(0), "nothing failed");
    assert!(!stderr.contains('\u{1b}'), "no terminal escapes in a log");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.last().copied(),
        Some("rollout R-plain: completed 15/15 final, failures 0/1")
    );
    // One line per state change, plus at most one progress line per 5 s of a short run.
    assert!(lines.len() <= 4, "{stderr}");
    assert!(
        stdout.contains("15 succeeded, 0 failed, 0 rejected, 0 cancelled"),
        "{stdout}"
    );
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn watch_exits_3_on_halt_with_exit_on_halt() {
    let app = TestApp::spawn_with_latency(10).await;
    let (stop, worker) = app.start_worker();
    declare(
        &app,
        "R-halt",
        10,
        json!({"failure_budget": 0, "canary": 1}),
    )
    .await;
    doom(&app, 0);
    let tmux = Tmux::start(&app, &["R-halt", "--exit-on-halt"]);
    tmux.wait_for_screen("0/10 final").await;
    publish_jobs(&app, "R-halt", 0..10).await;
    assert_eq!(tmux.exit_code().await, 3);
    let screen = tmux.screen();
    eprintln!("{screen}");
    assert!(screen.contains("HALTED"), "{screen}");
    assert!(screen.contains("failures 1/0"), "{screen}");
    assert_eq!(status(&app, "R-halt").await.state, State::Halted);
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

/// A job event of `rollout_id`, timed now, as a worker would publish it.
fn event_now(rollout_id: &str, n: u32, outcome: Outcome) -> ResultEvent {
    ResultEvent::new(
        "replayer",
        JobResult {
            job_id: format!("{rollout_id}:{}", instance(n)),
            rerun: 0,
            rollout_id: Some(rollout_id.into()),
            ticket: None,
            region: Some("cn-north-4".into()),
            project_id: Some(PROJECT.into()),
            instance_id: Some(instance(n)),
            requested_status: Some("on".into()),
            resulting_status: None,
            outcome,
            attempts: 1,
            http_status: Some(403),
            error_code: Some("DBS.MARKER".into()),
            error_msg: Some("the marker".into()),
            request_id: None,
            duration_ms: 3,
        },
        chrono::Utc::now(),
    )
}

async fn publish_event(app: &TestApp, event: &ResultEvent) {
    let confirm = app
        .channel
        .basic_publish(
            app.settings.amqp.results_exchange.as_str().into(),
            event.routing_key().as_str().into(),
            Default::default(),
            event.to_json().as_bytes(),
            BasicProperties::default()
                .with_message_id(event.id.as_str().into())
                .with_content_type("application/cloudevents+json".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

#[tokio::test]
async fn a_replayed_event_counts_once_and_ctrl_c_leaves_the_rollout_as_it_was() {
    let app = TestApp::spawn_with_latency(5).await;
    let (stop, worker) = app.start_worker();
    declare(&app, "R-dup", 4, json!({})).await;
    publish_jobs(&app, "R-dup", 0..1).await;
    wait_until(Duration::from_secs(30), || async {
        status(&app, "R-dup").await.counts.finished() == 1
    })
    .await;
    let tmux = Tmux::start(&app, &["R-dup"]);
    tmux.wait_for_screen("1/4 final").await;

    // The same event twice (a replay keeps its id), then a failure as a marker: when the marker
    // is on the screen, both copies went through the view.
    let replayed = event_now("R-dup", 1, Outcome::Succeeded);
    publish_event(&app, &replayed).await;
    publish_event(&app, &replayed).await;
    publish_event(&app, &event_now("R-dup", 2, Outcome::Failed)).await;
    let screen = tmux.wait_for_screen("DBS.MARKER").await;
    assert!(
        screen.contains("3/4 final"),
        "the replay counted once:\n{screen}"
    );

    let before = status(&app, "R-dup").await;
    tmux.keys("C-c");
    assert_eq!(tmux.exit_code().await, 130);
    let screen = tmux.screen();
    eprintln!("{screen}");
    assert!(
        screen.contains("stopped watching; nothing was sent to the rollout"),
        "{screen}"
    );
    let after = status(&app, "R-dup").await;
    assert_eq!(
        after.state,
        State::Running,
        "Ctrl-C left the rollout running"
    );
    assert_eq!(
        (after.counts.clone(), after.reason.clone()),
        (before.counts, before.reason)
    );
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn watch_all_follows_every_rollout_and_an_unknown_rollout_exits_1() {
    let app = TestApp::spawn_with_latency(5).await;
    let (stop, worker) = app.start_worker();
    declare(&app, "R-all-a", 2, json!({})).await;
    declare(&app, "R-all-b", 3, json!({})).await;

    // Through tokio: the in-process worker must keep running while this waits.
    let unknown = tokio::process::Command::from(watch_command(&app, &["R-nope"]))
        .output()
        .await
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    let stderr = String::from_utf8(unknown.stderr).unwrap();
    assert!(stderr.contains("R-nope"), "{stderr}");

    let mut child = tokio::process::Command::from(watch_command(&app, &["--all"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(line);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "rollout R-all-a: running 0/2 final, failures 0 (no budget)",
            "rollout R-all-b: running 0/3 final, failures 0 (no budget)"
        ]
    );
    publish_jobs(&app, "R-all-a", 0..2).await;
    // Progress lines (at most one per 5 s) may come first on a slow machine.
    let completed = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if !line.contains(", ETA ") && !line.contains(" jobs/s") {
            break line;
        }
    };
    assert_eq!(
        completed,
        "rollout R-all-a: completed 2/2 final, failures 0 (no budget)"
    );
    // --all does not end with one rollout: only Ctrl-C (SIGINT) ends it.
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(130));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains("rollout R-all-b: running 0/3 final"),
        "{stdout}"
    );
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}

/// A cancelled rollout ends the watch too: exit 0 when nothing failed.
#[tokio::test]
async fn watch_exits_0_when_the_rollout_is_cancelled_and_nothing_failed() {
    let app = TestApp::spawn().await;
    let (stop, worker) = app.start_worker();
    declare(&app, "R-cancel-watch", 5, json!({})).await;
    let mut child = tokio::process::Command::from(watch_command(&app, &["R-cancel-watch"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), stderr_lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        first.starts_with("rollout R-cancel-watch: running"),
        "{first}"
    );
    let reply = command(
        &app,
        json!({"kind": "cancel", "rollout_id": "R-cancel-watch", "reason": "not today"}),
    )
    .await;
    assert!(reply.ok);
    let mut last = first;
    while let Some(line) = tokio::time::timeout(Duration::from_secs(30), stderr_lines.next_line())
        .await
        .expect("watch ends when the rollout is cancelled")
        .unwrap()
    {
        last = line;
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "cancelled with nothing failed: {last}"
    );
    assert!(last.contains("cancelled"), "{last}");
    stop.cancel();
    worker.await.unwrap();
    app.cleanup().await;
}
