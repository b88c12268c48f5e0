//! Rollouts: the plan a ticketing system declares for the jobs that share a `rollout_id`, the
//! commands that steer it, and the snapshot everyone reads back (contract §6).
//!
//! Pure domain: commands arrive as bytes from the control queue and leave this module as a valid
//! [`Command`] or a [`Rejection`] naming every field at fault, exactly like jobs. The state itself
//! lives in the store (one row per rollout, counts kept as jobs finish); the pipeline decides with
//! [`Rollout::admits`] what a job of a rollout may do.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::{self, Label, Problem, Problems, Rejection, RolloutId};

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    /// By an operator, or after a `manual` canary passed: `resume` continues.
    Paused,
    /// By the failure budget or a canary failure: `resume` continues.
    Halted,
    Cancelled,
    /// Every expected job has a final outcome.
    Completed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Halted => "halted",
            State::Cancelled => "cancelled",
            State::Completed => "completed",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        [
            State::Running,
            State::Paused,
            State::Halted,
            State::Cancelled,
            State::Completed,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens when the canary jobs are final and none failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CanaryGate {
    /// The rest of the rollout continues at once.
    #[default]
    Auto,
    /// The rollout pauses until `resume`.
    Manual,
}

/// How many failures a rollout tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// This many failures; the next one halts.
    Count(u32),
    /// Hundredths of a percent of `expected_jobs` (`"2.5%"` is 250).
    Percent { hundredths: u32 },
}

impl Budget {
    /// Failures allowed: a count as given, a percentage `floor(p × expected / 100)`. With budget
    /// N the (N+1)-th failure halts, as AWS SSM's MaxErrors.
    pub fn allowed(self, expected_jobs: u32) -> u64 {
        match self {
            Budget::Count(count) => count.into(),
            Budget::Percent { hundredths } => {
                u64::from(hundredths) * u64::from(expected_jobs) / 10_000
            }
        }
    }

    /// As written in a plan: `25` or `"2.5%"`.
    pub fn to_value(self) -> Value {
        match self {
            Budget::Count(count) => Value::from(count),
            Budget::Percent { hundredths } => {
                let whole = hundredths / 100;
                let rest = hundredths % 100;
                let text = match rest {
                    0 => format!("{whole}%"),
                    r if r % 10 == 0 => format!("{whole}.{}%", r / 10),
                    r => format!("{whole}.{r:02}%"),
                };
                Value::from(text)
            }
        }
    }
}

/// A rollout's declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub rollout_id: RolloutId,
    pub ticket: Option<Label>,
    pub expected_jobs: u32,
    /// `None`: no budget (every failure is tolerated).
    pub failure_budget: Option<Budget>,
    /// The first this many jobs run alone; 0 = no canary.
    pub canary: u32,
    pub canary_gate: CanaryGate,
    /// API calls per second for this rollout, on top of the other limits; `None` = no cap.
    pub max_per_second: Option<u32>,
    pub requested_by: Option<Label>,
}

impl Plan {
    /// The plan as JSON, the same for the same plan however it was spelled: a re-declaration is
    /// idempotent when this is equal, refused when it differs.
    pub fn canonical(&self) -> Value {
        serde_json::json!({
            "rollout_id": self.rollout_id.as_str(),
            "ticket": self.ticket.as_ref().map(Label::as_str),
            "expected_jobs": self.expected_jobs,
            "failure_budget": self.failure_budget.map(Budget::to_value),
            "canary": self.canary,
            "canary_gate": self.canary_gate,
            "max_per_second": self.max_per_second,
            "requested_by": self.requested_by.as_ref().map(Label::as_str),
        })
    }

    /// Failures allowed, `None` without a budget.
    pub fn allowed_failures(&self) -> Option<u64> {
        self.failure_budget
            .map(|budget| budget.allowed(self.expected_jobs))
    }
}

/// What an operator or a ticketing system asks of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Declare(Plan),
    Pause(Steer),
    Resume(Steer),
    Cancel(Steer),
    RetryFailed(Steer),
    /// A snapshot of one rollout, or of every rollout when `None`.
    Status(Option<RolloutId>),
}

/// The fields every steering command shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steer {
    pub rollout_id: RolloutId,
    pub reason: Option<Label>,
    pub requested_by: Option<Label>,
}

impl Command {
    /// The `kind` as written on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Declare(_) => "rollout",
            Command::Pause(_) => "pause",
            Command::Resume(_) => "resume",
            Command::Cancel(_) => "cancel",
            Command::RetryFailed(_) => "retry_failed",
            Command::Status(_) => "status",
        }
    }

    pub fn rollout_id(&self) -> Option<&RolloutId> {
        match self {
            Command::Declare(plan) => Some(&plan.rollout_id),
            Command::Pause(steer)
            | Command::Resume(steer)
            | Command::Cancel(steer)
            | Command::RetryFailed(steer) => Some(&steer.rollout_id),
            Command::Status(rollout_id) => rollout_id.as_ref(),
        }
    }

    /// The command as JSON, as `keyturn submit` and `keyturn rollout` publish it.
    pub fn to_json(&self) -> Value {
        let steer = |kind: &str, steer: &Steer| {
            let mut value =
                serde_json::json!({"kind": kind, "rollout_id": steer.rollout_id.as_str()});
            if let Some(reason) = &steer.reason {
                value["reason"] = reason.as_str().into();
            }
            if let Some(by) = &steer.requested_by {
                value["requested_by"] = by.as_str().into();
            }
            value
        };
        match self {
            Command::Declare(plan) => {
                let mut value = plan.canonical();
                value["kind"] = "rollout".into();
                let object = value.as_object_mut().expect("an object");
                object.retain(|_, v| !v.is_null());
                value
            }
            Command::Pause(s) => steer("pause", s),
            Command::Resume(s) => steer("resume", s),
            Command::Cancel(s) => steer("cancel", s),
            Command::RetryFailed(s) => steer("retry_failed", s),
            Command::Status(id) => match id {
                Some(id) => serde_json::json!({"kind": "status", "rollout_id": id.as_str()}),
                None => serde_json::json!({"kind": "status"}),
            },
        }
    }
}

/// The fields a control message may carry, before validation.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    kind: Option<Value>,
    rollout_id: Option<Value>,
    ticket: Option<Value>,
    expected_jobs: Option<Value>,
    failure_budget: Option<Value>,
    canary: Option<Value>,
    canary_gate: Option<Value>,
    max_per_second: Option<Value>,
    requested_by: Option<Value>,
    reason: Option<Value>,
}

/// Largest `expected_jobs` and `canary`.
pub const MAX_JOBS: u64 = 10_000_000;

/// Parses a control message.
pub fn parse_command(body: &[u8]) -> Result<Command, Rejection> {
    if body.len() > job::MAX_BODY_BYTES {
        return Err(job::reject("body", "is larger than 64 KiB"));
    }
    let text = std::str::from_utf8(body).map_err(|_| job::reject("body", "is not UTF-8"))?;
    let raw: RawCommand = serde_json::from_str(text).map_err(|error| {
        let message = error.to_string();
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let name = rest.split('`').next().unwrap_or("?");
            job::reject(&job::sanitize(name), "is not a field of a control command")
        } else {
            job::reject("body", format!("is not a JSON command object: {message}"))
        }
    })?;
    let kind = job::string("kind", job::required("kind", &raw.kind)?)?;
    let mut problems = Problems::default();
    let command = match kind {
        "rollout" => declare(&raw, &mut problems).map(Command::Declare),
        "pause" | "resume" | "cancel" | "retry_failed" => {
            steer(&raw, &mut problems).map(|steer| match kind {
                "pause" => Command::Pause(steer),
                "resume" => Command::Resume(steer),
                "cancel" => Command::Cancel(steer),
                _ => Command::RetryFailed(steer),
            })
        }
        "status" => problems
            .check(job::optional(&raw.rollout_id, rollout_id))
            .map(Command::Status),
        other => {
            return Err(job::reject(
                "kind",
                format!(
                    "{:?} is not a command (rollout, pause, resume, cancel, retry_failed, status)",
                    job::sanitize(other)
                ),
            ));
        }
    };
    if kind != "rollout" {
        for (name, value) in [
            ("ticket", &raw.ticket),
            ("expected_jobs", &raw.expected_jobs),
            ("failure_budget", &raw.failure_budget),
            ("canary", &raw.canary),
            ("canary_gate", &raw.canary_gate),
            ("max_per_second", &raw.max_per_second),
        ] {
            if value.is_some() {
                problems.0.push(Problem {
                    field: name.into(),
                    reason: format!("belongs to a rollout declaration, not to {kind}"),
                });
            }
        }
    }
    match command {
        Some(command) if problems.0.is_empty() => Ok(command),
        _ => Err(Rejection::of(problems.0)),
    }
}

fn rollout_id(value: &Value) -> Result<RolloutId, Rejection> {
    job::token("rollout_id", value).map(RolloutId)
}

fn steer(raw: &RawCommand, problems: &mut Problems) -> Option<Steer> {
    let id = problems.check(job::required("rollout_id", &raw.rollout_id).and_then(rollout_id));
    let reason = problems.check(job::optional(&raw.reason, |v| job::label("reason", v, 512)));
    let by = problems.check(job::optional(&raw.requested_by, |v| {
        job::label("requested_by", v, 128)
    }));
    Some(Steer {
        rollout_id: id?,
        reason: reason?,
        requested_by: by?,
    })
}

fn declare(raw: &RawCommand, problems: &mut Problems) -> Option<Plan> {
    let id = problems.check(job::required("rollout_id", &raw.rollout_id).and_then(rollout_id));
    let ticket = problems.check(job::optional(&raw.ticket, |v| job::label("ticket", v, 256)));
    let expected = problems.check(
        job::required("expected_jobs", &raw.expected_jobs)
            .and_then(|v| count("expected_jobs", v, 1)),
    );
    let budget = problems.check(job::optional(&raw.failure_budget, budget));
    let canary = problems.check(job::optional(&raw.canary, |v| count("canary", v, 0)));
    let gate = problems.check(job::optional(&raw.canary_gate, canary_gate));
    let rate = problems.check(job::optional(&raw.max_per_second, |v| {
        count("max_per_second", v, 1)
    }));
    let by = problems.check(job::optional(&raw.requested_by, |v| {
        job::label("requested_by", v, 128)
    }));
    if raw.reason.is_some() {
        problems.0.push(Problem {
            field: "reason".into(),
            reason: "belongs to pause, resume, cancel or retry_failed".into(),
        });
    }
    let (expected, canary) = (expected?, canary?);
    if canary.is_some_and(|canary| canary > expected) {
        problems.0.push(Problem {
            field: "canary".into(),
            reason: format!("is larger than expected_jobs ({expected})"),
        });
    }
    Some(Plan {
        rollout_id: id?,
        ticket: ticket?,
        expected_jobs: expected,
        failure_budget: budget?,
        canary: canary.unwrap_or(0),
        canary_gate: gate?.unwrap_or_default(),
        max_per_second: rate?,
        requested_by: by?,
    })
}

fn count(field: &str, value: &Value, min: u64) -> Result<u32, Rejection> {
    value
        .as_u64()
        .filter(|n| (min..=MAX_JOBS).contains(n))
        .map(|n| n as u32)
        .ok_or_else(|| {
            job::reject(
                field,
                format!("must be an integer from {min} to {MAX_JOBS}"),
            )
        })
}

fn canary_gate(value: &Value) -> Result<CanaryGate, Rejection> {
    match job::string("canary_gate", value)? {
        "auto" => Ok(CanaryGate::Auto),
        "manual" => Ok(CanaryGate::Manual),
        _ => Err(job::reject("canary_gate", "must be auto or manual")),
    }
}

/// `25` (a count) or `"2%"` / `"2.5%"` (a percentage of expected_jobs, two decimals at most).
pub fn budget(value: &Value) -> Result<Budget, Rejection> {
    const FIELD: &str = "failure_budget";
    let bad = || {
        job::reject(
            FIELD,
            "must be a count (25) or a percentage of expected_jobs (\"2%\", \"2.5%\", up to 100%)",
        )
    };
    if let Some(count) = value.as_u64() {
        return u32::try_from(count).map(Budget::Count).map_err(|_| bad());
    }
    let text = value.as_str().ok_or_else(bad)?.trim();
    let number = text.strip_suffix('%').ok_or_else(bad)?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (!fraction.is_empty() && !digits(fraction)) || fraction.len() > 2 {
        return Err(bad());
    }
    let whole: u32 = whole.parse().map_err(|_| bad())?;
    let fraction: u32 = format!("{fraction:0<2}").parse().map_err(|_| bad())?;
    let hundredths = whole
        .checked_mul(100)
        .and_then(|w| w.checked_add(fraction))
        .filter(|h| *h <= 10_000)
        .ok_or_else(bad)?;
    Ok(Budget::Percent { hundredths })
}

/// Jobs per outcome, plus those parked and in flight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub succeeded: u64,
    pub failed: u64,
    pub rejected: u64,
    pub cancelled: u64,
    pub parked: u64,
    pub in_flight: u64,
}

impl Counts {
    /// Jobs with a final outcome.
    pub fn finished(&self) -> u64 {
        self.succeeded + self.failed + self.rejected + self.cancelled
    }

    /// Failures that spend the budget: `failed` and `rejected`.
    pub fn failures(&self) -> u64 {
        self.failed + self.rejected
    }
}

/// The failure budget as it stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetUse {
    /// `None`: no budget.
    pub allowed: Option<u64>,
    pub used: u64,
}

/// Everything known about a rollout: what `status` answers and rollout events carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub rollout_id: String,
    /// False for an ad-hoc rollout (jobs named it, nobody declared it).
    pub declared: bool,
    pub ticket: Option<String>,
    pub state: State,
    pub reason: Option<String>,
    pub expected_jobs: Option<u64>,
    pub counts: Counts,
    pub budget: BudgetUse,
    pub canary: u64,
    pub canary_gate: CanaryGate,
    /// Jobs that took a canary place so far.
    #[serde(default)]
    pub canary_admitted: u64,
    /// The canary is over (passed, or there was none).
    pub canary_done: bool,
    pub max_per_second: Option<u64>,
    pub requested_by: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// The answer to a control command that carried `reply_to` (`correlation_id` is copied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The command's `kind`.
    pub kind: String,
    /// Whether the command was applied (a `status` that found its rollouts is `ok` too).
    pub ok: bool,
    /// Why it was not, when it was not.
    pub error: Option<String>,
    /// The rollouts concerned, after the command: one for a command naming a rollout, every
    /// rollout for `status` without one.
    pub rollouts: Vec<Snapshot>,
}

/// What a job of a rollout may do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Run,
    /// Run as one of the canary jobs (the store counts it in).
    Canary,
    /// Park until the rollout runs again (the reason says why).
    Park(String),
    /// The rollout was cancelled: end the job `cancelled`.
    Cancel,
}

impl Snapshot {
    /// What a new job of this rollout may do now.
    pub fn admission(&self) -> Admission {
        Rollout {
            state: self.state,
            canary: self.canary,
            canary_admitted: self.canary_admitted,
            canary_done: self.canary_done,
        }
        .admits()
    }
}

/// The part of a rollout's stored state a job's admission depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub state: State,
    pub canary: u64,
    /// Jobs admitted to the canary so far.
    pub canary_admitted: u64,
    pub canary_done: bool,
}

impl Rollout {
    /// Decides what a new job of this rollout may do.
    pub fn admits(&self) -> Admission {
        match self.state {
            State::Cancelled => Admission::Cancel,
            State::Paused => Admission::Park("rollout paused".into()),
            State::Halted => Admission::Park("rollout halted".into()),
            State::Running | State::Completed if self.canary_done || self.canary == 0 => {
                Admission::Run
            }
            State::Running | State::Completed if self.canary_admitted < self.canary => {
                Admission::Canary
            }
            State::Running | State::Completed => {
                Admission::Park("waiting for the canary jobs to finish".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<Command, Rejection> {
        parse_command(value.to_string().as_bytes())
    }

    fn fields(value: Value) -> Vec<String> {
        parse(value)
            .unwrap_err()
            .problems()
            .iter()
            .map(|p| p.field.clone())
            .collect()
    }

    #[test]
    fn the_contract_example_declares_a_rollout() {
        let command = parse(
            json!({"kind":"rollout","rollout_id":"CHG-1042","ticket":"CHG-1042",
            "expected_jobs":1200,"failure_budget":"2%","canary":10,"canary_gate":"auto",
            "max_per_second":5,"requested_by":"jdoe"}),
        )
        .unwrap();
        let Command::Declare(plan) = command else {
            panic!("a declaration")
        };
        assert_eq!(plan.expected_jobs, 1200);
        assert_eq!(plan.allowed_failures(), Some(24));
        assert_eq!(plan.canary, 10);
        assert_eq!(plan.max_per_second, Some(5));
        let again = parse(Command::Declare(plan.clone()).to_json()).unwrap();
        assert_eq!(again, Command::Declare(plan), "to_json round-trips");
    }

    #[test]
    fn a_percentage_budget_rounds_down_and_n_means_the_next_one_halts() {
        let allowed = |text: &str, expected| budget(&json!(text)).unwrap().allowed(expected);
        assert_eq!(allowed("2%", 1200), 24);
        assert_eq!(allowed("10%", 15), 1, "1.5 rounds down");
        assert_eq!(
            allowed("10%", 9),
            0,
            "0.9 rounds down to zero: the first failure halts"
        );
        assert_eq!(allowed("2.5%", 200), 5);
        assert_eq!(allowed("0.01%", 10_000), 1);
        assert_eq!(allowed("100%", 7), 7);
        assert_eq!(budget(&json!(5)).unwrap().allowed(200), 5);
        for bad in [
            json!("2"),
            json!("-1%"),
            json!("1.234%"),
            json!("101%"),
            json!(-3),
            json!("x%"),
        ] {
            assert!(budget(&bad).is_err(), "{bad}");
        }
        assert_eq!(
            Budget::Percent { hundredths: 250 }.to_value(),
            json!("2.5%")
        );
        assert_eq!(
            Budget::Percent { hundredths: 205 }.to_value(),
            json!("2.05%")
        );
    }

    #[test]
    fn a_bad_command_names_every_field_at_fault() {
        assert_eq!(
            fields(
                json!({"kind":"rollout","rollout_id":"a b","expected_jobs":0,"canary_gate":"later"})
            ),
            ["rollout_id", "expected_jobs", "canary_gate"]
        );
        assert_eq!(
            fields(json!({"kind":"pause","rollout_id":"R","canary":3})),
            ["canary"]
        );
        assert_eq!(fields(json!({"kind":"explode"})), ["kind"]);
        assert_eq!(
            fields(json!({"kind":"pause","rolout_id":"R"})),
            ["rolout_id"]
        );
        assert_eq!(fields(json!({"rollout_id":"R"})), ["kind"]);
        assert_eq!(
            fields(json!({"kind":"rollout","rollout_id":"R","expected_jobs":5,"canary":6})),
            ["canary"]
        );
        assert_eq!(parse_command(b"\xff").unwrap_err().field(), "body");
    }

    #[test]
    fn status_may_name_one_rollout_or_none() {
        assert_eq!(
            parse(json!({"kind":"status"})).unwrap(),
            Command::Status(None)
        );
        assert!(matches!(
            parse(json!({"kind":"status","rollout_id":"R-1"})).unwrap(),
            Command::Status(Some(_))
        ));
    }

    #[test]
    fn admission_follows_state_and_canary() {
        let rollout = |state, canary, admitted, done| Rollout {
            state,
            canary,
            canary_admitted: admitted,
            canary_done: done,
        };
        assert_eq!(
            rollout(State::Running, 0, 0, false).admits(),
            Admission::Run
        );
        assert_eq!(
            rollout(State::Running, 3, 2, false).admits(),
            Admission::Canary
        );
        assert!(matches!(
            rollout(State::Running, 3, 3, false).admits(),
            Admission::Park(_)
        ));
        assert_eq!(rollout(State::Running, 3, 3, true).admits(), Admission::Run);
        assert!(matches!(
            rollout(State::Paused, 0, 0, true).admits(),
            Admission::Park(_)
        ));
        assert!(matches!(
            rollout(State::Halted, 0, 0, true).admits(),
            Admission::Park(_)
        ));
        assert_eq!(
            rollout(State::Cancelled, 0, 0, true).admits(),
            Admission::Cancel
        );
    }
}
