//! TLS for the client port and the peer port (rustls): certificate and key from PEM files,
//! re-read when they change (a rotated Kubernetes Secret or cert-manager renewal takes effect
//! for new connections without a restart), and optional client-certificate verification.
//!
//! The same certificate serves both ports. On the peer port the node is also a TLS client:
//! it connects to its peers verifying their certificate for the member's `host` (a DNS name,
//! or an IP address) and presents its own certificate, which a peer whose port requires
//! client certificates (`--tls-client-ca`) verifies: mutual TLS. Peers are trusted by
//! `--peer-tls-ca`, else `--tls-client-ca`, else (no CA at all) only if they present this
//! node's own certificate — the pods of one cluster share one Secret, so one certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::sync::watch;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::verify_server_name;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider,
};
use tokio_rustls::rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How often the files are checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Where the PEM files are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients (and connecting peers) must present a certificate signed by one of
    /// these CAs; peers' server certificates are verified against them too unless `peer_ca`
    /// is in force.
    pub client_ca: Option<PathBuf>,
    /// CAs that peers' certificates must chain to when this node connects to them. Used
    /// while the file exists, so a Secret's optional `ca.crt` may appear later.
    pub peer_ca: Option<PathBuf>,
}

/// How this node decides whether a peer it connects to is genuine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerTrust {
    /// The peer's certificate must chain to the CAs in this file, for the member's host.
    Ca(PathBuf),
    /// No CA: the peer must present this node's own certificate (for the member's host).
    OwnCertificate,
}

impl std::fmt::Display for PeerTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerTrust::Ca(path) => write!(f, "CA {}", path.display()),
            PeerTrust::OwnCertificate => f.write_str("this node's own certificate"),
        }
    }
}

/// Why TLS files could not be turned into a configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file that cannot be read or parsed (`what` names its role: certificate, key, CA).
    #[error("{what} {}: {detail}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{what} {}: no certificate found", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("certificate and key do not match: {0}")]
    KeyMismatch(TlsError),
    #[error("no certificate to trust")]
    NoOwnCertificate,
    #[error("peer host {host:?} is not a DNS name or IP address: {detail}")]
    ServerName { host: String, detail: String },
    #[error("{0}")]
    Rustls(#[from] TlsError),
}

/// The error for `path` (in the role `what`) failing with `detail`.
fn file_error(what: &'static str, path: &Path, detail: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::File {
        what,
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn read_roots(path: &Path, what: &'static str) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path, what)? {
        roots.add(cert).map_err(|e| file_error(what, path, e))?;
    }
    Ok(roots)
}

/// The name a peer's certificate must carry: the member's `host`, a DNS name or an IP.
pub fn peer_server_name(host: &str) -> Result<ServerName<'static>, TlsSetupError> {
    ServerName::try_from(host.to_string()).map_err(|e| TlsSetupError::ServerName {
        host: host.to_string(),
        detail: e.to_string(),
    })
}

impl TlsFiles {
    fn modified(&self) -> Vec<Option<SystemTime>> {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut times = vec![m(&self.cert), m(&self.key)];
        times.extend(self.client_ca.as_deref().map(m));
        times.extend(self.peer_ca.as_deref().map(m));
        times
    }

    /// The certificate chain and key this node presents, on both ports.
    fn identity(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
        let certs = read_certs(&self.cert, "certificate")?;
        let key =
            PrivateKeyDer::from_pem_file(&self.key).map_err(|e| file_error("key", &self.key, e))?;
        Ok((certs, key))
    }

    /// Which peers this node trusts when it connects to them, as the files are now.
    pub fn peer_trust(&self) -> PeerTrust {
        match (&self.peer_ca, &self.client_ca) {
            (Some(ca), _) if ca.exists() => PeerTrust::Ca(ca.clone()),
            (_, Some(ca)) => PeerTrust::Ca(ca.clone()),
            _ => PeerTrust::OwnCertificate,
        }
    }

    /// Builds a server configuration from the files (the client port and the peer port).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsSetupError> {
        let (certs, key) = self.identity()?;
        let provider = Arc::new(default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = read_roots(ca, "client CA")?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| file_error("client CA", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(TlsSetupError::KeyMismatch)?;
        Ok(Arc::new(config))
    }

    /// Builds the configuration this node uses to connect to its peers: their certificate
    /// verified as `peer_trust` says, this node's own certificate presented as the client's.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsSetupError> {
        let (certs, key) = self.identity()?;
        let provider = Arc::new(default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match self.peer_trust() {
            PeerTrust::Ca(ca) => builder.with_root_certificates(read_roots(&ca, "peer CA")?),
            PeerTrust::OwnCertificate => {
                let own = certs
                    .first()
                    .cloned()
                    .ok_or(TlsSetupError::NoOwnCertificate)?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(SameCertificate { own, provider }))
            }
        };
        let config = builder
            .with_client_auth_cert(certs, key)
            .map_err(TlsSetupError::KeyMismatch)?;
        Ok(Arc::new(config))
    }
}

/// How `kache-node proxy` reaches nodes whose client port speaks TLS: their certificate
/// verified against `ca` for the member's `host`, and `cert`/`key` presented when the nodes
/// require client certificates.
#[derive(Clone, Debug)]
pub struct NodeTlsFiles {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl NodeTlsFiles {
    /// A connector built from the files as they are now. The proxy builds one per new node
    /// connection (they are few and long-lived), so rotated files apply without a restart.
    pub fn connector(&self) -> Result<TlsConnector, TlsSetupError> {
        let builder = ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(read_roots(&self.ca, "node CA")?);
        let config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = read_certs(cert, "certificate")?;
                let key =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| file_error("key", key, e))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(TlsSetupError::KeyMismatch)?
            }
        };
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// Trusts a peer only if it presents exactly this node's certificate, valid for the name
/// asked for; the handshake still proves the peer holds the private key.
#[derive(Debug)]
struct SameCertificate {
    own: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SameCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        if end_entity.as_ref() != self.own.as_ref() {
            return Err(TlsError::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        verify_server_name(&ParsedCertificate::try_from(end_entity)?, server_name)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The acceptor and the peer connector in force, replaced when the files change.
pub struct Tls {
    files: TlsFiles,
    acceptor: ArcSwap<TlsAcceptor>,
    connector: ArcSwap<TlsConnector>,
}

impl Tls {
    /// Loads the files once; bad files are a start-up error.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsSetupError> {
        let server = files.server_config()?;
        let client = files.client_config()?;
        if let Some(ca) = &files.peer_ca {
            if !ca.exists() {
                tracing::info!(
                    peer_ca = %ca.display(),
                    trust = %files.peer_trust(),
                    "peer CA file absent; using the fallback until it appears"
                );
            }
        }
        Ok(Tls {
            files,
            acceptor: ArcSwap::from_pointee(TlsAcceptor::from(server)),
            connector: ArcSwap::from_pointee(TlsConnector::from(client)),
        })
    }

    /// What serves TLS on the client port and the peer port.
    pub fn acceptor(&self) -> Arc<TlsAcceptor> {
        self.acceptor.load_full()
    }

    /// What this node connects to its peers with.
    pub fn connector(&self) -> Arc<TlsConnector> {
        self.connector.load_full()
    }

    /// Which peers this node trusts, as the files are now.
    pub fn peer_trust(&self) -> PeerTrust {
        self.files.peer_trust()
    }

    /// Rebuilds the configurations whenever a file changes, until `shutdown`. New files that
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
            match (self.files.server_config(), self.files.client_config()) {
                (Ok(server), Ok(client)) => {
                    self.acceptor.store(Arc::new(TlsAcceptor::from(server)));
                    self.connector.store(Arc::new(TlsConnector::from(client)));
                    tracing::info!(peer_trust = %self.files.peer_trust(), "TLS certificate reloaded");
                }
                (Err(error), _) | (_, Err(error)) => {
                    tracing::warn!(%error, "ignoring new TLS files; keeping the current ones")
                }
            }
        }
    }
}

/// Certificates for tests (ECDSA P-256, valid until 2126, made with the `openssl` CLI): a CA,
/// a node certificate it signed for `IP:127.0.0.1` and `DNS:localhost` (server and client
/// authentication), and an intruder's certificate for the same names from another CA.
#[cfg(test)]
pub(crate) mod test_pki {
    use super::TlsFiles;
    use std::path::Path;

    pub const CA: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBhzCCAS2gAwIBAgIUTH0FT3AzXSOCmcMe2cVXxW3Oa2QwCgYIKoZIzj0EAwIw\n\
GDEWMBQGA1UEAwwNa2FjaGUgdGVzdCBDQTAgFw0yNjExMjQwODE0MDNaGA8yMTI2\n\
MTAzMTA4MTQwM1owGDEWMBQGA1UEAwwNa2FjaGUgdGVzdCBDQTBZMBMGByqGSM49\n\
AgEGCCqGSM49AwEHA0IABD2Hc4UmUbb7wdl9TuIYI1ftVd2Tz4IfaEd72AZKWDFn\n\
J1kwvls74D0kEzhBmSIFqyl9VnqLR/VgfAg3Pi6hWdujUzBRMB0GA1UdDgQWBBQG\n\
79Amut9ixts9h18NZSY3LtvUiDAfBgNVHSMEGDAWgBQG79Amut9ixts9h18NZSY3\n\
LtvUiDAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQCe12y7WFgW\n\
MlP8bxUU7xCmQwxmGes6oJUU5N7Gwy+G9gIgIfX32svf6OINqGPA2y/YfpGdYMGj\n\
GDQYlyc2s0XgY54=\n\
-----END CERTIFICATE-----\n\
";

    pub const NODE_CERT: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBuzCCAWGgAwIBAgIURR2t1aU40VX6E6MAHtVQjq8kfB4wCgYIKoZIzj0EAwIw\n\
GDEWMBQGA1UEAwwNa2FjaGUgdGVzdCBDQTAgFw0yNjExMjQwODE0MDNaGA8yMTI2\n\
MTAzMTA4MTQwM1owFTETMBEGA1UEAwwKa2FjaGUtbm9kZTBZMBMGByqGSM49AgEG\n\
CCqGSM49AwEHA0IABOd48XhEn6umOn+xsmSbqOKT52RTH0gRwduEwTky8dOzdbF2\n\
CIZeUlR3RQQMZWUPS40G/Q4zqCtJyH9oyCvh8LajgYkwgYYwGgYDVR0RBBMwEYcE\n\
fwAAAYIJbG9jYWxob3N0MAkGA1UdEwQCMAAwHQYDVR0lBBYwFAYIKwYBBQUHAwEG\n\
CCsGAQUFBwMCMB0GA1UdDgQWBBTG2KbR6ZXE68vy1+IrHMLB/MGfHjAfBgNVHSME\n\
GDAWgBQG79Amut9ixts9h18NZSY3LtvUiDAKBggqhkjOPQQDAgNIADBFAiEAqbud\n\
6IJiSCoDcwJJanYzNahFBrg/OLEdc+IyObghzXkCIAmnxHvY70Q168RItj/lQqeM\n\
f+MC0CenlFz9NSjVRya7\n\
-----END CERTIFICATE-----\n\
";

    pub const NODE_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg87WsJvv+2Id1+7yn\n\
xDyiMOV7OOfH7TE/YfoSE9BjRsqhRANCAATnePF4RJ+rpjp/sbJkm6jik+dkUx9I\n\
EcHbhME5MvHTs3WxdgiGXlJUd0UEDGVlD0uNBv0OM6grSch/aMgr4fC2\n\
-----END PRIVATE KEY-----\n\
";

    pub const OTHER_CERT: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBtTCCAVqgAwIBAgIUfQlwaKKR6tmoKS5dCxRnjMs4t98wCgYIKoZIzj0EAwIw\n\
EzERMA8GA1UEAwwIb3RoZXIgQ0EwIBcNMjYxMTI0MDgxNDAzWhgPMjEyNjEwMzEw\n\
ODE0MDNaMBMxETAPBgNVBAMMCGludHJ1ZGVyMFkwEwYHKoZIzj0CAQYIKoZIzj0D\n\
AQcDQgAExRXnqohA7tgUD+cVLzKIqsRAglVHKvk5Lsr4BNyObt3h+FYzuYHhtFPc\n\
xm3osaBYJnhbV2EZtDSVhKgYsLPYhaOBiTCBhjAaBgNVHREEEzARhwR/AAABggls\n\
b2NhbGhvc3QwCQYDVR0TBAIwADAdBgNVHSUEFjAUBggrBgEFBQcDAQYIKwYBBQUH\n\
AwIwHQYDVR0OBBYEFIvAh4UaIceLmJfLimlu5SPbPgd1MB8GA1UdIwQYMBaAFEwn\n\
NV0gyYnIlQOoy37ZJMMmtMGfMAoGCCqGSM49BAMCA0kAMEYCIQCr2Xm55oLIxZcv\n\
TtzU68H0yLbXA4XdAD4JJ55zoC3rowIhAI80hnZMwkxazJ/dv1l7bATVqzOxC5Ai\n\
v2EeSiHGpoHH\n\
-----END CERTIFICATE-----\n\
";

    pub const OTHER_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgB1fX18BUQpmXa5Mb\n\
kTkIWiXl6wjkVOuJXi9N8RDyzfGhRANCAATFFeeqiEDu2BQP5xUvMoiqxECCVUcq\n\
+TkuyvgE3I5u3eH4VjO5geG0U9zGbeixoFgmeFtXYRm0NJWEqBiws9iF\n\
-----END PRIVATE KEY-----\n\
";

    /// Writes the PEM files into `dir` and names them: the node's identity (or the
    /// intruder's), trusting `ca` as the client CA and `peer_ca` for peers.
    pub fn files(dir: &Path, intruder: bool, client_ca: bool, peer_ca: bool) -> TlsFiles {
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (cert, key) = if intruder {
            (OTHER_CERT, OTHER_KEY)
        } else {
            (NODE_CERT, NODE_KEY)
        };
        let prefix = if intruder { "other" } else { "node" };
        let ca = write("ca.crt", CA);
        TlsFiles {
            cert: write(&format!("{prefix}.crt"), cert),
            key: write(&format!("{prefix}.key"), key),
            client_ca: client_ca.then(|| ca.clone()),
            peer_ca: peer_ca.then_some(ca),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS session between `client` (connecting to `name`) and `server` over an in-memory
    /// pipe, with one byte each way: Ok when both sides accepted the other.
    async fn session(client: &Tls, server: &Tls, name: &str) -> Result<(), String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = server.acceptor();
        let served = tokio::spawn(async move {
            let mut s = acceptor.accept(b).await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            s.write_all(&byte).await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())
        });
        let talked = async {
            let name = peer_server_name(name).map_err(|e| e.to_string())?;
            let mut c = client
                .connector()
                .connect(name, a)
                .await
                .map_err(|e| e.to_string())?;
            c.write_all(b"x").await.map_err(|e| e.to_string())?;
            c.flush().await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            c.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        }
        .await;
        let served = served.await.map_err(|e| e.to_string())?;
        talked.and(served)
    }

    fn load(dir: &Path, intruder: bool, client_ca: bool, peer_ca: bool) -> Tls {
        Tls::load(test_pki::files(dir, intruder, client_ca, peer_ca)).unwrap()
    }

    #[test]
    fn peers_are_trusted_by_the_peer_ca_then_the_client_ca_then_the_own_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = test_pki::files(dir.path(), false, true, true);
        let ca = dir.path().join("ca.crt");
        assert_eq!(files.peer_trust(), PeerTrust::Ca(ca.clone()));
        // A peer CA file that does not exist (an optional Secret key) is not in force.
        files.peer_ca = Some(dir.path().join("absent.crt"));
        assert_eq!(files.peer_trust(), PeerTrust::Ca(ca));
        files.client_ca = None;
        assert_eq!(files.peer_trust(), PeerTrust::OwnCertificate);
        assert!(files.client_config().is_ok());
        // Once the file appears it is used.
        std::fs::write(dir.path().join("absent.crt"), test_pki::CA).unwrap();
        assert!(matches!(files.peer_trust(), PeerTrust::Ca(_)));
        // A peer CA file that exists but holds no certificate is an error, not a fallback.
        std::fs::write(dir.path().join("absent.crt"), "garbage").unwrap();
        assert!(files.client_config().is_err());
    }

    #[test]
    fn host_names_and_ip_addresses_are_server_names() {
        assert!(matches!(
            peer_server_name("web-0.web-peers.ns.svc"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(matches!(
            peer_server_name("10.0.0.7"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            peer_server_name("fd00::7"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(peer_server_name("not a name").is_err());
    }

    #[tokio::test]
    async fn with_a_ca_peers_are_verified_for_the_member_host() {
        let dir = tempfile::tempdir().unwrap();
        let node = load(dir.path(), false, false, true);
        session(&node, &node, "127.0.0.1").await.unwrap();
        session(&node, &node, "localhost").await.unwrap();
        let wrong_name = session(&node, &node, "web-0.web-peers.ns.svc").await;
        let error = wrong_name.unwrap_err();
        assert!(error.contains("not valid for name"), "{error}");
        // A certificate from another CA is refused, whatever name it carries.
        let intruder = load(dir.path(), true, false, false);
        let error = session(&node, &intruder, "127.0.0.1").await.unwrap_err();
        assert!(error.contains("UnknownIssuer"), "{error}");
    }

    #[tokio::test]
    async fn without_a_ca_only_the_own_certificate_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let node = load(dir.path(), false, false, false);
        assert_eq!(node.peer_trust(), PeerTrust::OwnCertificate);
        session(&node, &node, "127.0.0.1").await.unwrap();
        assert!(session(&node, &node, "elsewhere.example").await.is_err());
        let intruder = load(dir.path(), true, false, false);
        for error in [
            session(&node, &intruder, "127.0.0.1").await.unwrap_err(),
            session(&intruder, &node, "127.0.0.1").await.unwrap_err(),
        ] {
            assert!(error.contains("invalid peer certificate"), "{error}");
        }
    }

    #[tokio::test]
    async fn with_a_client_ca_nodes_present_their_certificate_to_each_other() {
        let dir = tempfile::tempdir().unwrap();
        // --tls-client-ca alone: it verifies both directions (mutual TLS).
        let node = load(dir.path(), false, true, false);
        assert!(matches!(node.peer_trust(), PeerTrust::Ca(_)));
        session(&node, &node, "127.0.0.1").await.unwrap();
        // The intruder trusts the node (same CA for peers) but holds no certificate the
        // node's CA signed: the node refuses it as a client.
        let other_dir = tempfile::tempdir().unwrap();
        let mut files = test_pki::files(other_dir.path(), true, false, true);
        files.peer_ca = Some(dir.path().join("ca.crt"));
        let intruder = Tls::load(files).unwrap();
        let error = session(&intruder, &node, "127.0.0.1").await.unwrap_err();
        assert!(error.contains("alert: UnknownCA"), "{error}");
    }
}
