//! Starting the real `kache-node` binary for the integration tests, on free loopback ports.
// Each test crate uses a different part of this module.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::io::{Read, Write};
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

/// How long a node gets to listen on its ports: generous, as the tests share the machine's
/// cores with compilers; a node that fails to start exits (and is reported) long before.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The TCP ports process `pid` itself listens on (its sockets in LISTEN state, from /proc).
/// A port that accepts connections may belong to another process that took it first.
fn listening_ports(pid: u32) -> HashSet<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let mut ports = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT, state 0A is LISTEN, field 9 the inode.
            if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                if let Some(port) = fields[1].rsplit(':').next() {
                    ports.insert(u16::from_str_radix(port, 16).unwrap());
                }
            }
        }
    }
    ports
}

/// Waits until `child` itself listens on every port of `ports`; false if it exited first
/// (typically because another process took one of them).
fn listening(child: &mut Child, ports: &[u16]) -> bool {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        let mine = listening_ports(child.id());
        if ports.iter().all(|p| mine.contains(p)) {
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "kache-node did not listen on {ports:?} within {START_TIMEOUT:?} (it listens on {mine:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET `path` from `port` (an admin endpoint): the status and the whole response.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = connect(port);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    (status, text)
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
    /// (it cannot listen), and it is started again on other ports. It is this test's node
    /// once the process itself listens on all its ports.
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
            let ports: Vec<u16> = [port, admin_port].into_iter().chain(peer_port).collect();
            if listening(&mut child, &ports) {
                return Node {
                    child,
                    port,
                    admin_port,
                    peer_port,
                    _dir: dir,
                };
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

    /// A counter or gauge of the node's `/metrics`, e.g. `kache_bytes_read_total`.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, body) = http_get(self.admin_port, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no metric {name} in {body}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits (bounded) until metric `name` is at least `target`; returns its value. E.g.
    /// `kache_bytes_read_total`: the node has read, and handled, what a test sent.
    pub fn wait_metric(&self, name: &str, target: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.metric(name);
            if value >= target {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {value}, still short of {target}"
            );
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
