//! `keyturn watch ROLLOUT` (or `--all`): how far along a rollout is, live, without SQL or a
//! custom consumer.
//!
//! It binds a private queue (exclusive, auto-delete, server-named) to the result exchange for
//! `rollout.#` and `job.#` *first*, then takes the snapshot over the control queue (`status`), so
//! nothing that happens after the snapshot is missed. Rollout events carry whole snapshots and
//! replace what is shown (newest `updated_at` wins); job events between two snapshots move the
//! counts on at once and feed the list of latest failures. A job event counts only when it is
//! newer than the snapshot shown (older ones are in it already) and only once per event id, so a
//! replayed event (a duplicate delivery re-published with the same id) is not counted twice; only
//! the events since the last snapshot are remembered, so memory does not grow with the rollout.
//!
//! On a terminal it draws an `indicatif` view; otherwise one plain line per state change and at
//! most one progress line every 5 s, for logs. A lost broker connection is retried with capped
//! backoff and the snapshot taken again. Ctrl-C only stops watching: it sends nothing to the
//! worker, so the rollout is left as it was.
//!
//! Exit codes: 0 the rollout completed or was cancelled and nothing failed; 1 something failed
//! (failed or rejected jobs, as the budget counts them), the rollout is unknown, or no worker
//! answered the first snapshot; 2 bad configuration or arguments; 3 the rollout halted
//! (`--exit-on-halt` only); 130 interrupted.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::rollout::{BAD_ARGUMENTS, REFUSED};
use crate::amqp::ConnectError;
use crate::amqp::control::{ControlClient, ControlError};
use crate::config::Settings;
use crate::events::{Outcome, ResultEvent};
use crate::rollout::{self, Command, Counts, Snapshot, State};

/// Exit code when the rollout halted and `--exit-on-halt` was given.
pub const HALTED: u8 = 3;
/// Exit code after Ctrl-C, as shells report SIGINT.
pub const INTERRUPTED: u8 = 130;
/// How many failures the view keeps.
const LATEST_FAILURES: usize = 5;
/// At most one plain progress line this often.
const LINE_EVERY: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The rollout to follow.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    rollout: Option<String>,
    /// Follow every rollout (until Ctrl-C).
    #[arg(long)]
    all: bool,
    /// Exit 3 as soon as the rollout halts, instead of waiting for it to complete.
    #[arg(long)]
    exit_on_halt: bool,
    /// How long to wait for a worker's answer to each snapshot request.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub async fn run(settings: &Settings, args: WatchArgs) -> anyhow::Result<ExitCode> {
    let command = match status_command(args.rollout.as_deref()) {
        Ok(command) => command,
        Err(rejection) => {
            eprintln!("keyturn: invalid argument: {rejection}");
            return Ok(ExitCode::from(BAD_ARGUMENTS));
        }
    };
    let interrupted = CancellationToken::new();
    tokio::spawn({
        let token = interrupted.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                token.cancel();
            }
        }
    });
    let mut board = Board::new(args.rollout.clone());
    let mut view = View::new(std::io::stderr().is_terminal());
    let ending = follow(
        settings,
        &args,
        &command,
        &mut board,
        &mut view,
        &interrupted,
    )
    .await;
    view.finish();
    let ending = match ending {
        Ok(ending) => ending,
        Err(Fatal::Control(error)) => return fatal_control(error),
        Err(Fatal::Refused(reason)) => {
            eprintln!("keyturn: {reason}");
            return Ok(ExitCode::from(REFUSED));
        }
    };
    print!("{}", board.summary());
    Ok(match ending {
        Ending::Final { failed } if failed => ExitCode::from(REFUSED),
        Ending::Final { .. } => ExitCode::SUCCESS,
        Ending::Halted => ExitCode::from(HALTED),
        Ending::Interrupted => {
            println!("stopped watching; nothing was sent to the rollout");
            ExitCode::from(INTERRUPTED)
        }
    })
}

/// The `status` command, checked by the worker's own parser.
fn status_command(rollout_id: Option<&str>) -> Result<Command, crate::job::Rejection> {
    let request = match rollout_id {
        Some(id) => serde_json::json!({"kind": "status", "rollout_id": id}),
        None => serde_json::json!({"kind": "status"}),
    };
    rollout::parse_command(request.to_string().as_bytes())
}

fn fatal_control(error: ControlError) -> anyhow::Result<ExitCode> {
    match error {
        ControlError::Connect(ConnectError::Settings(config)) => Err(config.into()),
        other => {
            eprintln!("keyturn: {other}");
            Ok(ExitCode::from(REFUSED))
        }
    }
}

/// Why watching stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Completed or cancelled; `failed` when any job failed or was rejected.
    Final {
        failed: bool,
    },
    Halted,
    Interrupted,
}

/// Errors that end `watch` at once (as opposed to a lost connection, which is retried).
enum Fatal {
    Control(ControlError),
    Refused(String),
}

/// Why one connected session ended without an [`Ending`].
enum Lost {
    Fatal(Fatal),
    Connection(String),
}

impl From<ControlError> for Lost {
    fn from(error: ControlError) -> Self {
        Lost::Connection(error.to_string())
    }
}

impl From<lapin::Error> for Lost {
    fn from(error: lapin::Error) -> Self {
        Lost::Connection(format!("RabbitMQ: {error}"))
    }
}

/// Sessions until one ends the watch; a lost connection is retried with capped backoff.
async fn follow(
    settings: &Settings,
    args: &WatchArgs,
    command: &Command,
    board: &mut Board,
    view: &mut View,
    interrupted: &CancellationToken,
) -> Result<Ending, Fatal> {
    let backoff = crate::retry::Backoff {
        base: Duration::from_millis(500),
        cap: settings.amqp.reconnect_max_backoff,
    };
    let mut retry = 0u32;
    loop {
        let result = tokio::select! {
            () = interrupted.cancelled() => return Ok(Ending::Interrupted),
            result = session(settings, args, command, board, view, interrupted) => result,
        };
        let reason = match result {
            Ok(ending) => return Ok(ending),
            Err(Lost::Fatal(fatal)) => return Err(fatal),
            // Before any snapshot, a broker or worker that is not there is the operator's to fix.
            Err(Lost::Connection(reason)) if !board.has_snapshot() => {
                return Err(Fatal::Refused(reason));
            }
            Err(Lost::Connection(reason)) => reason,
        };
        let wait = backoff
            .delay(retry, &mut rand::rng())
            .max(Duration::from_millis(200));
        view.reconnecting(&reason, wait);
        retry = retry.saturating_add(1);
        tokio::select! {
            () = interrupted.cancelled() => return Ok(Ending::Interrupted),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One connection: subscribe, take the snapshot, then apply events until an ending or a loss.
async fn session(
    settings: &Settings,
    args: &WatchArgs,
    command: &Command,
    board: &mut Board,
    view: &mut View,
    interrupted: &CancellationToken,
) -> Result<Ending, Lost> {
    let first = !board.has_snapshot();
    let mut client = match ControlClient::connect(&settings.amqp, "keyturn-watch").await {
        Ok(client) => client,
        Err(error @ ControlError::Connect(ConnectError::Settings(_))) => {
            return Err(Lost::Fatal(Fatal::Control(error)));
        }
        Err(error) if first => return Err(Lost::Fatal(Fatal::Control(error))),
        Err(error) => return Err(error.into()),
    };
    let result = watch_connected(settings, args, command, &mut client, board, view).await;
    if !matches!(result, Err(Lost::Connection(_))) && !interrupted.is_cancelled() {
        client.close().await;
    }
    result
}

async fn watch_connected(
    settings: &Settings,
    args: &WatchArgs,
    command: &Command,
    client: &mut ControlClient,
    board: &mut Board,
    view: &mut View,
) -> Result<Ending, Lost> {
    let first = !board.has_snapshot();
    let mut events = subscribe(client.channel(), &settings.amqp.results_exchange).await?;
    let reply = match client.request(command, args.timeout).await {
        Ok(reply) => reply,
        Err(error) if first => return Err(Lost::Fatal(Fatal::Control(error))),
        Err(error) => return Err(error.into()),
    };
    if !reply.ok {
        let reason = reply.error.unwrap_or_else(|| "no reason given".into());
        return Err(Lost::Fatal(Fatal::Refused(format!(
            "the worker refused status: {reason}"
        ))));
    }
    for snapshot in reply.rollouts {
        board.snapshot(snapshot, true);
    }
    board.connected = true;
    view.draw(board);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        if let Some(ending) = board.ending(args.exit_on_halt) {
            return Ok(ending);
        }
        tokio::select! {
            delivery = events.next() => match delivery {
                Some(Ok(delivery)) => board.event(delivery.routing_key.as_str(), &delivery.data),
                Some(Err(error)) => return Err(error.into()),
                None => return Err(Lost::Connection("the event stream ended".into())),
            },
            _ = tick.tick() => {}
        }
        view.draw(board);
    }
}

/// A private queue bound to every rollout and job event, consumed without acks.
async fn subscribe(channel: &Channel, exchange: &str) -> Result<Consumer, lapin::Error> {
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare("".into(), private, FieldTable::default())
        .await?;
    for key in ["rollout.#", "job.#"] {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// One failed or rejected job, as the view lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    event_id: String,
    rollout_id: String,
    instance: String,
    code: String,
    message: String,
}

/// A job event not yet in the snapshot shown.
#[derive(Debug, Clone)]
struct Recent {
    time: String,
    job_id: String,
    rerun: u32,
    outcome: Outcome,
}

/// What is known of one rollout: its newest snapshot and the job events since.
#[derive(Debug, Clone)]
struct Watched {
    snapshot: Snapshot,
    recent: HashMap<String, Recent>,
    /// Final jobs at the first snapshot and when, for the rate.
    start: (u64, Instant),
}

impl Watched {
    /// The snapshot's counts plus the first runs of jobs finished since (reruns change an
    /// outcome, not the number of final jobs: the next snapshot has them).
    fn counts(&self) -> Counts {
        let mut counts = self.snapshot.counts.clone();
        let mut jobs = HashSet::new();
        for recent in self.recent.values() {
            if recent.rerun != 0 || !jobs.insert(recent.job_id.as_str()) {
                continue;
            }
            match recent.outcome {
                Outcome::Succeeded => counts.succeeded += 1,
                Outcome::Failed => counts.failed += 1,
                Outcome::Rejected => counts.rejected += 1,
                Outcome::Cancelled => counts.cancelled += 1,
            }
            counts.in_flight = counts.in_flight.saturating_sub(1);
        }
        counts
    }

    /// Final jobs, never above the expected number.
    fn finished(&self) -> u64 {
        let finished = self.counts().finished();
        self.snapshot
            .expected_jobs
            .map_or(finished, |expected| finished.min(expected))
    }

    /// Final jobs per second since watching began, and the time left at that rate.
    fn rate(&self) -> (f64, Option<Duration>) {
        let elapsed = self.start.1.elapsed().as_secs_f64();
        let done = self.finished().saturating_sub(self.start.0) as f64;
        if elapsed < 0.2 || done == 0.0 {
            return (0.0, None);
        }
        let rate = done / elapsed;
        let left = self
            .snapshot
            .expected_jobs
            .map(|expected| expected.saturating_sub(self.finished()) as f64 / rate);
        (
            rate,
            left.map(|secs| Duration::from_secs(secs.ceil() as u64)),
        )
    }

    fn failures_text(&self) -> String {
        let used = self.counts().failures();
        match self.snapshot.budget.allowed {
            Some(allowed) => format!("failures {used}/{allowed}"),
            None => format!("failures {used} (no budget)"),
        }
    }
}

/// Everything `watch` shows, fed by snapshots and events; no I/O, so it is tested directly.
#[derive(Debug)]
struct Board {
    /// `None` with `--all`.
    target: Option<String>,
    rollouts: BTreeMap<String, Watched>,
    failures: VecDeque<Failure>,
    connected: bool,
}

impl Board {
    fn new(target: Option<String>) -> Board {
        Board {
            target,
            rollouts: BTreeMap::new(),
            failures: VecDeque::new(),
            connected: false,
        }
    }

    fn has_snapshot(&self) -> bool {
        !self.rollouts.is_empty()
    }

    fn wanted(&self, rollout_id: &str) -> bool {
        self.target
            .as_deref()
            .is_none_or(|target| target == rollout_id)
    }

    /// Takes `snapshot` unless an older one than shown; `fresh` (a status answer) always wins.
    fn snapshot(&mut self, snapshot: Snapshot, fresh: bool) {
        if !self.wanted(&snapshot.rollout_id) {
            return;
        }
        match self.rollouts.get_mut(&snapshot.rollout_id) {
            Some(watched) => {
                if !fresh && snapshot.updated_at < watched.snapshot.updated_at {
                    return;
                }
                let since = snapshot.updated_at.clone();
                watched.recent.retain(|_, recent| recent.time > since);
                watched.snapshot = snapshot;
            }
            None => {
                let start = (snapshot.counts.finished(), Instant::now());
                self.rollouts.insert(
                    snapshot.rollout_id.clone(),
                    Watched {
                        snapshot,
                        recent: HashMap::new(),
                        start,
                    },
                );
            }
        }
    }

    /// Applies one delivery from the result exchange; anything unreadable is skipped.
    fn event(&mut self, routing_key: &str, body: &[u8]) {
        if routing_key.starts_with("rollout.") {
            // Taking the same snapshot twice changes nothing, so replays need no bookkeeping.
            let Ok(value) = serde_json::from_slice::<Value>(body) else {
                return;
            };
            if let Ok(snapshot) = serde_json::from_value::<Snapshot>(value["data"].clone()) {
                self.snapshot(snapshot, false);
            }
        } else if routing_key.starts_with("job.")
            && let Ok(event) = serde_json::from_slice::<ResultEvent>(body)
        {
            self.job_event(event);
        }
    }

    fn job_event(&mut self, event: ResultEvent) {
        let Some(rollout_id) = event.data.rollout_id.clone() else {
            return;
        };
        if !self.wanted(&rollout_id) {
            return;
        }
        let listed = self.failures.iter().any(|f| f.event_id == event.id);
        if matches!(event.data.outcome, Outcome::Failed | Outcome::Rejected) && !listed {
            let clean = |text: Option<&str>, max: usize| {
                let text: String = text
                    .unwrap_or("-")
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                match text.char_indices().nth(max) {
                    Some((cut, _)) => format!("{}…", &text[..cut]),
                    None => text,
                }
            };
            self.failures.push_back(Failure {
                event_id: event.id.clone(),
                rollout_id: rollout_id.clone(),
                instance: clean(event.data.instance_id.as_deref(), 40),
                code: clean(event.data.error_code.as_deref(), 24),
                message: clean(event.data.error_msg.as_deref(), 60),
            });
            while self.failures.len() > LATEST_FAILURES {
                self.failures.pop_front();
            }
        }
        let Some(watched) = self.rollouts.get_mut(&rollout_id) else {
            return;
        };
        if event.time <= watched.snapshot.updated_at {
            return; // counted in the snapshot already
        }
        // Keyed by event id: a replay (same id) replaces itself and is counted once. The map only
        // holds events newer than the snapshot, so it stays small however long the rollout.
        watched.recent.insert(
            event.id,
            Recent {
                time: event.time,
                job_id: event.data.job_id,
                rerun: event.data.rerun,
                outcome: event.data.outcome,
            },
        );
    }

    /// When watching one rollout: whether its state ends the watch.
    fn ending(&self, exit_on_halt: bool) -> Option<Ending> {
        let watched = self.rollouts.get(self.target.as_deref()?)?;
        match watched.snapshot.state {
            State::Completed | State::Cancelled => Some(Ending::Final {
                failed: watched.counts().failures() > 0,
            }),
            State::Halted if exit_on_halt => Some(Ending::Halted),
            _ => None,
        }
    }

    /// One line per rollout: state, final/expected, the failures against the budget.
    fn line(&self, watched: &Watched) -> String {
        let s = &watched.snapshot;
        let expected = s.expected_jobs.map_or("?".into(), |n| n.to_string());
        let mut line = format!(
            "rollout {}: {} {}/{expected} final, {}",
            s.rollout_id,
            s.state,
            watched.finished(),
            watched.failures_text()
        );
        let c = watched.counts();
        if c.parked > 0 || c.in_flight > 0 {
            line.push_str(&format!(", {} parked, {} in flight", c.parked, c.in_flight));
        }
        if let Some(reason) = s.reason.as_deref().filter(|_| s.state != State::Running) {
            line.push_str(&format!(" ({reason})"));
        }
        line
    }

    /// What is printed on stdout at the end, whatever the terminal.
    fn summary(&self) -> String {
        let mut text = String::new();
        for watched in self.rollouts.values() {
            let c = watched.counts();
            text.push_str(&self.line(watched));
            text.push('\n');
            text.push_str(&format!(
                "  {} succeeded, {} failed, {} rejected, {} cancelled\n",
                c.succeeded, c.failed, c.rejected, c.cancelled
            ));
        }
        if !self.failures.is_empty() {
            text.push_str("latest failures:\n");
            for failure in &self.failures {
                text.push_str(&format!("  {}\n", failure_line(failure)));
            }
        }
        text
    }
}

fn failure_line(failure: &Failure) -> String {
    format!(
        "{}  {}  {}",
        failure.instance, failure.code, failure.message
    )
}

fn rate_text(watched: &Watched) -> String {
    match watched.rate() {
        (rate, Some(left)) if !left.is_zero() => {
            format!("{rate:.1} jobs/s, ETA {}", humantime::format_duration(left))
        }
        (rate, _) if rate > 0.0 => format!("{rate:.1} jobs/s"),
        _ => "- jobs/s".into(),
    }
}

/// The live view on a terminal, or plain lines for a log.
enum View {
    Live(Live),
    Plain {
        states: HashMap<String, State>,
        finished: HashMap<String, u64>,
        last_line: Option<Instant>,
    },
}

/// One bar per rollout, then a status line and the latest failures.
struct Live {
    multi: MultiProgress,
    bars: BTreeMap<String, ProgressBar>,
    status: ProgressBar,
    failures: Vec<ProgressBar>,
}

impl View {
    fn new(terminal: bool) -> View {
        if !terminal {
            return View::Plain {
                states: HashMap::new(),
                finished: HashMap::new(),
                last_line: None,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let line = ProgressStyle::with_template("{msg}").expect("a valid template");
        let status = multi.add(ProgressBar::new(0).with_style(line.clone()));
        let failures = (0..LATEST_FAILURES)
            .map(|_| multi.add(ProgressBar::new(0).with_style(line.clone())))
            .collect();
        View::Live(Live {
            multi,
            bars: BTreeMap::new(),
            status,
            failures,
        })
    }

    fn draw(&mut self, board: &Board) {
        match self {
            View::Live(live) => live.draw(board),
            View::Plain {
                states,
                finished,
                last_line,
            } => {
                let mut changed = false;
                for (id, watched) in &board.rollouts {
                    if states.insert(id.clone(), watched.snapshot.state)
                        != Some(watched.snapshot.state)
                    {
                        eprintln!("{}", board.line(watched));
                        finished.insert(id.clone(), watched.finished());
                        changed = true;
                    }
                }
                let due = last_line.is_none_or(|at| at.elapsed() >= LINE_EVERY);
                if changed {
                    *last_line = Some(Instant::now());
                } else if due {
                    let mut printed = false;
                    for (id, watched) in &board.rollouts {
                        if finished.insert(id.clone(), watched.finished())
                            != Some(watched.finished())
                        {
                            eprintln!("{}, {}", board.line(watched), rate_text(watched));
                            printed = true;
                        }
                    }
                    if printed {
                        *last_line = Some(Instant::now());
                    }
                }
            }
        }
    }

    fn reconnecting(&mut self, reason: &str, wait: Duration) {
        let text = format!(
            "broker connection lost ({reason}); reconnecting in {}",
            humantime::format_duration(Duration::from_millis(wait.as_millis() as u64))
        );
        match self {
            View::Live(live) => live.status.set_message(text),
            View::Plain { .. } => eprintln!("{text}"),
        }
    }

    fn finish(&mut self) {
        if let View::Live(live) = self {
            for bar in live.bars.values() {
                bar.abandon();
            }
            // The summary on stdout says the rest; the bars stay as the last picture.
            live.status.finish_and_clear();
            for bar in &live.failures {
                bar.finish_and_clear();
            }
        }
    }
}

impl Live {
    fn draw(&mut self, board: &Board) {
        for (id, watched) in &board.rollouts {
            let bar = self.bars.entry(id.clone()).or_insert_with(|| {
                let style = ProgressStyle::with_template(
                    "{prefix:.bold} [{bar:40.cyan/blue}] {pos}/{len} final  {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> ");
                let bar = self
                    .multi
                    .insert_before(&self.status, ProgressBar::new(0).with_style(style));
                bar.set_prefix(id.clone());
                bar
            });
            let expected = watched.snapshot.expected_jobs.unwrap_or(0);
            bar.set_length(expected.max(watched.finished()));
            bar.set_position(watched.finished());
            bar.set_message(format!(
                "{}  {}  {}",
                rate_text(watched),
                watched.failures_text(),
                watched.snapshot.state.as_str().to_uppercase()
            ));
        }
        let states: Vec<String> = board.rollouts.values().map(|w| board.line(w)).collect();
        let mut status = states.join("; ");
        if board.rollouts.is_empty() {
            status = "no rollouts yet".into();
        }
        self.status.set_message(status);
        let mut lines = board.failures.iter().rev().map(|failure| {
            if board.target.is_some() {
                format!("  ✗ {}", failure_line(failure))
            } else {
                format!("  ✗ {}  {}", failure.rollout_id, failure_line(failure))
            }
        });
        for (i, bar) in self.failures.iter().enumerate() {
            match lines.next() {
                Some(line) if i == 0 => bar.set_message(format!("latest failures:\n{line}")),
                Some(line) => bar.set_message(line),
                None => bar.set_message(""),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::JobResult;
    use crate::rollout::{BudgetUse, CanaryGate};

    fn snapshot(state: State, succeeded: u64, updated_at: &str) -> Snapshot {
        Snapshot {
            rollout_id: "R-1".into(),
            declared: true,
            ticket: None,
            state,
            reason: None,
            expected_jobs: Some(10),
            counts: Counts {
                succeeded,
                in_flight: 2,
                ..Counts::default()
            },
            budget: BudgetUse {
                allowed: Some(2),
                used: 0,
            },
            canary: 0,
            canary_gate: CanaryGate::Auto,
            canary_admitted: 0,
            canary_done: true,
            max_per_second: None,
            requested_by: None,
            created_at: "2026-11-29T10:00:00.000Z".into(),
            updated_at: updated_at.into(),
            started_at: None,
            finished_at: None,
        }
    }

    fn job_event(id: &str, job: &str, outcome: Outcome, time: &str) -> Vec<u8> {
        let mut event = ResultEvent::new(
            "w",
            JobResult {
                job_id: job.into(),
                rerun: 0,
                rollout_id: Some("R-1".into()),
                ticket: None,
                region: Some("cn-north-4".into()),
                project_id: None,
                instance_id: Some(format!("inst-{job}")),
                requested_status: Some("on".into()),
                resulting_status: None,
                outcome,
                attempts: 1,
                http_status: Some(403),
                error_code: Some("DBS.200010".into()),
                error_msg: Some("not authorised\nfor this instance".into()),
                request_id: None,
                duration_ms: 1,
            },
            chrono::Utc::now(),
        );
        event.id = id.into();
        event.time = time.into();
        event.to_json().into_bytes()
    }

    #[test]
    fn a_replayed_event_and_an_event_in_the_snapshot_count_nothing() {
        let mut board = Board::new(Some("R-1".into()));
        board.snapshot(
            snapshot(State::Running, 3, "2026-11-29T10:00:05.000Z"),
            true,
        );
        let late = job_event("e-1", "J-4", Outcome::Failed, "2026-11-29T10:00:06.000Z");
        board.event("job.failed.cn-north-4", &late);
        board.event("job.failed.cn-north-4", &late);
        let old = job_event("e-0", "J-3", Outcome::Succeeded, "2026-11-29T10:00:04.000Z");
        board.event("job.succeeded.cn-north-4", &old);
        let watched = &board.rollouts["R-1"];
        assert_eq!(watched.finished(), 4);
        assert_eq!(watched.counts().failed, 1);
        assert_eq!(board.failures.len(), 1, "a replay is listed once");
        assert_eq!(
            board.failures[0].message,
            "not authorised for this instance"
        );

        // A newer snapshot that includes the failure replaces the increments.
        let mut newer = snapshot(State::Halted, 3, "2026-11-29T10:00:07.000Z");
        newer.counts.failed = 1;
        let rollout = serde_json::json!({"id": "r-1", "data": newer});
        board.event("rollout.halted", rollout.to_string().as_bytes());
        assert_eq!(board.rollouts["R-1"].finished(), 4);
        assert_eq!(board.ending(false), None);
        assert_eq!(board.ending(true), Some(Ending::Halted));
        // An older snapshot arriving late does not go back in time.
        let stale = serde_json::json!({"id": "r-0", "data": snapshot(State::Running, 1, "2026-11-29T10:00:01.000Z")});
        board.event("rollout.progress", stale.to_string().as_bytes());
        assert_eq!(board.rollouts["R-1"].snapshot.state, State::Halted);
    }

    #[test]
    fn completion_ends_with_failed_or_not() {
        let mut board = Board::new(Some("R-1".into()));
        board.snapshot(
            snapshot(State::Completed, 10, "2026-11-29T10:00:05.000Z"),
            true,
        );
        assert_eq!(board.ending(false), Some(Ending::Final { failed: false }));
        let mut failed = snapshot(State::Completed, 9, "2026-11-29T10:00:06.000Z");
        failed.counts.failed = 1;
        board.snapshot(failed, true);
        assert_eq!(board.ending(false), Some(Ending::Final { failed: true }));
        let summary = board.summary();
        assert!(
            summary.contains("rollout R-1: completed 10/10 final, failures 1/2"),
            "{summary}"
        );
        // Events of other rollouts are not ours.
        let other = Board::new(Some("R-2".into()));
        assert!(!other.wanted("R-1"));
        assert!(Board::new(None).wanted("R-1"));
    }
}
