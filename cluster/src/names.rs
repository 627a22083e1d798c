//! Names both the operator and the nodes rely on: object names, ConfigMap data
//! keys, label keys and values, and well-known ports.
//!
//! Changing anything here is a wire-level change between the operator and the
//! nodes, so every such name lives in this one place.

use std::collections::BTreeMap;

/// `app.kubernetes.io/name` label key.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// `app.kubernetes.io/instance` label key (value: the CacheCluster's name).
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// `app.kubernetes.io/component` label key.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// `app.kubernetes.io/managed-by` label key.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// `app.kubernetes.io/part-of` label key.
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";

/// Value of [`LABEL_NAME`] on everything that belongs to a kache cluster.
pub const APP_NAME: &str = "kache";
/// Value of [`LABEL_COMPONENT`] on cache-node pods and their objects.
pub const COMPONENT_CACHE_NODE: &str = "cache-node";
/// Value of [`LABEL_MANAGED_BY`], and the operator's server-side-apply field manager.
pub const MANAGER: &str = "kache-operator";

/// Data key of the member-list JSON document in the members ConfigMap.
pub const MEMBERS_JSON_KEY: &str = "members.json";
/// Data key of the ElastiCache `config get cluster` payload in the members ConfigMap.
pub const CLUSTER_CONFIG_KEY: &str = "cluster-config";
/// Annotation on the members ConfigMap carrying the document's version.
pub const CONFIG_VERSION_ANNOTATION: &str = "kache.dev/config-version";

/// Default memcache (client) port.
pub const MEMCACHE_PORT: u16 = 11211;
/// Node-to-node (peer) port.
pub const PEER_PORT: u16 = 11212;
/// Admin HTTP port (`/metrics`, `/healthz`, `/readyz`).
pub const ADMIN_PORT: u16 = 11280;

/// Named container/service port for memcache traffic.
pub const PORT_NAME_MEMCACHE: &str = "memcache";
/// Named container/service port for peer traffic.
pub const PORT_NAME_PEER: &str = "peer";
/// Named container/service port for the admin HTTP endpoint.
pub const PORT_NAME_ADMIN: &str = "admin";

/// Environment variable holding the pod's name (downward API).
pub const ENV_POD_NAME: &str = "POD_NAME";
/// Environment variable holding the pod's namespace (downward API).
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";

/// Name of the ConfigMap holding a cluster's member list: `<cluster>-members`.
pub fn members_configmap_name(cluster: &str) -> String {
    format!("{cluster}-members")
}

/// Name of the headless Service giving each pod a stable DNS name: `<cluster>-peers`.
pub fn peers_service_name(cluster: &str) -> String {
    format!("{cluster}-peers")
}

/// Name of the client Service (ClusterIP) of a cluster: `<cluster>`.
pub fn client_service_name(cluster: &str) -> String {
    cluster.to_string()
}

/// Name of the ServiceAccount (and Role, RoleBinding) the nodes run as: `<cluster>-node`.
pub fn node_service_account_name(cluster: &str) -> String {
    format!("{cluster}-node")
}

/// Stable DNS name of a StatefulSet pod behind the headless peers Service:
/// `<pod>.<cluster>-peers.<namespace>.svc`.
pub fn pod_host(pod: &str, cluster: &str, namespace: &str) -> String {
    format!("{pod}.{}.{namespace}.svc", peers_service_name(cluster))
}

/// Labels that select the cache-node pods of one cluster.
pub fn selector_labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_INSTANCE.to_string(), cluster.to_string()),
        (
            LABEL_COMPONENT.to_string(),
            COMPONENT_CACHE_NODE.to_string(),
        ),
    ])
}

/// Selector labels plus `managed-by`: put on every object the operator creates.
pub fn common_labels(cluster: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cluster);
    labels.insert(LABEL_MANAGED_BY.to_string(), MANAGER.to_string());
    labels.insert(LABEL_PART_OF.to_string(), APP_NAME.to_string());
    labels
}

/// The selector labels rendered as a label-selector string (`k=v,k=v`), sorted by key.
pub fn selector_string(cluster: &str) -> String {
    selector_labels(cluster)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names() {
        assert_eq!(members_configmap_name("web"), "web-members");
        assert_eq!(peers_service_name("web"), "web-peers");
        assert_eq!(client_service_name("web"), "web");
        assert_eq!(node_service_account_name("web"), "web-node");
        assert_eq!(pod_host("web-0", "web", "prod"), "web-0.web-peers.prod.svc");
    }

    #[test]
    fn selector_is_sorted_and_stable() {
        assert_eq!(
            selector_string("web"),
            "app.kubernetes.io/component=cache-node,app.kubernetes.io/instance=web,app.kubernetes.io/name=kache"
        );
        let common = common_labels("web");
        assert_eq!(
            common.get(LABEL_MANAGED_BY).map(String::as_str),
            Some(MANAGER)
        );
        for (k, v) in selector_labels("web") {
            assert_eq!(common.get(&k), Some(&v));
        }
    }
}
