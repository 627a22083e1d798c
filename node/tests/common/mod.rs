//! Starting the real `kache-node` binary for the integration tests, on free loopback ports.
// Each test crate uses a different part of this module.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Timeout of every socket operation a test makes.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `kache-node`, killed when dropped.
pub struct Node {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    /// Set for a cluster node (`start_cluster`).
    pub peer_port: Option<u16>,
    _dir: Option<tempfile::TempDir>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A connection to `port` with `IO_TIMEOUT` on reads and writes.
pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), IO_TIMEOUT).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Waits until `port` accepts connections; false if the node exited first.
fn listening(port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))
        .is_err()
    {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "kache-node did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

impl Node {
    /// A standalone node with `extra` arguments.
    pub fn start(extra: &[&str]) -> Node {
        Node::launch(extra, false, None)
    }

    /// A standalone node whose log (stderr) goes to `log`.
    pub fn start_logged(extra: &[&str], log: &std::path::Path) -> Node {
        Node::launch(extra, false, Some(log))
    }

    /// A one-member cluster node (`n0`) following a member-list file, with a peer port.
    pub fn start_cluster() -> Node {
        Node::launch(&[], true, None)
    }

    /// Parallel tests can be handed the same "free" port; a node that loses that race exits
    /// at once (it cannot listen), so a node still running once its ports answer is this
    /// test's own. Otherwise it tries other ports.
    fn launch(extra: &[&str], cluster: bool, log: Option<&std::path::Path>) -> Node {
        for _ in 0..5 {
            let port = free_port();
            let admin_port = free_port();
            let mut command = Command::new(env!("CARGO_BIN_EXE_kache-node"));
            command
                .args(["-l", "127.0.0.1", "-p", &port.to_string()])
                .args(["--admin-port", &admin_port.to_string()])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(match log {
                    Some(path) => Stdio::from(
                        std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(path)
                            .unwrap(),
                    ),
                    None => Stdio::null(),
                });
            let (peer_port, dir) = if cluster {
                let peer_port = free_port();
                let dir = tempfile::tempdir().unwrap();
                let members = dir.path().join("members.json");
                std::fs::write(
                    &members,
                    format!(
                        r#"{{"version":1,"replicationFactor":1,"members":[{{"name":"n0","host":"127.0.0.1","ip":"127.0.0.1","port":{port},"peerPort":{peer_port}}}]}}"#
                    ),
                )
                .unwrap();
                command
                    .args(["--peer-port", &peer_port.to_string()])
                    .args(["--node-name", "n0"])
                    .arg("--members-file")
                    .arg(&members);
                (Some(peer_port), Some(dir))
            } else {
                (None, None)
            };
            let mut child = command.spawn().expect("start kache-node");
            let up =
                listening(port, &mut child) && peer_port.is_none_or(|p| listening(p, &mut child));
            if up {
                std::thread::sleep(Duration::from_millis(100));
                if child.try_wait().unwrap().is_none() {
                    return Node {
                        child,
                        port,
                        admin_port,
                        peer_port,
                        _dir: dir,
                    };
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start kache-node on free ports");
    }

    pub fn connect(&self) -> TcpStream {
        connect(self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `within` for the node to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "kache-node exited"
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
