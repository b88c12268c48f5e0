//! This worker's leases in the store: which job keys it holds, their renewal, and whether a
//! lease can still be trusted before an API call.
//!
//! A job claims its key (and with it its instance) in the store before its first API call
//! ([`crate::audit::AuditStore::claim`]); the final record or a park drops the lease in its own
//! transaction. While a job runs, [`Leases::renew`] (every third of `store.lease`) extends every
//! lease this process holds. A call is made only while the lease is sure to outlive it: the time
//! since the lease was last confirmed (counted from before the confirming write was sent) plus
//! `api.request_timeout` must stay under `store.lease`, because another worker may take over a
//! lease that expired.
//!
//! Claims and renewals are queued to the store's writer under this module's lock, so a renewal
//! that drops a released key can never be applied after a newer claim of the same key.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::audit::{AuditError, AuditStore, ClaimRequest, Claimed};

type Key = (String, u32);

/// The leases one worker process holds.
pub struct Leases {
    /// This run of this worker, as the store knows it: the worker id and a random token, so a
    /// restarted worker with the same id does not mistake its dead predecessor's leases for its
    /// own.
    pub owner: String,
    pub lease: Duration,
    /// The longest one API call may take (`api.request_timeout`).
    call_time: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Held keys and when each was last confirmed (claimed or renewed).
    held: HashMap<Key, Instant>,
    /// Keys whose job ended without a final record or a park: drop them at the next renewal.
    released: HashSet<Key>,
    /// Keys the store no longer has a lease of ours for.
    lost: HashSet<Key>,
    /// Keys with an API call under way, and when it started.
    calls: HashMap<Key, Instant>,
}

/// A held lease; dropping it hands the key to the next renewal to release, unless
/// [`LeaseGuard::settle`] said the store dropped it already.
pub struct LeaseGuard {
    leases: Arc<Leases>,
    key: Key,
    settled: bool,
}

impl LeaseGuard {
    /// Forgets the lease that the job's final record or park dropped in the store: nothing is
    /// left for a renewal to release.
    pub fn settle(mut self) {
        self.settled = true;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let mut state = self.leases.state.lock().expect("leases");
        state.held.remove(&self.key);
        state.lost.remove(&self.key);
        // A delivery dropped in the middle of a call (aborted at the end of a grace period)
        // keeps its lease until it expires: the call may still land.
        let calling = state
            .calls
            .remove(&self.key)
            .is_some_and(|started| started.elapsed() < self.leases.call_time);
        if !calling && !self.settled {
            state.released.insert(self.key.clone());
        }
    }
}

impl Leases {
    pub fn new(worker_id: &str, lease: Duration, call_time: Duration) -> Leases {
        let token = uuid::Uuid::new_v4().simple().to_string();
        Leases {
            owner: format!("{worker_id}/{}", &token[..12]),
            lease,
            call_time,
            state: Mutex::default(),
        }
    }

    /// Queues a claim of the request's key to the store. The key leaves the list of keys to
    /// release first, under the lock a renewal queues under.
    pub fn claim(
        &self,
        audit: &AuditStore,
        request: ClaimRequest,
    ) -> impl std::future::Future<Output = Result<(Claimed, Instant), AuditError>> + use<> {
        let asked = Instant::now();
        let claimed = {
            let mut state = self.state.lock().expect("leases");
            let key = (request.job_id.clone(), request.rerun);
            state.released.remove(&key);
            audit.claim(request)
        };
        async move { claimed.await.map(|claimed| (claimed, asked)) }
    }

    /// Notes a lease the store granted to a claim sent at `asked`.
    pub fn held(self: &Arc<Self>, job_id: &str, rerun: u32, asked: Instant) -> LeaseGuard {
        let key = (job_id.to_owned(), rerun);
        let mut state = self.state.lock().expect("leases");
        state.held.insert(key.clone(), asked);
        state.lost.remove(&key);
        LeaseGuard {
            leases: self.clone(),
            key,
            settled: false,
        }
    }

    /// Notes that a claim sent at `asked` renewed a lease this worker holds.
    pub fn confirmed(&self, job_id: &str, rerun: u32, asked: Instant) {
        let mut state = self.state.lock().expect("leases");
        if let Some(confirmed) = state.held.get_mut(&(job_id.to_owned(), rerun)) {
            *confirmed = (*confirmed).max(asked);
        }
    }

    /// Notes that a call of the job starts now.
    pub fn calling(&self, job_id: &str, rerun: u32) {
        let mut state = self.state.lock().expect("leases");
        state
            .calls
            .insert((job_id.to_owned(), rerun), Instant::now());
    }

    /// Notes that the job's call ended.
    pub fn called(&self, job_id: &str, rerun: u32) {
        let mut state = self.state.lock().expect("leases");
        state.calls.remove(&(job_id.to_owned(), rerun));
    }

    /// Whether the job may call the API now: its lease is confirmed recently enough that it
    /// cannot have expired in the store.
    pub fn trusted(&self, job_id: &str, rerun: u32) -> Trust {
        let state = self.state.lock().expect("leases");
        let key = (job_id.to_owned(), rerun);
        if state.lost.contains(&key) {
            return Trust::Lost;
        }
        match state.held.get(&key) {
            Some(confirmed) if confirmed.elapsed() + self.call_time < self.lease => Trust::Yes,
            Some(_) => Trust::Stale,
            None => Trust::Lost,
        }
    }

    /// Renews every held lease and drops the released ones, in one store write.
    pub async fn renew(&self, audit: &AuditStore) {
        let asked = Instant::now();
        let (active, renewed) = {
            let mut state = self.state.lock().expect("leases");
            let active = state.held.keys().cloned().collect::<Vec<_>>();
            let released = std::mem::take(&mut state.released)
                .into_iter()
                .collect::<Vec<_>>();
            if active.is_empty() && released.is_empty() {
                return;
            }
            // Queued under the lock: a later claim of a released key comes after this drop.
            let renewed = audit.renew_leases(&self.owner, active.clone(), released, self.lease);
            (active, renewed)
        };
        match renewed.await {
            Ok(lost) => {
                let mut state = self.state.lock().expect("leases");
                for key in &active {
                    if let Some(confirmed) = state.held.get_mut(key) {
                        *confirmed = (*confirmed).max(asked);
                    }
                }
                for key in lost {
                    if state.held.contains_key(&key) {
                        tracing::warn!(job_id = %key.0, rerun = key.1, "the job's lease is gone from the store; it makes no further call");
                        state.lost.insert(key);
                    }
                }
            }
            // The released keys are not asked again: one may be claimed anew by now, and an
            // unreleased lease only expires.
            Err(error) => tracing::warn!(%error, "renewing leases failed; retrying"),
        }
    }
}

impl super::Pipeline {
    /// Renews this worker's leases every third of their life, until the worker stops.
    pub(crate) async fn keep_renewing_leases(&self) {
        loop {
            tokio::time::sleep(self.leases.lease / 3).await;
            self.leases.renew(&self.audit).await;
        }
    }
}

/// Whether a lease may be relied on for an API call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    Yes,
    /// Not confirmed for too long (the store is slow or away): wait for a renewal.
    Stale,
    /// Gone: another worker may hold the job now.
    Lost,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_trusted_only_while_a_call_started_now_ends_before_it_expires() {
        let leases = Arc::new(Leases::new(
            "w",
            Duration::from_secs(60),
            Duration::from_secs(30),
        ));
        let guard = leases.held("J", 0, Instant::now());
        assert_eq!(leases.trusted("J", 0), Trust::Yes);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(leases.trusted("J", 0), Trust::Yes);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            leases.trusted("J", 0),
            Trust::Stale,
            "a call started now could outlive the lease"
        );
        leases.confirmed("J", 0, Instant::now());
        assert_eq!(leases.trusted("J", 0), Trust::Yes);
        drop(guard);
        assert_eq!(leases.trusted("J", 0), Trust::Lost);
        assert_eq!(
            leases.state.lock().unwrap().released,
            HashSet::from([("J".to_owned(), 0)])
        );
    }

    #[test]
    fn a_settled_lease_is_not_released_again() {
        let leases = Arc::new(Leases::new(
            "w",
            Duration::from_secs(60),
            Duration::from_secs(30),
        ));
        leases.held("J", 0, Instant::now()).settle();
        let state = leases.state.lock().unwrap();
        assert!(state.held.is_empty());
        assert!(
            state.released.is_empty(),
            "the store dropped it with the record"
        );
    }

    #[test]
    fn two_runs_of_one_worker_id_are_different_owners() {
        let new = || Leases::new("w", Duration::from_secs(60), Duration::from_secs(30));
        assert_ne!(new().owner, new().owner);
    }
}
