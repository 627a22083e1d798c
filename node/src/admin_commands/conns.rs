//! The connections `stats conns` lists: listening sockets and clients, each with its
//! addresses, its state in memcached's words and the seconds since its last command.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use parking_lot::Mutex;

use crate::protocol::reply;

/// What a connection is doing, named as memcached's `conn_*` states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnState {
    Listening,
    /// Waiting for the next request.
    Waiting,
    /// Executing requests.
    ParseCmd,
    /// Waiting for the data block of a storage command.
    Nread,
    /// Writing replies the client is slow to read.
    Write,
    /// A `watch` connection, or one streaming a metadump.
    Watch,
}

impl ConnState {
    fn name(self) -> &'static str {
        match self {
            ConnState::Listening => "conn_listening",
            ConnState::Waiting => "conn_waiting",
            ConnState::ParseCmd => "conn_parse_cmd",
            ConnState::Nread => "conn_nread",
            ConnState::Write => "conn_write",
            ConnState::Watch => "conn_watch",
        }
    }

    fn from_u8(n: u8) -> ConnState {
        [
            ConnState::Listening,
            ConnState::Waiting,
            ConnState::ParseCmd,
            ConnState::Nread,
            ConnState::Write,
            ConnState::Watch,
        ]
        .get(usize::from(n))
        .copied()
        .unwrap_or(ConnState::Waiting)
    }
}

/// One listed connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: usize,
    /// `tcp:<address>:<port>` of the peer (of the socket, for a listener).
    addr: String,
    /// `tcp:<address>:<port>` of the listening socket it came in on (none for a listener).
    listen_addr: Option<String>,
    state: AtomicU8,
    last_cmd: AtomicU32,
}

impl ConnInfo {
    pub fn set_state(&self, state: ConnState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Records that a command arrived at `now`.
    pub fn touch(&self, now: u32) {
        self.last_cmd.store(now, Ordering::Relaxed);
    }

    pub fn last_cmd(&self) -> u32 {
        self.last_cmd.load(Ordering::Relaxed)
    }
}

fn tcp(addr: SocketAddr) -> String {
    format!("tcp:{addr}")
}

/// Every open connection and listener.
#[derive(Debug, Default)]
pub struct Conns {
    next_id: AtomicUsize,
    open: Mutex<BTreeMap<usize, Arc<ConnInfo>>>,
    /// Connections closed for idling past `-o idle_timeout`.
    pub idle_kicks: AtomicU64,
    /// Times a connection let others run after `-R` requests (`conn_yields`).
    pub yields: AtomicU64,
}

/// Keeps a connection listed until dropped.
pub struct Registration<'a> {
    conns: &'a Conns,
    pub info: Arc<ConnInfo>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.conns.open.lock().remove(&self.info.id);
    }
}

impl Conns {
    fn add(
        &self,
        addr: String,
        listen_addr: Option<String>,
        state: ConnState,
        now: u32,
    ) -> Registration<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(ConnInfo {
            id,
            addr,
            listen_addr,
            state: AtomicU8::new(state as u8),
            last_cmd: AtomicU32::new(now),
        });
        self.open.lock().insert(id, info.clone());
        Registration { conns: self, info }
    }

    /// Lists a listening socket.
    pub fn listener(&self, local: SocketAddr, now: u32) -> Registration<'_> {
        self.add(tcp(local), None, ConnState::Listening, now)
    }

    /// Lists a client connection accepted on `local`.
    pub fn client(&self, peer: SocketAddr, local: SocketAddr, now: u32) -> Registration<'_> {
        self.add(tcp(peer), Some(tcp(local)), ConnState::Waiting, now)
    }

    /// `stats conns` (without the final `END`).
    pub fn report(&self, now: u32, out: &mut BytesMut) {
        let open: Vec<Arc<ConnInfo>> = self.open.lock().values().cloned().collect();
        for conn in open {
            let id = conn.id;
            reply::stat(out, &format!("{id}:addr"), &conn.addr);
            if let Some(listen) = &conn.listen_addr {
                reply::stat(out, &format!("{id}:listen_addr"), listen);
            }
            let state = ConnState::from_u8(conn.state.load(Ordering::Relaxed));
            reply::stat(out, &format!("{id}:state"), state.name());
            reply::stat(
                out,
                &format!("{id}:secs_since_last_cmd"),
                now.saturating_sub(conn.last_cmd()),
            );
        }
    }
}
