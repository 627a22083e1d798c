#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End-to-end tests against a real Kubernetes API server (1.28+).
//!
//! Runs only when `KACHE_E2E_KUBECONFIG` names a kubeconfig file; otherwise it
//! prints why it skipped and passes. Nothing here is faked: the CRD, the
//! operator's controller (run in-process, watching one fresh namespace) and
//! every object live in the real API server.
//!
//! The suite needs only an API server. A cluster without a kubelet or image
//! registry is enough: where no kubelet runs the pods, the suite plays the
//! kubelet's part for one pod by writing its status (Ready, with an IP)
//! through the pods/status subresource, exactly as a kubelet would.
//!
//! ```sh
//! KACHE_E2E_KUBECONFIG=$HOME/.kube/config cargo test -p kache-operator --test e2e -- --nocapture
//! ```

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Pod, PodCondition, PodSpec, PodStatus, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kache_cluster::{names, MemberList};
use kache_operator::crd::{self, CacheCluster, CacheClusterSpec};
use kache_operator::metrics::Metrics;
use kache_operator::reconcile::{run_controller, Context, Settings};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::Reporter;
use kube::{Api, Client, Config, ResourceExt};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

const ENV: &str = "KACHE_E2E_KUBECONFIG";
const TIMEOUT: Duration = Duration::from_secs(60);

async fn client_from_env() -> Option<Client> {
    let Ok(path) = std::env::var(ENV) else {
        println!("skipping e2e tests: {ENV} is not set (point it at a kubeconfig to run them)");
        return None;
    };
    let kubeconfig =
        Kubeconfig::read_from(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("valid kubeconfig");
    Some(Client::try_from(config).expect("client"))
}

/// Polls `f` every 250ms until it yields `Some`, or panics after `TIMEOUT`.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crd::crd();
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply("kache-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    eventually("CRD established", || {
        let crds = crds.clone();
        let name = name.clone();
        async move {
            let c = crds.get(&name).await.ok()?;
            let established = c
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        }
    })
    .await;
}

fn members_of(cm: &ConfigMap) -> MemberList {
    MemberList::from_json(&cm.data.as_ref().unwrap()[names::MEMBERS_JSON_KEY]).unwrap()
}

#[tokio::test]
async fn e2e_operator_against_real_apiserver() {
    let Some(client) = client_from_env().await else {
        return;
    };
    install_crd(&client).await;

    // A fresh namespace, deleted at the end whatever happens.
    let ns_name = format!("kache-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns_name.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("create namespace");
    struct Cleanup(Api<Namespace>, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let (api, name) = (self.0.clone(), self.1.clone());
            // Best effort, on a fresh runtime since the test's may be gone.
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    let _ = rt.block_on(api.delete(&name, &DeleteParams::default()));
                }
            })
            .join();
        }
    }
    let _cleanup = Cleanup(namespaces.clone(), ns_name.clone());
    let ns = ns_name.as_str();

    // The operator, in-process, watching only this namespace.
    let ctx = Arc::new(Context::new(
        client.clone(),
        Settings {
            node_image: "ghcr.io/kache-dev/kache-node:e2e".into(),
        },
        Arc::new(Metrics::default()),
        Reporter {
            controller: names::MANAGER.into(),
            instance: Some("e2e".into()),
        },
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(run_controller(ctx, Some(ns_name.clone()), async move {
        let _ = stop_rx.await;
    }));

    let ccs: Api<CacheCluster> = Api::namespaced(client.clone(), ns);

    // 1. The CRD's own validation rejects replicationFactor > replicas.
    let bad = CacheCluster::new(
        "bad",
        CacheClusterSpec {
            replicas: 1,
            replication_factor: 2,
            ..Default::default()
        },
    );
    let err = ccs.create(&PostParams::default(), &bad).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("replicationFactor must not exceed replicas"),
        "CEL rule must reject it: {err}"
    );

    // 2. A minimal CacheCluster: the API server fills in the defaults.
    let cc: CacheCluster = serde_json::from_value(json!({
        "apiVersion": "kache.dev/v1alpha1", "kind": "CacheCluster",
        "metadata": {"name": "e2e"}, "spec": {"replicas": 1}
    }))
    .unwrap();
    let created = ccs
        .create(&PostParams::default(), &cc)
        .await
        .expect("create CacheCluster");
    assert_eq!(created.spec.memory_mib, 64, "default from the schema");
    assert_eq!(created.spec.port, 11211);

    // 3. The operator creates every owned object, each owned by the CacheCluster.
    let uid = created.uid().unwrap();
    let owned = |meta: &ObjectMeta| {
        meta.owner_references
            .as_ref()
            .is_some_and(|o| o.iter().any(|r| r.uid == uid && r.controller == Some(true)))
    };
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let s = eventually("StatefulSet", || {
        let sts = sts.clone();
        async move { sts.get_opt("e2e").await.ok().flatten() }
    })
    .await;
    assert!(owned(&s.metadata));
    assert_eq!(s.spec.as_ref().unwrap().replicas, Some(1));
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let peers = svcs.get("e2e-peers").await.expect("peers service");
    assert!(owned(&peers.metadata));
    assert_eq!(
        peers.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("None")
    );
    let client_svc = svcs.get("e2e").await.expect("client service");
    assert!(owned(&client_svc.metadata));
    let pdb: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    assert!(owned(&pdb.get("e2e").await.expect("pdb").metadata));
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    assert!(owned(
        &sa.get("e2e-node").await.expect("service account").metadata
    ));
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    assert!(owned(&roles.get("e2e-node").await.expect("role").metadata));
    let rbs: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    assert!(owned(
        &rbs.get("e2e-node").await.expect("role binding").metadata
    ));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = cms.get("e2e-members").await.expect("members configmap");
    assert!(owned(&cm.metadata));

    // 4. Status: configVersion 1 (empty list) equals the ConfigMap's version.
    let status = eventually("status with configVersion", || {
        let ccs = ccs.clone();
        async move {
            let st = ccs.get("e2e").await.ok()?.status?;
            (st.config_version >= 1).then_some(st)
        }
    })
    .await;
    let list = members_of(&cms.get("e2e-members").await.unwrap());
    assert_eq!(status.config_version, i64::try_from(list.version).unwrap());
    assert_eq!(status.selector, names::selector_string("e2e"));
    assert!(status.conditions.iter().any(|c| c.type_ == "Ready"));

    // 5. A Ready pod is published: the member list version rises by one.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    if pods.get_opt("e2e-0").await.unwrap().is_none() {
        // No StatefulSet controller here: create the pod it would have created.
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("e2e-0".into()),
                labels: Some(names::common_labels("e2e")),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "kache-node".into(),
                    image: Some("ghcr.io/kache-dev/kache-node:e2e".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let _ = pods.create(&PostParams::default(), &pod).await;
    }
    let before = list.version;
    let ready_status = json!({"status": PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some("10.244.0.10".into()),
        conditions: Some(vec![PodCondition { type_: "Ready".into(), status: "True".into(), ..Default::default() }]),
        ..Default::default()
    }});
    pods.patch_status(
        "e2e-0",
        &PatchParams::default(),
        &Patch::Merge(&ready_status),
    )
    .await
    .expect("mark pod ready");
    let published = eventually("member list with e2e-0", || {
        let cms = cms.clone();
        async move {
            let list = members_of(&cms.get("e2e-members").await.ok()?);
            list.members
                .iter()
                .any(|m| m.name == "e2e-0")
                .then_some(list)
        }
    })
    .await;
    assert_eq!(published.version, before + 1);
    let m = &published.members[0];
    assert_eq!(m.host, format!("e2e-0.e2e-peers.{ns}.svc"));
    assert_eq!(m.ip, "10.244.0.10");
    let cfg = &cms.get("e2e-members").await.unwrap().data.unwrap()[names::CLUSTER_CONFIG_KEY];
    assert_eq!(
        cfg,
        &format!(
            "{}\ne2e-0.e2e-peers.{ns}.svc|10.244.0.10|11211\n",
            published.version
        )
    );

    // 6. The scale subresource drives the StatefulSet (what kubectl scale and HPAs use).
    let scale = json!({"spec": {"replicas": 2}});
    ccs.patch_scale("e2e", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .expect("scale subresource");
    eventually("StatefulSet scaled to 2", || {
        let sts = sts.clone();
        async move {
            let s = sts.get("e2e").await.ok()?;
            (s.spec?.replicas == Some(2)).then_some(())
        }
    })
    .await;

    // 7. A spec the schema accepts but the operator rejects: Degraded, not a retry loop.
    let bad_args = json!({"spec": {"extraArgs": ["--port=1"]}});
    ccs.patch("e2e", &PatchParams::default(), &Patch::Merge(&bad_args))
        .await
        .unwrap();
    let degraded = eventually("Degraded InvalidSpec", || {
        let ccs = ccs.clone();
        async move {
            let st = ccs.get("e2e").await.ok()?.status?;
            st.conditions
                .into_iter()
                .find(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "InvalidSpec")
        }
    })
    .await;
    assert!(
        degraded.message.contains("must not set --port"),
        "{}",
        degraded.message
    );

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), controller)
        .await
        .expect("controller stops on shutdown")
        .unwrap();
}
