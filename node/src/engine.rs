//! Executes parsed requests against the store and decides memcached's replies: typed
//! responses (`protocol::reply`, `protocol::meta_reply`) that the protocol module composes.
//!
//! Every branch here mirrors what memcached 1.6 answers for the same request, including its
//! corners (space-padded `decr` results, `noreply` silencing errors, meta flags echoed in
//! request order); the differential tests hold it to that.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use crate::admin_commands::watch::{EvictionLog, FetchStatus, StoreStatus};
use crate::admin_commands::{stats as admin_stats, Admin, AdminNext};
use crate::auth::AuthFile;
use crate::cluster::Cluster;
use crate::protocol::admin::{ClassSelection, WatchFlags};
use crate::protocol::meta_reply::{Markers, MetaDebug, MetaReply, MetaStatus, ReturnField};
use crate::protocol::reply::{Response, Value, NON_NUMERIC, OUT_OF_MEMORY, OUT_OF_MEMORY_STORING};
use crate::protocol::{
    exceeds_item_size, meta_set_mode, numbers, reply, GetCommand, KeyList, MetaCommand,
    MetaRequest, Request, StoreMode, StoreRequest,
};
use crate::record::{Record, DEFAULT_TOMBSTONE_TTL};
use crate::stats::{Counters, PrefixOp, PrefixStats, Stats};
use crate::store::classes::ClassOp;
use crate::store::{
    absolute_expiry, bits, Entry, ItemMeta, ItemRef, Lookup, NewItem, Store, StoreError,
};

/// memcached protocol level kache speaks, reported by `version` so clients that parse it
/// enable the features of that release.
pub const PROTOCOL_VERSION: &str = "1.6.18";

/// What `version` and `stats` report: the memcached release kache answers like, then
/// kache's own version (one token, so `STAT` lines keep three fields and clients that read
/// `major.minor.patch` see memcached's).
pub fn version_string() -> String {
    format!("{PROTOCOL_VERSION}-kache-{}", env!("CARGO_PKG_VERSION"))
}

pub use crate::admin_commands::Settings;

/// What the connection does after a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Write what is buffered, then close (`quit`).
    Close,
    /// Write what is buffered, then stream `lru_crawler metadump` (the crawler is held).
    Metadump(ClassSelection),
    /// Write what is buffered, then become a `watch` connection.
    Watch(WatchFlags),
}

/// The request executor shared by all connections: the store and memcached's command
/// semantics. Replication, hand-off and read-through live in `crate::node`, which wraps it.
pub struct Engine {
    pub store: Arc<Store>,
    pub stats: Stats,
    pub settings: Settings,
    /// The cluster this node belongs to, if any.
    pub cluster: Option<Arc<Cluster>>,
    /// `stats detail` per-prefix counters.
    pub prefixes: PrefixStats,
    /// Credentials clients must present first (`--auth-file`), if any.
    pub auth: Option<Arc<AuthFile>>,
    /// `lru_crawler`, `watch`, `stats conns` and the other operations commands.
    pub admin: Arc<Admin>,
    /// Seconds a delete's tombstone is kept in a cluster (`--tombstone-ttl`).
    tombstone_ttl: u32,
    /// A delete that finds nothing leaves a tombstone too, so its `NOT_FOUND` replicates
    /// and is confirmed by the other owners (`--write-acks quorum`/`all`).
    tombstone_misses: bool,
    verbosity: AtomicU32,
}

/// Per-connection state the engine writes into: counters, and the changes to replicate.
#[derive(Debug, Default)]
pub struct Context {
    pub counters: Counters,
    pub outbox: Outbox,
    /// The connection's id in `stats conns` and `watch` lines (`cfd`).
    pub conn_id: usize,
}

/// The changes a batch of requests made, to be sent to the keys' other owners.
#[derive(Debug, Default)]
pub struct Outbox {
    enabled: bool,
    pub records: Vec<Record>,
}

impl Outbox {
    /// An outbox that collects records only when `enabled` (the node is in a cluster).
    pub fn new(enabled: bool) -> Outbox {
        Outbox {
            enabled,
            records: Vec::new(),
        }
    }

    /// Records what the entry holds now (a value, or a delete's tombstone).
    fn push_current(&mut self, e: &Entry<'_>) {
        if self.enabled {
            if let Some(item) = e.current() {
                self.records.push(Record::of(item));
            }
        }
    }

    fn push_touch(&mut self, key: &[u8], exptime: u32) {
        if self.enabled {
            self.records.push(Record::touch(key, exptime));
        }
    }

    fn push_flush(&mut self, at: u32) {
        if self.enabled {
            self.records.push(Record::flush(at));
        }
    }
}

/// The key ElastiCache auto-discovery clients of old engines read the cluster from.
const ELASTICACHE_CLUSTER_KEY: &[u8] = b"AmazonElastiCache:cluster";

/// Result of a storage operation, as memcached names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoreResult {
    Stored,
    NotStored,
    Exists,
    NotFound,
    NoMemory,
}

/// The outcome of `incr`/`decr` on an entry.
enum Delta {
    Value(u64),
    NonNumeric,
    NotFound,
    CasMismatch,
    NoMemory,
}

impl Engine {
    pub fn new(
        store: Store,
        settings: Settings,
        verbosity: u32,
        cluster: Option<Arc<Cluster>>,
    ) -> Engine {
        let admin = Arc::new(Admin::new(&settings.memcached));
        admin.start(&store);
        store.observe_evictions(Some(Box::new(EvictionLog(admin.logger.clone()))));
        let prefixes = PrefixStats::with_delimiter(settings.memcached.prefix_delimiter);
        if settings.memcached.detail_enabled {
            prefixes.set_enabled(true);
        }
        Engine {
            store: Arc::new(store),
            stats: Stats::default(),
            settings,
            cluster,
            prefixes,
            auth: None,
            admin,
            tombstone_ttl: DEFAULT_TOMBSTONE_TTL,
            tombstone_misses: false,
            verbosity: AtomicU32::new(verbosity),
        }
    }

    /// The engine requiring clients to authenticate against `auth` first.
    pub fn with_auth(mut self, auth: Option<Arc<AuthFile>>) -> Engine {
        self.auth = auth;
        self
    }

    /// The engine keeping a delete's tombstone `seconds` (in a cluster), and with
    /// `misses`, leaving one for a delete that finds nothing (writes judged by quorum/all).
    pub fn with_tombstones(mut self, seconds: u32, misses: bool) -> Engine {
        self.tombstone_ttl = seconds;
        self.tombstone_misses = misses;
        self
    }

    /// Executes one request, appending its reply to `out`.
    pub fn execute(
        &self,
        request: Request<'_>,
        now: u32,
        out: &mut BytesMut,
        ctx: &mut Context,
    ) -> Next {
        let Context {
            counters,
            outbox,
            conn_id,
        } = ctx;
        let conn_id = *conn_id;
        let mark = out.len();
        // Commands answered with one line decide it here; the composer honours `noreply`.
        let (response, noreply) = match request {
            Request::Get {
                command,
                exptime,
                keys,
            } => {
                self.get(command, exptime, keys, now, out, counters, outbox, conn_id);
                return Next::Continue;
            }
            Request::Store(req) => (
                self.store_text(&req, now, counters, outbox, conn_id),
                req.noreply,
            ),
            Request::TooLarge {
                key,
                drop_existing,
                noreply,
            } => {
                counters.store_too_large += 1;
                self.admin
                    .logger
                    .store(&key, StoreStatus::TooLarge, "set", 0, 0, 0, conn_id);
                if drop_existing {
                    self.store
                        .with_entry(&key, now, |e| self.delete_entry(e, &key, outbox));
                }
                (Response::Line(reply::TOO_LARGE), noreply)
            }
            Request::Delete { key, noreply } => {
                self.prefixes.record(key, PrefixOp::Delete);
                let found = self.store.with_entry(key, now, |e| {
                    e.count(ClassOp::DeleteHit);
                    self.delete_entry(e, key, outbox)
                });
                if found {
                    counters.delete_hits += 1;
                    (Response::Deleted, noreply)
                } else {
                    counters.delete_misses += 1;
                    (Response::NotFound, noreply)
                }
            }
            Request::Arithmetic {
                incr,
                key,
                delta,
                noreply,
            } => {
                let result = self.store.with_entry(key, now, |e| {
                    let result = apply_delta(e, incr, delta, None);
                    if matches!(result, Delta::Value(_)) {
                        e.count(if incr {
                            ClassOp::IncrHit
                        } else {
                            ClassOp::DecrHit
                        });
                        outbox.push_current(e);
                    }
                    result
                });
                let response = match result {
                    Delta::Value(v) => {
                        count_delta_hit(counters, incr);
                        Response::Number(v)
                    }
                    Delta::NonNumeric => Response::Line(NON_NUMERIC),
                    Delta::NotFound | Delta::CasMismatch => {
                        count_delta_miss(counters, incr);
                        Response::NotFound
                    }
                    Delta::NoMemory => Response::Line(OUT_OF_MEMORY),
                };
                (response, noreply)
            }
            Request::Touch {
                key,
                exptime,
                noreply,
            } => {
                let exptime = absolute_expiry(i64::from(exptime), now);
                let found = self.store.with_entry(key, now, |e| {
                    let found = e.item_mut().map(|mut it| it.set_exptime(exptime)).is_some();
                    e.count(ClassOp::TouchHit);
                    e.bump();
                    if found {
                        outbox.push_touch(key, exptime);
                    }
                    found
                });
                counters.cmd_touch += 1;
                if found {
                    counters.touch_hits += 1;
                    (Response::Touched, noreply)
                } else {
                    counters.touch_misses += 1;
                    (Response::NotFound, noreply)
                }
            }
            Request::FlushAll { noreply, .. } if !self.settings.memcached.flush_enabled => (
                Response::Line("CLIENT_ERROR flush_all not allowed"),
                noreply,
            ),
            Request::FlushAll { delay, noreply } => {
                counters.cmd_flush += 1;
                let at = (delay > 0).then(|| absolute_expiry(i64::from(delay), now));
                self.store.flush(at);
                outbox.push_flush(at.unwrap_or(0));
                (Response::Ok, noreply)
            }
            Request::Version => {
                reply::version(out, &version_string());
                return Next::Continue;
            }
            Request::Verbosity { level, noreply } => {
                self.verbosity.store(level.min(2), Ordering::Relaxed);
                (Response::Ok, noreply)
            }
            Request::Quit => return Next::Close,
            Request::Stats { sub, arg } => {
                self.stats_command(sub, arg, now, out);
                return Next::Continue;
            }
            Request::CacheMemlimit { megabytes, noreply } => {
                if megabytes < 8 {
                    (
                        Response::Line("MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m"),
                        noreply,
                    )
                } else {
                    self.store.set_limit(megabytes as usize * 1024 * 1024);
                    (Response::Ok, noreply)
                }
            }
            Request::ConfigGet { what } => match (&self.cluster, what) {
                (Some(cluster), b"cluster") => {
                    out.put_slice(cluster.view().list.elasticache_config_reply().as_bytes());
                    return Next::Continue;
                }
                // memcached has no `config` command; a node outside a cluster answers as it.
                (None, _) => (Response::Line("ERROR"), false),
                (Some(_), _) => (Response::Line(reply::UNKNOWN_CONFIG_KEY), false),
            },
            Request::MetaNoop => (Response::MetaNoop, false),
            Request::Admin(req) => {
                let pending = mark > 0;
                return match self
                    .admin
                    .execute(req, &self.settings, &self.store, now, pending, out)
                {
                    AdminNext::Done => Next::Continue,
                    AdminNext::Metadump(selection) => Next::Metadump(selection),
                    AdminNext::Watch(flags) => Next::Watch(flags),
                    AdminNext::Close => Next::Close,
                };
            }
            Request::Meta(req) => {
                match req.command {
                    MetaCommand::Get => self.meta_get(&req, now, out, counters, outbox, conn_id),
                    MetaCommand::Set => self.meta_set(&req, now, out, counters, outbox, conn_id),
                    MetaCommand::Delete => self.meta_delete(&req, now, out, counters, outbox),
                    MetaCommand::Arithmetic => {
                        self.meta_arithmetic(&req, now, out, counters, outbox)
                    }
                }
                return Next::Continue;
            }
            Request::MetaDebug { key } => {
                counters.cmd_meta += 1;
                self.meta_debug(&key, now, out);
                return Next::Continue;
            }
            Request::Error {
                reply: text,
                noreply,
            } => (Response::Line(text), noreply),
        };
        response.compose(noreply, out);
        Next::Continue
    }

    /// Deletes the key's item. In a cluster the delete leaves a tombstone (and a record for
    /// the other owners) so older copies cannot come back. Returns whether there was one.
    fn delete_entry(&self, e: &mut Entry<'_>, key: &[u8], outbox: &mut Outbox) -> bool {
        if self.cluster.is_some() {
            let ttl = self.tombstone_ttl;
            let deleted = e.delete_with_tombstone(key, ttl).is_some();
            if deleted {
                outbox.push_current(e);
            } else if self.tombstone_misses {
                // A miss here does not say the key is gone from its other owners (a delete
                // of this node whose outcome was unknown, a restart): under quorum/all the
                // NOT_FOUND is a delete like any other, and holds only once they confirm.
                e.leave_tombstone(key, ttl);
                outbox.push_current(e);
            }
            deleted
        } else {
            e.remove()
        }
    }

    pub fn verbosity(&self) -> u32 {
        self.verbosity.load(Ordering::Relaxed)
    }

    // The request's three parts plus the connection's state.
    #[allow(clippy::too_many_arguments)]
    fn get(
        &self,
        command: GetCommand,
        exptime: i32,
        keys: KeyList<'_>,
        now: u32,
        out: &mut BytesMut,
        counters: &mut Counters,
        outbox: &mut Outbox,
        conn_id: usize,
    ) {
        let touch = command.touches();
        let new_exptime = absolute_expiry(i64::from(exptime), now);
        let with_cas = command.returns_cas();
        for key in keys.iter() {
            if key == ELASTICACHE_CLUSTER_KEY {
                if let Some(cluster) = &self.cluster {
                    let payload = cluster.view().list.elasticache_payload();
                    let value = Value {
                        key,
                        client_flags: 0,
                        data: payload.as_bytes(),
                        cas: with_cas.then_some(0),
                    };
                    value.compose(out);
                    continue;
                }
            }
            let lookup = self.store.with_entry(key, now, |e| {
                if touch {
                    if let Some(mut it) = e.item_mut() {
                        it.set_exptime(new_exptime);
                        outbox.push_touch(key, new_exptime);
                    }
                }
                e.bump();
                self.log_fetch(e, key, conn_id);
                if let Some(it) = e.item() {
                    let value = Value {
                        key,
                        client_flags: it.client_flags(),
                        data: it.value(),
                        cas: with_cas.then(|| it.cas()),
                    };
                    value.compose(out);
                }
                e.count(if touch {
                    ClassOp::TouchHit
                } else {
                    ClassOp::GetHit
                });
                e.lookup()
            });
            self.prefixes.record(
                key,
                PrefixOp::Get {
                    hit: lookup == Lookup::Hit,
                },
            );
            count_lookup(counters, lookup, touch);
        }
        Response::End.compose(false, out);
    }

    fn store_text(
        &self,
        req: &StoreRequest<'_>,
        now: u32,
        counters: &mut Counters,
        outbox: &mut Outbox,
        conn_id: usize,
    ) -> Response {
        counters.cmd_set += 1;
        self.prefixes.record(req.key, PrefixOp::Set);
        let meta = ItemMeta {
            client_flags: req.flags,
            exptime: absolute_expiry(i64::from(req.exptime), now),
            ..ItemMeta::default()
        };
        let (result, _) = self.store.with_entry(req.key, now, |e| {
            let cas = CasCheck {
                value: req.cas,
                allow_stale: false,
            };
            let max = self.settings.max_item_size;
            self.log_fetch(e, req.key, conn_id);
            let result = store_item(e, req.mode, req.key, req.data, meta, cas, max);
            self.after_store(e, req.key, req.mode, result.0, conn_id);
            if result.0 == StoreResult::Stored {
                outbox.push_current(e);
            }
            result
        });
        count_store(counters, req.mode, result);
        match result {
            StoreResult::Stored => Response::Stored,
            StoreResult::NotStored => Response::NotStored,
            StoreResult::Exists => Response::Exists,
            StoreResult::NotFound => Response::NotFound,
            StoreResult::NoMemory => Response::Line(OUT_OF_MEMORY_STORING),
        }
    }

    fn meta_get(
        &self,
        req: &MetaRequest<'_>,
        now: u32,
        out: &mut BytesMut,
        counters: &mut Counters,
        outbox: &mut Outbox,
        conn_id: usize,
    ) {
        let flags = &req.flags;
        let key: &[u8] = &req.key;
        let mut ttl_set = false;
        let hit = self.store.with_entry(key, now, |e| {
            self.log_fetch(e, key, conn_id);
            e.count(if flags.ttl.is_some() {
                ClassOp::TouchHit
            } else {
                ClassOp::GetHit
            });
            let mut created = false;
            if e.item().is_none() {
                let Some(vivify) = flags.vivify else {
                    return false;
                };
                let item = NewItem::new(
                    key,
                    &[],
                    ItemMeta {
                        exptime: absolute_expiry(i64::from(vivify), now),
                        bits: if flags.base64_key {
                            bits::KEY_BINARY
                        } else {
                            0
                        },
                        ..ItemMeta::default()
                    },
                );
                if e.store(item).is_err() {
                    return false;
                }
                created = true;
            }
            let next_now = e.now();
            let Some(mut it) = e.item_mut() else {
                return false;
            };
            let mut reply = MetaReply::new(MetaStatus::Done);
            let mut won = false;
            // In request order: a `t` before `T` reports the TTL the `T` replaces.
            for &token in &flags.tokens {
                let field = match token.first() {
                    Some(b'T') => {
                        ttl_set = true;
                        it.set_exptime(absolute_expiry(i64::from(flags.ttl.unwrap_or(0)), now));
                        continue;
                    }
                    Some(b'N') if created => {
                        won = true;
                        continue;
                    }
                    Some(b'R') => {
                        let recache = absolute_expiry(i64::from(flags.recache.unwrap_or(0)), now);
                        if !it.has(bits::TOKEN_SENT)
                            && !created
                            && it.exptime() != 0
                            && it.exptime() < recache
                        {
                            won = true;
                        }
                        continue;
                    }
                    Some(b's') => ReturnField::Size(it.value().len()),
                    Some(b't') => remaining_ttl(it.exptime(), next_now),
                    Some(b'c') => ReturnField::Cas(it.cas()),
                    Some(b'f') => ReturnField::ClientFlags(it.client_flags()),
                    Some(b'l') => ReturnField::LastAccess(next_now.saturating_sub(it.time())),
                    Some(b'h') => ReturnField::Fetched(it.has(bits::FETCHED)),
                    Some(b'O') => ReturnField::Opaque(token),
                    // The item's key is the request's; whether it is binary is the item's.
                    Some(b'k') => ReturnField::Key {
                        key,
                        binary: it.has(bits::KEY_BINARY),
                    },
                    _ => continue,
                };
                reply.fields.push(field);
            }
            let token_sent = it.has(bits::TOKEN_SENT);
            let stale = it.has(bits::STALE);
            // A stale item's first reader wins the recache.
            won |= stale && !token_sent;
            if won {
                it.set_bits(bits::TOKEN_SENT);
            }
            reply.markers = Markers {
                token_sent,
                stale,
                won,
            };
            if flags.value {
                reply.status = MetaStatus::Value(it.value());
            }
            reply.compose(req.command, flags.quiet, out);
            // The reply borrows the item; end that before the entry is used again.
            drop(reply);
            if created {
                outbox.push_current(e);
            } else if ttl_set {
                if let Some(it) = e.item() {
                    outbox.push_touch(key, it.exptime());
                }
            }
            if !flags.no_update {
                e.bump();
            }
            true
        });
        if ttl_set {
            counters.cmd_touch += 1;
            if hit {
                counters.touch_hits += 1;
            } else {
                counters.touch_misses += 1;
            }
        } else {
            counters.cmd_get += 1;
            if hit {
                counters.get_hits += 1;
            } else {
                counters.get_misses += 1;
            }
        }
        if !hit {
            status_reply(req, MetaStatus::Miss, out);
        }
    }

    fn meta_set(
        &self,
        req: &MetaRequest<'_>,
        now: u32,
        out: &mut BytesMut,
        counters: &mut Counters,
        outbox: &mut Outbox,
        conn_id: usize,
    ) {
        let flags = &req.flags;
        let mode = meta_set_mode(flags);
        counters.cmd_set += 1;
        let meta = ItemMeta {
            client_flags: flags.client_flags,
            exptime: absolute_expiry(i64::from(flags.ttl.unwrap_or(0)), now),
            bits: if flags.base64_key {
                bits::KEY_BINARY
            } else {
                0
            },
            ..ItemMeta::default()
        };
        let (result, cas) = self.store.with_entry(&req.key, now, |e| {
            let cas = CasCheck {
                value: flags.cas.unwrap_or(0),
                allow_stale: flags.invalidate,
            };
            let max = self.settings.max_item_size;
            self.log_fetch(e, &req.key, conn_id);
            let result = store_item(e, mode, &req.key, req.data, meta, cas, max);
            self.after_store(e, &req.key, mode, result.0, conn_id);
            if result.0 == StoreResult::Stored {
                outbox.push_current(e);
            }
            result
        });
        count_store(counters, mode, result);
        let status = match result {
            StoreResult::Stored => MetaStatus::Done,
            StoreResult::NotStored => MetaStatus::NotStored,
            StoreResult::Exists => MetaStatus::Exists,
            StoreResult::NotFound => MetaStatus::NotFound,
            StoreResult::NoMemory => {
                Response::Line(OUT_OF_MEMORY_STORING).compose(false, out);
                return;
            }
        };
        let reply =
            MetaReply::echoing_with(status, &flags.tokens, &req.key, flags.base64_key, |token| {
                (token.first() == Some(&b'c')).then_some(ReturnField::Cas(cas))
            });
        reply.compose(req.command, flags.quiet, out);
    }

    fn meta_delete(
        &self,
        req: &MetaRequest<'_>,
        now: u32,
        out: &mut BytesMut,
        counters: &mut Counters,
        outbox: &mut Outbox,
    ) {
        let flags = &req.flags;
        let status = self.store.with_entry(&req.key, now, |e| {
            let next_cas = e.next_cas();
            let Some(mut it) = e.item_mut() else {
                counters.delete_misses += 1;
                if flags.cas.is_none() {
                    // Confirmed by the other owners as a text delete's NOT_FOUND is.
                    self.delete_entry(e, &req.key, outbox);
                }
                return MetaStatus::NotFound;
            };
            if flags.cas.is_some_and(|c| c != it.cas()) {
                counters.delete_misses += 1;
                return MetaStatus::Exists;
            }
            if flags.invalidate {
                if let Some(ttl) = flags.ttl {
                    it.set_exptime(absolute_expiry(i64::from(ttl), now));
                }
                it.set_bits(bits::STALE);
                it.clear_bits(bits::TOKEN_SENT);
                it.set_cas(next_cas);
                outbox.push_current(e);
            } else {
                counters.delete_hits += 1;
                e.count(ClassOp::DeleteHit);
                self.delete_entry(e, &req.key, outbox);
            }
            MetaStatus::Done
        });
        status_reply(req, status, out);
    }

    fn meta_arithmetic(
        &self,
        req: &MetaRequest<'_>,
        now: u32,
        out: &mut BytesMut,
        counters: &mut Counters,
        outbox: &mut Outbox,
    ) {
        let flags = &req.flags;
        let incr = !matches!(flags.mode, Some(b'D' | b'-'));
        let delta = flags.delta.unwrap_or(1);
        let key: &[u8] = &req.key;
        // The new value's digits, which `VA` returns; declared first as the reply borrows them.
        let mut digits = itoa::Buffer::new();
        let outcome = self.store.with_entry(key, now, |e| {
            let mut created = false;
            let value = match apply_delta(e, incr, delta, flags.cas) {
                Delta::Value(v) => {
                    count_delta_hit(counters, incr);
                    e.count(if incr {
                        ClassOp::IncrHit
                    } else {
                        ClassOp::DecrHit
                    });
                    v
                }
                Delta::NonNumeric => return MetaCount::Error(NON_NUMERIC),
                Delta::NoMemory => return MetaCount::Error(OUT_OF_MEMORY),
                Delta::CasMismatch => return MetaCount::Failed(MetaStatus::Exists),
                Delta::NotFound => {
                    if flags.vivify.is_none() {
                        count_delta_miss(counters, incr);
                        return MetaCount::Failed(MetaStatus::NotFound);
                    }
                    let mut digits = itoa::Buffer::new();
                    let text = digits.format(flags.initial).as_bytes();
                    let parts = [text];
                    if e.store(NewItem::new(key, &parts, ItemMeta::default()))
                        .is_err()
                    {
                        return MetaCount::Error("SERVER_ERROR Out of memory allocating new item");
                    }
                    created = true;
                    flags.initial
                }
            };
            let next_now = e.now();
            let Some(mut it) = e.item_mut() else {
                return MetaCount::Failed(MetaStatus::NotFound);
            };
            let mut reply = MetaReply::new(MetaStatus::Done);
            // In request order: a `t` before `T` reports the TTL the `T` replaces.
            for &token in &flags.tokens {
                let field = match token.first() {
                    Some(b'c') => ReturnField::Cas(it.cas()),
                    Some(b't') => remaining_ttl(it.exptime(), next_now),
                    Some(b'T') => {
                        it.set_exptime(absolute_expiry(i64::from(flags.ttl.unwrap_or(0)), now));
                        continue;
                    }
                    Some(b'N') if created => {
                        it.set_exptime(absolute_expiry(i64::from(flags.vivify.unwrap_or(0)), now));
                        continue;
                    }
                    Some(b'O') => ReturnField::Opaque(token),
                    Some(b'k') => ReturnField::Key {
                        key,
                        binary: flags.base64_key,
                    },
                    _ => continue,
                };
                reply.fields.push(field);
            }
            outbox.push_current(e);
            MetaCount::Counted(value, reply)
        });
        match outcome {
            MetaCount::Error(error) => Response::Line(error).compose(false, out),
            MetaCount::Failed(status) => status_reply(req, status, out),
            MetaCount::Counted(value, mut reply) => {
                if flags.value {
                    reply.status = MetaStatus::Value(digits.format(value).as_bytes());
                }
                reply.compose(req.command, flags.quiet, out);
            }
        }
    }

    fn meta_debug(&self, key: &[u8], now: u32, out: &mut BytesMut) {
        self.store.with_entry(key, now, |e| {
            let Some(it) = e.item() else {
                MetaReply::new(MetaStatus::Miss).compose(MetaCommand::Get, false, out);
                return;
            };
            let debug = MetaDebug {
                key: it.key(),
                binary_key: it.has(bits::KEY_BINARY),
                exp: if it.exptime() == 0 {
                    -1
                } else {
                    i64::from(now) - i64::from(it.exptime())
                },
                last_access: now.saturating_sub(it.time()),
                cas: it.cas(),
                fetched: it.has(bits::FETCHED),
                class: self.class_of(it),
                size: self.store.classes().item_size(
                    it.key().len(),
                    it.client_flags(),
                    it.value().len(),
                ),
            };
            debug.compose(out);
        });
    }

    fn stats_command(&self, sub: &[u8], arg: &[u8], now: u32, out: &mut BytesMut) {
        match sub {
            b"" => self.general_stats(now, out),
            b"reset" => {
                self.stats.reset();
                self.store.reset_stats();
                self.prefixes.clear();
                Response::Reset.compose(false, out);
                return;
            }
            b"settings" => {
                let live = admin_stats::Live {
                    verbosity: self.verbosity(),
                    detail_enabled: self.prefixes.enabled(),
                    oldest: 0,
                };
                admin_stats::settings(&self.settings, &self.admin, &self.store, &live, out);
            }
            b"items" => admin_stats::items(&self.store, now, out),
            b"slabs" => admin_stats::slabs(&self.store, out),
            b"sizes" => admin_stats::sizes(&self.store, out),
            // memcached answers these two without END.
            b"sizes_enable" | b"sizes_disable" => {
                admin_stats::sizes_switch(&self.store, sub == b"sizes_enable", out);
                return;
            }
            b"conns" => self.admin.conns.report(now, out),
            b"detail" => match arg {
                b"on" | b"off" => {
                    self.prefixes.set_enabled(arg == b"on");
                    Response::Ok.compose(false, out);
                    return;
                }
                b"dump" => self.prefixes.dump(out),
                _ => {
                    Response::Line("CLIENT_ERROR usage: stats detail on|off|dump")
                        .compose(false, out);
                    return;
                }
            },
            _ => {
                Response::Line("ERROR").compose(false, out);
                return;
            }
        }
        Response::End.compose(false, out);
    }

    fn general_stats(&self, now: u32, out: &mut BytesMut) {
        let c = self.stats.snapshot();
        let items = self.store.stats();
        let s = &self.stats;
        reply::stat(out, "pid", std::process::id());
        reply::stat(out, "uptime", s.uptime_secs());
        reply::stat(out, "time", now);
        reply::stat(out, "version", version_string());
        reply::stat(out, "pointer_size", usize::BITS);
        reply::stat(out, "max_connections", self.settings.max_connections);
        reply::stat(
            out,
            "curr_connections",
            s.curr_connections.load(Ordering::Relaxed),
        );
        reply::stat(
            out,
            "total_connections",
            s.total_connections.load(Ordering::Relaxed),
        );
        reply::stat(
            out,
            "rejected_connections",
            s.rejected_connections.load(Ordering::Relaxed),
        );
        c.for_each(|name, _, value| reply::stat(out, name, value));
        reply::stat(out, "limit_maxbytes", items.limit);
        reply::stat(out, "threads", self.settings.threads);
        admin_stats::general(&self.settings, &self.admin, out);
        reply::stat(out, "bytes", items.bytes);
        reply::stat(out, "curr_items", items.curr_items);
        reply::stat(out, "total_items", items.total_items);
        reply::stat(out, "expired_unfetched", items.expired_unfetched);
        reply::stat(out, "evicted_unfetched", items.evicted_unfetched);
        reply::stat(out, "evictions", items.evictions);
        reply::stat(out, "reclaimed", items.reclaimed);
        reply::stat(out, "crawler_reclaimed", items.crawler_reclaimed);
        reply::stat(out, "crawler_items_checked", items.crawler_items_checked);
    }

    /// `watch fetchers`: what a lookup of `key` found.
    fn log_fetch(&self, e: &Entry<'_>, key: &[u8], conn_id: usize) {
        let logger = &self.admin.logger;
        if !logger.wants(WatchFlags::FETCHERS) {
            return;
        }
        let status = match e.lookup() {
            Lookup::Hit if e.item().is_some() => FetchStatus::Found,
            Lookup::Hit | Lookup::Miss => FetchStatus::NotFound,
            Lookup::Expired => FetchStatus::Expired,
            Lookup::Flushed => FetchStatus::Flushed,
        };
        let item = e.item().map(|it| (self.class_of(it), it.value().len()));
        logger.fetch(key, status, item, conn_id);
    }

    /// Per-class `cmd_set`/`cas_*` counts and `watch mutations` of a store command.
    fn after_store(
        &self,
        e: &mut Entry<'_>,
        key: &[u8],
        mode: StoreMode,
        result: StoreResult,
        conn_id: usize,
    ) {
        e.count(ClassOp::Set);
        if mode == StoreMode::Cas {
            match result {
                StoreResult::Stored => e.count(ClassOp::CasHit),
                StoreResult::Exists => e.count(ClassOp::CasBadval),
                _ => {}
            }
        }
        let logger = &self.admin.logger;
        if !logger.wants(WatchFlags::MUTATIONS) {
            return;
        }
        let status = match result {
            StoreResult::Stored => StoreStatus::Stored,
            StoreResult::NotStored => StoreStatus::NotStored,
            StoreResult::Exists => StoreStatus::Exists,
            StoreResult::NotFound => StoreStatus::NotFound,
            StoreResult::NoMemory => StoreStatus::NoMemory,
        };
        let command = match mode {
            StoreMode::Set => "set",
            StoreMode::Add => "add",
            StoreMode::Replace => "replace",
            StoreMode::Append => "append",
            StoreMode::Prepend => "prepend",
            StoreMode::Cas => "cas",
        };
        let (ttl, class, size) = e.item().map_or((0, 0, 0), |it| {
            let ttl = match it.exptime() {
                0 => 0,
                at => at.saturating_sub(e.now()),
            };
            (ttl, self.class_of(it), it.value().len())
        });
        logger.store(key, status, command, ttl, class, size, conn_id);
    }

    /// memcached's class of an item.
    fn class_of(&self, item: ItemRef<'_>) -> u8 {
        self.store.classes().class_of_item(
            item.key().len(),
            item.client_flags(),
            item.value().len(),
        )
    }
}

/// `t`'s field: the seconds an item expiring at `exptime` has left at `now` (none: never).
fn remaining_ttl(exptime: u32, now: u32) -> ReturnField<'static> {
    ReturnField::Ttl((exptime != 0).then(|| exptime.saturating_sub(now)))
}

/// A meta reply without an item: the status with the request's `O` and `k` echoed.
fn status_reply(req: &MetaRequest<'_>, status: MetaStatus<'_>, out: &mut BytesMut) {
    let flags = &req.flags;
    MetaReply::echoing(status, &flags.tokens, &req.key, flags.base64_key).compose(
        req.command,
        flags.quiet,
        out,
    );
}

/// What `ma` did, decided under the shard lock and composed after it.
// Returned once per `ma`, never stored: boxing the reply would allocate for each.
#[allow(clippy::large_enum_variant)]
enum MetaCount<'a> {
    /// The new value, and the reply's fields.
    Counted(u64, MetaReply<'a>),
    /// `NF` or `EX`.
    Failed(MetaStatus<'static>),
    Error(&'static str),
}

fn count_lookup(counters: &mut Counters, lookup: Lookup, touch: bool) {
    if touch {
        counters.cmd_touch += 1;
        if lookup == Lookup::Hit {
            counters.touch_hits += 1;
        } else {
            counters.touch_misses += 1;
        }
        return;
    }
    counters.cmd_get += 1;
    match lookup {
        Lookup::Hit => counters.get_hits += 1,
        Lookup::Miss => counters.get_misses += 1,
        Lookup::Expired => {
            counters.get_misses += 1;
            counters.get_expired += 1;
        }
        Lookup::Flushed => {
            counters.get_misses += 1;
            counters.get_flushed += 1;
        }
    }
}

fn count_store(counters: &mut Counters, mode: StoreMode, result: StoreResult) {
    match (mode, result) {
        (StoreMode::Cas, StoreResult::Stored) => counters.cas_hits += 1,
        (StoreMode::Cas, StoreResult::Exists) => counters.cas_badval += 1,
        (StoreMode::Cas, StoreResult::NotFound) => counters.cas_misses += 1,
        (_, StoreResult::NoMemory) => counters.store_no_memory += 1,
        _ => {}
    }
}

fn count_delta_hit(counters: &mut Counters, incr: bool) {
    if incr {
        counters.incr_hits += 1;
    } else {
        counters.decr_hits += 1;
    }
}

fn count_delta_miss(counters: &mut Counters, incr: bool) {
    if incr {
        counters.incr_misses += 1;
    } else {
        counters.decr_misses += 1;
    }
}

/// memcached's `do_store_item`: applies a storage command to an entry. Returns the outcome
/// and the CAS of the stored item (0 when nothing was stored).
/// The CAS condition of a storage command.
#[derive(Clone, Copy, Debug)]
struct CasCheck {
    /// 0 for none.
    value: u64,
    /// Meta `I` flag: an older CAS is accepted and marks the value stale.
    allow_stale: bool,
}

fn store_item(
    e: &mut Entry<'_>,
    mode: StoreMode,
    key: &[u8],
    data: &[u8],
    meta: ItemMeta,
    cas_check: CasCheck,
    max_item_size: usize,
) -> (StoreResult, u64) {
    let CasCheck {
        value: req_cas,
        allow_stale,
    } = cas_check;
    let mut meta = meta;
    let existing = e.item().map(|it| (it.cas(), it.meta()));
    // For append/prepend: the old value joined with the request's data.
    let mut joined: Vec<u8> = Vec::new();
    let meta = match (existing, mode) {
        (None, StoreMode::Set | StoreMode::Add) => meta,
        (None, StoreMode::Cas) => return (StoreResult::NotFound, 0),
        (None, _) => return (StoreResult::NotStored, 0),
        (Some(_), StoreMode::Add) => {
            // memcached moves the item up the LRU but does not mark it fetched.
            e.touch_lru();
            return (StoreResult::NotStored, 0);
        }
        (Some(_), StoreMode::Set | StoreMode::Replace) => meta,
        (Some((cas, old)), StoreMode::Cas) => {
            if req_cas == cas {
                meta
            } else if allow_stale && req_cas != 0 && req_cas < cas {
                // Invalidation mode: accept an older CAS but mark the value stale, keeping
                // the current TTL and any win token already handed out.
                meta.exptime = old.exptime;
                meta.bits |= bits::STALE | (old.bits & bits::TOKEN_SENT);
                meta
            } else {
                return (StoreResult::Exists, 0);
            }
        }
        (Some((cas, old)), StoreMode::Append | StoreMode::Prepend) => {
            if req_cas != 0 && req_cas != cas {
                return (StoreResult::Exists, 0);
            }
            let Some(current) = e.item().map(|it| it.value()) else {
                return (StoreResult::NotStored, 0);
            };
            if exceeds_item_size(
                key.len(),
                old.client_flags,
                current.len() + data.len(),
                max_item_size,
            ) {
                return (StoreResult::NotStored, 0);
            }
            joined.reserve_exact(current.len() + data.len());
            if mode == StoreMode::Append {
                joined.extend_from_slice(current);
                joined.extend_from_slice(data);
            } else {
                joined.extend_from_slice(data);
                joined.extend_from_slice(current);
            }
            // A new item: flags and expiry carry over, state bits (fetched, binary key) do not.
            ItemMeta { bits: 0, ..old }
        }
    };
    let value: &[u8] = if matches!(mode, StoreMode::Append | StoreMode::Prepend) {
        &joined
    } else {
        data
    };
    let parts = [value];
    match e.store(NewItem::new(key, &parts, meta)) {
        Ok(cas) => (StoreResult::Stored, cas),
        Err(StoreError::OutOfMemory) => {
            if mode == StoreMode::Set {
                // Like memcached: a failed set must not leave the old value readable.
                e.remove();
            }
            (StoreResult::NoMemory, 0)
        }
    }
}

/// memcached's `do_add_delta`: incr/decr in place when the result fits (space-padded, as
/// memcached does), otherwise by storing a new value.
fn apply_delta(e: &mut Entry<'_>, incr: bool, delta: u64, cas: Option<u64>) -> Delta {
    let next_cas = e.next_cas();
    let Some(mut it) = e.item_mut() else {
        return Delta::NotFound;
    };
    if it.value().is_empty() {
        return Delta::NonNumeric;
    }
    if cas.is_some_and(|c| c != 0 && c != it.cas()) {
        return Delta::CasMismatch;
    }
    let Some(current) = numbers::parse_u64(it.value()) else {
        return Delta::NonNumeric;
    };
    let value = if incr {
        current.wrapping_add(delta)
    } else {
        current.saturating_sub(delta)
    };
    let mut digits = itoa::Buffer::new();
    let text = digits.format(value).as_bytes();
    if text.len() <= it.value().len() {
        let slot = it.value_mut();
        slot[..text.len()].copy_from_slice(text);
        slot[text.len()..].fill(b' ');
        it.set_cas(next_cas);
        e.touch_lru();
        return Delta::Value(value);
    }
    let meta = ItemMeta {
        bits: 0,
        ..it.meta()
    };
    let key = it.key().to_vec();
    match e.store(NewItem::new(&key, &[text], meta)) {
        Ok(_) => Delta::Value(value),
        Err(StoreError::OutOfMemory) => Delta::NoMemory,
    }
}

#[cfg(test)]
mod tests;
