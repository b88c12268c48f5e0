//! Who may work on what, inside one worker.
//!
//! - [`JobLocks`]: one delivery of a job key at a time. After a reconnect the broker may
//!   redeliver a job whose first delivery is still being worked on; the second waits and then
//!   finds the record.
//! - [`InstanceTurns`]: one job per instance at a time, in delivery order. The consuming loop
//!   takes a ticket for each delivery as it arrives (in order, before the job's task is spawned);
//!   a job works only when every earlier ticket of its instance is done. A ticket dropped without
//!   its turn (a task aborted or panicking) counts as done, so nothing waits forever.
//!
//! Both maps hold an entry only while someone uses it: they never grow with the keys seen.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// One job at a time per job key.
#[derive(Default)]
pub struct JobLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl JobLocks {
    pub(super) async fn lock(&self, key: &str) -> JobGuard<'_> {
        let lock = {
            let mut locks = self.0.lock().expect("job locks");
            locks.entry(key.to_owned()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        JobGuard {
            locks: self,
            key: key.to_owned(),
            lock,
            _guard: guard,
        }
    }
}

pub(super) struct JobGuard<'a> {
    locks: &'a JobLocks,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        let mut locks = self.locks.0.lock().expect("job locks");
        // Ours, the map's and the guard's: nobody else waits for this job.
        if Arc::strong_count(&self.lock) <= 3 {
            locks.remove(&self.key);
        }
    }
}

/// Tickets per instance, served in the order they were taken.
#[derive(Default)]
pub struct InstanceTurns {
    queues: Arc<Mutex<HashMap<String, Queue>>>,
}

#[derive(Default)]
struct Queue {
    next: u64,
    serving: u64,
    /// Tickets done out of turn (dropped before being served).
    done: BTreeSet<u64>,
    /// A ticket whose job went back to the queue: every later ticket follows it back, in
    /// order, until the line is empty.
    handed_back: Option<u64>,
    notify: Arc<Notify>,
}

/// What a ticket holder does when its turn comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnReady {
    /// Work on the job.
    Go,
    /// An earlier job of this instance was handed back to the queue: hand this one back too,
    /// so it stays behind that one.
    FollowHandBack,
}

/// A place in an instance's line; dropping it ends the turn (or gives up the place).
pub struct Turn {
    queues: Arc<Mutex<HashMap<String, Queue>>>,
    instance: String,
    number: u64,
}

impl InstanceTurns {
    /// Takes the next ticket for `instance`; call in delivery order.
    pub fn take(&self, instance: &str) -> Turn {
        let mut queues = self.queues.lock().expect("instance turns");
        let queue = queues.entry(instance.to_owned()).or_default();
        let number = queue.next;
        queue.next += 1;
        Turn {
            queues: self.queues.clone(),
            instance: instance.to_owned(),
            number,
        }
    }

    /// Instances with a ticket outstanding.
    pub fn len(&self) -> usize {
        self.queues.lock().expect("instance turns").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Turn {
    /// Waits until every earlier ticket of this instance is done.
    pub async fn ready(&self) -> TurnReady {
        loop {
            let notify = {
                let queues = self.queues.lock().expect("instance turns");
                let queue = &queues[&self.instance];
                if queue.serving == self.number {
                    return self.what_now(queue);
                }
                queue.notify.clone()
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let queues = self.queues.lock().expect("instance turns");
                let queue = &queues[&self.instance];
                if queue.serving == self.number {
                    return self.what_now(queue);
                }
            }
            notified.await;
        }
    }

    fn what_now(&self, queue: &Queue) -> TurnReady {
        match queue.handed_back {
            Some(first) if first < self.number => TurnReady::FollowHandBack,
            _ => TurnReady::Go,
        }
    }

    /// This ticket's job goes back to the queue: every later ticket of the instance follows.
    pub fn hand_back(&self) {
        let mut queues = self.queues.lock().expect("instance turns");
        if let Some(queue) = queues.get_mut(&self.instance) {
            queue.handed_back = Some(
                queue
                    .handed_back
                    .map_or(self.number, |n| n.min(self.number)),
            );
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut queues = self.queues.lock().expect("instance turns");
        let Some(queue) = queues.get_mut(&self.instance) else {
            return;
        };
        queue.done.insert(self.number);
        while queue.done.remove(&queue.serving) {
            queue.serving += 1;
        }
        queue.notify.notify_waiters();
        if queue.serving == queue.next {
            queues.remove(&self.instance);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn turns_run_in_ticket_order_one_at_a_time() {
        let turns = InstanceTurns::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let tickets: Vec<Turn> = (0..5).map(|_| turns.take("i-1")).collect();
        let mut tasks = Vec::new();
        // Spawned in reverse: the order must come from the tickets, not from scheduling.
        for (n, turn) in tickets.into_iter().enumerate().rev() {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                assert_eq!(turn.ready().await, TurnReady::Go);
                order.lock().unwrap().push(n);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(turn);
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert!(turns.is_empty(), "a finished line leaves no entry");
    }

    #[tokio::test]
    async fn a_ticket_given_up_out_of_turn_lets_the_next_one_through() {
        let turns = InstanceTurns::default();
        let first = turns.take("i-1");
        let second = turns.take("i-1");
        let third = turns.take("i-1");
        drop(second);
        let other = turns.take("i-2");
        tokio::time::timeout(Duration::from_secs(1), other.ready())
            .await
            .expect("other instances do not wait");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), third.ready())
            .await
            .expect("the third runs once the first is done");
        drop(third);
        drop(other);
        assert!(turns.is_empty());
    }

    #[tokio::test]
    async fn many_instances_leave_nothing_behind() {
        let turns = InstanceTurns::default();
        for n in 0..100_000 {
            let turn = turns.take(&format!("i-{n}"));
            assert_eq!(turn.ready().await, TurnReady::Go);
        }
        assert!(turns.is_empty());
    }

    #[tokio::test]
    async fn after_a_hand_back_the_rest_of_the_line_follows_until_it_is_empty() {
        let turns = InstanceTurns::default();
        let first = turns.take("i-1");
        let second = turns.take("i-1");
        let third = turns.take("i-1");
        assert_eq!(first.ready().await, TurnReady::Go);
        first.hand_back();
        drop(first);
        assert_eq!(second.ready().await, TurnReady::FollowHandBack);
        second.hand_back();
        drop(second);
        assert_eq!(third.ready().await, TurnReady::FollowHandBack);
        drop(third);
        assert!(turns.is_empty());
        let later = turns.take("i-1");
        assert_eq!(
            later.ready().await,
            TurnReady::Go,
            "an empty line forgets the hand-back"
        );
    }
}
