//! The headless `<name>-peers` Service and the client Service `<name>`.

use super::{object_meta, ValidCluster};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kache_cluster::names;

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// Headless Service `<name>-peers`: gives every pod the stable DNS name
/// `<pod>.<name>-peers.<namespace>.svc`, including pods that are not Ready yet
/// (nodes must find each other before they are ready).
pub fn peers_service(vc: &ValidCluster) -> Service {
    let name = &vc.cluster.name;
    Service {
        metadata: object_meta(&vc.cluster, names::peers_service_name(name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(names::selector_labels(name)),
            ports: Some(vec![
                service_port(names::PORT_NAME_MEMCACHE, i32::from(vc.spec.port)),
                service_port(names::PORT_NAME_PEER, i32::from(names::PEER_PORT)),
                service_port(names::PORT_NAME_ADMIN, i32::from(names::ADMIN_PORT)),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Client Service `<name>` (ClusterIP): `<name>.<namespace>.svc:<port>` reaches
/// a Ready node.
pub fn client_service(vc: &ValidCluster) -> Service {
    let name = &vc.cluster.name;
    Service {
        metadata: object_meta(&vc.cluster, names::client_service_name(name)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(names::selector_labels(name)),
            ports: Some(vec![service_port(
                names::PORT_NAME_MEMCACHE,
                i32::from(vc.spec.port),
            )]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::valid_cluster;

    #[test]
    fn peers_service_is_headless_and_publishes_not_ready() {
        let svc = peers_service(&valid_cluster("web", Default::default()));
        assert_eq!(svc.metadata.name.as_deref(), Some("web-peers"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector, Some(names::selector_labels("web")));
        let ports: Vec<_> = spec
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("memcache".to_string(), 11211),
                ("peer".to_string(), 11212),
                ("admin".to_string(), 11280)
            ]
        );
    }

    #[test]
    fn client_service_exposes_memcache_port() {
        let cc = valid_cluster(
            "web",
            crate::crd::CacheClusterSpec {
                port: 11300,
                ..Default::default()
            },
        );
        let svc = client_service(&cc);
        assert_eq!(svc.metadata.name.as_deref(), Some("web"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(
            spec.cluster_ip, None,
            "ClusterIP is allocated by the API server"
        );
        let p = &spec.ports.unwrap()[0];
        assert_eq!(p.name.as_deref(), Some("memcache"));
        assert_eq!(p.port, 11300);
        assert_eq!(p.target_port, Some(IntOrString::String("memcache".into())));
    }
}
