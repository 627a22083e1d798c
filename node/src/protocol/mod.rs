//! The memcached text and meta protocols: one definition used by the node and the proxy.
//!
//! Parsing is pure (bytes in, `Request` out); replies are composed into a write buffer by
//! `reply` and `meta_reply`. Nothing here does I/O.

pub mod admin;
pub mod auth;
pub mod forward;
pub mod meta;
pub mod meta_reply;
pub mod numbers;
mod parse;
pub mod reply;
mod request;
pub mod tokens;

pub use parse::{
    exceeds_item_size, meta_set_mode, parse, Limits, ParseOutcome, KEY_MAX_LENGTH,
    MAX_LINE_WITHOUT_NEWLINE,
};
pub use request::{
    GetCommand, KeyList, MetaCommand, MetaRequest, Request, StoreMode, StoreRequest,
};
