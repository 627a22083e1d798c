//! Where the member list comes from: a file (`--members-file`, for runs without
//! Kubernetes) or the cluster's `<name>-members` ConfigMap, watched through the Kubernetes
//! API. Either way a bad or missing document never replaces a good one: the node keeps
//! serving with the last list it had.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kache_cluster::names::MEMBERS_JSON_KEY;
use kache_cluster::MemberList;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::watch;

use super::Cluster;

/// How often the members file is checked for changes.
const FILE_POLL: Duration = Duration::from_millis(250);

/// Follows a members file until `shutdown`, installing each valid new version.
pub async fn follow_file(
    cluster: Arc<Cluster>,
    path: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_text = String::new();
    loop {
        match tokio::fs::read_to_string(&path).await {
            Ok(text) if text != last_text => {
                match MemberList::from_json(&text) {
                    Ok(list) => {
                        cluster.update(list);
                    }
                    Err(error) => tracing::warn!(
                        path = %path.display(),
                        %error,
                        "ignoring invalid member list; keeping the last one"
                    ),
                }
                last_text = text;
            }
            Ok(_) => {}
            Err(error) => {
                if !last_text.is_empty() {
                    tracing::warn!(path = %path.display(), %error, "cannot read member list; keeping the last one");
                    last_text.clear();
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(FILE_POLL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Reads the member list from one of the ConfigMap's data keys.
pub fn list_from_configmap(
    cm: &ConfigMap,
) -> Option<Result<MemberList, kache_cluster::MemberListError>> {
    let text = cm.data.as_ref()?.get(MEMBERS_JSON_KEY)?;
    Some(MemberList::from_json(text))
}

/// The API server ends each watch request after this long and the watcher starts the next
/// one (from where it was: no re-list).
const WATCH_TIMEOUT_SECS: u32 = 60;
/// A response that sends nothing for this long counts as failed: longer than a watch
/// request lasts, so only an API server that hangs (accepts, never answers) trips it, and
/// then the node notices within this time instead of the client's default five minutes.
const API_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// A Kubernetes client from the usual places (in-cluster service account, or `KUBECONFIG`),
/// with a read timeout suited to `follow_configmap`.
pub async fn api_client() -> Result<kube::Client, ApiClientError> {
    let mut config = kube::Config::infer().await?;
    config.read_timeout = Some(API_READ_TIMEOUT);
    Ok(kube::Client::try_from(config)?)
}

/// Why no Kubernetes client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("{0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("{0}")]
    Client(#[from] kube::Error),
}

/// Watches the `name` ConfigMap in `namespace` until `shutdown`. The watch restarts with
/// backoff when the API server is unreachable; meanwhile the last list stays in force.
pub async fn follow_configmap(
    cluster: Arc<Cluster>,
    client: kube::Client,
    namespace: String,
    name: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(WATCH_TIMEOUT_SECS);
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = shutdown.changed() => return,
        };
        match event {
            Some(Ok(Event::Apply(cm) | Event::InitApply(cm))) => match list_from_configmap(&cm) {
                Some(Ok(list)) => {
                    cluster.update(list);
                }
                Some(Err(error)) => tracing::warn!(
                    configmap = %name,
                    %error,
                    "ignoring invalid member list; keeping the last one"
                ),
                None => {
                    tracing::warn!(configmap = %name, key = MEMBERS_JSON_KEY, "member list key missing")
                }
            },
            Some(Ok(Event::Delete(_))) => {
                tracing::warn!(configmap = %name, "member list deleted; keeping the last one")
            }
            Some(Ok(Event::Init | Event::InitDone)) => {}
            Some(Err(error)) => {
                tracing::warn!(%error, "member list watch failed; retrying, keeping the last list")
            }
            None => return,
        }
    }
}
