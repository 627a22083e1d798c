//! Prints the CacheCluster CustomResourceDefinition as YAML.
//!
//! `cargo run -p kache-operator --bin crdgen > crds/cachecluster.yaml`
//! (and the same into `charts/kache/crds/`); a test fails when either drifts.

fn main() -> Result<(), serde_yaml::Error> {
    print!("{}", kache_operator::crd::crd_yaml()?);
    Ok(())
}
