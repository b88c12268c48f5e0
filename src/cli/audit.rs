//! `keyturn audit`: the operator's window into the audit file without writing SQL — query and
//! export runs, list every HTTP call of a job, check the store keeps its rules, and render a
//! rollout report to attach to the change ticket.
//!
//! Everything here reads through [`crate::audit::query`], which opens the file itself
//! (read-only, except `verify`'s rolled-back UPDATE), so it works beside a running worker.
//! Exit codes: 0 done; 1 `verify` found a problem or a rollout is unknown; 2 bad configuration
//! or arguments (as every command).

mod report;
mod table;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};

use crate::audit::Location;
use crate::audit::query::{Filter, Reader, TOGGLE_COLUMNS, ToggleRow};
use crate::audit::timestamp;
use crate::config::{ConfigError, Settings};

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// The audit file (default: the `audit.path` setting).
    #[arg(long, global = true, value_name = "FILE")]
    db: Option<PathBuf>,
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    query: QueryArgs,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Every HTTP call made for a job: time, call, status, code, request id, latency.
    Attempts {
        /// The job id.
        job: String,
        /// Only this run of the job.
        #[arg(long)]
        rerun: Option<i64>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Check the append-only triggers, the migrations and that counts agree with rows.
    Verify,
    /// One self-contained HTML page (and/or CSV, JSON) about one rollout.
    Report(report::ReportArgs),
}

#[derive(Args, Debug)]
struct QueryArgs {
    /// Only runs of this rollout.
    #[arg(long)]
    rollout: Option<String>,
    /// Only runs for this instance id.
    #[arg(long)]
    instance: Option<String>,
    /// Only runs of this job id.
    #[arg(long)]
    job: Option<String>,
    /// Only this outcome.
    #[arg(long, value_parser = ["succeeded", "failed", "rejected", "cancelled"])]
    outcome: Option<String>,
    /// Finished at or after: RFC 3339, or a duration ago such as `2h`.
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Finished before: RFC 3339, or a duration ago such as `30m`.
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Only runs of this ticket.
    #[arg(long)]
    ticket: Option<String>,
    /// table (default), json or csv.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// At most this many rows (the oldest first).
    #[arg(long)]
    limit: Option<u64>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// Aligned columns that fit 100 characters.
    Table,
    /// One JSON object per line, every column.
    Json,
    /// RFC 4180 with a header line, every column.
    Csv,
}

impl QueryArgs {
    /// Whether any query option was given (they do not apply to the subcommands).
    fn is_given(&self) -> bool {
        let QueryArgs {
            rollout,
            instance,
            job,
            outcome,
            since,
            until,
            ticket,
            format,
            limit,
        } = self;
        rollout.is_some()
            || instance.is_some()
            || job.is_some()
            || outcome.is_some()
            || since.is_some()
            || until.is_some()
            || ticket.is_some()
            || format.is_some()
            || limit.is_some()
    }
}

/// An RFC 3339 time, or a humantime duration counted back from now.
fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is neither an RFC 3339 time nor a duration like 2h"))?;
    let ago = chrono::Duration::from_std(ago).map_err(|e| e.to_string())?;
    Ok(Utc::now() - ago)
}

pub fn run(settings: &Settings, args: AuditArgs) -> anyhow::Result<ExitCode> {
    if args.action.is_some() && args.query.is_given() {
        eprintln!(
            "keyturn: invalid argument: the query options (--rollout, --format …) go after `keyturn audit`, not with `attempts`, `verify` or `report`"
        );
        return Ok(ExitCode::from(2));
    }
    let location = store_location(settings, args.db.as_deref())?;
    // The PostgreSQL client blocks on a runtime of its own, which cannot run inside this one.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut out = std::io::stdout().lock();
                match args.action {
                    None => query(&location, args.query, &mut out),
                    Some(Action::Attempts { job, rerun, format }) => {
                        attempts(&location, &job, rerun, format, &mut out)
                    }
                    Some(Action::Verify) => verify(&location, &mut out),
                    Some(Action::Report(report)) => report::run(&location, report),
                }
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The store to read: `--db` (a SQLite file), else `store.url`, else `audit.path`; a file that
/// does not exist is a configuration error naming the key (reading never creates a store).
fn store_location(settings: &Settings, db: Option<&Path>) -> Result<Location, ConfigError> {
    let (key, path) = match db {
        Some(path) => ("--db", path),
        None if !settings.store.url.is_empty() => return Ok(settings.store_location()),
        None => ("audit.path", settings.audit.path.as_path()),
    };
    let path = super::absolute(path);
    if path.is_file() {
        Ok(Location::Sqlite(path))
    } else {
        Err(ConfigError {
            key: key.into(),
            problem: format!("no audit log at {}", path.display()),
        })
    }
}

pub(crate) fn open(location: &Location) -> anyhow::Result<Reader> {
    Reader::open_at(location, false).with_context(|| format!("reading {}", location.describe()))
}

fn query(location: &Location, args: QueryArgs, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let filter = Filter {
        rollout_id: args.rollout,
        instance_id: args.instance,
        job_id: args.job,
        outcome: args.outcome,
        ticket: args.ticket,
        since: args.since.map(timestamp),
        until: args.until.map(timestamp),
        limit: args.limit,
    };
    let rows = open(location)?.toggles(&filter)?;
    match args.format.unwrap_or(Format::Table) {
        Format::Table => write!(out, "{}", table::toggles(&rows))?,
        Format::Json => json_lines(&rows, out)?,
        Format::Csv => csv(TOGGLE_COLUMNS, &rows, out)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn attempts(
    location: &Location,
    job: &str,
    rerun: Option<i64>,
    format: Format,
    out: &mut impl Write,
) -> anyhow::Result<ExitCode> {
    let rows = open(location)?.attempts(job, rerun)?;
    match format {
        Format::Table => write!(out, "{}", table::attempts(&rows))?,
        Format::Json => json_lines(&rows, out)?,
        Format::Csv => csv(ATTEMPT_COLUMNS, &rows, out)?,
    }
    if rows.is_empty() {
        eprintln!("keyturn: no attempts recorded for job {job:?}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The columns of `keyturn audit attempts --format csv`, in order.
const ATTEMPT_COLUMNS: &[&str] = &[
    "job_id",
    "rerun",
    "outcome",
    "number",
    "call",
    "started_at",
    "latency_ms",
    "http_status",
    "error_code",
    "error_msg",
    "request_id",
    "event_id",
];

fn verify(location: &Location, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let reader = Reader::open_at(location, true)
        .with_context(|| format!("opening {} to verify it", location.describe()))?;
    let findings = reader.verify()?;
    for finding in &findings {
        let mark = if finding.ok { "ok" } else { "PROBLEM" };
        writeln!(out, "{mark} {}", finding.text)?;
    }
    Ok(if findings.iter().all(|f| f.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn json_lines<T: serde::Serialize>(rows: &[T], out: &mut impl Write) -> anyhow::Result<()> {
    for row in rows {
        serde_json::to_writer(&mut *out, row)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// RFC 4180: CRLF line ends; a field with a comma, quote, CR or LF is quoted, quotes doubled;
/// NULL is an empty field.
fn csv<T: serde::Serialize>(
    columns: &[&str],
    rows: &[T],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    write_record(columns.iter().map(|c| c.to_string()), out)?;
    for row in rows {
        let value = serde_json::to_value(row)?;
        write_record(columns.iter().map(|c| csv_text(&value[*c])), out)?;
    }
    Ok(())
}

fn csv_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn write_record(
    fields: impl Iterator<Item = String>,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let fields: Vec<String> = fields.map(|f| csv_field(&f)).collect();
    write!(out, "{}\r\n", fields.join(","))
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// Rows of one rollout for `report --csv`: every toggles column but the stored event.
pub(crate) fn csv_runs(rows: &[ToggleRow], out: &mut impl Write) -> anyhow::Result<()> {
    let columns: Vec<&str> = TOGGLE_COLUMNS
        .iter()
        .copied()
        .filter(|c| *c != "event_json")
        .collect();
    csv(&columns, rows, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_what_rfc_4180_asks() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }

    #[test]
    fn times_are_rfc_3339_or_a_duration_ago() {
        let at = parse_time("2026-11-29T10:00:00+01:00").unwrap();
        assert_eq!(timestamp(at), "2026-11-29T09:00:00.000Z");
        let ago = parse_time("2h").unwrap();
        let expected = Utc::now() - chrono::Duration::hours(2);
        assert!((ago - expected).num_seconds().abs() < 5);
        assert!(parse_time("yesterday").is_err());
    }
}
