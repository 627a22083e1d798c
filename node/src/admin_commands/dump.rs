//! `lru_crawler metadump` (streamed in chunks, one shard lock at a time) and
//! `stats cachedump` (bounded to memcached's 2 MiB reply).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::ControlFlow;

use bytes::{BufMut, BytesMut};

use super::crawler::Crawler;
use crate::protocol::admin::{uri_encode, ClassSelection};
use crate::protocol::reply;
use crate::store::{bits, ItemRef, ScanCursor, Store};

/// Records one step of a dump reads under a shard's lock.
const SCAN_CHUNK: usize = 256;
/// memcached's cap on a `stats cachedump` reply.
const CACHEDUMP_LIMIT: usize = 2 * 1024 * 1024;

/// memcached's class and size of an item.
fn class_and_size(store: &Store, item: &ItemRef<'_>) -> (u8, usize) {
    let classes = store.classes();
    let size = classes.item_size(item.key().len(), item.client_flags(), item.value().len());
    (classes.class_of(size), size)
}

/// One `lru_crawler metadump`, holding the crawler until it is dropped.
pub struct Metadump<'a> {
    store: &'a Store,
    crawler: &'a Crawler,
    selection: ClassSelection,
    shard: usize,
    cursor: ScanCursor,
    finished: bool,
}

impl<'a> Metadump<'a> {
    /// A dump of `selection`; the crawler must already be held for it (`Crawler::try_hold`).
    pub fn new(store: &'a Store, crawler: &'a Crawler, selection: ClassSelection) -> Self {
        Metadump {
            store,
            crawler,
            selection,
            shard: 0,
            cursor: ScanCursor::default(),
            finished: false,
        }
    }

    /// Appends lines until `out` holds at least `target` bytes or the dump is over (then
    /// `END`). Returns whether it is over.
    pub fn fill(&mut self, now: u32, out: &mut BytesMut, target: usize) -> bool {
        let mut key = Vec::with_capacity(3 * 250);
        while !self.finished && out.len() < target {
            if self.shard >= self.store.shard_count() {
                out.put_slice(b"END\r\n");
                self.finished = true;
                break;
            }
            let next = self
                .store
                .scan(self.shard, self.cursor, SCAN_CHUNK, now, |item| {
                    let (class, size) = class_and_size(self.store, &item);
                    if !self.selection.includes(class) {
                        return ControlFlow::Continue(());
                    }
                    key.clear();
                    uri_encode(item.key(), &mut key);
                    out.put_slice(b"key=");
                    out.put_slice(&key);
                    out.put_slice(b" exp=");
                    match item.exptime() {
                        0 => out.put_slice(b"-1"),
                        at => reply::number(out, at),
                    }
                    out.put_slice(b" la=");
                    reply::number(out, item.time());
                    out.put_slice(b" cas=");
                    reply::number(out, item.cas());
                    out.put_slice(if item.has(bits::FETCHED) {
                        b" fetch=yes cls="
                    } else {
                        b" fetch=no cls="
                    });
                    reply::number(out, class);
                    out.put_slice(b" size=");
                    reply::number(out, size);
                    // memcached ends item lines with a bare newline, and only END with CRLF.
                    out.put_u8(b'\n');
                    ControlFlow::Continue(())
                });
            match next {
                Some(at) => self.cursor = at,
                None => {
                    self.shard += 1;
                    self.cursor = ScanCursor::default();
                }
            }
        }
        self.finished
    }
}

impl Drop for Metadump<'_> {
    fn drop(&mut self) {
        self.crawler.release();
    }
}

/// `stats cachedump <class> <limit>`: the class's most recently used items first, at most
/// `limit` (0: no limit) and at most 2 MiB of reply; binary keys are left out.
pub fn cachedump(store: &Store, class: u8, limit: u32, now: u32, out: &mut BytesMut) {
    // Oldest on top, so the least recent entry goes first when over a bound.
    let mut kept: BinaryHeap<Reverse<(u32, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut bytes = 0;
    for shard in 0..store.shard_count() {
        let mut start = ScanCursor::default();
        loop {
            let next = store.scan(shard, start, SCAN_CHUNK, now, |item| {
                if item.has(bits::KEY_BINARY) || class_and_size(store, &item).0 != class {
                    return ControlFlow::Continue(());
                }
                let mut line = Vec::with_capacity(item.key().len() + 40);
                line.extend_from_slice(b"ITEM ");
                line.extend_from_slice(item.key());
                line.extend_from_slice(
                    format!(" [{} b; {} s]\r\n", item.value().len(), item.exptime()).as_bytes(),
                );
                bytes += line.len();
                kept.push(Reverse((item.time(), item.cas(), line)));
                while (limit != 0 && kept.len() > limit as usize)
                    || bytes + b"END\r\n".len() > CACHEDUMP_LIMIT
                {
                    match kept.pop() {
                        Some(Reverse((_, _, dropped))) => bytes -= dropped.len(),
                        None => break,
                    }
                }
                ControlFlow::Continue(())
            });
            match next {
                Some(at) => start = at,
                None => break,
            }
        }
    }
    let mut lines: Vec<(u32, u64, Vec<u8>)> = kept.into_iter().map(|Reverse(e)| e).collect();
    lines.sort_unstable_by_key(|line| Reverse((line.0, line.1)));
    for (_, _, line) in &lines {
        out.put_slice(line);
    }
    out.put_slice(b"END\r\n");
}
