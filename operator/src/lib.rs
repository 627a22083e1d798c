//! kache-operator: turns `CacheCluster` resources into running, observable
//! kache clusters.
//!
//! Layout: pure core, I/O at the edges.
//! * [`crd`]: the resource types, defaults and validation.
//! * [`build`]: pure builders, spec → desired Kubernetes objects.
//! * [`status`]: pure functions, observed state → member list, status, conditions.
//! * [`reconcile`]: the reconciler that reads, applies and patches.
//! * [`leader`], [`metrics`], [`admin`]: the operator process's plumbing.

pub mod admin;
pub mod build;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod status;
