//! The PodDisruptionBudget `<name>`.

use super::{object_meta, ValidCluster};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kache_cluster::names;

/// Limits voluntary disruptions (drains, evictions) to
/// `spec.podDisruptionBudget.maxUnavailable` nodes at once.
pub fn pod_disruption_budget(vc: &ValidCluster) -> PodDisruptionBudget {
    let name = &vc.cluster.name;
    PodDisruptionBudget {
        metadata: object_meta(&vc.cluster, name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(vc.spec.pdb_max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(names::selector_labels(name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CacheClusterSpec, PodDisruptionBudgetConfig};
    use crate::fixtures::valid_cluster;

    #[test]
    fn default_allows_one_disruption() {
        let pdb = pod_disruption_budget(&valid_cluster("web", Default::default()));
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.min_available, None);
        assert_eq!(
            spec.selector.unwrap().match_labels,
            Some(names::selector_labels("web"))
        );
    }

    #[test]
    fn max_unavailable_comes_from_the_spec() {
        let cc = valid_cluster(
            "web",
            CacheClusterSpec {
                pod_disruption_budget: PodDisruptionBudgetConfig { max_unavailable: 0 },
                ..Default::default()
            },
        );
        let pdb = pod_disruption_budget(&cc);
        assert_eq!(pdb.spec.unwrap().max_unavailable, Some(IntOrString::Int(0)));
    }
}
