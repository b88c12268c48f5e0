//! `keyturn audit report ROLLOUT --html FILE [--csv FILE] [--json FILE]`: what one rollout did,
//! as a page to attach to its change ticket.
//!
//! The HTML is one self-contained file: inline CSS, inline SVG charts, no script, and no URL of
//! any kind, so it renders the same offline, in a mail client or years later. Every stored value
//! is escaped: a ticket or an API error message is text on the page, never markup.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::audit::Location;
use crate::audit::query::{Filter, RolloutRow, ToggleRow};

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The rollout id.
    rollout: String,
    /// Write the page here.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Write one CSV row per job run here.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Write the report's data as one JSON document here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Outcomes in the order the report shows them.
const OUTCOMES: &[&str] = &["succeeded", "failed", "rejected", "cancelled", "halted"];

/// Everything the report shows, derived from the `rollouts` row and the rollout's `toggles` rows.
#[derive(Debug, Serialize)]
struct Report {
    rollout: RolloutRow,
    /// Failures counted against the budget: the latest outcome of each job, failed or rejected.
    budget_used: i64,
    /// Job runs recorded (a rerun is a run of its own).
    runs: usize,
    /// Runs per outcome.
    runs_by_outcome: BTreeMap<String, usize>,
    /// Runs finished per minute (`YYYY-MM-DDTHH:MM`, UTC), by outcome.
    timeline: Vec<Bucket>,
    /// The latest run of each job, by region and outcome.
    regions: Vec<Bucket>,
    /// Every failed or cancelled run.
    failures: Vec<Failure>,
    /// Jobs with more than one run, each run's outcome.
    reruns: Vec<Rerun>,
}

#[derive(Debug, Serialize)]
struct Bucket {
    key: String,
    by_outcome: BTreeMap<String, usize>,
}

impl Bucket {
    fn total(&self) -> usize {
        self.by_outcome.values().sum()
    }
}

#[derive(Debug, Serialize)]
struct Failure {
    job_id: String,
    rerun: i64,
    outcome: String,
    instance_id: Option<String>,
    region: Option<String>,
    error_code: Option<String>,
    error_msg: Option<String>,
    request_id: Option<String>,
    finished_at: String,
}

#[derive(Debug, Serialize)]
struct Rerun {
    job_id: String,
    runs: Vec<RunOutcome>,
}

#[derive(Debug, Serialize)]
struct RunOutcome {
    rerun: i64,
    outcome: String,
    finished_at: String,
}

pub fn run(location: &Location, args: ReportArgs) -> anyhow::Result<ExitCode> {
    if args.html.is_none() && args.csv.is_none() && args.json.is_none() {
        eprintln!("keyturn: audit report: give at least one of --html, --csv, --json");
        return Ok(ExitCode::from(2));
    }
    let reader = super::open(location)?;
    let Some(rollout) = reader.rollout(&args.rollout)? else {
        eprintln!(
            "keyturn: no rollout {:?} in {}",
            args.rollout,
            location.describe()
        );
        return Ok(ExitCode::FAILURE);
    };
    let runs = reader.toggles(&Filter {
        rollout_id: Some(args.rollout.clone()),
        ..Filter::default()
    })?;
    let report = Report::build(rollout, &runs);
    if let Some(file) = &args.html {
        write_file(file, html(&report).as_bytes())?;
    }
    if let Some(file) = &args.csv {
        let mut bytes = Vec::new();
        super::csv_runs(&runs, &mut bytes)?;
        write_file(file, &bytes)?;
    }
    if let Some(file) = &args.json {
        let mut document = serde_json::to_value(&report)?;
        document["job_runs"] = serde_json::to_value(&runs)?;
        write_file(file, serde_json::to_string_pretty(&document)?.as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn write_file(file: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(file, bytes).with_context(|| format!("writing {}", file.display()))
}

impl Report {
    fn build(rollout: RolloutRow, runs: &[ToggleRow]) -> Report {
        let mut runs_by_outcome = BTreeMap::new();
        let mut minutes: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        let mut latest: BTreeMap<&str, &ToggleRow> = BTreeMap::new();
        let mut per_job: BTreeMap<&str, Vec<&ToggleRow>> = BTreeMap::new();
        for run in runs {
            *runs_by_outcome.entry(run.outcome.clone()).or_insert(0) += 1;
            let minute: String = run.finished_at.chars().take(16).collect();
            *minutes
                .entry(minute)
                .or_default()
                .entry(run.outcome.clone())
                .or_insert(0) += 1;
            per_job.entry(&run.job_id).or_default().push(run);
            let newer = latest
                .get(run.job_id.as_str())
                .is_none_or(|seen| (run.rerun, run.id) > (seen.rerun, seen.id));
            if newer {
                latest.insert(&run.job_id, run);
            }
        }
        let mut regions: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for run in latest.values() {
            let region = run.region.clone().unwrap_or_else(|| "unknown".into());
            *regions
                .entry(region)
                .or_default()
                .entry(run.outcome.clone())
                .or_insert(0) += 1;
        }
        let buckets = |map: BTreeMap<String, BTreeMap<String, usize>>| {
            map.into_iter()
                .map(|(key, by_outcome)| Bucket { key, by_outcome })
                .collect()
        };
        Report {
            budget_used: rollout.failed + rollout.rejected,
            runs: runs.len(),
            runs_by_outcome,
            timeline: buckets(minutes),
            regions: buckets(regions),
            failures: runs
                .iter()
                .filter(|r| r.outcome == "failed" || r.outcome == "cancelled")
                .map(failure)
                .collect(),
            reruns: per_job
                .into_iter()
                .filter(|(_, runs)| runs.len() > 1)
                .map(|(job_id, runs)| Rerun {
                    job_id: job_id.to_owned(),
                    runs: runs
                        .iter()
                        .map(|r| RunOutcome {
                            rerun: r.rerun,
                            outcome: r.outcome.clone(),
                            finished_at: r.finished_at.clone(),
                        })
                        .collect(),
                })
                .collect(),
            rollout,
        }
    }
}

fn failure(run: &ToggleRow) -> Failure {
    Failure {
        job_id: run.job_id.clone(),
        rerun: run.rerun,
        outcome: run.outcome.clone(),
        instance_id: run.instance_id.clone(),
        region: run.region.clone(),
        error_code: run.error_code.clone(),
        error_msg: run.error_msg.clone(),
        request_id: run.request_id.clone(),
        finished_at: run.finished_at.clone(),
    }
}

/// Text made safe for HTML element content and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt(value: &Option<String>) -> String {
    value.as_deref().map(escape).unwrap_or_else(|| "—".into())
}

fn colour(outcome: &str) -> &'static str {
    match outcome {
        "succeeded" => "#2e7d32",
        "failed" => "#c62828",
        "rejected" => "#ef6c00",
        "cancelled" => "#757575",
        _ => "#6a1b9a",
    }
}

const STYLE: &str = "
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1f2328;margin:24px auto;max-width:1100px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.state{display:inline-block;padding:2px 10px;border-radius:12px;color:#fff;font-weight:600;font-size:13px;vertical-align:middle}
dl{display:grid;grid-template-columns:max-content 1fr max-content 1fr;gap:4px 16px;margin:12px 0}
dt{color:#57606a}dd{margin:0;font-weight:500;overflow-wrap:anywhere}
.counts{display:flex;gap:12px;flex-wrap:wrap}.count{border:1px solid #d0d7de;border-radius:8px;padding:8px 16px;min-width:110px}
.count b{display:block;font-size:26px}.count span{color:#57606a}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{border-bottom:1px solid #d0d7de;padding:4px 6px;text-align:left;vertical-align:top}
table{table-layout:fixed}th{background:#f6f8fa}td{overflow-wrap:anywhere}td code{word-break:break-all}code{font-size:12px}
svg{max-width:100%;height:auto}
.legend span{margin-right:14px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
svg text{font:11px system-ui,sans-serif;fill:#57606a}.muted{color:#57606a}
";

fn html(report: &Report) -> String {
    let r = &report.rollout;
    let mut page = String::new();
    let state = escape(&r.state);
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Rollout {id} — keyturn report</title><style>{STYLE}</style></head><body>\
         <h1>Rollout <span id=\"rollout-id\">{id}</span> \
         <span class=\"state\" id=\"state\" style=\"background:{bg}\">{state}</span></h1>",
        id = escape(&r.rollout_id),
        bg = state_colour(&r.state),
    );
    header(&mut page, report);
    counts(&mut page, report);
    page.push_str("<h2>Completions per minute (UTC)</h2>");
    legend(&mut page);
    page.push_str(&timeline_svg(&report.timeline));
    page.push_str("<h2>Latest outcome per job, by region</h2>");
    page.push_str(&regions_svg(&report.regions));
    failures(&mut page, &report.failures);
    reruns(&mut page, &report.reruns);
    page.push_str("<p class=\"muted\">Written by <code>keyturn audit report</code> from the audit log.</p></body></html>\n");
    page
}

fn state_colour(state: &str) -> &'static str {
    match state {
        "completed" => "#2e7d32",
        "running" => "#0969da",
        "paused" => "#9a6700",
        "halted" => "#c62828",
        _ => "#57606a",
    }
}

fn header(page: &mut String, report: &Report) {
    let r = &report.rollout;
    let number = |n: Option<i64>| n.map(|n| n.to_string()).unwrap_or_else(|| "—".into());
    let budget = match r.budget_allowed {
        Some(allowed) => format!("{} used of {allowed} allowed", report.budget_used),
        None => format!("{} failures; no budget", report.budget_used),
    };
    let canary = if r.canary > 0 {
        format!("{} ({})", r.canary, escape(&r.canary_gate))
    } else {
        "none".into()
    };
    let rows = [
        ("ticket", "ticket", opt(&r.ticket)),
        ("requested by", "requested-by", opt(&r.requested_by)),
        ("expected jobs", "expected", number(r.expected_jobs)),
        ("failure budget", "budget", budget),
        ("canary", "canary", canary),
        ("max per second", "max-per-second", number(r.max_per_second)),
        ("state", "state-text", escape(&r.state)),
        ("reason", "reason", opt(&r.reason)),
        ("created", "created", escape(&r.created_at)),
        ("started", "started", opt(&r.started_at)),
        ("finished", "finished", opt(&r.finished_at)),
        (
            "declared",
            "declared",
            if r.declared { "yes" } else { "no (ad hoc)" }.into(),
        ),
    ];
    page.push_str("<dl>");
    for (label, id, value) in rows {
        let _ = write!(page, "<dt>{label}</dt><dd id=\"{id}\">{value}</dd>");
    }
    page.push_str("</dl>");
}

fn counts(page: &mut String, report: &Report) {
    let r = &report.rollout;
    page.push_str("<h2>Outcomes (latest run of each job)</h2><div class=\"counts\">");
    for (outcome, count) in [
        ("succeeded", r.succeeded),
        ("failed", r.failed),
        ("rejected", r.rejected),
        ("cancelled", r.cancelled),
    ] {
        let _ = write!(
            page,
            "<div class=\"count\" style=\"border-top:4px solid {c}\"><b id=\"count-{outcome}\">{count}</b><span>{outcome}</span></div>",
            c = colour(outcome)
        );
    }
    let _ = write!(
        page,
        "<div class=\"count\"><b id=\"count-runs\">{}</b><span>runs recorded</span></div></div>",
        report.runs
    );
}

fn legend(page: &mut String) {
    page.push_str("<p class=\"legend\">");
    for outcome in &OUTCOMES[..4] {
        let _ = write!(
            page,
            "<span><i style=\"background:{}\"></i>{outcome}</span>",
            colour(outcome)
        );
    }
    page.push_str("</p>");
}

/// Stacked bars, one per minute, outcomes in [`OUTCOMES`] order from the bottom.
fn timeline_svg(minutes: &[Bucket]) -> String {
    let (width, height, left, bottom) = (1040.0, 220.0, 40.0, 30.0);
    let most = minutes.iter().map(Bucket::total).max().unwrap_or(0).max(1) as f64;
    let plot = height - bottom - 24.0;
    let slot = (width - left) / minutes.len().max(1) as f64;
    let bar = (slot * 0.7).min(60.0);
    let mut svg = format!(
        "<svg id=\"timeline\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"completions per minute\">\
         <line x1=\"{left}\" y1=\"{base}\" x2=\"{width}\" y2=\"{base}\" stroke=\"#d0d7de\"/>\
         <text x=\"{tx}\" y=\"{top}\" text-anchor=\"end\">{most}</text><text x=\"{tx}\" y=\"{base}\" text-anchor=\"end\">0</text>",
        base = height - bottom,
        top = 24.0 + 4.0,
        tx = left - 6.0,
    );
    let label_every = (minutes.len() / 12).max(1);
    for (i, minute) in minutes.iter().enumerate() {
        let x = left + slot * i as f64 + (slot - bar) / 2.0;
        let mut y = height - bottom;
        for outcome in OUTCOMES {
            let n = minute.by_outcome.get(*outcome).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let h = plot * n as f64 / most;
            y -= h;
            let _ = write!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{} {outcome}: {n}</title></rect>",
                colour(outcome),
                escape(&minute.key)
            );
        }
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" data-total=\"{}\">{}</text>",
            x + bar / 2.0,
            y - 4.0,
            minute.total(),
            minute.total()
        );
        if i % label_every == 0 {
            let label: String = minute.key.chars().skip(11).collect();
            let _ = write!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x + bar / 2.0,
                height - bottom + 16.0,
                escape(&label)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// One horizontal stacked bar per region.
fn regions_svg(regions: &[Bucket]) -> String {
    let (width, left, row) = (1040.0, 130.0, 26.0);
    let height = row * regions.len().max(1) as f64 + 8.0;
    let most = regions.iter().map(Bucket::total).max().unwrap_or(0).max(1) as f64;
    let span = width - left - 60.0;
    let mut svg = format!(
        "<svg id=\"regions\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"jobs per region\">"
    );
    for (i, region) in regions.iter().enumerate() {
        let y = 4.0 + row * i as f64;
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left - 8.0,
            y + 15.0,
            escape(&region.key)
        );
        let mut x = left;
        for outcome in OUTCOMES {
            let n = region.by_outcome.get(*outcome).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let w = span * n as f64 / most;
            let _ = write!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {outcome}: {n}</title></rect>",
                row - 8.0,
                colour(outcome),
                escape(&region.key)
            );
            x += w;
        }
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            x + 6.0,
            y + 15.0,
            region.total()
        );
    }
    svg.push_str("</svg>");
    svg
}

fn failures(page: &mut String, failures: &[Failure]) {
    let _ = write!(
        page,
        "<h2>Failures and cancellations (<span id=\"failure-count\">{}</span> runs)</h2>",
        failures.len()
    );
    if failures.is_empty() {
        page.push_str("<p class=\"muted\">None.</p>");
        return;
    }
    page.push_str(
        "<table id=\"failures\"><colgroup><col style=\"width:19%\"><col style=\"width:5%\">\
         <col style=\"width:7%\"><col style=\"width:15%\"><col style=\"width:9%\">\
         <col style=\"width:9%\"><col style=\"width:16%\"><col style=\"width:11%\">\
         <col style=\"width:9%\"></colgroup><tr><th>job</th><th>rerun</th><th>outcome</th><th>instance</th>\
         <th>region</th><th>code</th><th>message</th><th>request id</th><th>finished</th></tr>",
    );
    for f in failures {
        let _ = write!(
            page,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td>\
             <td><code>{}</code></td><td class=\"msg\">{}</td><td><code>{}</code></td><td>{}</td></tr>",
            escape(&f.job_id),
            f.rerun,
            escape(&f.outcome),
            opt(&f.instance_id),
            opt(&f.region),
            opt(&f.error_code),
            opt(&f.error_msg),
            opt(&f.request_id),
            escape(&f.finished_at),
        );
    }
    page.push_str("</table>");
}

fn reruns(page: &mut String, reruns: &[Rerun]) {
    let _ = write!(
        page,
        "<h2>Reruns (<span id=\"rerun-count\">{}</span> jobs ran more than once)</h2>",
        reruns.len()
    );
    if reruns.is_empty() {
        page.push_str("<p class=\"muted\">None.</p>");
        return;
    }
    page.push_str("<ul id=\"reruns\">");
    for rerun in reruns {
        let runs: Vec<String> = rerun
            .runs
            .iter()
            .map(|r| {
                format!(
                    "run {}: <b style=\"color:{}\">{}</b>",
                    r.rerun,
                    colour(&r.outcome),
                    escape(&r.outcome)
                )
            })
            .collect();
        let _ = write!(
            page,
            "<li><code>{}</code> — {}</li>",
            escape(&rerun.job_id),
            runs.join(", ")
        );
    }
    page.push_str("</ul>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }
}
