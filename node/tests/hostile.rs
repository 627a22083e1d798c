//! Hostile clients and peers against the real `kache-node` binary over TCP: slowloris,
//! connection floods, memory floods, garbage on the peer port, garbage request lines.
//!
//! Every socket operation has a timeout and every node is killed when its test ends. The
//! figures the lead reports (resident memory peaks, latencies) are printed with `eprintln!`
//! (run with `--nocapture` to see them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use bytes::BytesMut;
use common::{connect, Node};

/// What the node has read from its clients: waiting on it proves a test's bytes arrived.
const BYTES_READ: &str = "kache_bytes_read_total";
use kache_node::peer::wire::{self, Frame};

const MIB: u64 = 1024 * 1024;

impl Node {
    /// Resident memory of the node, in bytes.
    fn rss(&self) -> u64 {
        rss_of(self.pid())
    }
}

fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples a process's resident memory every 10 ms until stopped; returns the peak.
struct RssMonitor {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssMonitor {
    fn start(pid: u32) -> RssMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_of(pid)));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RssMonitor {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// Reads until the buffer ends with `suffix`.
fn read_until(s: &mut TcpStream, suffix: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while !out.ends_with(suffix) {
        match s.read(&mut buf) {
            Ok(0) => panic!(
                "connection closed before {:?}; got {:?}",
                String::from_utf8_lossy(suffix),
                String::from_utf8_lossy(&out)
            ),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "read failed waiting for {:?} after {:?}: {e}",
                String::from_utf8_lossy(suffix),
                String::from_utf8_lossy(&out)
            ),
        }
    }
    out
}

fn request(s: &mut TcpStream, req: &[u8], reply_suffix: &[u8]) -> String {
    s.write_all(req).unwrap();
    String::from_utf8_lossy(&read_until(s, reply_suffix)).into_owned()
}

fn set(s: &mut TcpStream, key: &str, value: &[u8]) {
    let mut req = format!("set {key} 0 0 {}\r\n", value.len()).into_bytes();
    req.extend_from_slice(value);
    req.extend_from_slice(b"\r\n");
    assert_eq!(request(s, &req, b"\r\n"), "STORED\r\n", "set {key}");
}

fn get(s: &mut TcpStream, key: &str) -> Option<Vec<u8>> {
    s.write_all(format!("get {key}\r\n").as_bytes()).unwrap();
    let reply = read_until(s, b"END\r\n");
    if reply == b"END\r\n" {
        return None;
    }
    let header_end = reply.iter().position(|&b| b == b'\n').unwrap() + 1;
    Some(reply[header_end..reply.len() - 7].to_vec())
}

/// `stats` as name/value pairs.
fn stats(s: &mut TcpStream) -> std::collections::HashMap<String, String> {
    let text = request(s, b"stats\r\n", b"END\r\n");
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ' ');
            (parts.next() == Some("STAT")).then(|| {
                (
                    parts.next().unwrap_or_default().to_string(),
                    parts.next().unwrap_or_default().to_string(),
                )
            })
        })
        .collect()
}

fn stat(stats: &std::collections::HashMap<String, String>, name: &str) -> u64 {
    stats
        .get(name)
        .unwrap_or_else(|| panic!("no stat {name}"))
        .parse()
        .unwrap()
}

/// Reads (and discards) until the node closes the connection; panics if it stays open.
/// Returns what was received before the close.
fn expect_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return got
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "connection still open after {within:?}; got {:?}",
                    String::from_utf8_lossy(&got)
                )
            }
            Err(e) => panic!("read failed: {e}"),
        }
        assert!(Instant::now() < deadline, "connection still open");
    }
}

/// Writes what the node will take; a node that closes early makes the rest fail, which is fine.
fn write_lossy(s: &mut TcpStream, bytes: &[u8]) {
    let _ = s.write_all(bytes);
}

/// A set and a get on a fresh connection must complete within `bound`.
fn answered_within(port: u16, bound: Duration, key: &str) -> Duration {
    let started = Instant::now();
    let mut s = connect(port);
    s.set_read_timeout(Some(bound)).unwrap();
    set(&mut s, key, b"alive");
    assert_eq!(get(&mut s, key).as_deref(), Some(&b"alive"[..]));
    let took = started.elapsed();
    assert!(took < bound, "a request took {took:?} (bound {bound:?})");
    took
}

// ---------------------------------------------------------------------------------------------

#[test]
fn slowloris_partial_lines_do_not_stall_other_clients() {
    let node = Node::start(&["-c", "256"]);
    let before = node.rss();
    let read_before = node.metric(BYTES_READ);
    let mut sent = 0;
    let mut stalled = Vec::new();
    for i in 0..50 {
        let mut s = node.connect();
        // Partial lines of every kind: a short get, a long get close to the unterminated-line
        // limit, a storage line without its data, a meta command.
        let partial: Vec<u8> = match i % 4 {
            0 => b"get slow".to_vec(),
            1 => {
                let mut v = b"get".to_vec();
                while v.len() < 2000 {
                    v.extend_from_slice(b" kk");
                }
                v
            }
            2 => b"set slow 0 0 100\r\n0123456789".to_vec(),
            _ => b"mg slow v".to_vec(),
        };
        s.write_all(&partial).unwrap();
        sent += partial.len() as u64;
        stalled.push(s);
    }
    // Every partial line is in the node's buffers before the others are timed.
    node.wait_metric(BYTES_READ, read_before + sent);
    let mut worst = Duration::ZERO;
    for i in 0..100 {
        worst = worst.max(answered_within(
            node.port,
            Duration::from_secs(2),
            &format!("k{i}"),
        ));
    }
    let after = node.rss();
    eprintln!(
        "hostile[slowloris]: 50 stalled connections; 100 other clients answered, worst {worst:?}; \
         RSS {:.1} MiB -> {:.1} MiB",
        before as f64 / MIB as f64,
        after as f64 / MIB as f64
    );
    assert!(
        after < before + 32 * MIB,
        "50 stalled partial lines grew RSS from {before} to {after}"
    );
    // The stalled connections are still served once they finish their requests.
    for (i, s) in stalled.iter_mut().enumerate() {
        let reply = match i % 4 {
            0 => request(s, b"\r\n", b"END\r\n"),
            1 => request(s, b"\r\n", b"END\r\n"),
            2 => request(s, &[[b'x'; 90].as_slice(), b"\r\n"].concat(), b"\r\n"),
            _ => request(s, b"\r\n", b"\r\n"),
        };
        assert!(
            matches!(reply.as_str(), "END\r\n" | "STORED\r\n" | "EN\r\n")
                || reply.starts_with("VALUE")
                || reply.starts_with("VA "),
            "stalled connection {i} got {reply:?}"
        );
    }
}

#[test]
fn a_stalled_data_block_holds_only_its_own_connection() {
    let node = Node::start(&[]);
    let mut other = node.connect();
    set(&mut other, "held", b"old");
    let mut slow = node.connect();
    let value = vec![b'v'; 1_000_000];
    let header = b"set held 0 0 1000000\r\n";
    let read_before = node.metric(BYTES_READ);
    slow.write_all(header).unwrap();
    slow.write_all(&value[..500_000]).unwrap();
    node.wait_metric(BYTES_READ, read_before + (header.len() + 500_000) as u64);
    // The half-received value is not visible and does not stop anybody else.
    assert_eq!(get(&mut other, "held").as_deref(), Some(&b"old"[..]));
    for i in 0..20 {
        answered_within(node.port, Duration::from_secs(2), &format!("o{i}"));
    }
    // Finishing the block completes the set on the slow connection only.
    slow.write_all(&value[500_000..]).unwrap();
    slow.write_all(b"\r\n").unwrap();
    assert_eq!(
        String::from_utf8_lossy(&read_until(&mut slow, b"\r\n")),
        "STORED\r\n"
    );
    assert_eq!(get(&mut other, "held").map(|v| v.len()), Some(1_000_000));
}

#[test]
fn partial_get_lines_hold_bounded_memory_and_overlong_ones_close() {
    // A multi-key get may be up to 2 MiB before its newline arrives (memcached's rule), so
    // stalled gets hold up to that much per connection: measure it.
    let node = Node::start(&["-c", "256"]);
    let before = node.rss();
    let monitor = RssMonitor::start(node.pid());
    let mut line = b"get ".to_vec();
    while line.len() < 2 * 1024 * 1024 - 1000 {
        line.extend_from_slice(b"somewhat_long_key_name_0123456789 ");
    }
    let read_before = node.metric(BYTES_READ);
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = node.connect();
        s.write_all(&line).unwrap();
        stalled.push(s);
    }
    // The node holds all 20 lines (the memory measured is theirs) before it is asked more.
    node.wait_metric(BYTES_READ, read_before + 20 * line.len() as u64);
    answered_within(node.port, Duration::from_secs(2), "during");
    let peak = monitor.finish();
    let per_conn = peak.saturating_sub(before) / 20;
    eprintln!(
        "hostile[partial-get]: 20 stalled ~2 MiB get lines: RSS {:.1} -> peak {:.1} MiB \
         ({:.2} MiB per connection)",
        before as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        per_conn as f64 / MIB as f64
    );
    assert!(
        per_conn <= 5 * MIB,
        "each stalled get line costs {per_conn} bytes of RSS"
    );
    // One more byte line past the limit closes that connection, and only that one.
    let mut over = node.connect();
    write_lossy(&mut over, &line);
    write_lossy(&mut over, &vec![b'k'; 2 * 1024 * 1024]);
    expect_closed(&mut over, Duration::from_secs(10));
    drop(stalled);
    answered_within(node.port, Duration::from_secs(2), "after");
}

#[test]
fn connections_beyond_the_limit_are_refused_while_others_keep_working() {
    let node = Node::start(&["-c", "8"]);
    let mut first = node.connect();
    assert_eq!(stat(&stats(&mut first), "curr_connections"), 1);
    let mut open: Vec<TcpStream> = std::iter::once(first)
        .chain((1..8).map(|_| node.connect()))
        .collect();
    for (i, s) in open.iter_mut().enumerate() {
        set(s, &format!("c{i}"), b"x");
    }
    for _ in 0..5 {
        let mut extra = node.connect();
        let got = expect_closed(&mut extra, Duration::from_secs(5));
        assert_eq!(
            String::from_utf8_lossy(&got),
            "ERROR Too many open connections\r\n"
        );
    }
    for (i, s) in open.iter_mut().enumerate() {
        assert_eq!(get(s, &format!("c{i}")).as_deref(), Some(&b"x"[..]));
    }
    let mut s = open.pop().unwrap();
    assert_eq!(stat(&stats(&mut s), "rejected_connections"), 5);
    drop(s);
    // A freed slot is usable again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = node.connect();
        s.write_all(b"version\r\n").unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) if buf[..n].starts_with(b"VERSION") => break,
            _ => assert!(Instant::now() < deadline, "freed slot not reused"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `-m 64` under ~320 MiB of maximum-size sets (half the writers pipelining) must keep the
/// node's resident memory within the idle process plus `-m` plus 48 MiB. The 48 MiB cover
/// each writer connection's read buffer (up to two items while a data block arrives), the item
/// being built while an old one is evicted, and allocator slack for 1 MiB blocks. Measured on
/// a debug build, 2 cores: idle RSS ~13.5 MiB, peak 86-106 MiB (22-42 MiB above `-m`, idle
/// process included).
#[test]
fn a_flood_of_maximum_size_sets_keeps_memory_bounded() {
    const LIMIT_MIB: u64 = 64;
    const OVERHEAD_MIB: u64 = 48;
    const WRITERS: usize = 4;
    const SETS_PER_WRITER: usize = 80;
    // The largest value `-I 1m` accepts for a 6-byte key is 1 MiB minus 65 bytes.
    const VALUE: usize = 1024 * 1024 - 512;
    let mut node = Node::start(&["-m", &LIMIT_MIB.to_string()]);
    let idle = node.rss();
    let monitor = RssMonitor::start(node.pid());
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let port = node.port;
            std::thread::spawn(move || {
                let mut s = connect(port);
                let value = vec![b'a' + w as u8; VALUE];
                if w % 2 == 0 {
                    for i in 0..SETS_PER_WRITER {
                        set(&mut s, &format!("w{w}-{i:03}"), &value);
                    }
                } else {
                    // Pipelined: every set is sent before any reply is read.
                    for i in 0..SETS_PER_WRITER {
                        let key = format!("w{w}-{i:03}");
                        s.write_all(format!("set {key} 0 0 {VALUE}\r\n").as_bytes())
                            .unwrap();
                        s.write_all(&value).unwrap();
                        s.write_all(b"\r\n").unwrap();
                    }
                    let replies = read_until(&mut s, &b"STORED\r\n".repeat(SETS_PER_WRITER));
                    assert_eq!(replies.len(), 8 * SETS_PER_WRITER);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let peak = monitor.finish();
    node.assert_alive();
    let mut s = node.connect();
    let st = stats(&mut s);
    let (bytes, limit, evictions) = (
        stat(&st, "bytes"),
        stat(&st, "limit_maxbytes"),
        stat(&st, "evictions"),
    );
    let total = (WRITERS * SETS_PER_WRITER * VALUE) as u64;
    eprintln!(
        "hostile[flood]: {} MiB of 1 MiB sets from {WRITERS} writers in {took:?}; RSS idle {:.1} \
         MiB, peak {:.1} MiB with -m {LIMIT_MIB} (peak - limit = {:.1} MiB); bytes {bytes} \
         limit_maxbytes {limit} evictions {evictions} curr_items {}",
        total / MIB,
        idle as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        (peak as f64 - (LIMIT_MIB * MIB) as f64) / MIB as f64,
        stat(&st, "curr_items"),
    );
    assert!(bytes <= limit, "bytes {bytes} over limit_maxbytes {limit}");
    assert_eq!(limit, LIMIT_MIB * MIB);
    assert!(evictions > 0, "no evictions after {total} bytes of sets");
    assert!(
        peak <= idle + (LIMIT_MIB + OVERHEAD_MIB) * MIB,
        "RSS peaked at {peak} bytes with -m {LIMIT_MIB} (idle {idle})"
    );
    // Whatever survived eviction is intact, and `curr_items` counts exactly that.
    let mut present = 0;
    for w in 0..WRITERS {
        for i in 0..SETS_PER_WRITER {
            if let Some(v) = get(&mut s, &format!("w{w}-{i:03}")) {
                present += 1;
                assert!(v.len() == VALUE && v.iter().all(|&b| b == b'a' + w as u8));
            }
        }
    }
    assert!(present > 0);
    assert_eq!(present, stat(&stats(&mut s), "curr_items"));
}

/// Sends `count` `noreply` sets of `value` under `prefix`N, in pipelined batches each closed
/// by `mn`, and checks nothing but the `MN`s came back.
fn set_many(
    s: &mut TcpStream,
    prefix: &str,
    count: usize,
    value: &[u8],
    exptime: impl Fn(usize) -> u32,
) {
    for lo in (0..count).step_by(500) {
        let mut batch = Vec::new();
        for i in lo..(lo + 500).min(count) {
            batch.extend_from_slice(
                format!(
                    "set {prefix}{i} 0 {} {} noreply\r\n",
                    exptime(i),
                    value.len()
                )
                .as_bytes(),
            );
            batch.extend_from_slice(value);
            batch.extend_from_slice(b"\r\n");
        }
        batch.extend_from_slice(b"mn\r\n");
        s.write_all(&batch).unwrap();
        assert_eq!(read_until(s, b"MN\r\n"), b"MN\r\n");
    }
}

/// Value sizes that shift (100 B, then 1000 B, then 5000 B values, 2 x `-m` of each under new
/// keys), then a phase where half the items have 1..60 s TTLs: a per-item allocator
/// fragments under this (1.5 x `-m` before the segment store); segments do not. The node's
/// resident memory stays within the idle process plus 1.10 x `-m` + 16 MiB, the store within
/// `limit_maxbytes`, and the newest keys are served.
#[test]
fn shifting_value_sizes_keep_memory_within_the_limit() {
    const LIMIT_MIB: u64 = 64;
    let node = Node::start(&["-m", &LIMIT_MIB.to_string()]);
    let idle = node.rss();
    let monitor = RssMonitor::start(node.pid());
    let mut s = node.connect();
    let phase_bytes = (2 * LIMIT_MIB * MIB) as usize;
    for (phase, size) in [100usize, 1000, 5000].into_iter().enumerate() {
        let value = vec![b'a' + phase as u8; size];
        set_many(
            &mut s,
            &format!("p{phase}-"),
            phase_bytes / size,
            &value,
            |_| 0,
        );
    }
    let newest = phase_bytes / 5000;
    let value = vec![b'c'; 5000];
    for i in newest - 1000..newest {
        assert_eq!(
            get(&mut s, &format!("p2-{i}")).as_deref(),
            Some(&value[..]),
            "p2-{i}"
        );
    }
    let value = vec![b't'; 800];
    set_many(&mut s, "t-", phase_bytes / 800, &value, |i| {
        if i % 2 == 0 {
            1 + (i % 60) as u32
        } else {
            0
        }
    });
    let peak = monitor.finish();
    let st = stats(&mut s);
    eprintln!(
        "hostile[shift]: RSS idle {:.1} MiB, peak {:.1} MiB with -m {LIMIT_MIB}; bytes {} evictions {}",
        idle as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        stat(&st, "bytes"),
        stat(&st, "evictions"),
    );
    assert!(stat(&st, "bytes") <= stat(&st, "limit_maxbytes"));
    assert!(stat(&st, "evictions") > 0);
    let bound = idle + LIMIT_MIB * MIB * 110 / 100 + 16 * MIB;
    assert!(
        peak <= bound,
        "RSS peaked at {peak} bytes, over {bound} (idle {idle})"
    );
}

#[test]
fn garbage_on_the_peer_port_closes_only_that_connection() {
    let node = Node::start_cluster();
    let peer_port = node.peer_port.unwrap();
    let mut client = node.connect();
    set(&mut client, "kept", b"value");
    let rejected_before = node.metric("kache_peer_rejected_total");

    let frame = |f: Frame| {
        let mut b = BytesMut::new();
        wire::encode(&f, &mut b);
        b.to_vec()
    };
    let hello = frame(Frame::Hello {
        node: "intruder".into(),
        ring_version: 0,
        secret: Vec::new(),
    });
    let mut noise = Vec::new();
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        noise.push(x as u8);
    }
    let mut lying_count = hello.clone();
    lying_count.extend_from_slice(&[0, 0, 0, 13, 2]);
    lying_count.extend_from_slice(&1u64.to_be_bytes());
    lying_count.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut unknown_kind = hello.clone();
    unknown_kind.extend_from_slice(&[0, 0, 0, 1, 99]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", noise),
        (
            "an HTTP request",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "a huge length prefix",
            vec![0xff, 0xff, 0xff, 0xff, 2, 0, 0],
        ),
        (
            "just over the frame limit",
            ((wire::MAX_FRAME + 1) as u32).to_be_bytes().to_vec(),
        ),
        ("a zero-length frame", vec![0, 0, 0, 0]),
        ("a frame before hello", frame(Frame::Ack { seq: 1 })),
        (
            "records before hello",
            frame(Frame::Records {
                seq: 1,
                records: Vec::new(),
            }),
        ),
        ("a record count that lies", lying_count),
        ("an unknown frame kind", unknown_kind),
        ("a memcached command", b"set k 0 0 1\r\nx\r\n".to_vec()),
    ];
    let started = Instant::now();
    for (what, bytes) in &cases {
        let mut s = connect(peer_port);
        write_lossy(&mut s, bytes);
        expect_closed(&mut s, Duration::from_secs(10));
        eprintln!("hostile[peer]: {what}: closed");
        // The node keeps serving clients after each one.
        assert_eq!(get(&mut client, "kept").as_deref(), Some(&b"value"[..]));
    }
    // A peer that connects and never says hello is dropped after the hello timeout.
    let mut silent = connect(peer_port);
    write_lossy(&mut silent, &[0, 0]);
    expect_closed(&mut silent, Duration::from_secs(15));
    let expected = rejected_before + cases.len() as u64 + 1;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rejected = node.metric("kache_peer_rejected_total");
    while rejected < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        rejected = node.metric("kache_peer_rejected_total");
    }
    eprintln!(
        "hostile[peer]: kache_peer_rejected_total {rejected_before} -> {rejected} after {} \
         hostile peer connections ({:?})",
        cases.len() + 1,
        started.elapsed()
    );
    assert_eq!(rejected, expected);
    // Client traffic and data are unaffected.
    assert_eq!(get(&mut client, "kept").as_deref(), Some(&b"value"[..]));
    answered_within(node.port, Duration::from_secs(2), "after-peer-garbage");
}

#[test]
fn garbage_request_lines_close_only_their_connection() {
    let node = Node::start(&[]);
    let mut keeper = node.connect();
    for i in 0..20 {
        set(
            &mut keeper,
            &format!("data{i}"),
            format!("value{i}").as_bytes(),
        );
    }
    let mut long_get = b"get ".to_vec();
    long_get.resize(2 * 1024 * 1024 + 100, b'k');
    let closing: Vec<(&str, Vec<u8>)> = vec![
        ("an overlong line", vec![b'x'; 4096]),
        ("an overlong set line", {
            let mut v = b"set k 0 0 1 ".to_vec();
            v.resize(3000, b' ');
            v
        }),
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("the binary protocol", {
            let mut v = vec![0x80, 0x00, 0x00, 0x01];
            v.resize(25, 0);
            v
        }),
        ("a get line over 2 MiB", long_get),
        ("NUL bytes", vec![0; 4096]),
    ];
    for (what, bytes) in &closing {
        let mut s = node.connect();
        write_lossy(&mut s, bytes);
        let got = expect_closed(&mut s, Duration::from_secs(10));
        eprintln!(
            "hostile[lines]: {what}: closed after {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // Garbage with line ends is answered with errors and the connection stays usable.
    let mut s = node.connect();
    let answered = request(
        &mut s,
        b"\x01\x02\x03 garbage\r\nset k 0 0 abc\r\nget \xff\xfe\r\nincr data1 1\r\nversion\r\n",
        format!("-kache-{}\r\n", env!("CARGO_PKG_VERSION")).as_bytes(),
    );
    assert_eq!(
        answered,
        format!(
            "ERROR\r\nCLIENT_ERROR bad command line format\r\nEND\r\n\
             CLIENT_ERROR cannot increment or decrement non-numeric value\r\n\
             VERSION {}\r\n",
            kache_node::engine::version_string()
        )
    );
    set(&mut s, "afterwards", b"ok");
    for i in 0..20 {
        assert_eq!(
            get(&mut keeper, &format!("data{i}")),
            Some(format!("value{i}").into_bytes())
        );
    }
    assert_eq!(get(&mut keeper, "afterwards").as_deref(), Some(&b"ok"[..]));
}
