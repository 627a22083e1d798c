//! A node's report of its view of the cluster: the JSON document of `GET /cluster` on its
//! admin port. The node writes it; the operator reads it to decide when a scale-in's
//! departing nodes have handed their data off and when a rolling update may restart the
//! next node; tests and people read it too.
//!
//! ```json
//! {"node": "c-2", "member": true, "version": 7, "replicationFactor": 2,
//!  "members": ["c-0", "c-1", "c-2"],
//!  "handoff": {"version": 7, "running": false, "done": true, "sent": 1234, "acked": 1230,
//!              "failed": 4, "refilled": 0},
//!  "readThroughHits": 0, "items": 5120}
//! ```
//!
//! Every field but `handoff` may be missing when read (an older node wrote fewer).

use serde::{Deserialize, Serialize};

/// The `handoff` object: progress of the node's latest hand-off of items to their new owners.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct HandoffReport {
    /// Member-list version of the hand-off under way or last finished.
    pub version: u64,
    /// A hand-off is running.
    pub running: bool,
    /// The hand-off for `version` has finished.
    pub done: bool,
    /// Items sent to new owners.
    pub sent: u64,
    /// Items the new owners acknowledged.
    pub acked: u64,
    /// Items that could not be handed off.
    pub failed: u64,
    /// Items received by refills.
    pub refilled: u64,
}

/// A node's `GET /cluster` document.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// The node's member name.
    #[serde(default)]
    pub node: String,
    /// The node is in the member list it follows.
    #[serde(default)]
    pub member: bool,
    /// Version of the member list the node follows.
    #[serde(default)]
    pub version: u64,
    /// Replication factor of that list.
    #[serde(default)]
    pub replication_factor: u8,
    /// Names of the list's members, in its order.
    #[serde(default)]
    pub members: Vec<String>,
    /// Its hand-off progress.
    pub handoff: HandoffReport,
    /// Misses this node answered by reading the key from its previous owner.
    #[serde(default)]
    pub read_through_hits: u64,
    /// Items the node holds.
    #[serde(default)]
    pub items: u64,
}

impl NodeReport {
    /// The node follows member list `version` (or a newer one) and moves no data: nothing
    /// it should hold is still on its way.
    pub fn settled_on(&self, version: u64) -> bool {
        self.version >= version && !self.handoff.running
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_document_round_trips_with_its_field_names() {
        let report = NodeReport {
            node: "c-2".into(),
            member: true,
            version: 7,
            replication_factor: 2,
            members: vec!["c-0".into(), "c-1".into(), "c-2".into()],
            handoff: HandoffReport {
                version: 7,
                running: false,
                done: true,
                sent: 1234,
                acked: 1230,
                failed: 4,
                refilled: 1,
            },
            read_through_hits: 3,
            items: 5120,
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "node": "c-2", "member": true, "version": 7, "replicationFactor": 2,
                "members": ["c-0", "c-1", "c-2"],
                "handoff": {"version": 7, "running": false, "done": true, "sent": 1234,
                            "acked": 1230, "failed": 4, "refilled": 1},
                "readThroughHits": 3, "items": 5120
            })
        );
        assert_eq!(serde_json::from_value::<NodeReport>(json).unwrap(), report);
    }

    #[test]
    fn only_the_handoff_is_required() {
        let r: NodeReport = serde_json::from_str(r#"{"handoff":{"version":3}}"#).unwrap();
        assert_eq!(r.handoff.version, 3);
        assert!(!r.member && r.members.is_empty());
        assert!(serde_json::from_str::<NodeReport>("{}").is_err());
    }

    #[test]
    fn settled_means_on_the_version_with_no_handoff_running() {
        let mut r = NodeReport {
            version: 4,
            ..NodeReport::default()
        };
        assert!(r.settled_on(4) && r.settled_on(3) && !r.settled_on(5));
        r.handoff.running = true;
        assert!(!r.settled_on(4));
    }
}
