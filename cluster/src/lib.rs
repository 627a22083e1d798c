//! kache-cluster: the shared vocabulary of a kache cluster.
//!
//! This crate holds the *one* definition of the member-list document that the
//! operator publishes, the nodes read, and cluster-aware clients consume, plus
//! the names (ConfigMap name, data keys, labels, ports) both sides must agree
//! on. It deliberately has no Kubernetes dependencies.

pub mod member_list;
pub mod names;
pub mod ring;

pub use member_list::{Member, MemberList, MemberListError};
pub use ring::{Ring, RingNode};
