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
    let levels = levels(tx, buckets, now)?;
    let short_ms = buckets
        .iter()
        .zip(&levels)
        .filter(|(_, level)| **level < 1.0)
        .map(|(bucket, level)| (1.0 - level) / bucket.per_ms())
        .fold(0.0, f64::max);
    if short_ms > 0.0 {
        // Workers configured with other rates read another's pause at their own: never longer
        // than the longest pause a 429 may set.
        let wait = Duration::from_micros((short_ms * 1000.0).ceil() as u64);
        return Ok(Some(wait.min(crate::limits::MAX_PAUSE)));
    }
    let taken: Vec<f64> = levels.into_iter().map(|level| level - 1.0).collect();
    store(tx, buckets, &taken, now)?;
    Ok(None)
}

/// Empties `bucket` for `pause` (the API answered 429 for its project): it holds no token
/// before `pause` from now, for every worker on the store. A bucket emptier than that keeps its
/// own, longer wait.
pub(super) fn pause(tx: &mut dyn Db, bucket: &Bucket, pause: Duration) -> Result<(), AuditError> {
    let now = tx.now_ms()?;
    let level = levels(tx, std::slice::from_ref(bucket), now)?[0];
    let paused = 1.0 - pause.as_secs_f64() * 1000.0 * bucket.per_ms();
    store(tx, std::slice::from_ref(bucket), &[level.min(paused)], now)
}

impl Bucket {
    /// Tokens it gains per millisecond.
    fn per_ms(&self) -> f64 {
        self.per_second.max(f64::MIN_POSITIVE) / 1000.0
    }

    /// The time it takes to gain one token: the longest wait it gives while refilling at its
    /// rate (a longer one is a pause after a 429).
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second.max(0.001))
    }
}

/// Each bucket's tokens at `now`: what it held when last written, refilled since, up to its
/// burst (a bucket never written is full). One statement.
fn levels(tx: &mut dyn Db, buckets: &[Bucket], now: i64) -> Result<Vec<f64>, AuditError> {
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
    for bucket in buckets {
        let mut level = bucket.burst;
        for row in &stored {
            if row.get::<String>(0)? == bucket.name {
                let (tokens, updated): (f64, i64) = (row.get(1)?, row.get(2)?);
                level =
                    (tokens + (now - updated).max(0) as f64 * bucket.per_ms()).min(bucket.burst);
            }
        }
        levels.push(level);
    }
    Ok(levels)
}

/// Writes each bucket's tokens as of `now`, in one multi-row upsert.
fn store(tx: &mut dyn Db, buckets: &[Bucket], tokens: &[f64], now: i64) -> Result<(), AuditError> {
    let rows = (0..buckets.len())
        .map(|n| format!("(?{}, ?{}, ?{})", 3 * n + 1, 3 * n + 2, 3 * n + 3))
        .collect::<Vec<_>>()
        .join(", ");
    let mut values = Vec::with_capacity(3 * buckets.len());
    for (bucket, tokens) in buckets.iter().zip(tokens) {
        values.extend([
            Value::Text(bucket.name.clone()),
            Value::Real(*tokens),
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
    Ok(())
}
