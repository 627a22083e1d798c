//! The StatefulSet `<name>` of kache-node pods.

use super::{object_meta, ValidCluster};
use crate::crd::defaults::{memory_file_mib, SHUTDOWN_DELAY_SECONDS};
use crate::crd::ValidSpec;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, SeccompProfile, SecretVolumeSource, SecurityContext, TopologySpreadConstraint, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kache_cluster::names;

/// Name of the cache container in every pod.
pub const CONTAINER_NAME: &str = "kache-node";
/// UID and GID the nodes run as (distroless `nonroot`).
pub const RUN_AS_USER: i64 = 65532;

/// Where the `spec.tls` Secret is mounted.
pub const TLS_DIR: &str = "/etc/kache/tls";
/// Where the `spec.tls` Secret's optional `ca.crt` is mounted without
/// `clientAuth` (a volume of its own, so a Secret without it still mounts).
pub const TLS_CA_DIR: &str = "/etc/kache/tls-ca";
/// Where the `spec.auth` Secret is mounted.
pub const AUTH_DIR: &str = "/etc/kache/auth";
/// Where the `spec.peerAuth` Secret is mounted.
pub const PEER_SECRET_DIR: &str = "/etc/kache/peer";
/// Where the in-memory `emptyDir` holding the `--memory-file` is mounted.
pub const MEMORY_FILE_DIR: &str = "/var/lib/kache";
/// The `--memory-file` in it.
pub const MEMORY_FILE: &str = "/var/lib/kache/memory";
/// Name of that volume.
pub const MEMORY_FILE_VOLUME: &str = "memory-file";
/// Mode of every mounted Secret file: read-only, for the owner (root) and
/// the group (`fsGroup`, the nodes' GID) only.
pub const SECRET_FILE_MODE: i32 = 0o440;

/// Keys of the `spec.tls` Secret (those of a `kubernetes.io/tls` Secret).
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Private-key key of the `spec.tls` Secret.
pub const TLS_KEY_KEY: &str = "tls.key";
/// CA-bundle key of the `spec.tls` Secret: required with `clientAuth`,
/// optional without (it then only verifies peers).
pub const TLS_CA_KEY: &str = "ca.crt";
/// Key of the `spec.auth` Secret: memcached's `user:password` lines.
pub const AUTH_FILE_KEY: &str = "auth-file";
/// Key of the `spec.peerAuth` Secret: the shared peer secret.
pub const PEER_SECRET_KEY: &str = "secret";

/// One Secret the pods mount: volume name, Secret name, mount directory, and
/// the keys it maps to files of the same name, each with the kache-node flag
/// that names the file.
struct SecretMount {
    volume: &'static str,
    secret: String,
    dir: &'static str,
    keys: Vec<(&'static str, &'static str)>,
    /// Whether the pod starts without the keys (kache-node then does without
    /// the files).
    optional: bool,
}

impl SecretMount {
    fn path(&self, key: &str) -> String {
        format!("{}/{key}", self.dir)
    }

    fn volume(&self) -> Volume {
        Volume {
            name: self.volume.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(self.secret.clone()),
                default_mode: Some(SECRET_FILE_MODE),
                // Unless optional, a missing key fails the mount: the pod
                // does not start without the files its flags name. An
                // optional key that is missing is skipped (no file).
                items: Some(
                    self.keys
                        .iter()
                        .map(|(k, _)| KeyToPath {
                            key: (*k).into(),
                            path: (*k).into(),
                            mode: None,
                        })
                        .collect(),
                ),
                optional: Some(self.optional),
            }),
            ..Volume::default()
        }
    }

    fn mount(&self) -> VolumeMount {
        // A whole-directory mount (no subPath): the kubelet updates the files
        // when the Secret changes, and kache-node reloads certificates.
        VolumeMount {
            name: self.volume.into(),
            mount_path: self.dir.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }
    }
}

/// The Secrets `spec.tls`, `spec.auth` and `spec.peerAuth` name, mounted by
/// name: the operator never reads them.
fn secret_mounts(s: &ValidSpec) -> Vec<SecretMount> {
    let mut mounts = Vec::new();
    if let Some(tls) = &s.tls {
        // The certificate serves the memcache port and the peer port, and
        // the nodes present it to each other.
        let mut keys = vec![(TLS_CERT_KEY, "--tls-cert"), (TLS_KEY_KEY, "--tls-key")];
        if tls.client_auth {
            // Required, and it also verifies peers (kache-node's default).
            keys.push((TLS_CA_KEY, "--tls-client-ca"));
        }
        mounts.push(SecretMount {
            volume: "tls",
            secret: tls.secret_name.clone(),
            dir: TLS_DIR,
            keys,
            optional: false,
        });
        if !tls.client_auth {
            // Verifies peers when the Secret has it; without it a node trusts
            // only peers presenting its own certificate (they share it).
            mounts.push(SecretMount {
                volume: "tls-ca",
                secret: tls.secret_name.clone(),
                dir: TLS_CA_DIR,
                keys: vec![(TLS_CA_KEY, "--peer-tls-ca")],
                optional: true,
            });
        }
    }
    if let Some(auth) = &s.auth_secret {
        mounts.push(SecretMount {
            volume: "auth",
            secret: auth.clone(),
            dir: AUTH_DIR,
            keys: vec![(AUTH_FILE_KEY, "--auth-file")],
            optional: false,
        });
    }
    if let Some(peer) = &s.peer_secret {
        mounts.push(SecretMount {
            volume: "peer-secret",
            secret: peer.clone(),
            dir: PEER_SECRET_DIR,
            keys: vec![(PEER_SECRET_KEY, "--peer-secret-file")],
            optional: false,
        });
    }
    mounts
}

/// The security flags: the files of the mounted Secrets.
fn security_args(s: &ValidSpec) -> Vec<String> {
    let mut args = Vec::new();
    for m in secret_mounts(s) {
        for (key, flag) in &m.keys {
            args.push((*flag).to_string());
            args.push(m.path(key));
        }
    }
    args
}

/// kache-node's command line, derived from the spec; `extraArgs` come last.
pub fn container_args(vc: &ValidCluster) -> Vec<String> {
    let s = &vc.spec;
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        "0.0.0.0".into(),
        "--port".into(),
        s.port.to_string(),
        "--memory-limit".into(),
        s.memory_mib.to_string(),
        "--conn-limit".into(),
        s.max_connections.to_string(),
        "--threads".into(),
        s.threads.to_string(),
        "--max-item-size".into(),
        s.max_item_size_text.clone(),
        "--admin-port".into(),
        names::ADMIN_PORT.to_string(),
        "--peer-port".into(),
        names::PEER_PORT.to_string(),
        "--shutdown-delay".into(),
        SHUTDOWN_DELAY_SECONDS.to_string(),
        "--cluster".into(),
        vc.cluster.name.clone(),
    ];
    args.extend(security_args(s));
    if s.memory_file {
        args.push("--memory-file".into());
        args.push(MEMORY_FILE.into());
    }
    for (flag, value) in &s.replication_flags {
        args.extend([flag.to_string(), value.clone()]);
    }
    args.extend(s.extra_args.iter().cloned());
    args
}

/// The in-memory `emptyDir` for the memory file (its pages count as the pod's memory).
fn memory_file_volume(memory_mib: u32) -> Volume {
    Volume {
        name: MEMORY_FILE_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity(format!("{}Mi", memory_file_mib(memory_mib)))),
        }),
        ..Volume::default()
    }
}

fn default_topology_spread(cluster: &str) -> Vec<TopologySpreadConstraint> {
    vec![TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "kubernetes.io/hostname".into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(names::selector_labels(cluster)),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    }]
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(names::PORT_NAME_ADMIN.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// The StatefulSet `<name>`: one kache-node pod per replica, each with a
/// stable DNS name behind the `<name>-peers` headless Service.
pub fn statefulset(vc: &ValidCluster, default_image: &str) -> StatefulSet {
    let name = &vc.cluster.name;
    let spec = &vc.spec;
    let selector = names::selector_labels(name);
    let mounts = secret_mounts(spec);
    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(spec.image.as_deref().unwrap_or(default_image).to_string()),
        args: Some(container_args(vc)),
        env: Some(vec![
            field_env(names::ENV_POD_NAME, "metadata.name"),
            field_env(names::ENV_POD_NAMESPACE, "metadata.namespace"),
        ]),
        ports: Some(vec![
            port(names::PORT_NAME_MEMCACHE, i32::from(spec.port)),
            port(names::PORT_NAME_PEER, i32::from(names::PEER_PORT)),
            port(names::PORT_NAME_ADMIN, i32::from(names::ADMIN_PORT)),
        ]),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(5),
            ..http_probe("/healthz", 10, 3)
        }),
        resources: Some(spec.resources.clone()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            run_as_group: Some(RUN_AS_USER),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: {
            let mut all: Vec<VolumeMount> = mounts.iter().map(SecretMount::mount).collect();
            if spec.memory_file {
                all.push(VolumeMount {
                    name: MEMORY_FILE_VOLUME.into(),
                    mount_path: MEMORY_FILE_DIR.into(),
                    ..VolumeMount::default()
                });
            }
            (!all.is_empty()).then_some(all)
        },
        ..Container::default()
    };
    let pod_spec = PodSpec {
        service_account_name: Some(names::node_service_account_name(name)),
        automount_service_account_token: Some(true),
        termination_grace_period_seconds: Some(spec.termination_grace_period_seconds),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            run_as_group: Some(RUN_AS_USER),
            fs_group: Some(RUN_AS_USER),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: {
            let mut all: Vec<Volume> = mounts.iter().map(SecretMount::volume).collect();
            if spec.memory_file {
                all.push(memory_file_volume(spec.memory_mib));
            }
            (!all.is_empty()).then_some(all)
        },
        node_selector: spec.scheduling.node_selector.clone(),
        tolerations: spec.scheduling.tolerations.clone(),
        affinity: spec.scheduling.affinity.clone(),
        topology_spread_constraints: Some(
            spec.scheduling
                .topology_spread_constraints
                .clone()
                .unwrap_or_else(|| default_topology_spread(name)),
        ),
        priority_class_name: spec.scheduling.priority_class_name.clone(),
        ..PodSpec::default()
    };
    let template_labels = names::common_labels(name);
    StatefulSet {
        metadata: object_meta(&vc.cluster, name.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas_i32()),
            service_name: names::peers_service_name(name),
            // Cache nodes are independent: start and stop them all at once.
            pod_management_policy: Some("Parallel".into()),
            // The operator restarts the pods itself, one at a time and only
            // once the one before holds its share again (see `crate::roll`):
            // the StatefulSet controller would roll on readiness alone.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                rolling_update: None,
            }),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(template_labels),
                    annotations: spec.scheduling.pod_annotations.clone(),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::defaults::default_resources;
    use crate::crd::defaults::{EXIT_SECONDS, NODE_SHUTDOWN_GRACE_SECONDS};
    use crate::crd::CacheClusterSpec;
    use crate::fixtures::valid_cluster;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use std::collections::BTreeMap;

    fn pod_spec(sts: &StatefulSet) -> &PodSpec {
        sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn defaults_give_three_hardened_nodes() {
        let cc = valid_cluster("web", CacheClusterSpec::default());
        let sts = statefulset(&cc, "img:1");
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(sts.metadata.name.as_deref(), Some("web"));
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name, "web-peers");
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            spec.selector.match_labels.as_ref(),
            Some(&names::selector_labels("web"))
        );
        let labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        for (k, v) in names::selector_labels("web") {
            assert_eq!(labels.get(&k), Some(&v), "template must match selector");
        }

        let pod = pod_spec(&sts);
        assert_eq!(pod.service_account_name.as_deref(), Some("web-node"));
        assert_eq!(pod.termination_grace_period_seconds, Some(60));
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );

        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("img:1"));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".into()])
        );

        let ports: Vec<_> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref().unwrap(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [("memcache", 11211), ("peer", 11212), ("admin", 11280)]
        );

        let env: Vec<_> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(env, ["POD_NAME", "POD_NAMESPACE"]);

        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(ready.port, IntOrString::String("admin".into()));
        let live = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));

        // 64 MiB cache (in the memory file, with 1 MiB for its table) + 64 MiB minimum
        // headroom.
        let res = c.resources.as_ref().unwrap();
        assert_eq!(
            res.limits.as_ref().unwrap()["memory"],
            Quantity("129Mi".into())
        );
        assert_eq!(
            res.requests.as_ref().unwrap()["memory"],
            Quantity("129Mi".into())
        );
        assert_eq!(
            res.requests.as_ref().unwrap()["cpu"],
            Quantity("400m".into())
        );
        assert!(!res.limits.as_ref().unwrap().contains_key("cpu"));

        let tsc = &pod.topology_spread_constraints.as_ref().unwrap()[0];
        assert_eq!(tsc.topology_key, "kubernetes.io/hostname");
        assert_eq!(tsc.when_unsatisfiable, "ScheduleAnyway");
    }

    #[test]
    fn args_come_from_the_spec() {
        let cc = valid_cluster(
            "web",
            CacheClusterSpec {
                memory_mib: 1024,
                max_item_size: "4m".into(),
                threads: 8,
                max_connections: 4096,
                port: 11300,
                extra_args: vec!["-v".into()],
                ..Default::default()
            },
        );
        assert_eq!(
            container_args(&cc).join(" "),
            "serve --listen 0.0.0.0 --port 11300 --memory-limit 1024 --conn-limit 4096 \
             --threads 8 --max-item-size 4m --admin-port 11280 --peer-port 11212 \
             --shutdown-delay 5 --cluster web --memory-file /var/lib/kache/memory -v"
        );
    }

    #[test]
    fn the_grace_period_covers_the_shutdown_delay_and_grace() {
        let with = |extra: &[&str]| {
            let cc = valid_cluster(
                "web",
                CacheClusterSpec {
                    extra_args: extra.iter().map(ToString::to_string).collect(),
                    ..Default::default()
                },
            );
            pod_spec(&statefulset(&cc, "img:1")).termination_grace_period_seconds
        };
        // 5 s delay + the node's default 10 s grace + exit fit in the 60 s floor.
        assert_eq!(with(&[]), Some(60));
        const { assert!(SHUTDOWN_DELAY_SECONDS + NODE_SHUTDOWN_GRACE_SECONDS + EXIT_SECONDS <= 60) };
        // A longer --shutdown-grace in extraArgs, in either spelling, extends it.
        assert_eq!(with(&["-v", "--shutdown-grace", "100"]), Some(110));
        assert_eq!(with(&["--shutdown-grace=70"]), Some(80));
    }

    fn secure(client_auth: bool) -> CacheClusterSpec {
        use crate::crd::PersistenceConfig;
        use crate::crd::{AuthConfig, PeerAuthConfig, TlsConfig};
        CacheClusterSpec {
            tls: Some(TlsConfig {
                secret_name: "web-tls".into(),
                client_auth,
            }),
            auth: Some(AuthConfig {
                secret_name: "web-auth".into(),
            }),
            peer_auth: Some(PeerAuthConfig {
                secret_name: "web-peer".into(),
            }),
            extra_args: vec!["-v".into()],
            // The memory file has tests of its own.
            persistence: PersistenceConfig { enabled: false },
            ..Default::default()
        }
    }

    fn without_memory_file() -> CacheClusterSpec {
        use crate::crd::PersistenceConfig;
        CacheClusterSpec {
            persistence: PersistenceConfig { enabled: false },
            ..Default::default()
        }
    }

    #[test]
    fn the_memory_file_is_on_an_in_memory_empty_dir_unless_switched_off() {
        let sts = statefulset(&valid_cluster("web", Default::default()), "img:1");
        let pod = pod_spec(&sts);
        let volumes = serde_json::to_value(pod.volumes.as_ref().unwrap()).unwrap();
        assert_eq!(
            volumes,
            serde_json::json!([
                {"name": "memory-file", "emptyDir": {"medium": "Memory", "sizeLimit": "65Mi"}},
            ])
        );
        let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (
                mount.name.as_str(),
                mount.mount_path.as_str(),
                mount.read_only
            ),
            ("memory-file", MEMORY_FILE_DIR, None)
        );
        let args = container_args(&valid_cluster("web", Default::default())).join(" ");
        assert!(
            args.ends_with("--memory-file /var/lib/kache/memory"),
            "{args}"
        );
        // Switched off: no flag, no volume, and the limit counts no file.
        let off = valid_cluster("web", without_memory_file());
        assert!(!container_args(&off).join(" ").contains("--memory-file"));
        let pod = pod_spec(&statefulset(&off, "img:1")).clone();
        assert_eq!(pod.volumes, None);
        let limit = &pod.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()["memory"];
        assert_eq!(limit, &Quantity("128Mi".into()));
        assert_eq!(memory_file_mib(1 << 20), (1 << 20) + 64 + 1);
    }

    #[test]
    fn security_flags_name_the_mounted_files() {
        let args = container_args(&valid_cluster("web", secure(true))).join(" ");
        assert!(
            args.ends_with(
                "--cluster web --tls-cert /etc/kache/tls/tls.crt --tls-key /etc/kache/tls/tls.key \
                 --tls-client-ca /etc/kache/tls/ca.crt --auth-file /etc/kache/auth/auth-file \
                 --peer-secret-file /etc/kache/peer/secret -v"
            ),
            "{args}"
        );
        // With clientAuth the client CA also verifies peers: no peer CA flag.
        assert!(!args.contains("--peer-tls-ca"), "{args}");
        // Without clientAuth no client CA, but the optional CA verifies peers;
        // without the sections no flags at all.
        let args = container_args(&valid_cluster("web", secure(false))).join(" ");
        assert!(!args.contains("--tls-client-ca"), "{args}");
        assert!(
            args.contains(
                "--tls-cert /etc/kache/tls/tls.crt --tls-key /etc/kache/tls/tls.key \
                 --peer-tls-ca /etc/kache/tls-ca/ca.crt --auth-file"
            ),
            "{args}"
        );
        let plain = container_args(&valid_cluster("web", without_memory_file())).join(" ");
        for flag in ["--tls", "--auth-file", "--peer-secret-file"] {
            assert!(!plain.contains(flag), "{plain}");
        }
        let only_peer = CacheClusterSpec {
            peer_auth: secure(false).peer_auth,
            ..without_memory_file()
        };
        let args = container_args(&valid_cluster("web", only_peer)).join(" ");
        assert!(
            args.ends_with("--cluster web --peer-secret-file /etc/kache/peer/secret"),
            "{args}"
        );
    }

    #[test]
    fn secrets_are_mounted_read_only_by_name() {
        let sts = statefulset(&valid_cluster("web", secure(true)), "img:1");
        let pod = pod_spec(&sts);
        let volumes = serde_json::to_value(pod.volumes.as_ref().unwrap()).unwrap();
        assert_eq!(
            volumes,
            serde_json::json!([
                {"name": "tls", "secret": {"secretName": "web-tls", "defaultMode": 0o440,
                    "optional": false, "items": [
                        {"key": "tls.crt", "path": "tls.crt"},
                        {"key": "tls.key", "path": "tls.key"},
                        {"key": "ca.crt", "path": "ca.crt"}]}},
                {"name": "auth", "secret": {"secretName": "web-auth", "defaultMode": 0o440,
                    "optional": false, "items": [{"key": "auth-file", "path": "auth-file"}]}},
                {"name": "peer-secret", "secret": {"secretName": "web-peer", "defaultMode": 0o440,
                    "optional": false, "items": [{"key": "secret", "path": "secret"}]}},
            ])
        );
        let mounts: Vec<_> = pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m.read_only, Some(true));
                assert_eq!(m.sub_path, None, "subPath mounts are never updated");
                (m.name.as_str(), m.mount_path.as_str())
            })
            .collect();
        assert_eq!(
            mounts,
            [
                ("tls", "/etc/kache/tls"),
                ("auth", "/etc/kache/auth"),
                ("peer-secret", "/etc/kache/peer")
            ]
        );
        // fsGroup makes the 0440 files readable by the nodes' group.
        assert_eq!(
            pod.security_context.as_ref().unwrap().fs_group,
            Some(RUN_AS_USER)
        );
        // Without clientAuth the Secret need not have the CA: it is not in the
        // required volume but in an optional one of its own, for the peers.
        let sts = statefulset(&valid_cluster("web", secure(false)), "img:1");
        let pod = pod_spec(&sts);
        let volumes = serde_json::to_value(&pod.volumes.as_ref().unwrap()[..2]).unwrap();
        assert_eq!(
            volumes,
            serde_json::json!([
                {"name": "tls", "secret": {"secretName": "web-tls", "defaultMode": 0o440,
                    "optional": false, "items": [
                        {"key": "tls.crt", "path": "tls.crt"},
                        {"key": "tls.key", "path": "tls.key"}]}},
                {"name": "tls-ca", "secret": {"secretName": "web-tls", "defaultMode": 0o440,
                    "optional": true, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            ])
        );
        let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[1];
        assert_eq!(
            (
                mount.name.as_str(),
                mount.mount_path.as_str(),
                mount.read_only
            ),
            ("tls-ca", "/etc/kache/tls-ca", Some(true))
        );
        assert_eq!(mount.sub_path, None);
        // No security settings: no volumes, no mounts.
        let sts = statefulset(&valid_cluster("web", without_memory_file()), "img:1");
        assert_eq!(pod_spec(&sts).volumes, None);
        assert_eq!(pod_spec(&sts).containers[0].volume_mounts, None);
    }

    #[test]
    fn changing_a_secret_name_rolls_the_pods() {
        let a = statefulset(&valid_cluster("web", secure(false)), "img:1");
        let mut spec = secure(false);
        spec.auth.as_mut().unwrap().secret_name = "web-auth-2".into();
        let b = statefulset(&valid_cluster("web", spec), "img:1");
        assert_ne!(a.spec.unwrap().template, b.spec.unwrap().template);
    }

    #[test]
    fn headroom_scales_with_memory() {
        let r = default_resources(4096, 2, false);
        assert_eq!(r.limits.unwrap()["memory"], Quantity("5120Mi".into()));
        assert_eq!(r.requests.unwrap()["cpu"], Quantity("200m".into()));
    }

    #[test]
    fn scheduling_overrides_are_passed_through() {
        let custom_tsc = TopologySpreadConstraint {
            max_skew: 2,
            topology_key: "topology.kubernetes.io/zone".into(),
            when_unsatisfiable: "DoNotSchedule".into(),
            ..Default::default()
        };
        let resources = ResourceRequirements {
            limits: Some(BTreeMap::from([("memory".into(), Quantity("1Gi".into()))])),
            ..Default::default()
        };
        let cc = valid_cluster(
            "web",
            CacheClusterSpec {
                image: Some("mine:2".into()),
                node_selector: Some(BTreeMap::from([("pool".into(), "cache".into())])),
                priority_class_name: Some("high".into()),
                pod_annotations: Some(BTreeMap::from([("a".into(), "b".into())])),
                topology_spread_constraints: Some(vec![custom_tsc.clone()]),
                resources: Some(resources.clone()),
                ..Default::default()
            },
        );
        let sts = statefulset(&cc, "img:1");
        let tmpl = &sts.spec.as_ref().unwrap().template;
        assert_eq!(
            tmpl.metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()["a"],
            "b"
        );
        let pod = pod_spec(&sts);
        assert_eq!(pod.containers[0].image.as_deref(), Some("mine:2"));
        assert_eq!(pod.containers[0].resources.as_ref(), Some(&resources));
        assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "cache");
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        assert_eq!(pod.topology_spread_constraints, Some(vec![custom_tsc]));
    }

    #[test]
    fn spec_change_changes_the_pod_template() {
        let a = statefulset(&valid_cluster("web", Default::default()), "img:1");
        let b = statefulset(
            &valid_cluster(
                "web",
                CacheClusterSpec {
                    memory_mib: 128,
                    ..Default::default()
                },
            ),
            "img:1",
        );
        assert_ne!(
            a.spec.as_ref().unwrap().template,
            b.spec.as_ref().unwrap().template,
            "a changed template is what makes the StatefulSet roll"
        );
        // Only replicas changing must not roll the pods.
        let c = statefulset(
            &valid_cluster(
                "web",
                CacheClusterSpec {
                    replicas: 5,
                    ..Default::default()
                },
            ),
            "img:1",
        );
        assert_eq!(
            a.spec.as_ref().unwrap().template,
            c.spec.as_ref().unwrap().template
        );
    }
}
