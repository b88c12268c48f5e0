//! Token buckets in the store: rate limits that hold for every worker on it. A take removes
//! one token from each bucket a call needs, all or none, in one write transaction; writes run
//! one at a time on the store, so no two workers can spend one token.
//!
//! A slow store makes calls slower, never faster: a token is spent when the store grants it, and
//! a worker that cannot reach the store makes no call.

use std::time::Duration;

use super::AuditError;
use super::db::{Db, args};

/// A bucket a call needs a token of.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// `global`, `project:<region>/<project_id>` or `rollout:<rollout_id>`.
    pub name: String,
    pub per_second: f64,
    pub burst: f64,
}

/// Takes one token of every bucket; when one is short, takes none and returns how long until
/// it has one.
pub(super) fn take(tx: &mut dyn Db, buckets: &[Bucket]) -> Result<Option<Duration>, AuditError> {
    let now = tx.now_ms()?;
    let mut levels = Vec::with_capacity(buckets.len());
    let mut short_ms: f64 = 0.0;
    for bucket in buckets {
        let per_ms = bucket.per_second.max(f64::MIN_POSITIVE) / 1000.0;
        let level = match tx.query_opt(
            "SELECT tokens, updated_ms FROM rate_buckets WHERE name = ?1",
            args![bucket.name],
        )? {
            Some(row) => {
                let (tokens, updated): (f64, i64) = (row.get(0)?, row.get(1)?);
                (tokens + (now - updated).max(0) as f64 * per_ms).min(bucket.burst)
            }
            None => bucket.burst,
        };
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
    for (bucket, level) in buckets.iter().zip(levels) {
        tx.execute(
            "INSERT INTO rate_buckets (name, tokens, updated_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET tokens = excluded.tokens, updated_ms = excluded.updated_ms",
            args![bucket.name, level - 1.0, now],
        )?;
    }
    Ok(None)
}
