//! Tests of the real `kache-node` binary over TCP: pipelining, graceful shutdown, admin
//! endpoint, connection limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{http_get, Node};

/// Reads until `expected_len` bytes arrived or the peer closed.
fn read_exact_len(s: &mut TcpStream, expected_len: usize) -> Vec<u8> {
    let mut out = vec![0u8; 0];
    let mut buf = [0u8; 65536];
    while out.len() < expected_len {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read failed after {} bytes: {e}", out.len()),
        }
    }
    out
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let node = Node::start(&[]);
    let mut s = node.connect();
    let mut request = Vec::new();
    let mut expected = Vec::new();
    for i in 0..500 {
        request.extend_from_slice(
            format!("set k{i} {i} 0 {}\r\nv{i}\r\n", format!("v{i}").len()).as_bytes(),
        );
        expected.extend_from_slice(b"STORED\r\n");
        request.extend_from_slice(format!("get k{i}\r\n").as_bytes());
        expected.extend_from_slice(
            format!(
                "VALUE k{i} {i} {}\r\nv{i}\r\nEND\r\n",
                format!("v{i}").len()
            )
            .as_bytes(),
        );
        request.extend_from_slice(format!("incr k{i} 1\r\n").as_bytes());
        expected
            .extend_from_slice(b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n");
    }
    s.write_all(&request).unwrap();
    let got = read_exact_len(&mut s, expected.len());
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&expected)
    );
}

#[test]
fn requests_split_byte_by_byte_get_the_same_reply() {
    let node = Node::start(&[]);
    let mut s = node.connect();
    s.set_nodelay(true).unwrap();
    for b in b"set split 7 0 5\r\nhello\r\nget split\r\n" {
        s.write_all(&[*b]).unwrap();
    }
    let expected = b"STORED\r\nVALUE split 7 5\r\nhello\r\nEND\r\n";
    assert_eq!(read_exact_len(&mut s, expected.len()), expected);
}

#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_zero() {
    let mut node = Node::start(&[]);
    let mut busy = node.connect();
    let _idle = node.connect();
    // Half a request: the line and part of the data block, read by the node.
    let half = b"set inflight 0 0 10\r\n01234";
    let read_before = node.metric("kache_bytes_read_total");
    busy.write_all(half).unwrap();
    node.wait_metric("kache_bytes_read_total", read_before + half.len() as u64);
    node.terminate();
    // New connections are refused once shutdown began (SIGTERM is handled asynchronously:
    // wait for it, bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", node.port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "new connections still accepted 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    busy.write_all(b"56789\r\n").unwrap();
    assert_eq!(read_exact_len(&mut busy, 8), b"STORED\r\n");
    drop(busy);
    let status = node
        .wait_exit(Duration::from_secs(5))
        .expect("kache-node did not exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
}

/// `--shutdown-delay`: after SIGTERM the node reports not ready at once, but accepts and
/// serves new connections for the delay (so kube-proxy can drop its endpoint first), and
/// refuses them only once the delay is over.
#[test]
fn sigterm_with_a_shutdown_delay_serves_new_connections_until_the_delay_ends() {
    const DELAY: Duration = Duration::from_secs(4);
    let mut node = Node::start(&["--shutdown-delay", "4"]);
    let mut open = node.connect();
    assert_eq!(http_get(node.admin_port, "/readyz").0, 200);
    let signalled = Instant::now();
    node.terminate();
    // The signal is handled asynchronously: wait until it was taken (readiness drops).
    while http_get(node.admin_port, "/readyz").0 == 200 {
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "/readyz still 200 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Within the delay: a new connection is accepted and served, so is an open one, and
    // the node stays live.
    let mut late = node.connect();
    late.write_all(b"set late 0 0 2\r\nok\r\nget late\r\n")
        .unwrap();
    let expected = b"STORED\r\nVALUE late 0 2\r\nok\r\nEND\r\n";
    assert_eq!(read_exact_len(&mut late, expected.len()), expected);
    open.write_all(b"get late\r\n").unwrap();
    let expected = b"VALUE late 0 2\r\nok\r\nEND\r\n";
    assert_eq!(read_exact_len(&mut open, expected.len()), expected);
    assert_eq!(http_get(node.admin_port, "/healthz").0, 200);
    assert_eq!(http_get(node.admin_port, "/readyz").0, 503);
    let served = signalled.elapsed();
    assert!(
        served < DELAY,
        "the checks above took {served:?}, past the {DELAY:?} delay: they prove nothing"
    );
    drop((late, open));
    // Then new connections are refused, not before the delay is over.
    while TcpStream::connect(("127.0.0.1", node.port)).is_ok() {
        assert!(
            signalled.elapsed() < DELAY + Duration::from_secs(10),
            "new connections still accepted 10 s after the delay"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused = signalled.elapsed();
    assert!(
        refused >= DELAY,
        "new connections refused {refused:?} after SIGTERM, within the {DELAY:?} delay"
    );
    let status = node
        .wait_exit(Duration::from_secs(10))
        .expect("kache-node did not exit after the delay");
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn admin_endpoint_reports_health_readiness_and_metrics() {
    let node = Node::start(&[]);
    let mut s = node.connect();
    s.write_all(b"set m 0 0 1\r\nx\r\nget m\r\nget nope\r\n")
        .unwrap();
    read_exact_len(
        &mut s,
        b"STORED\r\nVALUE m 0 1\r\nx\r\nEND\r\nEND\r\n".len(),
    );
    assert_eq!(http_get(node.admin_port, "/healthz").0, 200);
    assert_eq!(http_get(node.admin_port, "/readyz").0, 200);
    let (status, body) = http_get(node.admin_port, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("kache_cmd_get_total 2"), "{body}");
    assert!(body.contains("kache_get_hits_total 1"), "{body}");
    assert!(body.contains("kache_get_misses_total 1"), "{body}");
    assert!(body.contains("kache_curr_items 1"), "{body}");
    assert_eq!(http_get(node.admin_port, "/nope").0, 404);
}

/// Polls `stats` on `conn` until every `(name, value)` holds at once (bounded).
fn wait_for_stats(conn: &mut TcpStream, expected: &[(&str, &str)]) {
    let wanted: Vec<String> = expected
        .iter()
        .map(|(name, value)| format!("STAT {name} {value}\r\n"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        conn.write_all(b"stats\r\n").unwrap();
        let mut text = Vec::new();
        let mut buf = [0u8; 8192];
        while !text.ends_with(b"END\r\n") {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed");
            text.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&text);
        if wanted.iter().all(|w| text.contains(w.as_str())) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {expected:?} in {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connections_over_the_limit_are_refused_without_harming_others() {
    let node = Node::start(&["-c", "2"]);
    let mut a = node.connect();
    wait_for_stats(
        &mut a,
        &[("curr_connections", "1"), ("total_connections", "1")],
    );
    let _b = node.connect();
    wait_for_stats(
        &mut a,
        &[("curr_connections", "2"), ("total_connections", "2")],
    );
    let mut c = node.connect();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "ERROR Too many open connections\r\n");
    a.write_all(b"version\r\n").unwrap();
    let got = read_exact_len(&mut a, 9);
    assert!(got.starts_with(b"VERSION "), "{got:?}");
}

#[test]
fn invalid_command_lines_fail_at_start_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_kache-node"))
        .args(["-Q"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("-Q"));
    // memcached's own refusals, with its words and exit codes.
    let out = Command::new(env!("CARGO_BIN_EXE_kache-node"))
        .args(["-m", "1", "-I", "1m"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "Cannot set item size limit higher than 1/2 of memory max.\n"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_kache-node"))
        .args(["-o", "modern,bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).ends_with("Illegal suboption \"bogus\"\n"));
}
