#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The committed CRD YAML (in `crds/` and in the Helm chart) must be exactly
//! what `crdgen` prints from the Rust types.
//!
//! To fix a failure, regenerate both copies:
//!
//! ```sh
//! cargo run -p kache-operator --bin crdgen > crds/cachecluster.yaml
//! cp crds/cachecluster.yaml charts/kache/crds/cachecluster.yaml
//! ```

use std::path::PathBuf;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn check(rel: &str) {
    let generated = kache_operator::crd::crd_yaml().unwrap();
    let path = repo_root().join(rel);
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        committed == generated,
        "{rel} is out of date with operator/src/crd/; regenerate it with\n  \
         cargo run -p kache-operator --bin crdgen > crds/cachecluster.yaml && \
         cp crds/cachecluster.yaml charts/kache/crds/cachecluster.yaml"
    );
}

#[test]
fn crds_dir_matches_generated() {
    check("crds/cachecluster.yaml");
}

#[test]
fn chart_crd_matches_generated() {
    check("charts/kache/crds/cachecluster.yaml");
}

#[test]
fn generated_crd_parses_back() {
    let yaml = kache_operator::crd::crd_yaml().unwrap();
    let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
        serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(crd.spec.group, "kache.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    let v = &crd.spec.versions[0];
    assert!(v.served && v.storage);
    assert!(v.subresources.as_ref().unwrap().status.is_some());
}
