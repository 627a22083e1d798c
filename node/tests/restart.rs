//! The restartable cache over the real binary: `-e FILE` keeps items across a SIGTERM
//! (all of them) and a `kill -9` (what was acknowledged), and a truncated or corrupted file
//! is discarded with a log line, never trusted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{connect, Node};

const ITEMS: usize = 20_000;

fn value(i: usize) -> Vec<u8> {
    let unit = format!("{i}-");
    unit.repeat(2000).into_bytes()[..50 + i % 400].to_vec()
}

/// Stores every item, each acknowledged (`STORED`).
fn fill(port: u16) {
    let mut s = connect(port);
    let mut r = BufReader::new(s.try_clone().unwrap());
    for lo in (0..ITEMS).step_by(500) {
        let mut batch = Vec::new();
        for i in lo..(lo + 500).min(ITEMS) {
            let v = value(i);
            batch.extend_from_slice(format!("set key{i} {} 0 {}\r\n", i % 7, v.len()).as_bytes());
            batch.extend_from_slice(&v);
            batch.extend_from_slice(b"\r\n");
        }
        s.write_all(&batch).unwrap();
        for _ in lo..(lo + 500).min(ITEMS) {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "STORED\r\n");
        }
    }
}

/// How many items the node serves with exactly the value and flags stored.
fn served(port: u16) -> usize {
    let mut s = connect(port);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut hits = 0;
    for lo in (0..ITEMS).step_by(100) {
        let keys: Vec<String> = (lo..(lo + 100).min(ITEMS))
            .map(|i| format!("key{i}"))
            .collect();
        s.write_all(format!("get {}\r\n", keys.join(" ")).as_bytes())
            .unwrap();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line == "END\r\n" {
                break;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(parts[0], "VALUE", "{line:?}");
            let i: usize = parts[1].trim_start_matches("key").parse().unwrap();
            let len: usize = parts[3].parse().unwrap();
            let mut data = vec![0u8; len + 2];
            r.read_exact(&mut data).unwrap();
            if data[..len] == value(i)[..] && parts[2] == (i % 7).to_string() {
                hits += 1;
            }
        }
    }
    hits
}

fn args(file: &Path) -> Vec<String> {
    vec![
        "-m".into(),
        "64".into(),
        "-t".into(),
        "2".into(),
        "-e".into(),
        file.display().to_string(),
    ]
}

fn start(file: &Path, log: &Path) -> Node {
    let a = args(file);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    Node::start_logged(&a, log)
}

/// SIGTERM, and a clean exit.
fn stop(node: &mut Node) {
    node.terminate();
    let status = node
        .wait_exit(Duration::from_secs(30))
        .expect("no exit after SIGTERM");
    assert_eq!(status.code(), Some(0));
}

fn wait_for_log(log: &Path, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let content = std::fs::read_to_string(log).unwrap_or_default();
        if content.contains(text) {
            return content;
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} in the log:\n{content}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_then_restart_serves_every_item() {
    let dir = tempfile::tempdir().unwrap();
    let (file, log) = (dir.path().join("memory"), dir.path().join("log"));
    let mut node = start(&file, &log);
    fill(node.port);
    stop(&mut node);
    let node = start(&file, &log);
    assert_eq!(served(node.port), ITEMS);
}

#[test]
fn kill_9_then_restart_serves_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (file, log) = (dir.path().join("memory"), dir.path().join("log"));
    let mut node = start(&file, &log);
    fill(node.port);
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    let node = start(&file, &log);
    let hits = served(node.port);
    assert!(
        hits * 100 >= ITEMS * 99,
        "{hits} of {ITEMS} items after kill -9"
    );
}

fn damaged_file_is_discarded(damage: impl FnOnce(&Path)) {
    damaged_file_is_discarded_because(damage, "memory file discarded; starting empty");
}

fn damaged_file_is_discarded_because(damage: impl FnOnce(&Path), reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (file, log) = (dir.path().join("memory"), dir.path().join("log"));
    let mut node = start(&file, &log);
    fill(node.port);
    stop(&mut node);
    damage(&file);
    let node = start(&file, &log);
    wait_for_log(&log, "memory file discarded; starting empty");
    wait_for_log(&log, reason);
    assert_eq!(served(node.port), 0);
    // The node works on its fresh file.
    let mut s = connect(node.port);
    s.write_all(b"set fresh 0 0 1\r\nx\r\nget fresh\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"END\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"STORED\r\nVALUE fresh 0 1\r\nx\r\nEND\r\n");
}

#[test]
fn a_file_of_the_previous_format_is_discarded() {
    // Format 1 records (4-byte aligned, always with an expiry) cannot be read as format 2.
    damaged_file_is_discarded_because(
        |file| {
            let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
            f.write_all_at(&1u32.to_le_bytes(), 8).unwrap();
        },
        "it has format 1, this kache reads format 2",
    );
}

#[test]
fn a_truncated_file_is_discarded() {
    damaged_file_is_discarded(|file| {
        let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len / 2).unwrap();
    });
}

#[test]
fn a_corrupted_file_is_discarded() {
    damaged_file_is_discarded(|file| {
        // Flip bytes all over the segments (some land in items): a checksum of the clean
        // shutdown fails.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file)
            .unwrap();
        let len = f.metadata().unwrap().len();
        for at in (len / 2..len).step_by(4 * 1024 * 1024 + 4099) {
            let mut b = [0u8; 16];
            f.read_exact_at(&mut b, at).unwrap();
            for x in &mut b {
                *x ^= 0xa5;
            }
            f.write_all_at(&b, at).unwrap();
        }
    });
}
