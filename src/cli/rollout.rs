//! `keyturn rollout status|pause|resume|cancel|retry-failed ROLLOUT` and `keyturn rollout list`:
//! one command over the control queue, the worker's reply printed for a person (or raw with
//! `--json`).
//!
//! Exit codes, shared with `keyturn submit`: 0 applied or answered; 1 refused (`ok=false`, e.g.
//! an unknown rollout) or a broker failure; 2 bad configuration or arguments; 3 no worker
//! answered within `--timeout`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::amqp::ConnectError;
use crate::amqp::control::{ControlClient, ControlError};
use crate::config::Settings;
use crate::rollout::{self, Command, Reply, Snapshot};

/// Exit code when the worker refused the command.
pub const REFUSED: u8 = 1;
/// Exit code for bad arguments, as for bad configuration.
pub const BAD_ARGUMENTS: u8 = 2;
/// Exit code when no worker answered within the timeout.
pub const NO_ANSWER: u8 = 3;

#[derive(Args, Debug)]
pub struct RolloutArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Print one rollout's state, counts, budget, canary and times.
    Status(Target),
    /// Stop starting new jobs of the rollout; its jobs are parked until `resume`.
    Pause(Steering),
    /// Continue a paused or halted rollout; parked jobs are republished.
    Resume(Steering),
    /// End the rollout: parked and later jobs end `cancelled`.
    Cancel(Steering),
    /// Run each failed job of the rollout again, under the next `rerun`.
    RetryFailed(Steering),
    /// One line per rollout the store knows.
    List(Wait),
}

#[derive(Args, Debug)]
struct Wait {
    /// How long to wait for a worker's answer.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the worker's reply as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct Target {
    /// The rollout id.
    rollout: String,
    #[command(flatten)]
    wait: Wait,
}

#[derive(Args, Debug)]
struct Steering {
    /// The rollout id.
    rollout: String,
    /// Why; kept with the rollout and shown by `status`.
    #[arg(long)]
    reason: Option<String>,
    /// Who asks.
    #[arg(long)]
    requested_by: Option<String>,
    #[command(flatten)]
    wait: Wait,
}

impl Action {
    /// The command as JSON before validation, and how to wait for it.
    fn request(&self) -> (Value, &Wait) {
        let steer = |kind: &str, s: &Steering| {
            let mut value = json!({"kind": kind, "rollout_id": s.rollout});
            if let Some(reason) = &s.reason {
                value["reason"] = reason.as_str().into();
            }
            if let Some(by) = &s.requested_by {
                value["requested_by"] = by.as_str().into();
            }
            value
        };
        match self {
            Action::Status(t) => (json!({"kind": "status", "rollout_id": t.rollout}), &t.wait),
            Action::Pause(s) => (steer("pause", s), &s.wait),
            Action::Resume(s) => (steer("resume", s), &s.wait),
            Action::Cancel(s) => (steer("cancel", s), &s.wait),
            Action::RetryFailed(s) => (steer("retry_failed", s), &s.wait),
            Action::List(wait) => (json!({"kind": "status"}), wait),
        }
    }
}

pub async fn run(settings: &Settings, args: RolloutArgs) -> anyhow::Result<ExitCode> {
    let (request, wait) = args.action.request();
    // The worker's own parser, so a bad rollout id is an argument error here, not a dead letter.
    let command = match rollout::parse_command(request.to_string().as_bytes()) {
        Ok(command) => command,
        Err(rejection) => {
            eprintln!("keyturn: invalid argument: {rejection}");
            return Ok(ExitCode::from(BAD_ARGUMENTS));
        }
    };
    let reply = match ask(settings, &command, wait.timeout).await {
        Ok(reply) => reply,
        Err(error) => return control_failure(error),
    };
    if wait.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else if matches!(args.action, Action::List(_)) {
        print_list(&reply.rollouts);
    } else {
        reply
            .rollouts
            .iter()
            .for_each(|s| print!("{}", describe(s)));
    }
    Ok(verdict(&reply))
}

/// Connects, sends `command`, waits for its reply, disconnects.
pub async fn ask(
    settings: &Settings,
    command: &Command,
    timeout: Duration,
) -> Result<Reply, ControlError> {
    let mut client = ControlClient::connect(&settings.amqp, "keyturn-rollout").await?;
    let reply = client.request(command, timeout).await;
    client.close().await;
    reply
}

/// 0 when applied; a refusal says why on stderr and exits 1.
pub fn verdict(reply: &Reply) -> ExitCode {
    if reply.ok {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "keyturn: the worker refused {}: {}",
        reply.kind,
        reply.error.as_deref().unwrap_or("no reason given")
    );
    ExitCode::from(REFUSED)
}

/// No answer exits 3 with the reason; settings the broker refused exit 2 (through `cli::run`);
/// anything else exits 1.
pub fn control_failure(error: ControlError) -> anyhow::Result<ExitCode> {
    if error.is_no_answer() {
        eprintln!("keyturn: {error}");
        return Ok(ExitCode::from(NO_ANSWER));
    }
    match error {
        ControlError::Connect(ConnectError::Settings(config)) => Err(config.into()),
        other => Err(other.into()),
    }
}

/// A snapshot for a person, one fact per line.
pub fn describe(s: &Snapshot) -> String {
    let c = &s.counts;
    let mut text = format!("rollout {}: {}", s.rollout_id, s.state);
    if !s.declared {
        text.push_str(" (ad hoc: jobs named it, nobody declared it)");
    }
    text.push('\n');
    let mut line = |label: &str, value: String| text.push_str(&format!("  {label:<13} {value}\n"));
    if let Some(ticket) = &s.ticket {
        line("ticket", ticket.clone());
    }
    let expected = s
        .expected_jobs
        .map_or("not declared".into(), |n| n.to_string());
    line(
        "jobs",
        format!(
            "{} of {expected} final: {} succeeded, {} failed, {} rejected, {} cancelled",
            c.finished(),
            c.succeeded,
            c.failed,
            c.rejected,
            c.cancelled
        ),
    );
    line(
        "waiting",
        format!("{} in flight, {} parked", c.in_flight, c.parked),
    );
    line("budget", budget(s));
    line("canary", canary(s));
    if let Some(cap) = s.max_per_second {
        line("rate cap", format!("{cap} API calls/s"));
    }
    if let Some(reason) = &s.reason {
        line("last reason", reason.clone());
    }
    if let Some(by) = &s.requested_by {
        line("requested by", by.clone());
    }
    line("created", s.created_at.clone());
    if let Some(at) = &s.started_at {
        line("started", at.clone());
    }
    line("updated", s.updated_at.clone());
    if let Some(at) = &s.finished_at {
        line("finished", at.clone());
    }
    text
}

fn budget(s: &Snapshot) -> String {
    match s.budget.allowed {
        Some(allowed) => format!(
            "{} of {allowed} failures used (failure {} halts)",
            s.budget.used,
            allowed + 1
        ),
        None => format!("{} failures; no budget", s.budget.used),
    }
}

fn canary(s: &Snapshot) -> String {
    if s.canary == 0 {
        return "none".into();
    }
    let gate = match s.canary_gate {
        rollout::CanaryGate::Auto => "auto",
        rollout::CanaryGate::Manual => "manual",
    };
    let done = if s.canary_done { "done" } else { "running" };
    format!("{} jobs, {gate} gate, {done}", s.canary)
}

fn print_list(rollouts: &[Snapshot]) {
    if rollouts.is_empty() {
        println!("no rollouts");
        return;
    }
    println!(
        "{:<24} {:<10} {:>15} {:>7} {:>9} {:>7} {:>9}  updated",
        "rollout", "state", "final/expected", "failed", "budget", "parked", "in flight"
    );
    for s in rollouts {
        let c = &s.counts;
        let expected = s.expected_jobs.map_or("-".into(), |n| n.to_string());
        let allowed = s.budget.allowed.map_or("-".into(), |n| n.to_string());
        println!(
            "{:<24} {:<10} {:>15} {:>7} {:>9} {:>7} {:>9}  {}",
            s.rollout_id,
            s.state.as_str(),
            format!("{}/{expected}", c.finished()),
            c.failures(),
            format!("{}/{allowed}", s.budget.used),
            c.parked,
            c.in_flight,
            s.updated_at
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{BudgetUse, CanaryGate, Counts, State};

    fn snapshot() -> Snapshot {
        Snapshot {
            rollout_id: "CHG-1".into(),
            declared: true,
            ticket: Some("CHG-1".into()),
            state: State::Halted,
            reason: Some("failure budget spent: 3 failures, 2 allowed".into()),
            expected_jobs: Some(100),
            counts: Counts {
                succeeded: 40,
                failed: 3,
                in_flight: 2,
                parked: 55,
                ..Counts::default()
            },
            budget: BudgetUse {
                allowed: Some(2),
                used: 3,
            },
            canary: 5,
            canary_gate: CanaryGate::Manual,
            canary_admitted: 0,
            canary_done: true,
            max_per_second: Some(5),
            requested_by: Some("jdoe".into()),
            created_at: "2026-11-29T10:00:00Z".into(),
            updated_at: "2026-11-29T10:05:00Z".into(),
            started_at: Some("2026-11-29T10:00:01Z".into()),
            finished_at: None,
        }
    }

    #[test]
    fn a_snapshot_reads_as_state_counts_budget_and_reason() {
        let text = describe(&snapshot());
        for part in [
            "rollout CHG-1: halted",
            "43 of 100 final: 40 succeeded, 3 failed, 0 rejected, 0 cancelled",
            "2 in flight, 55 parked",
            "3 of 2 failures used (failure 3 halts)",
            "5 jobs, manual gate, done",
            "failure budget spent",
            "5 API calls/s",
        ] {
            assert!(text.contains(part), "{part:?} in\n{text}");
        }
    }

    #[test]
    fn steering_arguments_become_the_wire_command() {
        let action = Action::Pause(Steering {
            rollout: "CHG-1".into(),
            reason: Some("error rate".into()),
            requested_by: None,
            wait: Wait {
                timeout: Duration::from_secs(1),
                json: false,
            },
        });
        let (request, _) = action.request();
        let command = rollout::parse_command(request.to_string().as_bytes()).unwrap();
        assert_eq!(
            command.to_json(),
            json!({"kind":"pause","rollout_id":"CHG-1","reason":"error rate"})
        );
    }
}
