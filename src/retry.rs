//! Which API failures are worth another attempt, and how long to wait before it.
//!
//! Pure functions over status codes and error codes (the reference's retry table), plus the
//! backoff schedule: exponential, capped, with full jitter. The pipeline owns the loop.

use std::time::Duration;

use rand::Rng;

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transient: try again after a backoff.
    Retry,
    /// Throttled (429): pause this region and project, then try again.
    Throttled,
    /// Permanent: the job ends `failed` now.
    Fatal,
}

/// 409 codes meaning "instance busy with another operation" (Huawei's own Terraform provider
/// retries exactly these).
const BUSY_CODES: &[&str] = &[
    "DBS.200019",
    "DBS.201014",
    "DBS.201015",
    "DBS.200047",
    "DBS.05000084",
    "DBS.212033",
];

/// Classifies an HTTP answer by status and `error_code`.
pub fn classify(status: u16, error_code: Option<&str>) -> Verdict {
    match status {
        429 => Verdict::Throttled,
        409 if error_code.is_some_and(|code| BUSY_CODES.contains(&code)) => Verdict::Retry,
        500..=599 => Verdict::Retry,
        _ => Verdict::Fatal,
    }
}

/// Exponential backoff with full jitter and a cap.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The ceiling of the wait before retry number `retry` (0-based): `min(cap, base * 2^retry)`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A wait drawn uniformly from `[0, ceiling(retry)]` ("full jitter").
    pub fn delay(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(retry);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_reference_table() {
        assert_eq!(classify(500, Some("DBS.05000000")), Verdict::Retry);
        assert_eq!(classify(503, None), Verdict::Retry);
        assert_eq!(classify(429, Some("APIGW.0308")), Verdict::Throttled);
        assert_eq!(classify(409, Some("DBS.200019")), Verdict::Retry);
        assert_eq!(classify(409, Some("DBS.999999")), Verdict::Fatal);
        for status in [400, 401, 403, 404] {
            assert_eq!(
                classify(status, Some("DBS.200001")),
                Verdict::Fatal,
                "{status}"
            );
        }
    }

    #[test]
    fn ceiling_doubles_then_caps_and_never_overflows() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        };
        assert_eq!(backoff.ceiling(0), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(3), Duration::from_millis(800));
        assert_eq!(backoff.ceiling(6), Duration::from_secs(5));
        assert_eq!(backoff.ceiling(1000), Duration::from_secs(5));
    }

    #[test]
    fn jittered_delays_stay_within_the_ceiling() {
        let backoff = Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(300),
        };
        let mut rng = rand::rng();
        for retry in 0..40 {
            assert!(backoff.delay(retry, &mut rng) <= backoff.ceiling(retry));
        }
    }
}
