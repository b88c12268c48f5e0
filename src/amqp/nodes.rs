//! The broker's nodes (`amqp.urls`, or the one `amqp.url`) and which one a connect tries first.
//!
//! A connect tries every node once, in order, starting from the node it last reached; a node
//! that fails (to connect, or under a live session) moves the start to the node after it. One
//! rotation is shared by every connection of the process to the same list of nodes, so the
//! worker's consumer, the publisher and the CLI clients follow each other to a live node instead
//! of each first retrying the lost one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

/// Where the next connect to a list of `len` nodes starts.
#[derive(Debug)]
pub struct Rotation {
    len: usize,
    next: AtomicUsize,
}

impl Rotation {
    pub fn new(len: usize) -> Rotation {
        assert!(len > 0, "a broker has at least one node");
        Rotation {
            len,
            next: AtomicUsize::new(0),
        }
    }

    /// Every node once, starting with the one to try first.
    pub fn order(&self) -> impl Iterator<Item = usize> + use<> {
        let (start, len) = (self.next.load(Ordering::Acquire), self.len);
        (0..len).map(move |offset| (start + offset) % len)
    }

    /// Node `index` answered: later connects start there too.
    pub fn reached(&self, index: usize) {
        self.next.store(index % self.len, Ordering::Release);
    }

    /// Node `index` failed: move the start past it, unless another connection has already
    /// moved it elsewhere (to a node that works).
    pub fn failed(&self, index: usize) {
        let after = (index + 1) % self.len;
        let _ = self
            .next
            .compare_exchange(index, after, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The process-wide rotation of one list of node URLs.
pub fn rotation(urls: &[&str]) -> Arc<Rotation> {
    static ROTATIONS: LazyLock<Mutex<HashMap<Vec<String>, Arc<Rotation>>>> =
        LazyLock::new(Mutex::default);
    let key: Vec<String> = urls.iter().map(|url| (*url).to_owned()).collect();
    let mut rotations = ROTATIONS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    rotations
        .entry(key)
        .or_insert_with(|| Arc::new(Rotation::new(urls.len())))
        .clone()
}

/// The node a connection reached: report it lost when its session dies.
#[derive(Debug, Clone)]
pub struct Node {
    rotation: Arc<Rotation>,
    index: usize,
    /// Its URL without the password.
    pub shown: String,
}

impl Node {
    pub(super) fn new(rotation: Arc<Rotation>, index: usize, shown: String) -> Node {
        Node {
            rotation,
            index,
            shown,
        }
    }

    /// The connection to this node died: the next connect starts at the node after it.
    pub fn lost(&self) {
        self.rotation.failed(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(rotation: &Rotation) -> Vec<usize> {
        rotation.order().collect()
    }

    #[test]
    fn connects_start_at_the_first_node_and_move_past_each_failure() {
        let rotation = Rotation::new(3);
        assert_eq!(order(&rotation), [0, 1, 2]);
        rotation.failed(0);
        assert_eq!(order(&rotation), [1, 2, 0]);
        rotation.failed(1);
        rotation.failed(2);
        assert_eq!(order(&rotation), [0, 1, 2], "wraps around");
    }

    #[test]
    fn a_reached_node_stays_first_until_it_fails() {
        let rotation = Rotation::new(3);
        rotation.reached(2);
        assert_eq!(order(&rotation), [2, 0, 1]);
        // A stale report about another node (a second connection that lost node 0 earlier)
        // does not move the start away from the node that works.
        rotation.failed(0);
        assert_eq!(order(&rotation), [2, 0, 1]);
        rotation.failed(2);
        assert_eq!(order(&rotation), [0, 1, 2]);
    }

    #[test]
    fn one_node_is_always_first() {
        let rotation = Rotation::new(1);
        rotation.failed(0);
        assert_eq!(order(&rotation), [0]);
    }

    #[test]
    fn connections_to_the_same_nodes_share_a_rotation() {
        let nodes = ["amqp://rotation-test-a", "amqp://rotation-test-b"];
        let first = rotation(&nodes);
        let lost = Node::new(first.clone(), 0, "a".into());
        lost.lost();
        assert_eq!(order(&rotation(&nodes)), [1, 0]);
        assert_eq!(order(&rotation(&nodes[..1])), [0], "another list, its own");
    }
}
