//! The Kubernetes Pod Security Standards, "restricted" profile (which
//! includes "baseline"), as of Kubernetes 1.28: a checker for built pod
//! templates, so the tests prove the pods are admitted in namespaces labelled
//! `pod-security.kubernetes.io/enforce=restricted`.
//!
//! Reference: <https://kubernetes.io/docs/concepts/security/pod-security-standards/>.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, PodSecurityContext, PodTemplateSpec, SeccompProfile, SecurityContext,
};

/// Capabilities baseline lets containers add.
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];
/// Sysctls baseline allows.
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
];
/// Volume types restricted allows.
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];
/// SELinux types baseline allows.
const SELINUX_TYPES: &[&str] = &["container_t", "container_init_t", "container_kvm_t"];

fn seccomp_ok(p: Option<&SeccompProfile>) -> Option<bool> {
    p.map(|p| p.type_ == "RuntimeDefault" || p.type_ == "Localhost")
}

/// Every violation of the restricted profile in `template`, as messages
/// naming the rule; empty when the pods are admitted.
pub fn restricted_violations(template: &PodTemplateSpec) -> Vec<String> {
    let mut v = Vec::new();
    let Some(pod) = template.spec.as_ref() else {
        return vec!["no pod spec".into()];
    };
    let psc = pod.security_context.clone().unwrap_or_default();

    // ---- baseline
    if pod.host_network == Some(true) || pod.host_pid == Some(true) || pod.host_ipc == Some(true) {
        v.push("host namespaces: hostNetwork, hostPID and hostIPC must be unset or false".into());
    }
    if psc
        .windows_options
        .as_ref()
        .is_some_and(|w| w.host_process == Some(true))
    {
        v.push("HostProcess: pod windowsOptions.hostProcess must not be true".into());
    }
    pod_selinux(&psc, &mut v);
    if psc
        .seccomp_profile
        .as_ref()
        .is_some_and(|p| p.type_ == "Unconfined")
    {
        v.push("seccomp: the pod's profile must not be Unconfined".into());
    }
    for s in psc.sysctls.iter().flatten() {
        if !SAFE_SYSCTLS.contains(&s.name.as_str()) {
            v.push(format!("sysctls: {} is not a safe sysctl", s.name));
        }
    }
    for (k, val) in template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .into_iter()
        .flatten()
    {
        if k.starts_with("container.apparmor.security.beta.kubernetes.io/")
            && val != "runtime/default"
            && !val.starts_with("localhost/")
        {
            v.push(format!(
                "AppArmor: {k}={val} is not runtime/default or localhost/*"
            ));
        }
    }

    // ---- restricted: volumes
    for vol in pod.volumes.iter().flatten() {
        let json = serde_json::to_value(vol).unwrap_or_default();
        for key in json.as_object().into_iter().flat_map(|o| o.keys()) {
            if key != "name" && !RESTRICTED_VOLUMES.contains(&key.as_str()) {
                v.push(format!("volume types: volume {} is {key}", vol.name));
            }
        }
    }
    if pod
        .ephemeral_containers
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        v.push("ephemeral containers are not built by the operator".into());
    }

    let pod_non_root = psc.run_as_non_root == Some(true);
    if psc.run_as_user == Some(0) {
        v.push("runAsUser: the pod must not run as UID 0".into());
    }
    let pod_seccomp = seccomp_ok(psc.seccomp_profile.as_ref());
    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    for c in containers {
        container_violations(c, pod_non_root, pod_seccomp == Some(true), &mut v);
    }
    v
}

fn pod_selinux(psc: &PodSecurityContext, v: &mut Vec<String>) {
    if let Some(se) = &psc.se_linux_options {
        selinux(se, "pod", v);
    }
}

fn selinux(se: &k8s_openapi::api::core::v1::SELinuxOptions, whose: &str, v: &mut Vec<String>) {
    if se
        .type_
        .as_deref()
        .is_some_and(|t| !t.is_empty() && !SELINUX_TYPES.contains(&t))
        || se.user.as_deref().is_some_and(|u| !u.is_empty())
        || se.role.as_deref().is_some_and(|r| !r.is_empty())
    {
        v.push(format!("SELinux: {whose} options are not allowed"));
    }
}

fn container_violations(c: &Container, pod_non_root: bool, pod_seccomp: bool, v: &mut Vec<String>) {
    let n = &c.name;
    let sc: SecurityContext = c.security_context.clone().unwrap_or_default();
    // baseline
    if sc.privileged == Some(true) {
        v.push(format!("privileged: container {n} must not be privileged"));
    }
    if sc
        .windows_options
        .as_ref()
        .is_some_and(|w| w.host_process == Some(true))
    {
        v.push(format!("HostProcess: container {n}"));
    }
    if c.ports
        .iter()
        .flatten()
        .any(|p| p.host_port.is_some_and(|h| h != 0))
    {
        v.push(format!("host ports: container {n} must not use hostPort"));
    }
    if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
        v.push(format!("/proc mount: container {n} must use Default"));
    }
    if let Some(se) = &sc.se_linux_options {
        selinux(se, &format!("container {n}"), v);
    }
    let caps: Capabilities = sc.capabilities.clone().unwrap_or_default();
    for cap in caps.add.iter().flatten() {
        if !BASELINE_CAPABILITIES.contains(&cap.as_str()) {
            v.push(format!("capabilities: container {n} adds {cap}"));
        }
    }
    // restricted
    if sc.allow_privilege_escalation != Some(false) {
        v.push(format!(
            "privilege escalation: container {n} must set allowPrivilegeEscalation=false"
        ));
    }
    match sc.run_as_non_root {
        Some(false) => v.push(format!("running as non-root: container {n} sets false")),
        None if !pod_non_root => v.push(format!(
            "running as non-root: neither the pod nor container {n} sets runAsNonRoot=true"
        )),
        _ => {}
    }
    if sc.run_as_user == Some(0) {
        v.push(format!("runAsUser: container {n} must not run as UID 0"));
    }
    match seccomp_ok(sc.seccomp_profile.as_ref()) {
        Some(false) => v.push(format!(
            "seccomp: container {n}'s profile must be RuntimeDefault or Localhost"
        )),
        None if !pod_seccomp => v.push(format!(
            "seccomp: neither the pod nor container {n} sets RuntimeDefault or Localhost"
        )),
        _ => {}
    }
    if !caps.drop.iter().flatten().any(|d| d == "ALL") {
        v.push(format!("capabilities: container {n} must drop ALL"));
    }
    for cap in caps.add.iter().flatten() {
        if cap != "NET_BIND_SERVICE" {
            v.push(format!(
                "capabilities: container {n} may add only NET_BIND_SERVICE, adds {cap}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::statefulset;
    use crate::crd::CacheClusterSpec;
    use crate::fixtures::{secure_spec, valid_cluster};
    use k8s_openapi::api::core::v1::{HostPathVolumeSource, Volume};

    fn template(spec: CacheClusterSpec) -> PodTemplateSpec {
        statefulset(&valid_cluster("web", spec), "img:1")
            .spec
            .unwrap()
            .template
    }

    #[test]
    fn built_pods_meet_the_restricted_standard() {
        for spec in [CacheClusterSpec::default(), secure_spec()] {
            let t = template(spec);
            assert_eq!(restricted_violations(&t), Vec::<String>::new());
        }
    }

    #[test]
    fn the_checker_catches_violations() {
        // Each mutation breaks one rule; the checker must notice every one.
        type Mutation = fn(&mut PodTemplateSpec);
        let cases: [(Mutation, &str); 8] = [
            (
                |t| t.spec.as_mut().unwrap().host_network = Some(true),
                "host namespaces",
            ),
            (
                |t| {
                    t.spec.as_mut().unwrap().volumes = Some(vec![Volume {
                        name: "h".into(),
                        host_path: Some(HostPathVolumeSource {
                            path: "/".into(),
                            type_: None,
                        }),
                        ..Default::default()
                    }]);
                },
                "volume types",
            ),
            (
                |t| {
                    let c = &mut t.spec.as_mut().unwrap().containers[0];
                    c.security_context
                        .as_mut()
                        .unwrap()
                        .allow_privilege_escalation = None;
                },
                "privilege escalation",
            ),
            (
                |t| {
                    let p = t.spec.as_mut().unwrap();
                    p.security_context.as_mut().unwrap().run_as_non_root = None;
                    p.containers[0]
                        .security_context
                        .as_mut()
                        .unwrap()
                        .run_as_non_root = None;
                },
                "running as non-root",
            ),
            (
                |t| {
                    let p = t.spec.as_mut().unwrap();
                    p.security_context.as_mut().unwrap().seccomp_profile = None;
                },
                "seccomp",
            ),
            (
                |t| {
                    let c = &mut t.spec.as_mut().unwrap().containers[0];
                    c.security_context.as_mut().unwrap().capabilities = None;
                },
                "must drop ALL",
            ),
            (
                |t| {
                    let c = &mut t.spec.as_mut().unwrap().containers[0];
                    c.security_context.as_mut().unwrap().privileged = Some(true);
                },
                "privileged",
            ),
            (
                |t| {
                    let c = &mut t.spec.as_mut().unwrap().containers[0];
                    c.ports.as_mut().unwrap()[0].host_port = Some(11211);
                },
                "host ports",
            ),
        ];
        for (mutate, rule) in cases {
            let mut t = template(secure_spec());
            mutate(&mut t);
            let v = restricted_violations(&t);
            assert!(v.iter().any(|m| m.contains(rule)), "{rule}: {v:?}");
        }
    }
}
