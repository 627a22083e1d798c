//! The nodes' identity: ServiceAccount, Role and RoleBinding `<name>-node`,
//! allowing exactly one thing: reading the cluster's own member-list ConfigMap.

use super::{object_meta, ClusterRef};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kache_cluster::names;

/// ServiceAccount `<name>-node` the cache pods run as.
pub fn node_service_account(cluster: &ClusterRef) -> ServiceAccount {
    ServiceAccount {
        metadata: object_meta(cluster, names::node_service_account_name(&cluster.name)),
        ..ServiceAccount::default()
    }
}

/// Role `<name>-node`: get/list/watch on the `<name>-members` ConfigMap only.
pub fn node_role(cluster: &ClusterRef) -> Role {
    let name = &cluster.name;
    Role {
        metadata: object_meta(cluster, names::node_service_account_name(name)),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(vec![names::members_configmap_name(name)]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    }
}

/// RoleBinding `<name>-node`: binds the Role to the ServiceAccount.
pub fn node_role_binding(cluster: &ClusterRef) -> RoleBinding {
    let sa = names::node_service_account_name(&cluster.name);
    let meta = object_meta(cluster, sa.clone());
    RoleBinding {
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa.clone(),
            namespace: meta.namespace.clone(),
            ..Subject::default()
        }]),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: sa,
        },
        metadata: meta,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::owner;

    #[test]
    fn nodes_may_only_read_their_member_list() {
        let role = node_role(&owner("web"));
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 1);
        let r = &rules[0];
        assert_eq!(r.api_groups, Some(vec![String::new()]));
        assert_eq!(r.resources, Some(vec!["configmaps".to_string()]));
        assert_eq!(r.resource_names, Some(vec!["web-members".to_string()]));
        assert_eq!(r.verbs, ["get", "list", "watch"]);
    }

    #[test]
    fn binding_ties_role_to_service_account() {
        let sa = node_service_account(&owner("web"));
        let rb = node_role_binding(&owner("web"));
        assert_eq!(sa.metadata.name.as_deref(), Some("web-node"));
        assert_eq!(rb.role_ref.kind, "Role");
        assert_eq!(rb.role_ref.name, "web-node");
        let subject = &rb.subjects.unwrap()[0];
        assert_eq!(subject.kind, "ServiceAccount");
        assert_eq!(subject.name, "web-node");
        assert_eq!(subject.namespace.as_deref(), Some("prod"));
    }
}
