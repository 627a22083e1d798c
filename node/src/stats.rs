//! Server counters, named as memcached names them in `stats`.
//!
//! Connections count into a plain local `Counters` while they handle a batch of requests and
//! add it to the shared, sharded atomics once per batch, before the batch's replies are
//! written: no atomic operation on the per-request path, and `stats` never lags a reply a
//! client has already seen.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use crossbeam_utils::CachePadded;

macro_rules! counters {
    ($($name:ident: $help:literal),* $(,)?) => {
        /// Command counters of one connection's batch, or a snapshot of the whole server.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Counters {
            $(#[doc = $help] pub $name: u64,)*
        }

        #[derive(Default)]
        struct AtomicCounters {
            $($name: AtomicU64,)*
        }

        impl AtomicCounters {
            fn add(&self, c: &Counters) {
                $(if c.$name != 0 { self.$name.fetch_add(c.$name, Relaxed); })*
            }
            fn add_into(&self, total: &mut Counters) {
                $(total.$name += self.$name.load(Relaxed);)*
            }
            fn reset(&self) {
                $(self.$name.store(0, Relaxed);)*
            }
        }

        impl Counters {
            /// Calls `f` with each counter's memcached name, help text and value.
            pub fn for_each(&self, mut f: impl FnMut(&'static str, &'static str, u64)) {
                $(f(stringify!($name), $help, self.$name);)*
            }
        }
    };
}

counters! {
    cmd_get: "Retrieval requests (keys looked up by get, gets, mg).",
    cmd_set: "Storage requests.",
    cmd_flush: "flush_all requests.",
    cmd_touch: "Touch requests (touch, gat, gats, mg with T).",
    cmd_meta: "Meta debug (me) requests.",
    get_hits: "Keys found by retrieval requests.",
    get_misses: "Keys not found by retrieval requests.",
    get_expired: "Keys found but expired.",
    get_flushed: "Keys found but invalidated by flush_all.",
    delete_misses: "Deletes of keys that were not found.",
    delete_hits: "Deletes of keys that were found.",
    incr_misses: "incr of keys that were not found.",
    incr_hits: "incr of keys that were found.",
    decr_misses: "decr of keys that were not found.",
    decr_hits: "decr of keys that were found.",
    cas_misses: "cas of keys that were not found.",
    cas_hits: "cas that stored.",
    cas_badval: "cas refused because the CAS value differed.",
    touch_hits: "Touches of keys that were found.",
    touch_misses: "Touches of keys that were not found.",
    store_too_large: "Stores refused as larger than the item size limit.",
    store_no_memory: "Stores refused for lack of memory.",
    auth_cmds: "Authentication attempts.",
    auth_errors: "Failed authentication attempts.",
    bytes_read: "Bytes read from clients.",
    bytes_written: "Bytes written to clients.",
}

const SHARDS: usize = 16;

/// Server-wide counters.
pub struct Stats {
    shards: Box<[CachePadded<AtomicCounters>]>,
    pub curr_connections: AtomicU64,
    pub total_connections: AtomicU64,
    pub rejected_connections: AtomicU64,
    started: Instant,
    started_unix: u32,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(AtomicCounters::default()))
                .collect(),
            curr_connections: AtomicU64::new(0),
            total_connections: AtomicU64::new(0),
            rejected_connections: AtomicU64::new(0),
            started: Instant::now(),
            started_unix: crate::store::now_secs(),
        }
    }
}

impl Stats {
    /// Adds a connection's batch counters (`shard_hint` spreads connections over shards) and
    /// zeroes them.
    pub fn merge(&self, shard_hint: usize, local: &mut Counters) {
        if *local != Counters::default() {
            self.shards[shard_hint % SHARDS].add(local);
            *local = Counters::default();
        }
    }

    /// Sum of all counters.
    pub fn snapshot(&self) -> Counters {
        let mut total = Counters::default();
        for shard in self.shards.iter() {
            shard.add_into(&mut total);
        }
        total
    }

    /// `stats reset`.
    pub fn reset(&self) {
        for shard in self.shards.iter() {
            shard.reset();
        }
        self.total_connections.store(0, Relaxed);
        self.rejected_connections.store(0, Relaxed);
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub fn started_unix(&self) -> u32 {
        self.started_unix
    }
}

/// Most distinct key prefixes `stats detail` tracks; later ones are not counted.
const MAX_PREFIXES: usize = 10_000;
/// memcached's default prefix delimiter (`-D`).
const PREFIX_DELIMITER: u8 = b':';

/// What a prefix counter counts.
#[derive(Clone, Copy, Debug)]
pub enum PrefixOp {
    Get { hit: bool },
    Set,
    Delete,
}

#[derive(Clone, Copy, Debug, Default)]
struct PrefixCounts {
    get: u64,
    hit: u64,
    set: u64,
    del: u64,
}

/// Per-key-prefix counters of `stats detail on|off|dump`, off by default.
#[derive(Debug)]
pub struct PrefixStats {
    enabled: AtomicBool,
    delimiter: u8,
    table: parking_lot::Mutex<BTreeMap<Vec<u8>, PrefixCounts>>,
}

impl Default for PrefixStats {
    fn default() -> Self {
        PrefixStats::with_delimiter(PREFIX_DELIMITER)
    }
}

impl PrefixStats {
    /// Counters whose prefix ends at `delimiter` (memcached's `-D`).
    pub fn with_delimiter(delimiter: u8) -> Self {
        PrefixStats {
            enabled: AtomicBool::new(false),
            delimiter,
            table: parking_lot::Mutex::new(BTreeMap::new()),
        }
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    /// `stats reset` forgets the prefixes too.
    pub fn clear(&self) {
        self.table.lock().clear();
    }

    /// Counts an operation on `key` under its prefix (the part before the first `:`);
    /// keys without a prefix are not counted, as in memcached.
    pub fn record(&self, key: &[u8], op: PrefixOp) {
        if !self.enabled.load(Relaxed) {
            return;
        }
        let Some(end) = key.iter().position(|&b| b == self.delimiter) else {
            return;
        };
        let mut table = self.table.lock();
        if table.len() >= MAX_PREFIXES && !table.contains_key(&key[..end]) {
            return;
        }
        let counts = table.entry(key[..end].to_vec()).or_default();
        match op {
            PrefixOp::Get { hit } => {
                counts.get += 1;
                counts.hit += u64::from(hit);
            }
            PrefixOp::Set => counts.set += 1,
            PrefixOp::Delete => counts.del += 1,
        }
    }

    /// `stats detail dump`: one `PREFIX` line per prefix.
    pub fn dump(&self, out: &mut bytes::BytesMut) {
        use bytes::BufMut;
        for (prefix, c) in self.table.lock().iter() {
            out.put_slice(b"PREFIX ");
            out.put_slice(prefix);
            out.put_slice(
                format!(
                    " get {} hit {} set {} del {}\r\n",
                    c.get, c.hit, c.set, c.del
                )
                .as_bytes(),
            );
        }
    }
}
