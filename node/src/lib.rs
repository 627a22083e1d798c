//! kache-node: a memcached-compatible cache node.
//!
//! - `protocol`: the text and meta protocols (pure parsing and reply composition).
//! - `store`: the sharded in-memory item store.

pub mod admin;
pub mod admin_commands;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod listener;
pub mod node;
pub mod peer;
pub mod protocol;
pub mod proxy;
pub mod record;
pub mod server;
pub mod stats;
pub mod store;
pub mod tls;
