//! kache-operator: turns `CacheCluster` resources into running, observable
//! kache clusters.
//!
//! Layout: pure core, I/O at the edges.
//! * [`crd`]: the resource types, defaults and validation.
//! * [`build`]: pure builders, validated spec → desired Kubernetes objects.
//! * [`observe`]: the CacheCluster as the decisions below take it (its validated spec,
//!   never the raw one, and its last status), and what the pods and the StatefulSet say
//!   (ordinals, states, revisions).
//! * [`status`]: pure functions, observed state → member list, status, conditions.
//! * [`scale`]: pure decisions of a warm scale-in (hold the StatefulSet
//!   until departing nodes have handed their data off).
//! * [`roll`]: pure decisions of a rolling update (restart the nodes one at
//!   a time, each once the one before holds its share again).
//! * [`reconcile`]: the reconciler that reads, applies and patches.
//! * [`probe`]: asks departing nodes for their hand-off progress.
//! * [`leader`], [`metrics`], [`admin`]: the operator process's plumbing.

pub mod admin;
pub mod build;
pub mod crd;
#[cfg(test)]
mod fixtures;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod probe;
pub mod reconcile;
pub mod roll;
pub mod scale;
pub mod status;
