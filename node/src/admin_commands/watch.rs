//! `watch`: memcached's live log stream of fetches, mutations and evictions.
//!
//! A request that logs formats its line once and appends it to the buffer of every watcher
//! that asked for its type, under that watcher's own short lock; a watcher's connection
//! drains its buffer to the socket. A buffer is bounded in bytes (`-o watcher_logbuf_size`):
//! when a slow watcher lets it fill, new lines are dropped for that watcher and counted, and
//! it is told `skipped=N` once there is room again, as memcached does. The cache never waits
//! for a watcher.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::protocol::admin::{uri_encode, WatchFlags};
use crate::protocol::reply;
use crate::store::{bits, EvictionObserver, ItemRef};

/// memcached's `WATCHER_LIMIT`.
const WATCHER_LIMIT: usize = 20;
/// Room kept for a `skipped=N` line (memcached reserves 128 bytes with each line).
const SKIP_LINE_ROOM: usize = 128;

/// What a `watch` connection reads from.
pub struct Watcher {
    flags: WatchFlags,
    limit: usize,
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Default)]
struct Queue {
    buf: BytesMut,
    skipped: u64,
}

impl Watcher {
    /// Waits until there is something to send, then takes it (empty when woken for nothing).
    pub async fn next(&self, into: &mut BytesMut) {
        loop {
            {
                let mut queue = self.queue.lock();
                if !queue.buf.is_empty() {
                    into.extend_from_slice(&queue.buf);
                    queue.buf.clear();
                    return;
                }
            }
            self.wake.notified().await;
        }
    }

    fn offer(&self, line: &[u8], stats: &LogStats) {
        let mut queue = self.queue.lock();
        if queue.buf.len() + line.len() + SKIP_LINE_ROOM > self.limit {
            queue.skipped += 1;
            stats.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if queue.skipped > 0 {
            let note = format!("skipped={}\n", queue.skipped);
            queue.buf.put_slice(note.as_bytes());
            queue.skipped = 0;
        }
        queue.buf.put_slice(line);
        stats.sent.fetch_add(1, Ordering::Relaxed);
        drop(queue);
        self.wake.notify_one();
    }
}

#[derive(Default)]
struct LogStats {
    sent: AtomicU64,
    skipped: AtomicU64,
}

/// The watchers, and what requests log to them.
pub struct Logger {
    /// Union of every watcher's flags: one load tells a request whether to log at all.
    wanted: AtomicU16,
    gid: AtomicU64,
    buf_size: usize,
    watchers: Mutex<Vec<Arc<Watcher>>>,
    stats: LogStats,
}

/// Keeps a watcher registered until dropped.
pub struct Registration {
    logger: Arc<Logger>,
    pub watcher: Arc<Watcher>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut watchers = self.logger.watchers.lock();
        watchers.retain(|w| !Arc::ptr_eq(w, &self.watcher));
        self.logger.recompute(&watchers);
    }
}

/// A store command's outcome, as `type=item_store` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreStatus {
    NotStored,
    Stored,
    Exists,
    NotFound,
    TooLarge,
    NoMemory,
}

impl StoreStatus {
    fn name(self) -> &'static str {
        match self {
            StoreStatus::NotStored => "not_stored",
            StoreStatus::Stored => "stored",
            StoreStatus::Exists => "exists",
            StoreStatus::NotFound => "not_found",
            StoreStatus::TooLarge => "too_large",
            StoreStatus::NoMemory => "no_memory",
        }
    }
}

/// A lookup's outcome, as `type=item_get` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchStatus {
    NotFound,
    Found,
    Flushed,
    Expired,
}

impl Logger {
    pub fn new(buf_size: usize) -> Logger {
        Logger {
            wanted: AtomicU16::new(0),
            gid: AtomicU64::new(0),
            buf_size: buf_size.max(SKIP_LINE_ROOM * 2),
            watchers: Mutex::new(Vec::new()),
            stats: LogStats::default(),
        }
    }

    fn recompute(&self, watchers: &[Arc<Watcher>]) {
        let all = watchers.iter().fold(0, |acc, w| acc | w.flags.0);
        self.wanted.store(all, Ordering::Relaxed);
    }

    /// Registers a watcher (`None` when memcached's 20 are already watching); its buffer
    /// starts with `OK`.
    pub fn add(self: &Arc<Self>, flags: WatchFlags) -> Option<Registration> {
        let mut watchers = self.watchers.lock();
        if watchers.len() >= WATCHER_LIMIT {
            return None;
        }
        let watcher = Arc::new(Watcher {
            flags,
            limit: self.buf_size,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        });
        watcher.queue.lock().buf.put_slice(b"OK\r\n");
        watchers.push(watcher.clone());
        self.recompute(&watchers);
        Some(Registration {
            logger: self.clone(),
            watcher,
        })
    }

    /// Whether any watcher wants lines of this type.
    pub fn wants(&self, flag: u16) -> bool {
        self.wanted.load(Ordering::Relaxed) & flag != 0
    }

    /// `log_watchers`, `log_watcher_sent`, `log_watcher_skipped`.
    pub fn counts(&self) -> (usize, u64, u64) {
        (
            self.watchers.lock().len(),
            self.stats.sent.load(Ordering::Relaxed),
            self.stats.skipped.load(Ordering::Relaxed),
        )
    }

    fn emit(&self, flag: u16, body: impl FnOnce(&mut BytesMut)) {
        let targets: Vec<Arc<Watcher>> = self
            .watchers
            .lock()
            .iter()
            .filter(|w| w.flags.has(flag))
            .cloned()
            .collect();
        if targets.is_empty() {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut line = BytesMut::with_capacity(256);
        line.put_slice(b"ts=");
        reply::number(&mut line, now.as_secs());
        line.put_u8(b'.');
        reply::number(&mut line, now.subsec_micros());
        line.put_slice(b" gid=");
        reply::number(&mut line, self.gid.fetch_add(1, Ordering::Relaxed) + 1);
        body(&mut line);
        line.put_u8(b'\n');
        for watcher in targets {
            watcher.offer(&line, &self.stats);
        }
    }

    /// `type=item_get`: a key looked up; `item` is (class, value length) when found.
    pub fn fetch(&self, key: &[u8], status: FetchStatus, item: Option<(u8, usize)>, conn: usize) {
        if !self.wants(WatchFlags::FETCHERS) {
            return;
        }
        let (class, size) = item.unwrap_or((0, 0));
        self.emit(WatchFlags::FETCHERS, |line| {
            line.put_slice(b" type=item_get key=");
            put_key(line, key);
            line.put_slice(b" status=");
            line.put_slice(
                match status {
                    FetchStatus::NotFound => "not_found",
                    FetchStatus::Found => "found",
                    FetchStatus::Flushed => "flushed",
                    FetchStatus::Expired => "expired",
                }
                .as_bytes(),
            );
            put_tail(line, class, conn, size);
        });
    }

    /// `type=item_store`: a store command's outcome; `ttl` is the seconds left (0: none).
    #[allow(clippy::too_many_arguments)]
    pub fn store(
        &self,
        key: &[u8],
        status: StoreStatus,
        command: &str,
        ttl: u32,
        class: u8,
        size: usize,
        conn: usize,
    ) {
        if !self.wants(WatchFlags::MUTATIONS) {
            return;
        }
        self.emit(WatchFlags::MUTATIONS, |line| {
            line.put_slice(b" type=item_store key=");
            put_key(line, key);
            line.put_slice(b" status=");
            line.put_slice(status.name().as_bytes());
            line.put_slice(b" cmd=");
            line.put_slice(command.as_bytes());
            line.put_slice(b" ttl=");
            reply::number(line, ttl);
            put_tail(line, class, conn, size);
        });
    }
}

fn put_key(line: &mut BytesMut, key: &[u8]) {
    let mut encoded = Vec::with_capacity(key.len() * 3);
    uri_encode(key, &mut encoded);
    line.put_slice(&encoded);
}

/// ` clsid=N cfd=N size=N`.
fn put_tail(line: &mut BytesMut, class: u8, conn: usize, size: usize) {
    line.put_slice(b" clsid=");
    reply::number(line, class);
    line.put_slice(b" cfd=");
    reply::number(line, conn);
    line.put_slice(b" size=");
    reply::number(line, size);
}

/// The store's evictions, logged as `type=eviction`.
pub struct EvictionLog(pub Arc<Logger>);

impl EvictionObserver for EvictionLog {
    fn evicted(&self, item: &ItemRef<'_>, class: u8, now: u32) {
        if !self.0.wants(WatchFlags::EVICTIONS) {
            return;
        }
        self.0.emit(WatchFlags::EVICTIONS, |line| {
            line.put_slice(b" type=eviction key=");
            put_key(line, item.key());
            line.put_slice(if item.has(bits::FETCHED) {
                b" fetch=yes ttl="
            } else {
                b" fetch=no ttl="
            });
            match item.exptime() {
                0 => line.put_slice(b"-1"),
                at => reply::number(line, i64::from(at) - i64::from(now)),
            }
            line.put_slice(b" la=");
            reply::number(line, now.saturating_sub(item.time()));
            line.put_slice(b" clsid=");
            reply::number(line, class);
            line.put_slice(b" size=");
            reply::number(line, item.value().len());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_go_to_matching_watchers_and_overflow_is_skipped() {
        let logger = Arc::new(Logger::new(1024));
        let fetchers = logger.add(WatchFlags(WatchFlags::FETCHERS)).unwrap();
        let mutations = logger.add(WatchFlags(WatchFlags::MUTATIONS)).unwrap();
        logger.fetch(b"a b", FetchStatus::Found, Some((1, 3)), 7);
        let mut got = BytesMut::new();
        fetchers.watcher.next(&mut got).await;
        let text = String::from_utf8(got.to_vec()).unwrap();
        assert!(text.starts_with("OK\r\nts="), "{text}");
        assert!(
            text.ends_with(" type=item_get key=a%20b status=found clsid=1 cfd=7 size=3\n"),
            "{text}"
        );
        // A watcher that never reads: its buffer fills, then lines are counted as skipped.
        for _ in 0..100 {
            logger.store(b"k", StoreStatus::Stored, "set", 0, 1, 1, 7);
        }
        let (watchers, _, skipped) = logger.counts();
        assert_eq!(watchers, 2);
        assert!(skipped > 0);
        let mut got = BytesMut::new();
        mutations.watcher.next(&mut got).await;
        assert!(got.len() <= 1024);
        logger.store(b"k", StoreStatus::Stored, "set", 0, 1, 1, 7);
        let mut got = BytesMut::new();
        mutations.watcher.next(&mut got).await;
        assert!(String::from_utf8_lossy(&got).starts_with("skipped="));
        drop(fetchers);
        assert!(!logger.wants(WatchFlags::FETCHERS));
    }
}
