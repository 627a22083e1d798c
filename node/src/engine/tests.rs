//! The engine's command semantics, driven through `execute` with a clock the test sets: CAS
//! rules, `noreply`, incr/decr wrap and padding, touch/gat and expiry, delayed `flush_all`,
//! meta flags, the counters each command moves, and what each change hands to replication.
//!
//! Requests are written as memcached text and parsed by the protocol parser, so these tests
//! read like the protocol; what they check is the engine's side. Byte-level parity with
//! memcached itself is the differential suite's job (tests/python/test_differential.py);
//! these pin down what needs an exact clock or the engine's own state.

use super::*;
use crate::protocol::{parse, Limits, ParseOutcome};
use crate::record::Op;
use crate::store::StoreConfig;

/// The clock every test starts at (a Unix time, as the store keeps them).
const T0: u32 = 1_700_000_000;
const MIB: usize = 1024 * 1024;

/// An engine, the state of one client connection, and the time it is.
struct Node {
    engine: Engine,
    ctx: Context,
    now: u32,
}

impl Node {
    fn standalone() -> Node {
        Node::build(None, |_| {})
    }

    /// A member of a cluster: deletes leave tombstones and changes are collected for
    /// replication.
    fn in_cluster() -> Node {
        Node::build(Some(Arc::new(Cluster::new("n0"))), |_| {})
    }

    fn build(cluster: Option<Arc<Cluster>>, tweak: impl FnOnce(&mut Settings)) -> Node {
        let store = Store::new(StoreConfig {
            memory_limit: 8 * MIB,
            max_item_size: MIB,
            max_shards: 4,
            node_id: 1,
            ..StoreConfig::default()
        });
        let mut settings = Settings {
            port: 0,
            listen: "127.0.0.1".into(),
            memory_limit: 8 * MIB,
            max_connections: 16,
            threads: 1,
            max_item_size: MIB,
            memcached: Default::default(),
        };
        tweak(&mut settings);
        let in_cluster = cluster.is_some();
        Node {
            engine: Engine::new(store, settings, 0, cluster),
            ctx: Context {
                outbox: Outbox::new(in_cluster),
                ..Context::default()
            },
            now: T0,
        }
    }

    /// Executes every request in `input` at the current time; returns all the replies.
    fn send(&mut self, input: &str) -> String {
        let limits = Limits::default();
        let mut out = BytesMut::new();
        let mut rest = input.as_bytes();
        while !rest.is_empty() {
            match parse(rest, &limits) {
                ParseOutcome::Request {
                    request,
                    consumed,
                    swallow,
                } => {
                    assert_eq!(swallow, 0, "test input must not be too large");
                    let next = self
                        .engine
                        .execute(request, self.now, &mut out, &mut self.ctx);
                    assert_eq!(next, Next::Continue, "after {:?}", &rest[..consumed]);
                    rest = &rest[consumed..];
                }
                ParseOutcome::Incomplete | ParseOutcome::Close => {
                    panic!("incomplete test input {:?}", String::from_utf8_lossy(rest))
                }
            }
        }
        String::from_utf8(out.to_vec()).unwrap()
    }

    /// Moves the clock `secs` seconds on.
    fn wait(&mut self, secs: u32) -> &mut Node {
        self.now += secs;
        self
    }

    /// The key's CAS, as `gets` reports it.
    fn cas(&mut self, key: &str) -> u64 {
        let reply = self.send(&format!("gets {key}\r\n"));
        let header = reply.lines().next().unwrap();
        let fields: Vec<&str> = header.split(' ').collect();
        assert_eq!((fields[0], fields.len()), ("VALUE", 5), "{reply:?}");
        fields[4].parse().unwrap()
    }

    /// The value `get` returns, or None on a miss.
    fn value(&mut self, key: &str) -> Option<String> {
        let reply = self.send(&format!("get {key}\r\n"));
        let mut lines = reply.split("\r\n");
        let header = lines.next().unwrap();
        (header != "END").then(|| lines.next().unwrap().to_string())
    }

    /// The changes collected for replication since the last call.
    fn records(&mut self) -> Vec<Record> {
        std::mem::take(&mut self.ctx.outbox.records)
    }

    /// The counters this connection moved since the last call.
    fn counters(&mut self) -> Counters {
        std::mem::take(&mut self.ctx.counters)
    }
}

// ------------------------------------------------------------------------------------ CAS

#[test]
fn every_change_gets_a_new_higher_cas_and_a_cas_token_works_once() {
    let mut node = Node::standalone();
    node.send("set k 0 0 2\r\nv1\r\n");
    let first = node.cas("k");
    assert_eq!(node.cas("k"), first, "reading does not change the CAS");
    assert_eq!(
        node.send(&format!("cas k 0 0 2 {first}\r\nv2\r\n")),
        "STORED\r\n"
    );
    let second = node.cas("k");
    assert!(second > first);
    // The token is spent: the same one now names an older version.
    assert_eq!(
        node.send(&format!("cas k 0 0 2 {first}\r\nv3\r\n")),
        "EXISTS\r\n"
    );
    assert_eq!(node.value("k").as_deref(), Some("v2"));
    let mut last = second;
    for change in [
        "append k 0 0 1\r\na\r\n",
        "prepend k 0 0 1\r\np\r\n",
        "set k 0 0 1\r\n5\r\n",
        "incr k 1\r\n",
        "decr k 1\r\n",
        "ms k 1\r\nx\r\n",
    ] {
        node.send(change);
        let cas = node.cas("k");
        assert!(cas > last, "{change:?} kept or lowered the CAS");
        last = cas;
    }
    // A touch changes the expiry, not the version (as memcached: gets shows the same CAS).
    node.send("touch k 100\r\n");
    node.send("gat 200 k\r\n");
    assert_eq!(node.cas("k"), last);
    assert_eq!(node.send("cas nokey 0 0 1 1\r\nx\r\n"), "NOT_FOUND\r\n");
    let c = node.counters();
    assert_eq!((c.cas_hits, c.cas_badval, c.cas_misses), (1, 1, 1));
}

#[test]
fn a_cas_of_zero_never_matches_and_append_checks_a_given_cas() {
    let mut node = Node::standalone();
    node.send("set k 0 0 1\r\nv\r\n");
    assert_eq!(node.send("cas k 0 0 1 0\r\nx\r\n"), "EXISTS\r\n");
    let cas = node.cas("k");
    assert_eq!(
        node.send(&format!("ms k 1 MA C{}\r\nx\r\n", cas + 1)),
        "EX\r\n"
    );
    assert_eq!(node.send(&format!("ms k 1 MA C{cas}\r\nx\r\n")), "HD\r\n");
    assert_eq!(node.value("k").as_deref(), Some("vx"));
}

// -------------------------------------------------------------------------------- noreply

#[test]
fn noreply_silences_its_own_reply_only_and_still_applies() {
    let mut node = Node::standalone();
    // One batch: the get's reply, written before, survives the silenced ones around it.
    let reply = node.send(
        "set a 0 0 1 noreply\r\n1\r\n\
         get a\r\n\
         incr a 5 noreply\r\n\
         decr nosuch 1 noreply\r\n\
         add a 0 0 1 noreply\r\nz\r\n\
         replace nosuch 0 0 1 noreply\r\nz\r\n\
         cas a 0 0 1 1 noreply\r\nz\r\n\
         delete nosuch noreply\r\n\
         touch a 100 noreply\r\n\
         incr a abc noreply\r\n\
         verbosity 1 noreply\r\n\
         get a\r\n",
    );
    assert_eq!(
        reply,
        "VALUE a 0 1\r\n1\r\nEND\r\nVALUE a 0 1\r\n6\r\nEND\r\n"
    );
    let c = node.counters();
    assert_eq!(
        (c.incr_hits, c.decr_misses, c.cas_badval, c.touch_hits),
        (1, 1, 1, 1)
    );
    assert_eq!(node.send("mg a t\r\n"), "HD t100\r\n");
    // Meta commands are quiet with q: successes are silent, failures are not.
    assert_eq!(
        node.send("ms b 1 q\r\nx\r\nms b 1 ME q\r\ny\r\nmd b q\r\nmd b q\r\nmn\r\n"),
        "NS\r\nNF\r\nMN\r\n"
    );
}

// ---------------------------------------------------------------------------- incr / decr

#[test]
fn incr_wraps_at_2_64_and_decr_stops_at_zero() {
    let mut node = Node::standalone();
    node.send("set n 0 0 20\r\n18446744073709551615\r\nset m 0 0 1\r\n3\r\n");
    assert_eq!(node.send("incr n 1\r\n"), "0\r\n");
    assert_eq!(
        node.send("incr n 18446744073709551615\r\n"),
        "18446744073709551615\r\n"
    );
    assert_eq!(node.send("decr m 5\r\n"), "0\r\n");
    assert_eq!(node.send("decr m 1\r\n"), "0\r\n");
    let c = node.counters();
    assert_eq!((c.incr_hits, c.decr_hits), (2, 2));
}

#[test]
fn a_shorter_result_is_written_in_place_space_padded_and_a_longer_one_reallocated() {
    let mut node = Node::standalone();
    node.send("set n 0 0 2\r\n10\r\nset g 0 0 2\r\n99\r\n");
    assert_eq!(node.send("decr n 1\r\n"), "9\r\n");
    assert_eq!(node.send("get n\r\n"), "VALUE n 0 2\r\n9 \r\nEND\r\n");
    // A padded number still counts: the trailing space is not part of it.
    assert_eq!(node.send("incr n 1\r\n"), "10\r\n");
    assert_eq!(node.send("incr g 1\r\n"), "100\r\n");
    assert_eq!(node.send("get g\r\n"), "VALUE g 0 3\r\n100\r\nEND\r\n");
    node.send("set w 0 0 20\r\n18446744073709551615\r\n");
    node.send("incr w 1\r\n");
    assert_eq!(node.value("w").unwrap(), format!("0{}", " ".repeat(19)));
}

#[test]
fn arithmetic_keeps_the_items_flags_and_expiry_either_way() {
    let mut node = Node::standalone();
    node.send("set n 7 100 2\r\n10\r\n");
    node.wait(10);
    node.send("decr n 1\r\n"); // in place
    assert_eq!(node.send("mg n f t v\r\n"), "VA 2 f7 t90\r\n9 \r\n");
    node.send("incr n 100\r\n"); // a new, longer value
    assert_eq!(node.send("mg n f t v\r\n"), "VA 3 f7 t90\r\n109\r\n");
}

#[test]
fn arithmetic_on_what_is_not_a_number_is_an_error_that_changes_nothing() {
    let mut node = Node::standalone();
    node.send("set e 0 0 0\r\n\r\nset x 0 0 3\r\nabc\r\nset neg 0 0 2\r\n-1\r\n");
    for key in ["e", "x", "neg"] {
        assert_eq!(
            node.send(&format!("incr {key} 1\r\n")),
            "CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
        );
    }
    assert_eq!(node.value("x").as_deref(), Some("abc"));
    assert_eq!(node.send("incr nosuch 1\r\n"), "NOT_FOUND\r\n");
    let c = node.counters();
    assert_eq!((c.incr_hits, c.incr_misses), (0, 1));
}

// ------------------------------------------------------------------- expiry, touch, gat

#[test]
fn an_item_expires_at_its_exptime_second() {
    let mut node = Node::standalone();
    node.send("set k 0 10 1\r\nv\r\n");
    node.wait(9);
    assert_eq!(node.value("k").as_deref(), Some("v"));
    node.wait(1);
    assert_eq!(node.value("k"), None);
    let c = node.counters();
    assert_eq!((c.get_hits, c.get_misses, c.get_expired), (1, 1, 1));
}

#[test]
fn exptimes_over_30_days_are_unix_times() {
    let mut node = Node::standalone();
    node.send(&format!(
        "set abs 0 {} 1\r\nv\r\nset rel 0 2592000 1\r\nv\r\nset past 0 {} 1\r\nv\r\nset gone 0 -1 1\r\nv\r\n",
        T0 + 100,
        T0 - 1
    ));
    assert_eq!(node.send("mg abs t\r\n"), "HD t100\r\n");
    assert_eq!(node.send("mg rel t\r\n"), "HD t2592000\r\n");
    assert_eq!(node.send("mg past v\r\nmg gone v\r\n"), "EN\r\nEN\r\n");
}

#[test]
fn touch_and_gat_set_a_new_expiry_from_now() {
    let mut node = Node::standalone();
    node.send("set k 0 10 1\r\nv\r\nset j 0 10 1\r\nw\r\n");
    node.wait(5);
    assert_eq!(node.send("touch k 100\r\n"), "TOUCHED\r\n");
    assert_eq!(
        node.send("gat 50 j nosuch\r\n"),
        "VALUE j 0 1\r\nw\r\nEND\r\n"
    );
    assert_eq!(node.send("mg k t\r\nmg j t\r\n"), "HD t100\r\nHD t50\r\n");
    node.wait(99);
    assert_eq!(node.value("k").as_deref(), Some("v"));
    node.wait(1);
    assert_eq!(node.value("k"), None);
    // 0 makes an item permanent, a negative time expires it at once.
    node.send("set p 0 10 1\r\nv\r\ntouch p 0\r\nset q 0 0 1\r\nv\r\n");
    assert_eq!(node.send("touch q -1\r\n"), "TOUCHED\r\n");
    node.wait(1_000_000);
    assert_eq!(node.value("p").as_deref(), Some("v"));
    assert_eq!(node.value("q"), None);
    let c = node.counters();
    // touch k, gat j (hit) and nosuch (miss), touch p, touch q.
    assert_eq!((c.cmd_touch, c.touch_hits, c.touch_misses), (5, 4, 1));
}

// ------------------------------------------------------------------------------ flush_all

#[test]
fn a_delayed_flush_all_drops_what_was_stored_before_its_time() {
    let mut node = Node::standalone();
    node.send("set a 0 0 1\r\n1\r\n");
    assert_eq!(node.send("flush_all 10\r\n"), "OK\r\n");
    node.wait(9);
    node.send("set b 0 0 1\r\n2\r\n");
    assert_eq!(node.value("a").as_deref(), Some("1"));
    node.wait(1);
    node.send("set c 0 0 1\r\n3\r\n");
    node.counters();
    // a and b were stored (and last seen) before the flush time; c at it.
    assert_eq!(node.value("a"), None);
    assert_eq!(node.value("b"), None);
    assert_eq!(node.value("c").as_deref(), Some("3"));
    let c = node.counters();
    assert_eq!((c.get_flushed, c.get_misses, c.get_hits), (2, 2, 1));
}

#[test]
fn flush_all_now_drops_everything_unless_disabled() {
    let mut node = Node::standalone();
    node.send("set a 0 0 1\r\n1\r\nflush_all 0\r\n");
    assert_eq!(node.value("a"), None);
    let mut disabled = Node::build(None, |s| s.memcached.flush_enabled = false);
    disabled.send("set a 0 0 1\r\n1\r\n");
    assert_eq!(
        disabled.send("flush_all\r\nflush_all noreply\r\n"),
        "CLIENT_ERROR flush_all not allowed\r\n"
    );
    assert_eq!(disabled.value("a").as_deref(), Some("1"));
    assert_eq!(disabled.counters().cmd_flush, 0);
}

// ---------------------------------------------------------------------------- meta flags

#[test]
fn mg_n_creates_a_placeholder_whose_first_fetcher_wins() {
    let mut node = Node::standalone();
    assert_eq!(node.send("mg k N30 s t v\r\n"), "VA 0 s0 t30 W\r\n\r\n");
    assert_eq!(node.send("mg k N30 t v\r\n"), "VA 0 t30 Z\r\n\r\n");
    // The TTL is the created item's whatever the flag order (memcached prints t-1 when t
    // comes first; protocol.txt says t is the TTL remaining).
    assert_eq!(node.send("mg j t N30\r\n"), "HD t30 W\r\n");
    // Whoever won sets the value; then it is an ordinary item.
    node.send("set k 0 0 4\r\ndata\r\n");
    assert_eq!(node.send("mg k v\r\n"), "VA 4\r\ndata\r\n");
}

#[test]
fn mg_r_hands_out_one_win_once_the_ttl_falls_below_it() {
    let mut node = Node::standalone();
    node.send("set k 0 100 1\r\nv\r\n");
    node.wait(60);
    assert_eq!(node.send("mg k R30 t\r\n"), "HD t40\r\n");
    node.wait(11);
    assert_eq!(node.send("mg k R30 t\r\n"), "HD t29 W\r\n");
    assert_eq!(node.send("mg k R30 t\r\n"), "HD t29 Z\r\n");
}

#[test]
fn md_i_marks_an_item_stale_until_a_set_with_its_cas() {
    let mut node = Node::standalone();
    node.send("set k 0 0 1\r\nv\r\n");
    let before = node.cas("k");
    assert_eq!(node.send("md k I T30\r\n"), "HD\r\n");
    let stale = node.cas("k");
    assert!(stale > before, "invalidation gives the item a new CAS");
    assert_eq!(node.send("mg k t v\r\n"), "VA 1 t30 X W\r\nv\r\n");
    assert_eq!(node.send("mg k t v\r\n"), "VA 1 t30 Z X\r\nv\r\n");
    // An older CAS with I is taken, and the value stays stale...
    assert_eq!(node.send(&format!("ms k 1 I C{before}\r\nw\r\n")), "HD\r\n");
    assert_eq!(node.send("mg k v\r\n"), "VA 1 Z X\r\nw\r\n");
    // ...the current CAS stores a fresh value.
    let current = node.cas("k");
    assert_eq!(node.send(&format!("ms k 1 C{current}\r\nx\r\n")), "HD\r\n");
    assert_eq!(node.send("mg k v\r\n"), "VA 1\r\nx\r\n");
}

#[test]
fn mg_h_l_and_u_report_and_keep_access() {
    let mut node = Node::standalone();
    node.send("set k 0 0 1\r\nv\r\n");
    node.wait(5);
    assert_eq!(node.send("mg k h l\r\n"), "HD h0 l5\r\n");
    node.wait(3);
    // u: looked at without counting as an access.
    assert_eq!(node.send("mg k h l u\r\n"), "HD h1 l3\r\n");
    assert_eq!(node.send("mg k h l\r\n"), "HD h1 l3\r\n");
    assert_eq!(node.send("mg k l\r\n"), "HD l0\r\n");
}

#[test]
fn ma_creates_counts_and_stays_quiet_with_q() {
    let mut node = Node::standalone();
    // q silences a successful ma, also when N created the item (memcached 1.6.40's fix).
    assert_eq!(
        node.send("ma n N0 J7 q\r\nma n q\r\nma n MD D3 q\r\nmn\r\n"),
        "MN\r\n"
    );
    assert_eq!(node.send("ma n v t\r\n"), "VA 1 t-1\r\n6\r\n");
    assert_eq!(node.send("ma m N50 J1 v t\r\n"), "VA 1 t50\r\n1\r\n");
    assert_eq!(node.send("ma nosuch q\r\n"), "NF\r\n");
    let cas = node.cas("n");
    assert_eq!(node.send(&format!("ma n C{} v\r\n", cas + 1)), "EX\r\n");
    assert_eq!(node.send(&format!("ma n C{cas} v\r\n")), "VA 1\r\n7\r\n");
}

#[test]
fn me_reports_memcacheds_class_and_size() {
    let mut node = Node::standalone();
    node.send(&format!("set k 5 100 300\r\n{}\r\n", "x".repeat(300)));
    node.wait(4);
    let reply = node.send("me k\r\n");
    let fields: Vec<&str> = reply.trim_end().split(' ').collect();
    // exp is printed as 1.6.18 does: now minus the expiry time.
    assert_eq!(fields[..3], ["ME", "k", "exp=-96"]);
    assert_eq!(fields[3], "la=4");
    // 48-byte header, key and NUL, flags, value and CRLF, CAS: 364 bytes, class 7.
    assert_eq!(fields[5..], ["fetch=no", "cls=7", "size=364"]);
    assert_eq!(node.send("me nosuch\r\n"), "EN\r\n");
}

// ---------------------------------------------------------------------------- replication

#[test]
fn a_standalone_node_collects_nothing_to_replicate() {
    let mut node = Node::standalone();
    node.send("set k 0 0 1\r\nv\r\ndelete k\r\nflush_all\r\n");
    assert!(node.records().is_empty());
}

#[test]
fn each_change_is_handed_to_replication_as_the_item_now_is() {
    let mut node = Node::in_cluster();
    node.send("set k 3 100 1\r\nv\r\n");
    let set = node.records();
    let cas = node.cas("k");
    assert_eq!(set.len(), 1);
    let r = &set[0];
    assert_eq!(
        (r.op, r.key.as_slice(), r.value.as_slice()),
        (Op::Set, &b"k"[..], &b"v"[..])
    );
    assert_eq!((r.version, r.flags, r.exptime), (cas, 3, T0 + 100));

    // noreply changes are replicated too; incr sends the new value.
    node.send("set n 0 0 1 noreply\r\n1\r\nincr n 41\r\nappend k 0 0 1\r\nw\r\n");
    let values: Vec<(Op, Vec<u8>, Vec<u8>)> = node
        .records()
        .into_iter()
        .map(|r| (r.op, r.key, r.value))
        .collect();
    assert_eq!(
        values,
        [
            (Op::Set, b"n".to_vec(), b"1".to_vec()),
            (Op::Set, b"n".to_vec(), b"42".to_vec()),
            (Op::Set, b"k".to_vec(), b"vw".to_vec()),
        ]
    );

    // A touch sends only the new absolute expiry.
    node.wait(7);
    node.send("touch k 50\r\ngat 60 n\r\n");
    let touches: Vec<(Op, Vec<u8>, u32)> = node
        .records()
        .into_iter()
        .map(|r| (r.op, r.key, r.exptime))
        .collect();
    assert_eq!(
        touches,
        [
            (Op::Touch, b"k".to_vec(), T0 + 57),
            (Op::Touch, b"n".to_vec(), T0 + 67)
        ]
    );
}

#[test]
fn what_changes_nothing_replicates_nothing() {
    let mut node = Node::in_cluster();
    node.send("set k 0 0 1\r\nv\r\n");
    let cas = node.cas("k");
    node.records();
    node.send(&format!(
        "add k 0 0 1\r\nx\r\nreplace nosuch 0 0 1\r\nx\r\ncas k 0 0 1 {}\r\nx\r\n\
         incr nosuch 1\r\nincr k 1\r\ndelete nosuch\r\ntouch nosuch 10\r\nget k nosuch\r\n\
         mg nosuch v\r\nmd nosuch\r\nappend nosuch 0 0 1\r\nx\r\n",
        cas + 1
    ));
    assert!(node.records().is_empty());
}

#[test]
fn a_delete_in_a_cluster_leaves_a_newer_tombstone() {
    let mut node = Node::in_cluster();
    node.send("set k 0 0 1\r\nv\r\n");
    let cas = node.cas("k");
    node.records();
    assert_eq!(node.send("delete k\r\n"), "DELETED\r\n");
    let deleted = node.records();
    assert_eq!(deleted.len(), 1);
    assert_eq!(
        (deleted[0].op, deleted[0].key.as_slice()),
        (Op::Delete, &b"k"[..])
    );
    assert!(
        deleted[0].version > cas,
        "a tombstone outranks the value it deletes"
    );
    // The tombstone is not an item: the key is missing for every command.
    assert_eq!(
        node.send("get k\r\ndelete k\r\nincr k 1\r\nmg k v\r\n"),
        "END\r\nNOT_FOUND\r\nNOT_FOUND\r\nEN\r\n"
    );
    assert_eq!(node.send("add k 0 0 1\r\nn\r\n"), "STORED\r\n");
    assert_eq!(node.value("k").as_deref(), Some("n"));
}

#[test]
fn flush_all_replicates_its_time_and_meta_changes_their_items() {
    let mut node = Node::in_cluster();
    node.send("flush_all 10\r\nflush_all\r\n");
    let flushes: Vec<(Op, u32)> = node.records().iter().map(|r| (r.op, r.exptime)).collect();
    assert_eq!(flushes, [(Op::Flush, T0 + 10), (Op::Flush, 0)]);
    // A vivified placeholder and an invalidation are changes of their items.
    node.send("mg k N30 v\r\n");
    node.send("set s 0 0 1\r\nv\r\n");
    node.records();
    node.send("md s I\r\n");
    let meta: Vec<(Op, Vec<u8>)> = node.records().into_iter().map(|r| (r.op, r.key)).collect();
    assert_eq!(meta, [(Op::Set, b"s".to_vec())]);
    node.send("mg v N30\r\n");
    let created = node.records();
    assert_eq!(created.len(), 1);
    assert_eq!(
        (created[0].op, created[0].value.len(), created[0].exptime),
        (Op::Set, 0, T0 + 30)
    );
}
