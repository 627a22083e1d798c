//! Pure builders: a [`ValidCluster`] (the CacheCluster's identity and its validated spec)
//! in, the desired Kubernetes objects out.
//!
//! Nothing here performs I/O or reads the raw spec; every function is a deterministic
//! function of its arguments, so each one is unit-tested directly. The reconciler
//! validates once, builds, and applies the results with server-side apply under a single
//! field manager.

mod configmap;
mod networkpolicy;
#[cfg(test)]
mod node_args;
mod pdb;
#[cfg(test)]
pub(crate) mod pss;
mod rbac;
mod services;
mod statefulset;

pub use configmap::members_configmap;
pub use networkpolicy::{network_policy, NAMESPACE_NAME_LABEL};
pub use pdb::pod_disruption_budget;
pub use rbac::{node_role, node_role_binding, node_service_account};
pub use services::{client_service, peers_service};
pub use statefulset::{
    container_args, statefulset, AUTH_DIR, PEER_SECRET_DIR, SECRET_FILE_MODE, TLS_DIR,
};

use crate::crd::{CacheCluster, ValidSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kache_cluster::names;
use kube::{Resource, ResourceExt};

/// Default kache-node image: the one released with this operator version.
pub const DEFAULT_NODE_IMAGE: &str =
    concat!("ghcr.io/kache-dev/kache-node:", env!("CARGO_PKG_VERSION"));

/// Why an object could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The CacheCluster has no namespace or uid yet (not read from the API server).
    #[error("CacheCluster {0} has no {1}")]
    MissingMeta(String, &'static str),
    /// The member list could not be rendered.
    #[error(transparent)]
    MemberList(#[from] kache_cluster::MemberListError),
}

/// The CacheCluster the objects belong to: what they need of it besides its spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterRef {
    /// The CacheCluster's name, which names its objects.
    pub name: String,
    /// Its namespace, which holds them.
    pub namespace: String,
    /// The controller owner reference every created object carries, so that deleting the
    /// CacheCluster garbage-collects them.
    pub owner: OwnerReference,
}

impl ClusterRef {
    /// `cc`'s name, namespace and owner reference; they exist once the API server stored it.
    pub fn of(cc: &CacheCluster) -> Result<Self, BuildError> {
        let missing = |what| BuildError::MissingMeta(cc.name_any(), what);
        Ok(Self {
            name: cc.name_any(),
            namespace: cc.namespace().ok_or_else(|| missing("namespace"))?,
            owner: cc.controller_owner_ref(&()).ok_or_else(|| missing("uid"))?,
        })
    }
}

/// What the builders make a cluster's objects of: the CacheCluster they belong to and its
/// validated spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidCluster {
    /// The CacheCluster.
    pub cluster: ClusterRef,
    /// Its spec, validated.
    pub spec: ValidSpec,
}

impl ValidCluster {
    /// `cc` with `spec`, what its spec validated to.
    pub fn new(cc: &CacheCluster, spec: ValidSpec) -> Result<Self, BuildError> {
        Ok(Self {
            cluster: ClusterRef::of(cc)?,
            spec,
        })
    }
}

/// Namespace of the CacheCluster.
pub fn namespace(cc: &CacheCluster) -> Result<String, BuildError> {
    cc.namespace()
        .ok_or_else(|| BuildError::MissingMeta(cc.name_any(), "namespace"))
}

/// Metadata of an owned object: name, namespace, common labels, owner reference.
pub fn object_meta(cluster: &ClusterRef, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(cluster.namespace.clone()),
        labels: Some(names::common_labels(&cluster.name)),
        owner_references: Some(vec![cluster.owner.clone()]),
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::cluster;

    #[test]
    fn owned_objects_point_at_the_cluster() {
        let cc = cluster("web", Default::default());
        let meta = object_meta(&ClusterRef::of(&cc).unwrap(), "web-peers".into());
        let owner = &meta.owner_references.unwrap()[0];
        assert_eq!(owner.kind, "CacheCluster");
        assert_eq!(owner.api_version, "kache.dev/v1alpha1");
        assert_eq!(owner.name, "web");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some("prod"));
        assert_eq!(
            meta.labels
                .unwrap()
                .get(names::LABEL_MANAGED_BY)
                .map(String::as_str),
            Some("kache-operator")
        );
    }

    #[test]
    fn objects_need_uid_and_namespace() {
        let cc = CacheCluster::new("web", Default::default());
        assert!(matches!(
            ClusterRef::of(&cc),
            Err(BuildError::MissingMeta(_, "namespace"))
        ));
    }

    #[test]
    fn default_image_matches_operator_version() {
        assert!(DEFAULT_NODE_IMAGE.ends_with(env!("CARGO_PKG_VERSION")));
    }
}
