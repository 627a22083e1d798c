//! Pure builders: a `CacheCluster` spec in, the desired Kubernetes objects out.
//!
//! Nothing here performs I/O; every function is a deterministic function of its
//! arguments, so each one is unit-tested directly. The reconciler applies the
//! results with server-side apply under a single field manager.

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
    container_args, default_resources, statefulset, AUTH_DIR, PEER_SECRET_DIR, SECRET_FILE_MODE,
    TLS_DIR,
};

use crate::crd::CacheCluster;
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

/// The controller owner reference every created object carries, so that
/// deleting the CacheCluster garbage-collects them.
pub fn owner_reference(cc: &CacheCluster) -> Result<OwnerReference, BuildError> {
    cc.controller_owner_ref(&())
        .ok_or_else(|| BuildError::MissingMeta(cc.name_any(), "uid"))
}

/// Namespace of the CacheCluster.
pub fn namespace(cc: &CacheCluster) -> Result<String, BuildError> {
    cc.namespace()
        .ok_or_else(|| BuildError::MissingMeta(cc.name_any(), "namespace"))
}

/// Metadata of an owned object: name, namespace, common labels, owner reference.
pub fn object_meta(cc: &CacheCluster, name: String) -> Result<ObjectMeta, BuildError> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(namespace(cc)?),
        labels: Some(names::common_labels(&cc.name_any())),
        owner_references: Some(vec![owner_reference(cc)?]),
        ..ObjectMeta::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::cluster;

    #[test]
    fn owned_objects_point_at_the_cluster() {
        let cc = cluster("web", Default::default());
        let meta = object_meta(&cc, "web-peers".into()).unwrap();
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
            object_meta(&cc, "x".into()),
            Err(BuildError::MissingMeta(_, _))
        ));
    }

    #[test]
    fn default_image_matches_operator_version() {
        assert!(DEFAULT_NODE_IMAGE.ends_with(env!("CARGO_PKG_VERSION")));
    }
}
