//! Rollout files: the CSV or JSON-lines list of instances `keyturn submit` turns into jobs.
//!
//! Pure: text in, valid jobs (or every bad line with its number and fields) out. Each line is
//! checked by the worker's own parser ([`job::parse`]) with the [`ParseContext`] the worker
//! would use, so a file that passes here cannot be rejected by the worker for its shape. The
//! job id is `<rollout>:<instance_id>`, so submitting the same file twice makes the same jobs and
//! the worker's idempotency turns the second into replays. The dry-run summary and its duration
//! estimate live here too, since they only count.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::config::RateLimitSettings;
use crate::job::{self, Job, ParseContext, Problem, Status};

/// The columns (CSV) or keys (JSON lines) a rollout file may have.
pub const COLUMNS: &[&str] = &[
    "region",
    "project_id",
    "instance_id",
    "encryption_status",
    "kms_key_id",
];

/// What every line shares, from the command line.
#[derive(Debug, Clone, Default)]
pub struct Defaults<'a> {
    pub rollout_id: &'a str,
    /// For lines without `encryption_status`.
    pub status: Option<&'a str>,
    /// For `on` lines without `kms_key_id`.
    pub kms_key: Option<&'a str>,
    pub ticket: Option<&'a str>,
    pub requested_by: Option<&'a str>,
}

/// How the file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

impl Format {
    /// `.csv` is CSV, `.jsonl`/`.ndjson`/`.json` JSON lines; otherwise a first line starting with
    /// `{` means JSON lines.
    pub fn detect(path: &Path, text: &str) -> Format {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("csv") => Format::Csv,
            Some("jsonl" | "ndjson" | "json") => Format::JsonLines,
            _ if text.trim_start().starts_with('{') => Format::JsonLines,
            _ => Format::Csv,
        }
    }
}

/// One valid line: the job and the exact body that will be published.
#[derive(Debug, Clone)]
pub struct FileJob {
    pub line: usize,
    pub job: Job,
    pub body: Vec<u8>,
}

/// One bad line: its number (1-based, as an editor shows it) and every field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub problems: Vec<Problem>,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: ", self.line)?;
        for (n, problem) in self.problems.iter().enumerate() {
            let separator = if n == 0 { "" } else { "; " };
            write!(f, "{separator}{}: {}", problem.field, problem.reason)?;
        }
        Ok(())
    }
}

fn line_error(line: usize, field: &str, reason: impl Into<String>) -> LineError {
    LineError {
        line,
        problems: vec![Problem {
            field: field.into(),
            reason: reason.into(),
        }],
    }
}

/// Reads a whole file: every line valid and no instance twice, or every bad line.
pub fn read(
    text: &str,
    format: Format,
    defaults: &Defaults<'_>,
    ctx: &ParseContext<'_>,
) -> Result<Vec<FileJob>, Vec<LineError>> {
    let lines = match format {
        Format::Csv => csv_lines(text),
        Format::JsonLines => json_lines(text),
    };
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    for line in lines {
        match line.and_then(|(number, fields)| to_job(number, &fields, defaults, ctx)) {
            Ok(job) => jobs.push(job),
            Err(error) => errors.push(error),
        }
    }
    errors.extend(duplicates(&jobs));
    errors.sort_by_key(|error| error.line);
    if errors.is_empty() {
        Ok(jobs)
    } else {
        Err(errors)
    }
}

type RawLine = Result<(usize, Map<String, Value>), LineError>;

/// Lines that hold something: not blank, not a `#` comment.
fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
}

/// CSV with a header naming the columns. Values never contain commas (ids, regions, UUIDs), so
/// a cell is the text between commas, trimmed, with surrounding double quotes removed; an empty
/// cell is a missing value (the command-line default applies).
fn csv_lines(text: &str) -> Vec<RawLine> {
    let mut lines = content_lines(text);
    let Some((header_line, header)) = lines.next() else {
        return vec![Err(line_error(1, "file", "is empty"))];
    };
    let columns: Vec<String> = split_csv(header).map(|c| c.to_ascii_lowercase()).collect();
    if let Some(error) = check_header(header_line, &columns) {
        return vec![Err(error)];
    }
    lines
        .map(|(number, line)| {
            let cells: Vec<&str> = split_csv(line).collect();
            if cells.len() != columns.len() {
                return Err(line_error(
                    number,
                    "columns",
                    format!(
                        "has {} values; the header has {}",
                        cells.len(),
                        columns.len()
                    ),
                ));
            }
            let fields = columns
                .iter()
                .zip(cells)
                .filter(|(_, cell)| !cell.is_empty())
                .map(|(column, cell)| (column.clone(), Value::from(cell)))
                .collect();
            Ok((number, fields))
        })
        .collect()
}

fn split_csv(line: &str) -> impl Iterator<Item = &str> {
    line.split(',').map(|cell| {
        let cell = cell.trim();
        cell.strip_prefix('"')
            .and_then(|c| c.strip_suffix('"'))
            .unwrap_or(cell)
            .trim()
    })
}

fn check_header(line: usize, columns: &[String]) -> Option<LineError> {
    let mut problems: Vec<Problem> = columns
        .iter()
        .filter(|c| !COLUMNS.contains(&c.as_str()))
        .map(|c| Problem {
            field: job::sanitize(c),
            reason: format!("is not a column of a rollout file ({})", COLUMNS.join(", ")),
        })
        .collect();
    for required in ["project_id", "instance_id"] {
        if !columns.iter().any(|c| c == required) {
            problems.push(Problem {
                field: required.into(),
                reason: "is a required column of the header".into(),
            });
        }
    }
    (!problems.is_empty()).then_some(LineError { line, problems })
}

/// One JSON object per line, with the keys of [`COLUMNS`].
fn json_lines(text: &str) -> Vec<RawLine> {
    content_lines(text)
        .map(|(number, line)| {
            let object: Map<String, Value> = serde_json::from_str(line).map_err(|error| {
                line_error(number, "body", format!("is not a JSON object: {error}"))
            })?;
            let problems: Vec<Problem> = object
                .keys()
                .filter(|key| !COLUMNS.contains(&key.as_str()))
                .map(|key| Problem {
                    field: job::sanitize(key),
                    reason: format!("is not a key of a rollout file ({})", COLUMNS.join(", ")),
                })
                .collect();
            if problems.is_empty() {
                Ok((number, object))
            } else {
                Err(LineError {
                    line: number,
                    problems,
                })
            }
        })
        .collect()
}

/// The job body a line stands for, checked with the worker's parser.
fn to_job(
    line: usize,
    fields: &Map<String, Value>,
    defaults: &Defaults<'_>,
    ctx: &ParseContext<'_>,
) -> Result<FileJob, LineError> {
    let body = job_body(fields, defaults);
    let bytes = serde_json::to_vec(&body).expect("a JSON value serializes");
    match job::parse(&bytes, ctx) {
        Ok(job) => Ok(FileJob {
            line,
            job,
            body: bytes,
        }),
        Err(rejection) => Err(LineError {
            line,
            problems: explain(rejection.problems()),
        }),
    }
}

/// The job JSON of one line: the line's values, else the command line's defaults.
pub fn job_body(fields: &Map<String, Value>, defaults: &Defaults<'_>) -> Value {
    let text = |name: &str| fields.get(name).and_then(Value::as_str).unwrap_or("");
    let mut body = json!({
        "job_id": format!("{}:{}", defaults.rollout_id, text("instance_id")),
        "rollout_id": defaults.rollout_id,
    });
    for name in ["region", "project_id", "instance_id", "kms_key_id"] {
        if let Some(value) = fields.get(name) {
            body[name] = value.clone();
        }
    }
    let status = fields
        .get("encryption_status")
        .cloned()
        .or_else(|| defaults.status.map(Value::from));
    if let Some(status) = status {
        if status.as_str().and_then(Status::parse) == Some(Status::On) {
            body["type"] = "kms".into();
            if body.get("kms_key_id").is_none()
                && let Some(key) = defaults.kms_key
            {
                body["kms_key_id"] = key.into();
            }
        }
        body["encryption_status"] = status;
    }
    for (name, value) in [
        ("ticket", defaults.ticket),
        ("requested_by", defaults.requested_by),
    ] {
        if let Some(value) = value {
            body[name] = value.into();
        }
    }
    body
}

/// The parser's problems, worded for a file: a bad `job_id` follows from a bad instance id (or
/// rollout id), and a missing status or key can also come from the command line.
fn explain(problems: &[Problem]) -> Vec<Problem> {
    let instance_bad = problems.iter().any(|p| p.field == "instance_id");
    problems
        .iter()
        .filter(|p| !(instance_bad && p.field == "job_id"))
        .map(|p| {
            let hint = match (p.field.as_str(), p.reason.as_str()) {
                ("encryption_status", "is required") => " (a column, or --status on|off)",
                ("kms_key_id", reason) if reason.contains("required") => {
                    " (a column, or --kms-key)"
                }
                ("job_id", _) => " (the job id is <rollout>:<instance_id>; shorten --rollout)",
                _ => "",
            };
            Problem {
                field: p.field.clone(),
                reason: format!("{}{hint}", p.reason),
            }
        })
        .collect()
}

/// An instance named twice would be toggled twice: refused, naming both lines.
fn duplicates(jobs: &[FileJob]) -> Vec<LineError> {
    let mut first: HashMap<String, usize> = HashMap::new();
    let mut errors = Vec::new();
    for job in jobs {
        let instance = job.job.instance_id.as_str().to_ascii_lowercase();
        match first.get(&instance) {
            Some(earlier) => errors.push(line_error(
                job.line,
                "instance_id",
                format!("names the same instance as line {earlier}"),
            )),
            None => {
                first.insert(instance, job.line);
            }
        }
    }
    errors
}

/// Jobs per region and per (region, project), for the dry run and the estimate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub per_region: BTreeMap<String, u64>,
    pub per_project: BTreeMap<(String, String), u64>,
}

impl Counts {
    pub fn of<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> Counts {
        let mut counts = Counts::default();
        for job in jobs {
            counts.total += 1;
            *counts.per_region.entry(job.region.to_string()).or_default() += 1;
            *counts
                .per_project
                .entry((job.region.to_string(), job.project_id.to_string()))
                .or_default() += 1;
        }
        counts
    }
}

/// A lower bound on how long the API calls take at the configured rates, ignoring bursts,
/// retries and latency: the slowest of all jobs at `rate_limit.per_second`, the largest
/// (region, project) at `rate_limit.per_project_per_second`, and all jobs at the rollout's
/// `max_per_second`. One call per job (a Describe after Modify when `api.confirm_after` is on
/// is not counted).
pub fn estimate(
    counts: &Counts,
    rates: &RateLimitSettings,
    max_per_second: Option<u32>,
) -> Duration {
    let at = |jobs: u64, per_second: u32| jobs as f64 / f64::from(per_second.max(1));
    let largest_project = counts.per_project.values().copied().max().unwrap_or(0);
    let seconds = [
        at(counts.total, rates.per_second),
        at(largest_project, rates.per_project_per_second),
        max_per_second.map_or(0.0, |cap| at(counts.total, cap)),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    Duration::from_secs_f64(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROJECT: &str = "619d3e78f61b4be68bc5aa0b59edcf7b";
    const KEY: &str = "b82fa43f-f6e8-4ec4-9c31-231bc547c526";

    fn instance(n: u32) -> String {
        format!("{n:032x}in07")
    }

    fn defaults() -> Defaults<'static> {
        Defaults {
            rollout_id: "CHG-7",
            status: Some("on"),
            kms_key: Some(KEY),
            ticket: Some("CHG-7"),
            requested_by: Some("jdoe"),
        }
    }

    fn ctx() -> ParseContext<'static> {
        ParseContext::default()
    }

    fn fields(errors: &[LineError]) -> Vec<(usize, Vec<&str>)> {
        errors
            .iter()
            .map(|e| {
                (
                    e.line,
                    e.problems.iter().map(|p| p.field.as_str()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn csv_lines_become_jobs_with_deterministic_ids_and_defaults() {
        let text = format!(
            "region,project_id,instance_id,encryption_status,kms_key_id\n\
             cn-north-4,{PROJECT},{},,\n\
             # a comment\n\
             \n\
             ap-southeast-1,{PROJECT},{},off,\n",
            instance(1),
            instance(2)
        );
        let jobs = read(&text, Format::Csv, &defaults(), &ctx()).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].line, 2);
        assert_eq!(jobs[0].job.id.as_str(), format!("CHG-7:{}", instance(1)));
        assert_eq!(
            jobs[0].job.change.kms_key_id().map(|k| k.as_str()),
            Some(KEY)
        );
        assert_eq!(jobs[1].line, 5);
        assert_eq!(jobs[1].job.change.status(), Status::Off);
        let body: Value = serde_json::from_slice(&jobs[1].body).unwrap();
        assert_eq!(body["requested_by"], "jdoe");
        assert_eq!(body["ticket"], "CHG-7");
        assert!(body.get("kms_key_id").is_none() && body.get("type").is_none());
        let again = read(&text, Format::Csv, &defaults(), &ctx()).unwrap();
        assert_eq!(again[0].body, jobs[0].body, "the same file, the same bytes");
    }

    #[test]
    fn json_lines_take_per_line_values_over_the_defaults() {
        let other_key = "0d7a3f5e-3f46-4a0c-9b2c-5b7f6d1e2a90";
        let text = format!(
            "{{\"region\":\"cn-north-4\",\"project_id\":\"{PROJECT}\",\"instance_id\":\"{}\",\"kms_key_id\":\"{other_key}\"}}\n\
             {{\"region\":\"cn-north-4\",\"project_id\":\"{PROJECT}\",\"instance_id\":\"{}\",\"encryption_status\":\"OFF\"}}\n",
            instance(1),
            instance(2)
        );
        let jobs = read(&text, Format::JsonLines, &defaults(), &ctx()).unwrap();
        assert_eq!(
            jobs[0].job.change.kms_key_id().map(|k| k.as_str()),
            Some(other_key)
        );
        assert_eq!(jobs[1].job.change.status(), Status::Off);
    }

    #[test]
    fn every_bad_line_is_listed_with_its_number_and_fields() {
        let text = format!(
            "region,project_id,instance_id\n\
             cn-north-4,{PROJECT},{}\n\
             cn-north-4,nothex,{}\n\
             Bad Region,{PROJECT},i-123\n\
             cn-north-4,{PROJECT}\n",
            instance(1),
            instance(2)
        );
        let errors = read(&text, Format::Csv, &defaults(), &ctx()).unwrap_err();
        assert_eq!(
            fields(&errors),
            [
                (3, vec!["project_id"]),
                (4, vec!["region", "instance_id"]),
                (5, vec!["columns"]),
            ]
        );
        assert!(errors[0].to_string().starts_with("line 3: project_id: "));
    }

    #[test]
    fn missing_status_or_key_says_where_it_may_come_from() {
        let text = format!("project_id,instance_id\n{PROJECT},{}\n", instance(1));
        let none = Defaults {
            rollout_id: "R",
            ..Defaults::default()
        };
        let with_region = ParseContext {
            default_region: Some("cn-north-4"),
            ..ParseContext::default()
        };
        let errors = read(&text, Format::Csv, &none, &with_region).unwrap_err();
        assert_eq!(fields(&errors), [(2, vec!["encryption_status"])]);
        assert!(errors[0].to_string().contains("--status"));
        let on = Defaults {
            status: Some("on"),
            ..none
        };
        let errors = read(&text, Format::Csv, &on, &with_region).unwrap_err();
        assert_eq!(fields(&errors), [(2, vec!["kms_key_id"])]);
        assert!(errors[0].to_string().contains("--kms-key"));
    }

    #[test]
    fn a_duplicate_instance_names_both_lines() {
        let text = format!(
            "region,project_id,instance_id\n\
             cn-north-4,{PROJECT},{a}\n\
             cn-north-4,{PROJECT},{b}\n\
             cn-north-4,{PROJECT},{upper}\n",
            a = instance(10),
            b = instance(11),
            upper = instance(10).to_ascii_uppercase().replace("IN", "in"),
        );
        let errors = read(&text, Format::Csv, &defaults(), &ctx()).unwrap_err();
        assert_eq!(fields(&errors), [(4, vec!["instance_id"])]);
        assert!(errors[0].to_string().contains("line 2"), "{}", errors[0]);
    }

    #[test]
    fn a_bad_header_or_key_is_named() {
        let errors = read("region,instance\n", Format::Csv, &defaults(), &ctx()).unwrap_err();
        assert_eq!(
            fields(&errors),
            [(1, vec!["instance", "project_id", "instance_id"])]
        );
        let text = format!(
            "{{\"project_id\":\"{PROJECT}\",\"instance_id\":\"{}\",\"region\":\"cn-north-4\",\"ticket\":\"x\"}}\nnot json\n",
            instance(1)
        );
        let errors = read(&text, Format::JsonLines, &defaults(), &ctx()).unwrap_err();
        assert_eq!(fields(&errors), [(1, vec!["ticket"]), (2, vec!["body"])]);
    }

    #[test]
    fn the_format_follows_the_extension_then_the_content() {
        assert_eq!(Format::detect(Path::new("a.csv"), "{"), Format::Csv);
        assert_eq!(Format::detect(Path::new("a.jsonl"), "x"), Format::JsonLines);
        assert_eq!(
            Format::detect(Path::new("a.txt"), " {\"a\":1}"),
            Format::JsonLines
        );
        assert_eq!(Format::detect(Path::new("a"), "region,"), Format::Csv);
    }

    #[test]
    fn the_estimate_is_the_slowest_limit() {
        let mut counts = Counts {
            total: 100,
            ..Counts::default()
        };
        counts.per_project.insert(("r".into(), "p".into()), 60);
        counts.per_project.insert(("r".into(), "q".into()), 40);
        let rates = RateLimitSettings {
            per_second: 50,
            burst: 1,
            per_project_per_second: 10,
            per_project_burst: 1,
            throttle_pause: Duration::from_secs(1),
        };
        assert_eq!(estimate(&counts, &rates, None), Duration::from_secs(6));
        assert_eq!(estimate(&counts, &rates, Some(5)), Duration::from_secs(20));
    }
}
