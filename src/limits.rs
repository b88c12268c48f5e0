//! Rate limits on API calls: one global budget, one per (region, project), and a pause for a
//! region and project after the API answers 429.
//!
//! governor has no "blocked until", so the 429 pause is a map of instants checked before the
//! limiters; a paused key waits without spending global tokens, and other keys go on.
//!
//! Both per-key maps grow with the projects seen; [`Limits::prune`] (run every minute by the
//! worker) drops the keys whose bucket is full again and the pauses that are over.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::RateLimitSettings;

/// Longest pause after a 429, whatever `Retry-After` says: a huge or broken value cannot hold a
/// project for hours.
pub const MAX_PAUSE: Duration = Duration::from_secs(300);

/// Calls are limited per region and project: the unit the API gateway throttles.
pub type LimitKey = (String, String);

pub struct Limits {
    global: DefaultDirectRateLimiter,
    /// One limiter per rollout with a `max_per_second`, made when first needed.
    per_rollout: Mutex<HashMap<String, (u32, Arc<DefaultDirectRateLimiter>)>>,
    per_key: DefaultKeyedRateLimiter<LimitKey>,
    paused_until: Mutex<HashMap<LimitKey, Instant>>,
    default_pause: Duration,
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

impl Limits {
    pub fn new(settings: &RateLimitSettings) -> Limits {
        Limits {
            global: RateLimiter::direct(quota(settings.per_second, settings.burst)),
            per_rollout: Mutex::new(HashMap::new()),
            per_key: RateLimiter::keyed(quota(
                settings.per_project_per_second,
                settings.per_project_burst,
            )),
            paused_until: Mutex::new(HashMap::new()),
            default_pause: settings.throttle_pause,
        }
    }

    /// Waits until a call for `key` may go out.
    pub async fn acquire(&self, key: &LimitKey) {
        self.unpaused(key).await;
        self.per_key.until_key_ready(key).await;
        self.global.until_ready().await;
    }

    /// Whether `key` is paused after a 429 now.
    pub fn is_paused(&self, key: &LimitKey) -> bool {
        self.paused(key).is_some()
    }

    /// Waits until `key` is not paused after a 429 (taking no token).
    pub async fn unpaused(&self, key: &LimitKey) {
        while let Some(until) = self.paused(key) {
            tokio::time::sleep_until(until).await;
        }
    }

    /// Waits for a token of `rollout_id`'s own cap of `per_second` calls (burst 1).
    pub async fn acquire_rollout(&self, rollout_id: &str, per_second: u32) {
        let limiter = {
            let mut limiters = self.per_rollout.lock().expect("limits lock");
            let entry = limiters.entry(rollout_id.to_owned()).or_insert_with(|| {
                (
                    per_second,
                    Arc::new(RateLimiter::direct(quota(per_second, 1))),
                )
            });
            if entry.0 != per_second {
                *entry = (
                    per_second,
                    Arc::new(RateLimiter::direct(quota(per_second, 1))),
                );
            }
            entry.1.clone()
        };
        limiter.until_ready().await;
    }

    /// Pauses calls for `key` after a 429: `retry_after` when the API sent one, else the default.
    /// Returns the pause.
    pub fn throttled(&self, key: &LimitKey, retry_after: Option<Duration>) -> Duration {
        let now = Instant::now();
        let pause = retry_after.unwrap_or(self.default_pause).min(MAX_PAUSE);
        let until = now.checked_add(pause).unwrap_or(now);
        let mut paused = self.paused_until.lock().expect("limits lock");
        let entry = paused.entry(key.clone()).or_insert(until);
        *entry = (*entry).max(until);
        pause
    }

    /// Forgets keys that hold no state worth keeping: full buckets, pauses that are over.
    pub fn prune(&self) {
        self.per_key.retain_recent();
        self.per_key.shrink_to_fit();
        let now = Instant::now();
        let mut paused = self.paused_until.lock().expect("limits lock");
        paused.retain(|_, until| *until > now);
        paused.shrink_to_fit();
        drop(paused);
        // A rollout limiter nobody waits on holds nothing a new one would not.
        let mut limiters = self.per_rollout.lock().expect("limits lock");
        limiters.retain(|_, (_, limiter)| Arc::strong_count(limiter) > 1);
    }

    /// Keys held: (per-key limiters, pauses).
    pub fn len(&self) -> (usize, usize) {
        let paused = self.paused_until.lock().expect("limits lock").len();
        (self.per_key.len(), paused)
    }

    fn paused(&self, key: &LimitKey) -> Option<Instant> {
        let mut paused = self.paused_until.lock().expect("limits lock");
        match paused.get(key) {
            Some(until) if *until > Instant::now() => Some(*until),
            Some(_) => {
                paused.remove(key);
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(pause: Duration) -> Limits {
        Limits::new(&RateLimitSettings {
            per_second: 1000,
            burst: 100,
            per_project_per_second: 1000,
            per_project_burst: 100,
            throttle_pause: pause,
        })
    }

    fn key(project: &str) -> LimitKey {
        ("cn-north-4".into(), project.into())
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_key_waits_while_others_go_on() {
        let limits = limits(Duration::from_secs(3));
        limits.throttled(&key("a"), None);
        let start = Instant::now();
        limits.acquire(&key("b")).await;
        assert!(start.elapsed() < Duration::from_millis(10));
        limits.acquire(&key("a")).await;
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_overrides_the_default_pause_and_pauses_only_extend() {
        let limits = limits(Duration::from_secs(3));
        limits.throttled(&key("a"), Some(Duration::from_secs(7)));
        limits.throttled(&key("a"), None);
        let start = Instant::now();
        limits.acquire(&key("a")).await;
        assert!(start.elapsed() >= Duration::from_secs(7));
    }

    #[tokio::test]
    async fn pruning_forgets_idle_projects() {
        let limits = Limits::new(&RateLimitSettings {
            per_second: 100_000,
            burst: 100_000,
            per_project_per_second: 1000,
            per_project_burst: 1,
            throttle_pause: Duration::from_millis(1),
        });
        for n in 0..100_000 {
            let key = ("cn-north-4".to_owned(), format!("{n:032x}"));
            limits.acquire(&key).await;
            if n % 10 == 0 {
                limits.throttled(&key, None);
            }
        }
        assert_eq!(limits.len(), (100_000, 10_000));
        // Each bucket refills in 1 ms and each pause lasts 1 ms.
        std::thread::sleep(Duration::from_millis(20));
        limits.prune();
        assert_eq!(limits.len(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_retry_after_does_not_overflow() {
        let limits = limits(Duration::from_secs(3));
        limits.throttled(&key("a"), Some(Duration::MAX));
        let until = limits.paused(&key("a")).expect("paused");
        assert!(until <= Instant::now() + MAX_PAUSE);
        assert!(limits.paused(&key("b")).is_none());
    }
}
