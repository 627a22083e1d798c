#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Golden-file tests: the objects built for `examples/cachecluster.yaml` must
//! match `operator/tests/fixtures/my-cache.yaml` exactly, so every change to
//! what the operator applies shows up in review.
//!
//! After an intended change, regenerate the fixture with
//! `KACHE_UPDATE_FIXTURES=1 cargo test -p kache-operator --test builders`.

use kache_cluster::{Member, MemberList};
use kache_operator::build;
use kache_operator::crd::CacheCluster;
use std::path::PathBuf;

/// What the builders take for `cc`, which must be valid.
fn desired(cc: &CacheCluster) -> build::ValidCluster {
    build::ValidCluster::new(cc, cc.spec.validate().unwrap()).unwrap()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The example, as the API server would hand it to the operator.
fn example() -> CacheCluster {
    let text = std::fs::read_to_string(root().join("examples/cachecluster.yaml")).unwrap();
    let mut cc: CacheCluster = serde_yaml::from_str(&text).unwrap();
    cc.metadata.namespace = Some("default".into());
    cc.metadata.uid = Some("00000000-0000-4000-8000-000000000001".into());
    cc.metadata.generation = Some(1);
    cc
}

#[test]
fn example_is_a_valid_minimal_cachecluster() {
    let cc = example();
    assert_eq!(cc.metadata.name.as_deref(), Some("my-cache"));
    assert!(cc.spec.validate().is_ok(), "{:?}", cc.spec.validate());
    assert_eq!(cc.spec.replicas, 3);
    assert_eq!(cc.spec.memory_mib, 64);
}

#[test]
fn built_objects_match_fixture() {
    let cc = example();
    let list = MemberList {
        version: 2,
        replication_factor: 1,
        members: vec![Member {
            name: "my-cache-0".into(),
            host: "my-cache-0.my-cache-peers.default.svc".into(),
            ip: "10.244.0.5".into(),
            port: 11211,
            peer_port: 11212,
        }],
    };
    let docs = [
        serde_yaml::to_string(&build::node_service_account(&desired(&cc).cluster)).unwrap(),
        serde_yaml::to_string(&build::node_role(&desired(&cc).cluster)).unwrap(),
        serde_yaml::to_string(&build::node_role_binding(&desired(&cc).cluster)).unwrap(),
        serde_yaml::to_string(&build::peers_service(&desired(&cc))).unwrap(),
        serde_yaml::to_string(&build::client_service(&desired(&cc))).unwrap(),
        serde_yaml::to_string(&build::members_configmap(&desired(&cc).cluster, &list).unwrap())
            .unwrap(),
        serde_yaml::to_string(&build::statefulset(
            &desired(&cc),
            "ghcr.io/kache-dev/kache-node:0.1.0",
        ))
        .unwrap(),
        serde_yaml::to_string(&build::pod_disruption_budget(&desired(&cc))).unwrap(),
    ];
    let rendered = format!(
        "# Objects the operator applies for examples/cachecluster.yaml (golden file).\n\
         # Regenerate: KACHE_UPDATE_FIXTURES=1 cargo test -p kache-operator --test builders\n---\n{}",
        docs.join("---\n")
    );
    let path = root().join("operator/tests/fixtures/my-cache.yaml");
    if std::env::var_os("KACHE_UPDATE_FIXTURES").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == rendered,
        "{} is out of date; regenerate it with\n  KACHE_UPDATE_FIXTURES=1 cargo test -p kache-operator --test builders\n\
         rendered:\n{rendered}",
        path.display()
    );
}

/// `examples/cachecluster-secure.yaml`: its Secrets and its CacheCluster.
fn secure_example() -> (Vec<k8s_openapi::api::core::v1::Secret>, CacheCluster) {
    use serde::Deserialize;
    let text = std::fs::read_to_string(root().join("examples/cachecluster-secure.yaml")).unwrap();
    let mut secrets = Vec::new();
    let mut cluster = None;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        match v["kind"].as_str().unwrap() {
            "Secret" => secrets.push(serde_yaml::from_value(v).unwrap()),
            "CacheCluster" => cluster = Some(serde_yaml::from_value::<CacheCluster>(v).unwrap()),
            other => panic!("unexpected {other} in the secure example"),
        }
    }
    let mut cc = cluster.expect("a CacheCluster");
    cc.metadata.namespace = Some("default".into());
    cc.metadata.uid = Some("00000000-0000-4000-8000-000000000002".into());
    cc.metadata.generation = Some(1);
    (secrets, cc)
}

#[test]
fn secure_example_uses_every_security_setting_and_its_secrets_fit() {
    let (secrets, cc) = secure_example();
    assert!(cc.spec.validate().is_ok(), "{:?}", cc.spec.validate());
    let s = &cc.spec;
    let tls = s.tls.as_ref().expect("tls");
    assert!(tls.client_auth);
    let np = s.network_policy.as_ref().expect("networkPolicy");
    assert!(
        np.enabled && np.client_namespace_selector.is_some() && np.client_pod_selector.is_some()
    );
    // Every Secret the spec names exists in the file with the keys mounted.
    let keys = |name: &str| -> Vec<String> {
        let secret = secrets
            .iter()
            .find(|x| x.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("the example lacks Secret {name}"));
        secret.string_data.clone().unwrap().into_keys().collect()
    };
    assert_eq!(keys(&tls.secret_name), ["ca.crt", "tls.crt", "tls.key"]);
    assert_eq!(keys(&s.auth.as_ref().unwrap().secret_name), ["auth-file"]);
    assert_eq!(keys(&s.peer_auth.as_ref().unwrap().secret_name), ["secret"]);
    // The secrets are placeholders, never real key material.
    for secret in &secrets {
        for v in secret.string_data.as_ref().unwrap().values() {
            assert!(v.contains("placeholder"), "{v}");
        }
    }
}

#[test]
fn secure_example_objects_match_fixture() {
    let (_, cc) = secure_example();
    let docs = [
        serde_yaml::to_string(&build::statefulset(
            &desired(&cc),
            "ghcr.io/kache-dev/kache-node:0.1.0",
        ))
        .unwrap(),
        serde_yaml::to_string(&build::network_policy(&desired(&cc), "kache-system").unwrap())
            .unwrap(),
    ];
    let rendered = format!(
        "# StatefulSet and NetworkPolicy the operator applies for examples/cachecluster-secure.yaml\n\
         # (operator namespace kache-system; golden file).\n\
         # Regenerate: KACHE_UPDATE_FIXTURES=1 cargo test -p kache-operator --test builders\n---\n{}",
        docs.join("---\n")
    );
    let path = root().join("operator/tests/fixtures/secure-cache.yaml");
    if std::env::var_os("KACHE_UPDATE_FIXTURES").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == rendered,
        "{} is out of date; regenerate it with\n  KACHE_UPDATE_FIXTURES=1 cargo test -p kache-operator --test builders\n\
         rendered:\n{rendered}",
        path.display()
    );
}

#[test]
fn without_client_auth_the_ca_is_mounted_optionally_for_peer_tls() {
    let (secrets, mut cc) = secure_example();
    cc.spec.tls.as_mut().unwrap().client_auth = false;
    let sts = build::statefulset(&desired(&cc), "ghcr.io/kache-dev/kache-node:0.1.0");
    let pod = sts.spec.unwrap().template.spec.unwrap();
    let args = pod.containers[0].args.clone().unwrap().join(" ");
    assert!(!args.contains("--tls-client-ca"), "{args}");
    assert!(
        args.contains("--peer-tls-ca /etc/kache/tls-ca/ca.crt"),
        "{args}"
    );
    // The keys a pod cannot start without, per Secret, and the optional ones.
    let mut required = Vec::new();
    let mut optional = Vec::new();
    // (The memory file's emptyDir is no Secret.)
    for volume in pod
        .volumes
        .unwrap()
        .into_iter()
        .filter(|v| v.secret.is_some())
    {
        let secret = volume.secret.unwrap();
        let name = secret.secret_name.unwrap();
        for item in secret.items.unwrap() {
            let entry = (name.clone(), item.key);
            if secret.optional == Some(true) {
                optional.push(entry);
            } else {
                required.push(entry);
            }
        }
    }
    let tls = "secure-cache-tls".to_string();
    assert_eq!(optional, [(tls.clone(), "ca.crt".to_string())]);
    // A plain `kubectl create secret tls` Secret (no ca.crt) is enough to start.
    let tls_required: Vec<_> = required.iter().filter(|(s, _)| *s == tls).collect();
    assert_eq!(
        tls_required,
        [
            &(tls.clone(), "tls.crt".to_string()),
            &(tls.clone(), "tls.key".to_string())
        ]
    );
    // Every other required key is in the example's Secrets.
    for (name, key) in &required {
        let secret = secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name.as_str()))
            .unwrap();
        assert!(secret.string_data.as_ref().unwrap().contains_key(key));
    }
}
