//! Credentials for memcached-compatible authentication: the `--auth-file` (`user:password`
//! lines, memcached's `-Y` format), reloaded when the file changes so a rotated Kubernetes
//! Secret takes effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

/// Most entries read from an auth file.
const MAX_ENTRIES: usize = 1024;
/// How often the file is checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The accepted `user:password` pairs.
#[derive(Debug, Default)]
pub struct Credentials {
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Whether a peer's hello carries the cluster's secret (constant time).
pub fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    same(presented, expected)
}

/// Compares without an early exit, so timing does not tell how much matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// Why an auth file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("line {0}: expected user:password")]
    NoColon(usize),
    #[error("more than {MAX_ENTRIES} entries")]
    TooMany,
    #[error("no user:password entries")]
    Empty,
    /// A malformed file, named.
    #[error("{path}: {source}")]
    In {
        path: String,
        source: Box<AuthFileError>,
    },
}

impl Credentials {
    /// Parses an auth file: one `user:password` per line (the password runs to the end of
    /// the line); blank lines are skipped; a line without `:` is an error.
    pub fn parse(text: &[u8]) -> Result<Credentials, AuthFileError> {
        let mut entries = Vec::new();
        for (number, line) in text.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Err(AuthFileError::NoColon(number + 1));
            };
            if entries.len() == MAX_ENTRIES {
                return Err(AuthFileError::TooMany);
            }
            entries.push((line[..colon].to_vec(), line[colon + 1..].to_vec()));
        }
        if entries.is_empty() {
            return Err(AuthFileError::Empty);
        }
        Ok(Credentials { entries })
    }

    /// The first entry: what a client of the nodes (the proxy) logs in with.
    pub fn first(&self) -> Option<&(Vec<u8>, Vec<u8>)> {
        self.entries.first()
    }

    pub fn check(&self, user: &[u8], password: &[u8]) -> bool {
        // Every entry is compared, so the time taken does not depend on which one matched.
        self.entries
            .iter()
            .fold(false, |ok, (u, p)| ok | (same(u, user) & same(p, password)))
    }
}

/// Credentials that follow their file.
pub struct AuthFile {
    path: PathBuf,
    current: ArcSwap<Credentials>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl AuthFile {
    /// Loads the file once; a missing or malformed file is a start-up error.
    pub fn load(path: &Path) -> Result<AuthFile, AuthFileError> {
        let named = || path.display().to_string();
        let text = std::fs::read(path).map_err(|source| AuthFileError::Read {
            path: named(),
            source,
        })?;
        let credentials = Credentials::parse(&text).map_err(|e| AuthFileError::In {
            path: named(),
            source: Box::new(e),
        })?;
        Ok(AuthFile {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(credentials),
        })
    }

    pub fn check(&self, user: &[u8], password: &[u8]) -> bool {
        self.current.load().check(user, password)
    }

    /// The login request memcached's text-protocol authentication expects, made from the
    /// file's first entry: `set <key> 0 0 <length>` with the data `<user> <password>`.
    pub fn login_request(&self) -> Vec<u8> {
        let credentials = self.current.load();
        let (user, password) = credentials
            .first()
            .map_or((&[][..], &[][..]), |(u, p)| (u.as_slice(), p.as_slice()));
        let mut data = user.to_vec();
        data.push(b' ');
        data.extend_from_slice(password);
        let mut request = format!("set kache-auth 0 0 {}\r\n", data.len()).into_bytes();
        request.extend_from_slice(&data);
        request.extend_from_slice(b"\r\n");
        request
    }

    /// Re-reads the file whenever it changes, until `shutdown`. A bad new version is logged
    /// and ignored: the previous credentials stay in force.
    pub async fn follow(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut seen = modified(&self.path);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            let now = modified(&self.path);
            if now == seen {
                continue;
            }
            seen = now;
            match tokio::fs::read(&self.path)
                .await
                .map_err(|source| AuthFileError::Read {
                    path: self.path.display().to_string(),
                    source,
                })
                .and_then(|t| Credentials::parse(&t))
            {
                Ok(credentials) => {
                    self.current.store(Arc::new(credentials));
                    tracing::info!(path = %self.path.display(), "auth file reloaded");
                }
                Err(error) => {
                    tracing::warn!(path = %self.path.display(), %error, "ignoring bad auth file")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memcached_auth_files() {
        let c = Credentials::parse(b"alice:s3cret\r\nbob:pa:ss\n\n").unwrap();
        assert!(c.check(b"alice", b"s3cret"));
        assert!(c.check(b"bob", b"pa:ss"));
        assert!(!c.check(b"alice", b"s3cre"));
        assert!(!c.check(b"alice", b"s3crett"));
        assert!(!c.check(b"carol", b"s3cret"));
        assert!(Credentials::parse(b"nocolon\n").is_err());
        assert!(Credentials::parse(b"\n").is_err());
    }
}
