//! Rate limits on API calls: one global budget, one per (region, project), and a pause for a
//! region and project after the API answers 429.
//!
//! governor has no "blocked until", so the 429 pause is a map of instants checked before the
//! limiters; a paused key waits without spending global tokens, and other keys go on.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::RateLimitSettings;

/// Calls are limited per region and project: the unit the API gateway throttles.
pub type LimitKey = (String, String);

pub struct Limits {
    global: DefaultDirectRateLimiter,
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
        while let Some(until) = self.paused(key) {
            tokio::time::sleep_until(until).await;
        }
        self.per_key.until_key_ready(key).await;
        self.global.until_ready().await;
    }

    /// Pauses calls for `key` after a 429: `retry_after` when the API sent one, else the default.
    pub fn throttled(&self, key: &LimitKey, retry_after: Option<Duration>) {
        let until = Instant::now() + retry_after.unwrap_or(self.default_pause);
        let mut paused = self.paused_until.lock().expect("limits lock");
        let entry = paused.entry(key.clone()).or_insert(until);
        *entry = (*entry).max(until);
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
}
