//! `stats slabs`, `stats items`, `stats sizes`, `stats settings` and the operations lines
//! of `stats`, in memcached 1.6.18's names and order.
//!
//! kache has no slabs: each class's figures are those of the items memcached would have put
//! in it. `total_pages` is the bytes of those items' records in kache's segments in 1 MiB
//! pages, rounded up; segments are shared by every class, so there are no free chunks and
//! `total_chunks` equals `used_chunks`. `stats items` has the fields memcached prints
//! without its LRU maintainer (kache has none).

use std::ops::ControlFlow;

use bytes::BytesMut;

use super::{Admin, Settings};
use crate::protocol::reply;
use crate::store::classes::{ClassOp, ClassStats, PAGE_SIZE};
use crate::store::{ScanCursor, Store};

/// Records read per step when `stats items` looks for each class's oldest item.
const SCAN_CHUNK: usize = 1024;

fn class_stat(out: &mut BytesMut, prefix: &str, id: u8, name: &str, value: impl std::fmt::Display) {
    reply::stat(out, &format!("{prefix}{id}:{name}"), value);
}

/// `stats slabs` (without the final `END`).
pub fn slabs(store: &Store, out: &mut BytesMut) {
    let classes = store.classes();
    let figures = store.class_stats();
    let mut active = 0;
    let mut malloced = 0;
    for (id, class) in figures.iter().enumerate().skip(1) {
        let id = id as u8;
        let Some(chunk_size) = classes.chunk_size(id) else {
            continue;
        };
        if !class.is_used() {
            continue;
        }
        active += 1;
        malloced += class.bytes;
        let pages = class.bytes.div_ceil(PAGE_SIZE as u64);
        let stat =
            |out: &mut BytesMut, name: &str, value: u64| class_stat(out, "", id, name, value);
        stat(out, "chunk_size", chunk_size as u64);
        stat(out, "chunks_per_page", classes.per_page(id) as u64);
        stat(out, "total_pages", pages);
        stat(out, "total_chunks", class.number);
        stat(out, "used_chunks", class.number);
        stat(out, "free_chunks", 0);
        stat(out, "free_chunks_end", 0);
        for (op, name) in ClassOp::ALL {
            stat(out, name, class.op(op));
        }
    }
    reply::stat(out, "active_slabs", active);
    reply::stat(out, "total_malloced", malloced);
}

/// Seconds since the least recently used item of each class was last used (`age`).
fn ages(store: &Store, now: u32) -> Vec<u32> {
    let mut oldest = vec![u32::MAX; 64];
    let classes = store.classes();
    for shard in 0..store.shard_count() {
        let mut start = ScanCursor::default();
        while let Some(next) = store.scan(shard, start, SCAN_CHUNK, now, |item| {
            let id =
                classes.class_of_item(item.key().len(), item.client_flags(), item.value().len());
            let slot = &mut oldest[usize::from(id) % 64];
            *slot = (*slot).min(item.time());
            ControlFlow::Continue(())
        }) {
            start = next;
        }
    }
    oldest
        .into_iter()
        .map(|t| {
            if t == u32::MAX {
                0
            } else {
                now.saturating_sub(t)
            }
        })
        .collect()
}

/// `stats items` (without the final `END`).
pub fn items(store: &Store, now: u32, out: &mut BytesMut) {
    let figures = store.class_stats();
    if figures.iter().all(|c| c.number == 0) {
        return;
    }
    let ages = ages(store, now);
    for (id, class) in figures.iter().enumerate().skip(1) {
        if class.number == 0 {
            continue;
        }
        let id = id as u8;
        let ClassStats {
            number,
            mem_requested,
            evicted,
            evicted_nonzero,
            evicted_time,
            outofmemory,
            reclaimed,
            expired_unfetched,
            evicted_unfetched,
            crawler_reclaimed,
            crawler_items_checked,
            ..
        } = *class;
        let stat =
            |out: &mut BytesMut, name: &str, value: u64| class_stat(out, "items:", id, name, value);
        stat(out, "number", number);
        stat(out, "age", u64::from(ages[usize::from(id)]));
        stat(out, "mem_requested", mem_requested);
        stat(out, "evicted", evicted);
        stat(out, "evicted_nonzero", evicted_nonzero);
        stat(out, "evicted_time", u64::from(evicted_time));
        stat(out, "outofmemory", outofmemory);
        // kache items have no reference counts: nothing ever needs a tail repair.
        stat(out, "tailrepairs", 0);
        stat(out, "reclaimed", reclaimed);
        stat(out, "expired_unfetched", expired_unfetched);
        stat(out, "evicted_unfetched", evicted_unfetched);
        stat(out, "crawler_reclaimed", crawler_reclaimed);
        stat(out, "crawler_items_checked", crawler_items_checked);
        stat(out, "lrutail_reflocked", 0);
    }
}

/// `stats sizes` (without the final `END`).
pub fn sizes(store: &Store, out: &mut BytesMut) {
    match store.sizes() {
        Some(sizes) => sizes.for_each(|size, n| reply::stat(out, &size.to_string(), n)),
        None => reply::stat(out, "sizes_status", "disabled"),
    }
}

/// `stats sizes_enable` / `stats sizes_disable` (without the final `END`).
pub fn sizes_switch(store: &Store, on: bool, out: &mut BytesMut) {
    store.track_sizes(on);
    reply::stat(out, "sizes_status", if on { "enabled" } else { "disabled" });
}

/// The run-time values `stats settings` reports.
pub struct Live {
    pub verbosity: u32,
    pub detail_enabled: bool,
    pub oldest: u32,
}

fn yes_no(on: bool) -> &'static str {
    if on {
        "yes"
    } else {
        "no"
    }
}

/// `stats settings` (without the final `END`), in memcached's order; `shards` is kache's own.
pub fn settings(
    settings: &Settings,
    admin: &Admin,
    store: &Store,
    live: &Live,
    out: &mut BytesMut,
) {
    let m = &settings.memcached;
    let o = &m.options;
    let x = &o.extended;
    let c = &o.classes;
    let stat = |out: &mut BytesMut, name: &str, value: &dyn std::fmt::Display| {
        reply::stat(out, name, value)
    };
    stat(out, "maxbytes", &store.limit());
    stat(out, "maxconns", &settings.max_connections);
    stat(out, "tcpport", &settings.port);
    stat(out, "udpport", &0);
    stat(out, "inter", &settings.listen);
    stat(out, "verbosity", &live.verbosity);
    stat(out, "oldest", &live.oldest);
    stat(out, "evictions", &if m.evictions { "on" } else { "off" });
    stat(out, "domain_socket", &"NULL");
    stat(out, "umask", &m.umask);
    stat(out, "shutdown_command", &yes_no(m.shutdown_command));
    stat(out, "growth_factor", &format!("{:.2}", c.factor));
    stat(out, "chunk_size", &c.min_size);
    stat(out, "num_threads", &settings.threads);
    stat(out, "num_threads_per_udp", &settings.threads);
    stat(out, "stat_key_prefix", &char::from(m.prefix_delimiter));
    stat(out, "detail_enabled", &yes_no(live.detail_enabled));
    stat(out, "reqs_per_event", &m.reqs_per_event);
    stat(out, "cas_enabled", &"yes");
    stat(out, "tcp_backlog", &m.backlog);
    stat(out, "binding_protocol", &o.protocol);
    stat(out, "auth_enabled_sasl", &"no");
    stat(
        out,
        "auth_enabled_ascii",
        &m.auth_file.as_deref().unwrap_or("no"),
    );
    stat(out, "item_size_max", &settings.max_item_size);
    stat(out, "maxconns_fast", &yes_no(x.maxconns_fast));
    stat(out, "hashpower_init", &x.hashpower_init);
    stat(out, "slab_reassign", &yes_no(x.slab_reassign));
    stat(out, "slab_automove", &x.slab_automove);
    stat(
        out,
        "slab_automove_ratio",
        &format!("{:.2}", x.slab_automove_ratio),
    );
    stat(out, "slab_automove_window", &x.slab_automove_window);
    stat(out, "slab_chunk_max", &c.chunk_max);
    stat(out, "lru_crawler", &yes_no(admin.crawler.enabled()));
    stat(out, "lru_crawler_sleep", &admin.crawler.sleep_us());
    stat(out, "lru_crawler_tocrawl", &admin.crawler.tocrawl());
    stat(out, "tail_repair_time", &x.tail_repair_time);
    stat(out, "flush_enabled", &yes_no(m.flush_enabled));
    stat(out, "dump_enabled", &yes_no(m.dump_enabled));
    stat(out, "hash_algorithm", &x.hash_algorithm);
    // kache evicts by merging segments per shard: no maintainer thread, no segmented LRU.
    stat(out, "lru_maintainer_thread", &"no");
    stat(out, "lru_segmented", &"no");
    stat(out, "hot_lru_pct", &x.hot_lru_pct);
    stat(out, "warm_lru_pct", &x.warm_lru_pct);
    stat(out, "hot_max_factor", &format!("{:.2}", x.hot_max_factor));
    stat(out, "warm_max_factor", &format!("{:.2}", x.warm_max_factor));
    stat(out, "temp_lru", &yes_no(x.temp_lru));
    stat(out, "temporary_ttl", &x.temporary_ttl);
    stat(out, "idle_timeout", &x.idle_timeout);
    stat(out, "watcher_logbuf_size", &x.watcher_logbuf_size);
    stat(out, "worker_logbuf_size", &x.worker_logbuf_size);
    stat(out, "read_buf_mem_limit", &x.read_buf_mem_limit);
    stat(out, "track_sizes", &yes_no(store.sizes().is_some()));
    stat(out, "inline_ascii_response", &"no");
    stat(out, "ssl_enabled", &yes_no(m.ssl_enabled));
    stat(out, "ssl_verify_mode", &x.ssl_verify_mode);
    stat(
        out,
        "ssl_min_version",
        &format!("tlsv1.{}", x.ssl_min_version.max(2)),
    );
    // memcached prints these two with "%s" of a NULL: "(null)".
    match m.napi_ids {
        Some(n) => stat(out, "num_napi_ids", &n),
        None => stat(out, "num_napi_ids", &"(null)"),
    }
    stat(
        out,
        "memory_file",
        &m.memory_file.as_deref().unwrap_or("(null)"),
    );
    stat(out, "shards", &store.shard_count());
}

/// The crawler, logger and connection lines of `stats`, named as memcached names them.
pub fn general(settings: &Settings, admin: &Admin, out: &mut BytesMut) {
    if settings.memcached.options.extended.idle_timeout != 0 {
        reply::stat(
            out,
            "idle_kicks",
            admin
                .conns
                .idle_kicks
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    reply::stat(
        out,
        "conn_yields",
        admin
            .conns
            .yields
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    reply::stat(
        out,
        "lru_crawler_running",
        u8::from(admin.crawler.running()),
    );
    reply::stat(out, "lru_crawler_starts", admin.crawler.starts());
    let (watchers, sent, skipped) = admin.logger.counts();
    reply::stat(out, "log_watcher_skipped", skipped);
    reply::stat(out, "log_watcher_sent", sent);
    reply::stat(out, "log_watchers", watchers);
}
