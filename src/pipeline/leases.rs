//! This worker's leases in the store: which job keys it holds, their renewal, and whether a
//! lease can still be trusted before an API call.
//!
//! A job claims its key (and with it its instance) in the store before its first API call
//! ([`crate::audit::AuditStore::claim`]); the final record or a park drops the lease in its own
//! transaction. While a job runs, [`Leases::renew`] (every third of `store.lease`) extends every
//! lease this process holds. A lease whose renewal has not been confirmed for two thirds of its
//! life is not trusted: its job makes no call until a renewal succeeds, because another worker may
//! take over a lease that expired.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::audit::AuditStore;

type Key = (String, u32);

/// The leases one worker process holds.
pub struct Leases {
    /// This run of this worker, as the store knows it: the worker id and a random token, so a
    /// restarted worker with the same id does not mistake its dead predecessor's leases for its
    /// own.
    pub owner: String,
    pub lease: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Held keys and when each was last confirmed (claimed or renewed).
    held: HashMap<Key, Instant>,
    /// Keys whose job ended without a final record or a park: drop them at the next renewal.
    released: Vec<Key>,
    /// Keys the store no longer has a lease of ours for.
    lost: HashSet<Key>,
}

/// A held lease; dropping it hands the key to the next renewal to release.
pub struct LeaseGuard {
    leases: Arc<Leases>,
    key: Key,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let mut state = self.leases.state.lock().expect("leases");
        state.held.remove(&self.key);
        state.lost.remove(&self.key);
        state.released.push(self.key.clone());
    }
}

impl Leases {
    pub fn new(worker_id: &str, lease: Duration) -> Leases {
        let token = uuid::Uuid::new_v4().simple().to_string();
        Leases {
            owner: format!("{worker_id}/{}", &token[..12]),
            lease,
            state: Mutex::default(),
        }
    }

    /// Notes a lease the store just granted (or confirmed).
    pub fn held(self: &Arc<Self>, job_id: &str, rerun: u32) -> LeaseGuard {
        let key = (job_id.to_owned(), rerun);
        let mut state = self.state.lock().expect("leases");
        state.held.insert(key.clone(), Instant::now());
        state.lost.remove(&key);
        state.released.retain(|released| *released != key);
        LeaseGuard {
            leases: self.clone(),
            key,
        }
    }

    /// Notes that the store just renewed a lease this worker holds.
    pub fn confirmed(&self, job_id: &str, rerun: u32) {
        let mut state = self.state.lock().expect("leases");
        if let Some(confirmed) = state.held.get_mut(&(job_id.to_owned(), rerun)) {
            *confirmed = Instant::now();
        }
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
            Some(confirmed) if confirmed.elapsed() < self.lease * 2 / 3 => Trust::Yes,
            Some(_) => Trust::Stale,
            None => Trust::Lost,
        }
    }

    /// Renews every held lease and drops the released ones, in one store write.
    pub async fn renew(&self, audit: &AuditStore) {
        let (active, released) = {
            let mut state = self.state.lock().expect("leases");
            (
                state.held.keys().cloned().collect::<Vec<_>>(),
                std::mem::take(&mut state.released),
            )
        };
        if active.is_empty() && released.is_empty() {
            return;
        }
        let asked = Instant::now();
        match audit
            .renew_leases(&self.owner, active.clone(), released.clone(), self.lease)
            .await
        {
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
            Err(error) => {
                tracing::warn!(%error, "renewing leases failed; retrying");
                self.state.lock().expect("leases").released.extend(released);
            }
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
    async fn a_lease_is_trusted_for_two_thirds_of_its_life_unless_renewed() {
        let leases = Arc::new(Leases::new("w", Duration::from_secs(15)));
        let guard = leases.held("J", 0);
        assert_eq!(leases.trusted("J", 0), Trust::Yes);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(leases.trusted("J", 0), Trust::Stale);
        drop(guard);
        assert_eq!(leases.trusted("J", 0), Trust::Lost);
        assert_eq!(
            leases.state.lock().unwrap().released,
            vec![("J".to_owned(), 0)]
        );
    }

    #[test]
    fn two_runs_of_one_worker_id_are_different_owners() {
        assert_ne!(
            Leases::new("w", Duration::from_secs(15)).owner,
            Leases::new("w", Duration::from_secs(15)).owner
        );
    }
}
