//! kache-cluster: the shared vocabulary of a kache cluster.
//!
//! This crate holds the *one* definition of every contract between the operator,
//! the nodes and cluster-aware clients: the member-list document the operator
//! publishes and the nodes read ([`member_list`]), the ring ([`ring`]), the
//! report a node gives the operator on its admin port ([`report`]), the size
//! syntax of the node's flags and the spec ([`size`]), and the names (ConfigMap
//! name, data keys, labels, ports) both sides must agree on ([`names`]). It
//! deliberately has no Kubernetes dependencies.

pub mod member_list;
pub mod names;
pub mod report;
pub mod ring;
pub mod size;

pub use member_list::{Member, MemberList, MemberListError};
pub use report::{HandoffReport, NodeReport};
pub use ring::{Ring, RingNode};
