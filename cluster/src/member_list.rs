//! The member-list document: the one definition of who is in a kache cluster.
//!
//! The operator publishes it in the `<cluster>-members` ConfigMap under two keys:
//!
//! * [`MEMBERS_JSON_KEY`](crate::names::MEMBERS_JSON_KEY): JSON, see [`MemberList::to_json`]:
//!
//!   ```json
//!   {
//!     "version": 3,
//!     "replicationFactor": 2,
//!     "members": [
//!       {"name": "web-0", "host": "web-0.web-peers.prod.svc", "ip": "10.0.0.7", "port": 11211, "peerPort": 11212}
//!     ]
//!   }
//!   ```
//!
//! * [`CLUSTER_CONFIG_KEY`](crate::names::CLUSTER_CONFIG_KEY): the ElastiCache
//!   `config get cluster` payload, see [`MemberList::elasticache_payload`]:
//!
//!   ```text
//!   3
//!   web-0.web-peers.prod.svc|10.0.0.7|11211 web-1.web-peers.prod.svc|10.0.0.8|11211
//!   ```
//!
//! `version` rises by one on every change of the member list (members or
//! replication factor) and never on a no-op; [`MemberList::same_membership`]
//! is the comparison that decides it.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Highest replication factor a cluster supports.
pub const MAX_REPLICATION_FACTOR: u8 = 3;

/// One cache node in the member list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Pod name, e.g. `web-0`. Unique within the list.
    pub name: String,
    /// Stable DNS name, e.g. `web-0.web-peers.prod.svc`.
    pub host: String,
    /// Pod IP address.
    pub ip: String,
    /// Memcache (client) port.
    pub port: u16,
    /// Node-to-node (peer) port.
    pub peer_port: u16,
}

/// The member-list document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberList {
    /// Rises by one on every change of `members` or `replicationFactor`.
    pub version: u64,
    /// How many nodes hold each key (1..=3).
    pub replication_factor: u8,
    /// Members in ordinal order.
    pub members: Vec<Member>,
}

/// Why a member-list document (JSON or ElastiCache text) was rejected.
#[derive(Debug, thiserror::Error)]
pub enum MemberListError {
    /// Not valid JSON for a [`MemberList`].
    #[error("member list is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Replication factor outside 1..=3.
    #[error("replicationFactor {0} is out of range 1..={MAX_REPLICATION_FACTOR}")]
    ReplicationFactor(u8),
    /// Two members with the same name.
    #[error("member {0:?} is listed twice")]
    DuplicateMember(String),
    /// A member with an empty name or host.
    #[error("member #{0} has an empty name or host")]
    EmptyMember(usize),
    /// A malformed ElastiCache `config get cluster` payload.
    #[error("invalid cluster config payload: {0}")]
    ClusterConfig(String),
}

/// One node as listed by ElastiCache `config get cluster`: `host|ip|port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfigNode {
    /// DNS name.
    pub host: String,
    /// IP address (may be empty).
    pub ip: String,
    /// Memcache port.
    pub port: u16,
}

/// A parsed ElastiCache `config get cluster` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Config version.
    pub version: u64,
    /// Nodes in listed order.
    pub nodes: Vec<ClusterConfigNode>,
}

impl MemberList {
    /// An empty list at version 0.
    pub fn empty(replication_factor: u8) -> Self {
        Self {
            version: 0,
            replication_factor,
            members: Vec::new(),
        }
    }

    /// Checks the invariants: replication factor in range, names unique and non-empty.
    pub fn validate(&self) -> Result<(), MemberListError> {
        if !(1..=MAX_REPLICATION_FACTOR).contains(&self.replication_factor) {
            return Err(MemberListError::ReplicationFactor(self.replication_factor));
        }
        let mut seen = HashSet::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.name.is_empty() || m.host.is_empty() {
                return Err(MemberListError::EmptyMember(i));
            }
            if !seen.insert(m.name.as_str()) {
                return Err(MemberListError::DuplicateMember(m.name.clone()));
            }
        }
        Ok(())
    }

    /// True when both lists describe the same cluster, ignoring `version`.
    pub fn same_membership(&self, other: &MemberList) -> bool {
        self.replication_factor == other.replication_factor && self.members == other.members
    }

    /// Renders the JSON document (pretty-printed, trailing newline).
    pub fn to_json(&self) -> Result<String, MemberListError> {
        let mut s = serde_json::to_string_pretty(self)?;
        s.push('\n');
        Ok(s)
    }

    /// Parses and validates the JSON document. Unknown fields are ignored so
    /// that newer operators can add fields without breaking older nodes.
    pub fn from_json(s: &str) -> Result<Self, MemberListError> {
        let list: MemberList = serde_json::from_str(s)?;
        list.validate()?;
        Ok(list)
    }

    /// Renders the ElastiCache `config get cluster` payload:
    /// `<version>\n<host>|<ip>|<port> <host>|<ip>|<port>...\n`
    /// (all nodes on one line, space-separated, in member order).
    pub fn elasticache_payload(&self) -> String {
        let nodes = self
            .members
            .iter()
            .map(|m| format!("{}|{}|{}", m.host, m.ip, m.port))
            .collect::<Vec<_>>()
            .join(" ");
        format!("{}\n{}\n", self.version, nodes)
    }

    /// Renders the full memcached-protocol reply to `config get cluster`:
    /// `CONFIG cluster 0 <bytes>\r\n<payload>\r\nEND\r\n`, where `<bytes>` is
    /// the byte length of the payload.
    pub fn elasticache_config_reply(&self) -> String {
        config_reply(&self.elasticache_payload())
    }
}

/// Wraps an already-rendered payload in the `config get cluster` reply framing.
pub fn config_reply(payload: &str) -> String {
    format!(
        "CONFIG cluster 0 {}\r\n{}\r\nEND\r\n",
        payload.len(),
        payload
    )
}

/// Parses an ElastiCache `config get cluster` payload (the part between the
/// `CONFIG` line and the trailing `\r\nEND\r\n`).
pub fn parse_elasticache_payload(payload: &str) -> Result<ClusterConfig, MemberListError> {
    let bad = |why: &str| MemberListError::ClusterConfig(why.to_string());
    let mut lines = payload.lines();
    let version = lines
        .next()
        .ok_or_else(|| bad("empty payload"))?
        .trim()
        .parse::<u64>()
        .map_err(|_| bad("first line is not a version number"))?;
    let node_line = lines.next().unwrap_or("");
    if lines.any(|l| !l.trim().is_empty()) {
        return Err(bad("more than two lines"));
    }
    let mut nodes = Vec::new();
    for entry in node_line.split_whitespace() {
        let mut parts = entry.split('|');
        let (Some(host), Some(ip), Some(port), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad(&format!("entry {entry:?} is not host|ip|port")));
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| bad(&format!("entry {entry:?} has an invalid port")))?;
        nodes.push(ClusterConfigNode {
            host: host.to_string(),
            ip: ip.to_string(),
            port,
        });
    }
    Ok(ClusterConfig { version, nodes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(i: usize) -> Member {
        Member {
            name: format!("web-{i}"),
            host: format!("web-{i}.web-peers.prod.svc"),
            ip: format!("10.0.0.{}", i + 7),
            port: 11211,
            peer_port: 11212,
        }
    }

    fn list(n: usize) -> MemberList {
        MemberList {
            version: 3,
            replication_factor: 2,
            members: (0..n).map(member).collect(),
        }
    }

    #[test]
    fn json_is_camel_case_and_round_trips() {
        let l = list(2);
        let json = l.to_json().unwrap();
        assert!(json.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["version"], 3);
        assert_eq!(v["replicationFactor"], 2);
        assert_eq!(v["members"][1]["name"], "web-1");
        assert_eq!(v["members"][1]["host"], "web-1.web-peers.prod.svc");
        assert_eq!(v["members"][1]["ip"], "10.0.0.8");
        assert_eq!(v["members"][1]["port"], 11211);
        assert_eq!(v["members"][1]["peerPort"], 11212);
        assert_eq!(MemberList::from_json(&json).unwrap(), l);
    }

    #[test]
    fn parse_ignores_unknown_fields() {
        let json = r#"{"version":1,"replicationFactor":1,"future":true,
            "members":[{"name":"a","host":"a.x","ip":"1.2.3.4","port":1,"peerPort":2,"zone":"z"}]}"#;
        let l = MemberList::from_json(json).unwrap();
        assert_eq!(l.members.len(), 1);
        assert_eq!(l.members[0].peer_port, 2);
    }

    #[test]
    fn parse_rejects_invalid_documents() {
        assert!(matches!(
            MemberList::from_json("{"),
            Err(MemberListError::Json(_))
        ));
        assert!(matches!(
            MemberList::from_json(r#"{"version":1,"replicationFactor":4,"members":[]}"#),
            Err(MemberListError::ReplicationFactor(4))
        ));
        assert!(matches!(
            MemberList::from_json(r#"{"version":1,"replicationFactor":0,"members":[]}"#),
            Err(MemberListError::ReplicationFactor(0))
        ));
        let mut dup = list(2);
        dup.members[1].name = "web-0".into();
        assert!(matches!(
            MemberList::from_json(&dup.to_json().unwrap()),
            Err(MemberListError::DuplicateMember(n)) if n == "web-0"
        ));
        let mut empty = list(1);
        empty.members[0].host.clear();
        assert!(matches!(
            empty.validate(),
            Err(MemberListError::EmptyMember(0))
        ));
        // Missing required field.
        assert!(MemberList::from_json(r#"{"version":1,"members":[]}"#).is_err());
    }

    #[test]
    fn same_membership_ignores_version_only() {
        let a = list(2);
        let mut b = a.clone();
        b.version = 99;
        assert!(a.same_membership(&b));
        b.replication_factor = 1;
        assert!(!a.same_membership(&b));
        let mut c = a.clone();
        c.members[0].ip = "10.9.9.9".into();
        assert!(!a.same_membership(&c));
        assert!(!a.same_membership(&list(3)));
    }

    #[test]
    fn elasticache_payload_is_one_line_of_nodes() {
        let l = list(2);
        assert_eq!(
            l.elasticache_payload(),
            "3\nweb-0.web-peers.prod.svc|10.0.0.7|11211 web-1.web-peers.prod.svc|10.0.0.8|11211\n"
        );
        let empty = MemberList::empty(1);
        assert_eq!(empty.elasticache_payload(), "0\n\n");
    }

    #[test]
    fn elasticache_reply_counts_payload_bytes() {
        let l = list(1);
        let payload = "3\nweb-0.web-peers.prod.svc|10.0.0.7|11211\n";
        assert_eq!(payload.len(), 42);
        assert_eq!(
            l.elasticache_config_reply(),
            format!("CONFIG cluster 0 42\r\n{payload}\r\nEND\r\n")
        );
    }

    #[test]
    fn elasticache_payload_parses_back() {
        let l = list(3);
        let parsed = parse_elasticache_payload(&l.elasticache_payload()).unwrap();
        assert_eq!(parsed.version, 3);
        assert_eq!(parsed.nodes.len(), 3);
        assert_eq!(parsed.nodes[2].host, "web-2.web-peers.prod.svc");
        assert_eq!(parsed.nodes[2].ip, "10.0.0.9");
        assert_eq!(parsed.nodes[2].port, 11211);
        let empty = parse_elasticache_payload("7\n\n").unwrap();
        assert_eq!(empty.version, 7);
        assert!(empty.nodes.is_empty());
        assert!(parse_elasticache_payload("").is_err());
        assert!(parse_elasticache_payload("x\n").is_err());
        assert!(parse_elasticache_payload("1\na|b\n").is_err());
        assert!(parse_elasticache_payload("1\na|b|c\n").is_err());
        assert!(parse_elasticache_payload("1\na|b|1|2\n").is_err());
        assert!(parse_elasticache_payload("1\na|b|1\nextra\n").is_err());
    }
}
