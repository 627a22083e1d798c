//! Why `kache-node serve` or `kache-node proxy` could not start, once the command line was
//! accepted. `main` prints each as `kache-node: <message>` and exits with status 1; the
//! messages name the flag's file or address, as memcached's do.

use std::path::PathBuf;

use kache_node::auth::AuthFileError;
use kache_node::cluster::membership::ApiClientError;
use kache_node::store::OpenError;
use kache_node::tls::TlsSetupError;

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A listening socket could not be opened (port taken, address not local...).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// `host:port` as given.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// `--memory-file` could not be opened or mapped.
    #[error(transparent)]
    MemoryFile(#[from] OpenError),
    /// `--cluster` needs the Kubernetes API, which is not reachable from here.
    #[error("cannot reach the Kubernetes API for --cluster {cluster}: {source}")]
    KubernetesApi {
        /// The `--cluster` name.
        cluster: String,
        /// Why (boxed: kube's configuration errors are large).
        source: Box<ApiClientError>,
    },
    /// `--peer-secret-file` could not be read.
    #[error("cannot read {}: {source}", path.display())]
    PeerSecretRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--peer-secret-file` holds no secret, or one too long for the peer handshake.
    #[error("{}: the peer secret must be 1 to {max} bytes", path.display())]
    PeerSecretSize {
        /// The file.
        path: PathBuf,
        /// The longest secret.
        max: usize,
    },
    /// `--auth-file` (or the proxy's `--node-auth-file`) could not be loaded.
    #[error(transparent)]
    AuthFile(#[from] AuthFileError),
    /// The TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// The expiry sweeper's thread could not be started.
    #[error("cannot start the expiry sweeper: {0}")]
    Sweeper(std::io::Error),
    /// `-P`: memcached's wording.
    #[error("Could not write the pid file {}: {source}", path.display())]
    PidFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_failed() {
        let refused = || std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let cases = [
            (
                StartupError::Listen {
                    addr: "127.0.0.1:11211".into(),
                    source: refused(),
                },
                "cannot listen on 127.0.0.1:11211: address in use",
            ),
            (
                StartupError::PeerSecretSize {
                    path: "/etc/kache/peer/secret".into(),
                    max: 64,
                },
                "/etc/kache/peer/secret: the peer secret must be 1 to 64 bytes",
            ),
            (
                StartupError::PidFile {
                    path: "/run/x.pid".into(),
                    source: refused(),
                },
                "Could not write the pid file /run/x.pid: address in use",
            ),
            (
                StartupError::Sweeper(refused()),
                "cannot start the expiry sweeper: address in use",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
    }
}
