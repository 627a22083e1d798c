//! What the operator reads off the CacheCluster, the pods and the StatefulSet it observes:
//! the cluster as the decisions take it, ordinals, states and revisions. Pure functions,
//! shared by [`crate::status`], [`crate::scale`] and [`crate::roll`] (which depend on this
//! module, not on each other).

use crate::build::{BuildError, ValidCluster};
use crate::crd::{CacheCluster, CacheClusterStatus, MemberState, ValidSpec};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// The StatefulSet controller's label naming a pod's revision.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// A CacheCluster whose spec validated, as the decisions of [`crate::status`],
/// [`crate::scale`] and [`crate::roll`] take it: who it is and its [`ValidSpec`] (they never
/// read the raw spec, so every default and range is validation's), the generation it was
/// read at, and the status the operator last wrote (which holds the start of the steps
/// under way).
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedCluster {
    /// Its identity and validated spec, what its objects are built of.
    pub valid: ValidCluster,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `status`, as last written.
    pub status: Option<CacheClusterStatus>,
}

impl ObservedCluster {
    /// `cc`, whose spec validated to `spec`.
    pub fn new(cc: &CacheCluster, spec: ValidSpec) -> Result<Self, BuildError> {
        Ok(Self {
            valid: ValidCluster::new(cc, spec)?,
            generation: cc.metadata.generation,
            status: cc.status.clone(),
        })
    }

    /// The CacheCluster's name, which prefixes its pods'.
    pub fn name(&self) -> &str {
        &self.valid.cluster.name
    }

    /// Its validated spec.
    pub fn spec(&self) -> &ValidSpec {
        &self.valid.spec
    }
}

/// The StatefulSet ordinal of a pod named `<cluster>-<n>`.
pub fn pod_ordinal(pod_name: &str, cluster: &str) -> Option<u32> {
    pod_name
        .strip_prefix(cluster)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod's IP, once it has one.
pub fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty())
}

/// The lifecycle state of one pod.
pub fn member_state(pod: &Pod) -> MemberState {
    if pod.metadata.deletion_timestamp.is_some() {
        MemberState::Terminating
    } else if pod_is_ready(pod) && pod_ip(pod).is_some() {
        MemberState::Ready
    } else if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
        MemberState::NotReady
    } else {
        MemberState::Pending
    }
}

/// The revision the StatefulSet's pods should run, once the StatefulSet
/// controller has seen the current spec (before that, its revision is stale).
pub fn update_revision(sts: Option<&StatefulSet>) -> Option<&str> {
    let sts = sts?;
    let status = sts.status.as_ref()?;
    if status.observed_generation.unwrap_or(0) < sts.metadata.generation.unwrap_or(0) {
        return None;
    }
    status.update_revision.as_deref().filter(|r| !r.is_empty())
}

/// The revision a pod runs (its template's), if labelled.
pub fn pod_revision(pod: &Pod) -> Option<&str> {
    pod.labels().get(REVISION_LABEL).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{pod, t};

    #[test]
    fn ordinals() {
        assert_eq!(pod_ordinal("web-0", "web"), Some(0));
        assert_eq!(pod_ordinal("web-12", "web"), Some(12));
        assert_eq!(pod_ordinal("web-cache-0", "web"), None);
        assert_eq!(pod_ordinal("webx-0", "web"), None);
        assert_eq!(pod_ordinal("web", "web"), None);
    }

    #[test]
    fn member_states() {
        assert_eq!(
            member_state(&pod("a", Some("1.1.1.1"), true)),
            MemberState::Ready
        );
        assert_eq!(
            member_state(&pod("a", Some("1.1.1.1"), false)),
            MemberState::NotReady
        );
        assert_eq!(member_state(&pod("a", None, false)), MemberState::Pending);
        let mut p = pod("a", Some("1.1.1.1"), true);
        p.metadata.deletion_timestamp = Some(t(0));
        assert_eq!(member_state(&p), MemberState::Terminating);
    }
}
