//! The ConfigMap `<name>-members`: the published member list.

use super::{object_meta, BuildError, ClusterRef};
use k8s_openapi::api::core::v1::ConfigMap;
use kache_cluster::{names, MemberList};
use std::collections::BTreeMap;

/// The member list in both forms: JSON under `members.json` and the
/// ElastiCache `config get cluster` payload under `cluster-config`. The
/// version is also an annotation, so `kubectl get -o yaml` shows it at a glance.
pub fn members_configmap(cluster: &ClusterRef, list: &MemberList) -> Result<ConfigMap, BuildError> {
    let mut metadata = object_meta(cluster, names::members_configmap_name(&cluster.name));
    metadata.annotations = Some(BTreeMap::from([(
        names::CONFIG_VERSION_ANNOTATION.to_string(),
        list.version.to_string(),
    )]));
    Ok(ConfigMap {
        metadata,
        data: Some(BTreeMap::from([
            (names::MEMBERS_JSON_KEY.to_string(), list.to_json()?),
            (
                names::CLUSTER_CONFIG_KEY.to_string(),
                list.elasticache_payload(),
            ),
        ])),
        ..ConfigMap::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::owner;
    use kache_cluster::Member;

    #[test]
    fn both_forms_carry_the_same_list() {
        let list = MemberList {
            version: 4,
            replication_factor: 1,
            members: vec![Member {
                name: "web-0".into(),
                host: "web-0.web-peers.prod.svc".into(),
                ip: "10.0.0.7".into(),
                port: 11211,
                peer_port: 11212,
            }],
        };
        let cm = members_configmap(&owner("web"), &list).unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("web-members"));
        assert_eq!(
            cm.metadata.annotations.as_ref().unwrap()[names::CONFIG_VERSION_ANNOTATION],
            "4"
        );
        let data = cm.data.unwrap();
        assert_eq!(MemberList::from_json(&data["members.json"]).unwrap(), list);
        assert_eq!(
            data["cluster-config"],
            "4\nweb-0.web-peers.prod.svc|10.0.0.7|11211\n"
        );
    }
}
