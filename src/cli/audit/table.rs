//! Aligned text tables for a terminal: each column as wide as its widest value up to a cap, so
//! a row fits 100 columns. A longer value is cut with `…`; ids lose their start (their end is
//! what tells instances apart), other text its end.

use crate::audit::query::{AttemptRow, ToggleRow};

/// Where a value too long for its column is cut.
#[derive(Clone, Copy)]
enum Cut {
    Start,
    End,
}

struct Column {
    header: &'static str,
    cap: usize,
    cut: Cut,
    right: bool,
}

const fn column(header: &'static str, cap: usize, cut: Cut, right: bool) -> Column {
    Column {
        header,
        cap,
        cut,
        right,
    }
}

/// finished, job, rerun, instance, outcome, code, attempts: at most 100 characters.
const TOGGLES: &[Column] = &[
    column("finished_at", 19, Cut::End, false),
    column("job_id", 22, Cut::Start, false),
    column("rerun", 5, Cut::End, true),
    column("instance", 14, Cut::Start, false),
    column("outcome", 9, Cut::End, false),
    column("error_code", 16, Cut::End, false),
    column("att", 3, Cut::End, true),
];

/// time, rerun, number, call, status, code, request id, latency: at most 100 characters.
const ATTEMPTS: &[Column] = &[
    column("started_at", 23, Cut::End, false),
    column("rerun", 5, Cut::End, true),
    column("#", 2, Cut::End, true),
    column("call", 8, Cut::End, false),
    column("status", 6, Cut::End, true),
    column("error_code", 14, Cut::End, false),
    column("request_id", 18, Cut::Start, false),
    column("latency_ms", 10, Cut::End, true),
];

pub fn toggles(rows: &[ToggleRow]) -> String {
    let cells = rows
        .iter()
        .map(|r| {
            vec![
                r.finished_at.replace('T', " ").chars().take(19).collect(),
                r.job_id.clone(),
                r.rerun.to_string(),
                text(&r.instance_id),
                r.outcome.clone(),
                text(&r.error_code),
                r.attempts.to_string(),
            ]
        })
        .collect();
    render(TOGGLES, cells)
}

pub fn attempts(rows: &[AttemptRow]) -> String {
    let cells = rows
        .iter()
        .map(|r| {
            vec![
                r.started_at
                    .replace('T', " ")
                    .trim_end_matches('Z')
                    .to_owned(),
                r.rerun.to_string(),
                r.number.to_string(),
                r.call.clone(),
                r.http_status.map(|s| s.to_string()).unwrap_or_default(),
                text(&r.error_code),
                text(&r.request_id),
                r.latency_ms.to_string(),
            ]
        })
        .collect();
    render(ATTEMPTS, cells)
}

fn text(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

fn render(columns: &[Column], rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([c.header.chars().count()])
                .max()
                .unwrap_or(0)
                .min(c.cap)
        })
        .collect();
    let mut out = String::new();
    let headers: Vec<String> = columns.iter().map(|c| c.header.to_owned()).collect();
    for row in std::iter::once(headers).chain(rows) {
        let cells: Vec<String> = columns
            .iter()
            .zip(&widths)
            .zip(&row)
            .map(|((column, width), value)| {
                pad(&fit(value, *width, column.cut), *width, column.right)
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `value` in at most `width` characters; control characters are shown as spaces so a stored
/// message cannot move the cursor.
fn fit(value: &str, width: usize, cut: Cut) -> String {
    let clean: Vec<char> = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() <= width {
        return clean.into_iter().collect();
    }
    let keep = width.saturating_sub(1);
    match cut {
        Cut::End => clean[..keep].iter().collect::<String>() + "…",
        Cut::Start => "…".to_owned() + &clean[clean.len() - keep..].iter().collect::<String>(),
    }
}

fn pad(value: &str, width: usize, right: bool) -> String {
    let fill = " ".repeat(width.saturating_sub(value.chars().count()));
    if right {
        fill + value
    } else {
        value.to_owned() + &fill
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The widest a table line gets.
    const WIDTH: usize = 100;

    #[test]
    fn the_widest_row_fits_100_columns() {
        for columns in [TOGGLES, ATTEMPTS] {
            let width: usize =
                columns.iter().map(|c| c.cap).sum::<usize>() + 2 * (columns.len() - 1);
            assert!(width <= WIDTH, "{width}");
        }
    }

    #[test]
    fn long_values_are_cut_with_an_ellipsis() {
        assert_eq!(fit("abcdefgh", 5, Cut::End), "abcd…");
        assert_eq!(fit("abcdefgh", 5, Cut::Start), "…efgh");
        assert_eq!(fit("a\x1b[2Jb", 10, Cut::End), "a [2Jb");
    }
}
