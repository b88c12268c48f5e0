//! Token buckets in the store: rate limits that hold for every worker on it. A take removes
//! one token from each bucket a call needs, all or none, in one write transaction; writes run
//! one at a time on the store, so no two workers can spend one token.
//!
//! A slow store makes calls slower, never faster: a token is spent when the store grants it, and
//! a worker that cannot reach the store makes no call.

use std::time::Duration;

use super::AuditError;
use super::db::{Db, Value};

/// A bucket a call needs a token of.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// `global`, `project:<region>/<project_id>` or `rollout:<rollout_id>`.
    pub name: String,
    pub per_second: f64,
    pub burst: f64,
}

/// Takes one token of every bucket; when one is short, takes none and returns how long until
/// it has one. One statement reads every bucket and one writes them (round trips cost on
/// PostgreSQL, where every call of the fleet makes a take).
pub(super) fn take(tx: &mut dyn Db, buckets: &[Bucket]) -> Result<Option<Duration>, AuditError> {
    if buckets.is_empty() {
        return Ok(None);
    }
    // One upsert of every bucket: PostgreSQL refuses to change one row twice in a statement.
    debug_assert!(
        buckets
            .iter()
            .enumerate()
            .all(|(n, bucket)| buckets[..n].iter().all(|b| b.name != bucket.name)),
        "a take names each bucket once"
    );
    let now = tx.now_ms()?;
    let names: Vec<Value> = buckets
        .iter()
        .map(|bucket| Value::Text(bucket.name.clone()))
        .collect();
    let placeholders = (1..=buckets.len())
        .map(|n| format!("?{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let stored = tx.query(
        &format!(
            "SELECT name, tokens, updated_ms FROM rate_buckets WHERE name IN ({placeholders})"
        ),
        &names,
    )?;
    let mut levels = Vec::with_capacity(buckets.len());
    let mut short_ms: f64 = 0.0;
    for bucket in buckets {
        let per_ms = bucket.per_second.max(f64::MIN_POSITIVE) / 1000.0;
        let mut level = bucket.burst;
        for row in &stored {
            if row.get::<String>(0)? == bucket.name {
                let (tokens, updated): (f64, i64) = (row.get(1)?, row.get(2)?);
                level = (tokens + (now - updated).max(0) as f64 * per_ms).min(bucket.burst);
            }
        }
        if level < 1.0 {
            short_ms = short_ms.max((1.0 - level) / per_ms);
        }
        levels.push(level);
    }
    if short_ms > 0.0 {
        return Ok(Some(Duration::from_micros(
            (short_ms * 1000.0).ceil() as u64
        )));
    }
    let rows = (0..buckets.len())
        .map(|n| format!("(?{}, ?{}, ?{})", 3 * n + 1, 3 * n + 2, 3 * n + 3))
        .collect::<Vec<_>>()
        .join(", ");
    let mut values = Vec::with_capacity(3 * buckets.len());
    for (bucket, level) in buckets.iter().zip(levels) {
        values.extend([
            Value::Text(bucket.name.clone()),
            Value::Real(level - 1.0),
            Value::Int(now),
        ]);
    }
    tx.execute(
        &format!(
            "INSERT INTO rate_buckets (name, tokens, updated_ms) VALUES {rows}
             ON CONFLICT (name) DO UPDATE SET tokens = excluded.tokens, updated_ms = excluded.updated_ms"
        ),
        &values,
    )?;
    Ok(None)
}
