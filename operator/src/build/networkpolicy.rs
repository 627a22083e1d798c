//! The NetworkPolicy `<name>` (when `spec.networkPolicy.enabled`).

use super::{object_meta, ValidCluster};
use crate::crd::NetworkPolicyConfig;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kache_cluster::names;
use std::collections::BTreeMap;

/// Label every namespace carries with its own name (Kubernetes 1.21+).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn tcp(port: i32) -> Option<Vec<NetworkPolicyPort>> {
    Some(vec![NetworkPolicyPort {
        protocol: Some("TCP".into()),
        port: Some(IntOrString::Int(port)),
        ..NetworkPolicyPort::default()
    }])
}

fn match_labels(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels),
        ..LabelSelector::default()
    }
}

/// Who may connect to the memcache port: the pods `clientPodSelector`
/// selects in the namespaces `clientNamespaceSelector` selects; a missing
/// namespace selector means the cluster's namespace, a missing pod selector
/// every pod. Neither set: every pod in the cluster's namespace.
fn client_peer(np: &NetworkPolicyConfig) -> NetworkPolicyPeer {
    let pods = np.client_pod_selector.clone();
    let namespaces = np.client_namespace_selector.clone();
    NetworkPolicyPeer {
        // A peer with neither selector is invalid; `podSelector: {}` is
        // "every pod in the policy's namespace".
        pod_selector: if namespaces.is_none() {
            Some(pods.unwrap_or_default())
        } else {
            pods
        },
        namespace_selector: namespaces,
        ip_block: None,
    }
}

/// The NetworkPolicy `<name>`, or `None` when `spec.networkPolicy` is unset
/// or disabled. It selects the cluster's pods and restricts ingress only:
///
/// - peer port: from the cluster's own pods;
/// - memcache port: from the clients `spec.networkPolicy` selects;
/// - admin port: from every pod in `operator_namespace` (selected by its
///   `kubernetes.io/metadata.name` label): the operator's scale-in probe, and
///   Prometheus when it runs there.
///
/// Every other ingress to the pods is denied; egress is not restricted.
pub fn network_policy(vc: &ValidCluster, operator_namespace: &str) -> Option<NetworkPolicy> {
    let np = vc.spec.network_policy.as_ref()?;
    let name = &vc.cluster.name;
    let own_pods = match_labels(names::selector_labels(name));
    let operator = match_labels(BTreeMap::from([(
        NAMESPACE_NAME_LABEL.to_string(),
        operator_namespace.to_string(),
    )]));
    Some(NetworkPolicy {
        metadata: object_meta(&vc.cluster, name.clone()),
        spec: Some(NetworkPolicySpec {
            pod_selector: own_pods.clone(),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(own_pods),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: tcp(i32::from(names::PEER_PORT)),
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![client_peer(np)]),
                    ports: tcp(i32::from(vc.spec.port)),
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(operator),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: tcp(i32::from(names::ADMIN_PORT)),
                },
            ]),
            egress: None,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::CacheClusterSpec;
    use crate::fixtures::valid_cluster;
    use serde_json::{json, Value};

    fn with(np: Option<NetworkPolicyConfig>) -> ValidCluster {
        valid_cluster(
            "web",
            CacheClusterSpec {
                port: 11300,
                network_policy: np,
                ..Default::default()
            },
        )
    }

    fn selector(key: &str, value: &str) -> Option<LabelSelector> {
        Some(match_labels(BTreeMap::from([(key.into(), value.into())])))
    }

    fn rules(cc: &ValidCluster) -> Value {
        let np = network_policy(cc, "kache-system").unwrap();
        serde_json::to_value(np.spec.unwrap().ingress.unwrap()).unwrap()
    }

    #[test]
    fn disabled_or_unset_builds_none() {
        assert!(network_policy(&with(None), "ops").is_none());
        let off = NetworkPolicyConfig {
            enabled: false,
            client_pod_selector: selector("app", "shop"),
            ..Default::default()
        };
        assert!(network_policy(&with(Some(off)), "ops").is_none());
    }

    #[test]
    fn enabled_allows_peers_clients_and_the_operator_only() {
        let cc = with(Some(NetworkPolicyConfig {
            enabled: true,
            ..Default::default()
        }));
        let np = network_policy(&cc, "kache-system").unwrap();
        assert_eq!(np.metadata.name.as_deref(), Some("web"));
        assert_eq!(np.metadata.namespace.as_deref(), Some("prod"));
        assert_eq!(
            np.metadata.owner_references.as_ref().unwrap()[0].kind,
            "CacheCluster"
        );
        assert_eq!(
            np.metadata.labels.as_ref().unwrap()[names::LABEL_MANAGED_BY],
            "kache-operator"
        );
        let spec = np.spec.as_ref().unwrap();
        assert_eq!(
            spec.pod_selector.match_labels,
            Some(names::selector_labels("web"))
        );
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
        assert_eq!(spec.egress, None, "egress is not restricted");
        let own = json!({"matchLabels": names::selector_labels("web")});
        assert_eq!(
            rules(&cc),
            json!([
                {"from": [{"podSelector": own}],
                 "ports": [{"protocol": "TCP", "port": 11212}]},
                // Neither client selector: every pod of the namespace.
                {"from": [{"podSelector": {}}],
                 "ports": [{"protocol": "TCP", "port": 11300}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kache-system"}}}],
                 "ports": [{"protocol": "TCP", "port": 11280}]},
            ])
        );
    }

    #[test]
    fn client_selectors_shape_the_memcache_rule() {
        let client_rule = |ns: Option<LabelSelector>, pods: Option<LabelSelector>| {
            let cc = with(Some(NetworkPolicyConfig {
                enabled: true,
                client_namespace_selector: ns,
                client_pod_selector: pods,
            }));
            rules(&cc)[1]["from"].clone()
        };
        // Pods only: those pods, in the cluster's namespace.
        assert_eq!(
            client_rule(None, selector("app", "shop")),
            json!([{"podSelector": {"matchLabels": {"app": "shop"}}}])
        );
        // Namespaces only: every pod in those namespaces.
        assert_eq!(
            client_rule(selector("team", "web"), None),
            json!([{"namespaceSelector": {"matchLabels": {"team": "web"}}}])
        );
        // Both: those pods in those namespaces (one peer, both selectors).
        assert_eq!(
            client_rule(selector("team", "web"), selector("app", "shop")),
            json!([{"namespaceSelector": {"matchLabels": {"team": "web"}},
                    "podSelector": {"matchLabels": {"app": "shop"}}}])
        );
        // An empty namespace selector: every namespace.
        assert_eq!(
            client_rule(Some(LabelSelector::default()), None),
            json!([{"namespaceSelector": {}}])
        );
    }
}
