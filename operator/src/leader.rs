//! Leader election on a `coordination.k8s.io/v1` Lease, so two or more
//! operator replicas can run and exactly one reconciles.
//!
//! A small hand-written elector (the maintained `kube-leader-election` crate
//! pins a different kube line): the holder renews the Lease every
//! `renew_interval`; a candidate takes it over once `renewTime +
//! leaseDurationSeconds` has passed. Writes use the Lease's
//! `resourceVersion`, so two candidates racing for it cannot both win. The
//! decision is the pure function [`decide`].

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::chrono::{DateTime, Utc};
use kache_cluster::names;
use kube::api::PostParams;
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews (and candidates retry).
    pub renew_interval: Duration,
}

/// What to do with the Lease as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it, holding it.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Nobody holds it, or the holder let it expire: take it over.
    TakeOver,
    /// Someone else holds a valid lease.
    Follow(String),
}

/// Decides from the Lease's current spec (`None`: no Lease).
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, now: DateTime<Utc>) -> Decision {
    let Some(spec) = lease else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let last = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    match last {
        Some(last) if last + k8s_openapi::chrono::Duration::seconds(duration) > now => {
            Decision::Follow(holder.to_string())
        }
        _ => Decision::TakeOver,
    }
}

/// The Lease spec after acting on `decision`.
pub fn next_spec(
    decision: &Decision,
    current: Option<&LeaseSpec>,
    cfg: &LeaseConfig,
    now: DateTime<Utc>,
) -> LeaseSpec {
    let duration = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let transitions = current.and_then(|s| s.lease_transitions).unwrap_or(0);
    let acquire = match decision {
        Decision::Renew => current
            .and_then(|s| s.acquire_time.clone())
            .unwrap_or(MicroTime(now)),
        _ => MicroTime(now),
    };
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(duration),
        acquire_time: Some(acquire),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(match decision {
            Decision::TakeOver => transitions.saturating_add(1),
            _ => transitions,
        }),
    }
}

/// Campaigns for, holds and releases one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(r) if r.code == 409)
}

impl LeaderElector {
    /// An elector for `cfg` using `client`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    /// One round: returns whether this replica holds the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Utc::now();
        let current = self.api.get_opt(&self.cfg.name).await?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let decision = decide(spec, &self.cfg.identity, now);
        if let Decision::Follow(_) = decision {
            return Ok(false);
        }
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.cfg.name.clone()),
                namespace: Some(self.cfg.namespace.clone()),
                resource_version: current
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone()),
                labels: Some(BTreeMap::from([(
                    names::LABEL_NAME.to_string(),
                    names::MANAGER.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(next_spec(&decision, spec, &self.cfg, now)),
        };
        let result = match decision {
            Decision::Create => self.api.create(&PostParams::default(), &lease).await,
            _ => {
                self.api
                    .replace(&self.cfg.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => {
                if decision == Decision::TakeOver || decision == Decision::Create {
                    tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.name, "acquired leader lease");
                }
                Ok(true)
            }
            // Someone else wrote first: they won this round.
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (if held) so a standby takes over at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Campaigns until `shutdown` flips to true, publishing leadership on
    /// `leader`. Leadership is dropped when renewal keeps failing for a whole
    /// lease duration. Releases the lease on the way out.
    pub async fn run(self, leader: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let mut last_renew: Option<Instant> = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    last_renew = Some(Instant::now());
                    leader.send_if_modified(|l| !std::mem::replace(l, true));
                }
                Ok(false) => {
                    last_renew = None;
                    if leader.send_if_modified(|l| std::mem::replace(l, false)) {
                        tracing::warn!("lost leader lease");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election round failed");
                    let expired = last_renew.is_none_or(|t| t.elapsed() >= self.cfg.lease_duration);
                    if expired && leader.send_if_modified(|l| std::mem::replace(l, false)) {
                        tracing::warn!("could not renew leader lease in time; stepping down");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.renew_interval) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        if *leader.borrow() {
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "could not release leader lease");
            }
            leader.send_replace(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            name: "kache-operator".into(),
            namespace: "kache-system".into(),
            identity: "op-a".into(),
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
        }
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(at(0))),
            renew_time: Some(MicroTime(at(renewed))),
            lease_transitions: Some(2),
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "op-a", at(0)), Decision::Create);
        assert_eq!(
            decide(Some(&held_by("op-a", 0)), "op-a", at(100)),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&held_by("op-b", 0)), "op-a", at(10)),
            Decision::Follow("op-b".into())
        );
        assert_eq!(
            decide(Some(&held_by("op-b", 0)), "op-a", at(15)),
            Decision::TakeOver
        );
        let released = LeaseSpec {
            holder_identity: None,
            ..held_by("x", 0)
        };
        assert_eq!(decide(Some(&released), "op-a", at(1)), Decision::TakeOver);
        let never_renewed = LeaseSpec {
            renew_time: None,
            acquire_time: None,
            ..held_by("op-b", 0)
        };
        assert_eq!(
            decide(Some(&never_renewed), "op-a", at(1)),
            Decision::TakeOver
        );
    }

    #[test]
    fn take_over_counts_a_transition_and_renew_keeps_acquire_time() {
        let cur = held_by("op-b", 0);
        let taken = next_spec(&Decision::TakeOver, Some(&cur), &cfg(), at(20));
        assert_eq!(taken.holder_identity.as_deref(), Some("op-a"));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(20))));
        assert_eq!(taken.lease_duration_seconds, Some(15));

        let renewed = next_spec(&Decision::Renew, Some(&taken), &cfg(), at(25));
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(20))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(25))));

        let created = next_spec(&Decision::Create, None, &cfg(), at(0));
        assert_eq!(created.lease_transitions, Some(0));
    }

    mod mock_api {
        use super::*;
        use http::{Method, Request, Response, StatusCode};
        use kube::client::Body;
        use serde_json::{json, Value};
        use tower_test::mock;

        type Handle = mock::Handle<Request<Body>, Response<Body>>;
        const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/kache-system/leases";

        async fn answer(
            handle: &mut Handle,
            method: Method,
            uri: &str,
            status: StatusCode,
            body: Value,
        ) -> Value {
            let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                (req.method(), req.uri().to_string()),
                (&method, uri.to_string())
            );
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let sent = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let reply = if body.is_null() { sent.clone() } else { body };
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
            sent
        }

        fn status(code: u16, reason: &str) -> Value {
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "reason": reason, "message": reason, "code": code})
        }

        fn elector() -> (LeaderElector, Handle) {
            let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
            (
                LeaderElector::new(Client::new(svc, "default"), cfg()),
                handle,
            )
        }

        #[tokio::test]
        async fn creates_a_missing_lease_and_leads() {
            let (e, mut h) = elector();
            let task = tokio::spawn(async move { e.try_acquire_or_renew().await });
            answer(
                &mut h,
                Method::GET,
                &format!("{LEASE}/kache-operator"),
                StatusCode::NOT_FOUND,
                status(404, "NotFound"),
            )
            .await;
            let sent = answer(
                &mut h,
                Method::POST,
                &format!("{LEASE}?"),
                StatusCode::CREATED,
                Value::Null,
            )
            .await;
            assert_eq!(sent["spec"]["holderIdentity"], "op-a");
            assert_eq!(sent["spec"]["leaseDurationSeconds"], 15);
            assert!(task.await.unwrap().unwrap());
        }

        #[tokio::test]
        async fn follows_a_valid_lease_without_writing() {
            let (e, mut h) = elector();
            let task = tokio::spawn(async move { e.try_acquire_or_renew().await });
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some("kache-operator".into()),
                    namespace: Some("kache-system".into()),
                    resource_version: Some("7".into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    renew_time: Some(MicroTime(Utc::now())),
                    ..held_by("op-b", 0)
                }),
            };
            answer(
                &mut h,
                Method::GET,
                &format!("{LEASE}/kache-operator"),
                StatusCode::OK,
                serde_json::to_value(&lease).unwrap(),
            )
            .await;
            assert!(!task.await.unwrap().unwrap());
        }

        #[tokio::test]
        async fn losing_a_takeover_race_is_not_an_error() {
            let (e, mut h) = elector();
            let task = tokio::spawn(async move { e.try_acquire_or_renew().await });
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some("kache-operator".into()),
                    namespace: Some("kache-system".into()),
                    resource_version: Some("7".into()),
                    ..Default::default()
                },
                spec: Some(held_by("op-b", 0)), // expired long ago
            };
            answer(
                &mut h,
                Method::GET,
                &format!("{LEASE}/kache-operator"),
                StatusCode::OK,
                serde_json::to_value(&lease).unwrap(),
            )
            .await;
            let sent = answer(
                &mut h,
                Method::PUT,
                &format!("{LEASE}/kache-operator?"),
                StatusCode::CONFLICT,
                status(409, "Conflict"),
            )
            .await;
            assert_eq!(
                sent["metadata"]["resourceVersion"], "7",
                "optimistic concurrency"
            );
            assert_eq!(sent["spec"]["leaseTransitions"], 3);
            assert!(!task.await.unwrap().unwrap());
        }
    }
}
