//! The node's view of its cluster: the member list, the ring built from it, and which
//! member this node is. Updated whole (one `Arc` swap) whenever the member list changes,
//! so request handling reads a consistent view without taking a lock.

pub mod membership;

use std::sync::Arc;

use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use kache_cluster::{Member, MemberList, Ring, RingNode};
use tokio::sync::watch;

/// One version of the cluster as this node sees it.
#[derive(Debug)]
pub struct ClusterView {
    pub list: MemberList,
    pub ring: Ring,
    /// This node's index in `list.members`, when it is a member.
    pub me: Option<usize>,
}

impl ClusterView {
    pub fn new(list: MemberList, node_name: &str) -> ClusterView {
        let ring = Ring::new(
            list.members
                .iter()
                .map(|m| RingNode::new(m.host.clone(), m.port))
                .collect(),
        );
        let me = list.members.iter().position(|m| m.name == node_name);
        ClusterView { list, ring, me }
    }

    /// The members holding `key`: its owner first, then its replicas.
    pub fn owners(&self, key: &[u8]) -> Vec<&Member> {
        self.ring
            .owners(key, usize::from(self.list.replication_factor.max(1)))
            .into_iter()
            .filter_map(|i| self.list.members.get(i))
            .collect()
    }
}

/// The shared, swappable cluster view plus change notifications.
pub struct Cluster {
    node_name: String,
    view: ArcSwap<ClusterView>,
    /// The view before the last change, while keys may still be on their way from it.
    previous: ArcSwapOption<ClusterView>,
    changed_at: parking_lot::Mutex<Option<Instant>>,
    changed: watch::Sender<u64>,
}

/// How long after a ring change a new owner asks the previous owners for keys it misses.
pub const READ_THROUGH_WINDOW: Duration = Duration::from_secs(300);

impl Cluster {
    /// A cluster with no members yet (until the first member list arrives).
    pub fn new(node_name: impl Into<String>) -> Cluster {
        let node_name = node_name.into();
        let view = ClusterView::new(MemberList::empty(1), &node_name);
        let (changed, _) = watch::channel(0);
        Cluster {
            node_name,
            view: ArcSwap::from_pointee(view),
            previous: ArcSwapOption::empty(),
            changed_at: parking_lot::Mutex::new(None),
            changed,
        }
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The current view.
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.load_full()
    }

    /// Installs `list` if it differs from the current one. Returns whether it changed.
    pub fn update(&self, list: MemberList) -> bool {
        let current = self.view.load();
        if current.list == list {
            return false;
        }
        let version = list.version;
        tracing::info!(
            version,
            members = list.members.len(),
            replication_factor = list.replication_factor,
            "member list changed"
        );
        let old = self
            .view
            .swap(Arc::new(ClusterView::new(list, &self.node_name)));
        if !old.list.members.is_empty() {
            self.previous.store(Some(old));
            *self.changed_at.lock() = Some(Instant::now());
        }
        self.changed.send_replace(version);
        true
    }

    /// The members that held `key` under the previous ring and may still have it while a
    /// hand-off to this node is under way: empty unless this node has just become one of
    /// the key's owners.
    pub fn read_through_sources(&self, key: &[u8]) -> Vec<Member> {
        let recent = self
            .changed_at
            .lock()
            .is_some_and(|at| at.elapsed() < READ_THROUGH_WINDOW);
        if !recent {
            return Vec::new();
        }
        let Some(previous) = self.previous.load_full() else {
            return Vec::new();
        };
        let current = self.view();
        let me = self.node_name.as_str();
        if !current.owners(key).iter().any(|m| m.name == me) {
            return Vec::new();
        }
        let before = previous.owners(key);
        if before.iter().any(|m| m.name == me) {
            return Vec::new();
        }
        before.into_iter().cloned().collect()
    }

    /// Whether a ring change happened recently enough for read-through.
    pub fn in_read_through_window(&self) -> bool {
        self.changed_at
            .lock()
            .is_some_and(|at| at.elapsed() < READ_THROUGH_WINDOW)
    }

    /// Notified with the new version on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(i: u16) -> Member {
        Member {
            name: format!("n{i}"),
            host: "127.0.0.1".into(),
            ip: "127.0.0.1".into(),
            port: 20000 + i,
            peer_port: 21000 + i,
        }
    }

    #[test]
    fn updates_only_on_change_and_knows_itself() {
        let cluster = Cluster::new("n2");
        assert!(cluster.view().me.is_none());
        let list = MemberList {
            version: 3,
            replication_factor: 2,
            members: vec![member(1), member(2), member(3)],
        };
        let mut changes = cluster.subscribe();
        assert!(cluster.update(list.clone()));
        assert!(!cluster.update(list));
        assert!(changes.has_changed().unwrap());
        assert_eq!(*changes.borrow_and_update(), 3);
        let view = cluster.view();
        assert_eq!(view.me, Some(1));
        let owners = view.owners(b"some-key");
        assert_eq!(owners.len(), 2);
        assert_ne!(owners[0].name, owners[1].name);
    }
}
