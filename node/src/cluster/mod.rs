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
        let new = Arc::new(ClusterView::new(list, &self.node_name));
        let old = self.view.swap(new.clone());
        let previous = if !old.list.members.is_empty() {
            Some(old)
        } else if new.me.is_some() {
            // The first list this node sees already names it: it has joined (or restarted
            // into) a running cluster, whose ring was this list without it.
            let mut without_me = new.list.clone();
            without_me.members.retain(|m| m.name != self.node_name);
            (!without_me.members.is_empty())
                .then(|| Arc::new(ClusterView::new(without_me, &self.node_name)))
        } else {
            None
        };
        if let Some(previous) = previous {
            self.previous.store(Some(previous));
            *self.changed_at.lock() = Some(Instant::now());
        }
        self.changed.send_replace(version);
        true
    }

    /// Where an owner that misses `key` shortly after a ring change may find it: the key's
    /// owners under the previous ring, then its other current owners. Empty outside the
    /// window after a change, or when this node does not own the key.
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
        let owners = current.owners(key);
        if !owners.iter().any(|m| m.name == me) {
            return Vec::new();
        }
        // The key's previous owners first (a hand-off may still be bringing it), then its
        // other current owners (a replica may have it when this node missed a hand-off cut
        // short by a failure).
        let mut sources: Vec<Member> = Vec::new();
        for m in previous.owners(key).into_iter().chain(owners) {
            if m.name != me && !sources.iter().any(|s| s.name == m.name) {
                sources.push(m.clone());
            }
        }
        sources
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
    fn a_node_whose_first_list_names_it_reads_through_from_the_others() {
        let cluster = Cluster::new("n4");
        let list = MemberList {
            version: 9,
            replication_factor: 1,
            members: (1..=4).map(member).collect(),
        };
        cluster.update(list);
        let view = cluster.view();
        // Some key this node owns now must have somewhere to come from.
        let key = (0..1000)
            .map(|i| format!("k{i}"))
            .find(|k| view.owners(k.as_bytes())[0].name == "n4")
            .unwrap();
        let sources = cluster.read_through_sources(key.as_bytes());
        assert!(!sources.is_empty());
        assert!(sources.iter().all(|m| m.name != "n4"));
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
