//! TLS for the client port (rustls): certificate and key from PEM files, re-read when they
//! change (a rotated Kubernetes Secret or cert-manager renewal takes effect for new
//! connections without a restart), and optional client-certificate verification.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// How often the files are checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Where the PEM files are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn modified(&self) -> Vec<Option<SystemTime>> {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut times = vec![m(&self.cert), m(&self.key)];
        if let Some(ca) = &self.client_ca {
            times.push(m(ca));
        }
        times
    }

    /// Builds a server configuration from the files.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|it| it.collect())
            .map_err(|e| format!("certificate {}: {e}", self.cert.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "certificate {}: no certificate found",
                self.cert.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| format!("key {}: {e}", self.key.display()))?;
        let provider = Arc::new(default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| format!("client CA {}: {e}", ca.display()))?
                {
                    let cert = cert.map_err(|e| format!("client CA {}: {e}", ca.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("certificate and key do not match: {e}"))?;
        Ok(Arc::new(config))
    }
}

/// The acceptor in force, replaced when the files change.
pub struct Tls {
    files: TlsFiles,
    acceptor: ArcSwap<TlsAcceptor>,
}

impl Tls {
    /// Loads the files once; bad files are a start-up error.
    pub fn load(files: TlsFiles) -> Result<Tls, String> {
        let config = files.server_config()?;
        Ok(Tls {
            files,
            acceptor: ArcSwap::from_pointee(TlsAcceptor::from(config)),
        })
    }

    pub fn acceptor(&self) -> Arc<TlsAcceptor> {
        self.acceptor.load_full()
    }

    /// Rebuilds the configuration whenever a file changes, until `shutdown`. New files that
    /// do not load are logged and ignored: the previous certificate stays in use.
    pub async fn follow(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut seen = self.files.modified();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            let now = self.files.modified();
            if now == seen {
                continue;
            }
            seen = now;
            match self.files.server_config() {
                Ok(config) => {
                    self.acceptor.store(Arc::new(TlsAcceptor::from(config)));
                    tracing::info!("TLS certificate reloaded");
                }
                Err(error) => {
                    tracing::warn!(%error, "ignoring new TLS files; keeping the current ones")
                }
            }
        }
    }
}
