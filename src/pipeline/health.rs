//! The health gate: while the audit store refuses writes or the broker refuses result events,
//! jobs hold before calling the API, so a fault stops new toggles instead of piling up
//! unrecorded ones. Each dependency is tracked on its own, so only its own recovery reopens the
//! gate. [`Pipeline::infra`] retries one infrastructure operation until it heals.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Pipeline;
use crate::retry::Backoff;

/// An infrastructure operation a job may have to wait on; each names what its failure says
/// about the worker's dependencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Infra {
    AuditLookup,
    InFlightMarker,
    RateTokens,
    AuditCommit,
    Parking,
    ResultPublish,
    JobRequeue,
}

impl Infra {
    fn name(self) -> &'static str {
        match self {
            Infra::AuditLookup => "audit lookup",
            Infra::InFlightMarker => "in-flight marker",
            Infra::RateTokens => "taking rate-limit tokens from the store",
            Infra::AuditCommit => "audit commit",
            Infra::Parking => "parking a job",
            Infra::ResultPublish => "result publish",
            Infra::JobRequeue => "publishing a job back to the queue",
        }
    }

    /// The dependency whose state this operation's result reports. Lookups report none: reads
    /// can succeed while writes fail (a locked file), and must not reopen the gate.
    fn dependency(self) -> Option<Dependency> {
        match self {
            Infra::AuditLookup => None,
            Infra::InFlightMarker | Infra::RateTokens | Infra::AuditCommit | Infra::Parking => {
                Some(Dependency::AuditWrites)
            }
            Infra::ResultPublish | Infra::JobRequeue => Some(Dependency::EventPublishing),
        }
    }
}

/// What can hold every job: the audit log refusing writes, the broker refusing publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    AuditWrites = 0b01,
    EventPublishing = 0b10,
}

/// Infrastructure health, one bit per failing [`Dependency`].
#[derive(Clone)]
pub struct Health {
    failing: watch::Sender<u8>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            failing: watch::Sender::new(0),
        }
    }
}

impl Health {
    pub fn set(&self, dependency: Dependency, healthy: bool) {
        let bit = dependency as u8;
        self.failing.send_if_modified(|failing| {
            let before = *failing;
            if healthy {
                *failing &= !bit;
            } else {
                *failing |= bit;
            }
            *failing != before
        });
    }

    pub fn is_healthy(&self) -> bool {
        *self.failing.borrow() == 0
    }

    /// What fails now, in words (for `/readyz`).
    pub fn failing(&self) -> Vec<&'static str> {
        let failing = *self.failing.borrow();
        [
            (Dependency::AuditWrites, "the audit store refuses writes"),
            (
                Dependency::EventPublishing,
                "the broker refuses result events",
            ),
        ]
        .into_iter()
        .filter(|(dependency, _)| failing & *dependency as u8 != 0)
        .map(|(_, words)| words)
        .collect()
    }

    pub(super) async fn wait_healthy(&self) {
        let mut receiver = self.failing.subscribe();
        let _ = receiver.wait_for(|failing| *failing == 0).await;
    }
}

impl Pipeline {
    /// While a dependency fails, tests it every second and reopens the gate when it works:
    /// the jobs that saw it fail may have been aborted or handed back, so nobody else would.
    pub async fn keep_health(&self) {
        let stopping = self.stopping.clone();
        loop {
            tokio::select! {
                () = stopping.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let failing = *self.health.failing.borrow();
            if failing & Dependency::AuditWrites as u8 != 0 && self.audit.ping().await.is_ok() {
                tracing::info!("audit store takes writes again");
                self.health.set(Dependency::AuditWrites, true);
            }
            if failing & Dependency::EventPublishing as u8 != 0 && self.events.probe().await.is_ok()
            {
                tracing::info!("result events can be published again");
                self.health.set(Dependency::EventPublishing, true);
            }
        }
    }

    /// Retries an infrastructure operation until it succeeds; `None` only when shutting down.
    pub(super) async fn infra<T, E, F, Fut>(
        &self,
        what: Infra,
        shutdown: &CancellationToken,
        mut op: F,
    ) -> Option<T>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        };
        for failures in 0u32.. {
            match op().await {
                Ok(value) => {
                    if let Some(dependency) = what.dependency() {
                        self.health.set(dependency, true);
                    }
                    return Some(value);
                }
                Err(error) => {
                    if let Some(dependency) = what.dependency() {
                        self.health.set(dependency, false);
                    }
                    tracing::error!(%error, failures, "{} failed; holding the job until it heals", what.name());
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(backoff.ceiling(failures)) => {}
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::{Dependency, Health};

    #[test]
    fn only_the_failing_dependency_reopens_the_gate() {
        let health = Health::default();
        health.set(Dependency::EventPublishing, false);
        health.set(Dependency::AuditWrites, true);
        assert!(
            !health.is_healthy(),
            "audit writes working says nothing of publishing"
        );
        health.set(Dependency::AuditWrites, false);
        health.set(Dependency::EventPublishing, true);
        assert!(!health.is_healthy());
        health.set(Dependency::AuditWrites, true);
        assert!(health.is_healthy());
    }
}
