//! One type per request the node understands.

use std::borrow::Cow;

use super::admin::AdminRequest;
use super::meta::MetaFlags;

/// The retrieval commands of the text protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetCommand {
    Get,
    Gets,
    Gat,
    Gats,
}

impl GetCommand {
    pub fn returns_cas(self) -> bool {
        matches!(self, GetCommand::Gets | GetCommand::Gats)
    }
    pub fn touches(self) -> bool {
        matches!(self, GetCommand::Gat | GetCommand::Gats)
    }
}

/// The storage commands of the text protocol, and the `ms` modes that map onto them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreMode {
    Set,
    Add,
    Replace,
    Append,
    Prepend,
    Cas,
}

/// `set`/`add`/`replace`/`append`/`prepend`/`cas` with its data block.
#[derive(Clone, Debug)]
pub struct StoreRequest<'a> {
    pub mode: StoreMode,
    pub key: &'a [u8],
    pub flags: u32,
    pub exptime: i32,
    pub data: &'a [u8],
    pub cas: u64,
    pub noreply: bool,
}

/// The space-separated keys of a multi-key retrieval, validated by the parser.
#[derive(Clone, Copy, Debug)]
pub struct KeyList<'a> {
    text: &'a [u8],
}

impl<'a> KeyList<'a> {
    pub fn new(text: &'a [u8]) -> Self {
        KeyList { text }
    }
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.text.split(|&b| b == b' ').filter(|k| !k.is_empty())
    }
}

/// Which meta command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaCommand {
    Get,
    Set,
    Delete,
    Arithmetic,
}

/// A meta command with its decoded key and flags.
#[derive(Clone, Debug)]
pub struct MetaRequest<'a> {
    pub command: MetaCommand,
    pub key: Cow<'a, [u8]>,
    pub flags: MetaFlags<'a>,
    /// Data block of `ms`.
    pub data: &'a [u8],
}

/// A request, borrowing from the connection's read buffer.
#[derive(Clone, Debug)]
pub enum Request<'a> {
    Get {
        command: GetCommand,
        exptime: i32,
        keys: KeyList<'a>,
    },
    Store(StoreRequest<'a>),
    /// A storage command whose value exceeds the item size limit. memcached drops the key's
    /// old value on a failed `set` (and on any failed `ms`) so stale data cannot persist.
    TooLarge {
        key: Cow<'a, [u8]>,
        drop_existing: bool,
        noreply: bool,
    },
    Delete {
        key: &'a [u8],
        noreply: bool,
    },
    Arithmetic {
        incr: bool,
        key: &'a [u8],
        delta: u64,
        noreply: bool,
    },
    Touch {
        key: &'a [u8],
        exptime: i32,
        noreply: bool,
    },
    FlushAll {
        delay: i32,
        noreply: bool,
    },
    Version,
    Verbosity {
        level: u32,
        noreply: bool,
    },
    Quit,
    /// `stats [<sub> [<arg>]]`.
    Stats {
        sub: &'a [u8],
        arg: &'a [u8],
    },
    /// `cache_memlimit <megabytes> [noreply]`: change the memory limit at run time.
    CacheMemlimit {
        megabytes: u32,
        noreply: bool,
    },
    /// `config get <what>` / `get AmazonElastiCache:cluster`: ElastiCache auto discovery.
    ConfigGet {
        what: &'a [u8],
    },
    MetaNoop,
    Meta(MetaRequest<'a>),
    /// Operations commands: `stats cachedump`, `lru_crawler`, `watch`, `shutdown`.
    Admin(AdminRequest),
    MetaDebug {
        key: Cow<'a, [u8]>,
    },
    /// A request answered with a fixed line and no other effect.
    Error {
        reply: &'static str,
        /// memcached's `noreply` also silences error lines of text commands.
        noreply: bool,
    },
}

impl Request<'_> {
    /// Whether the client asked for no reply even on error (memcached's text `noreply`;
    /// the meta protocol's quiet mode still reports errors).
    pub fn silences_errors(&self) -> bool {
        match self {
            Request::Store(req) => req.noreply,
            Request::TooLarge { noreply, .. }
            | Request::Delete { noreply, .. }
            | Request::Arithmetic { noreply, .. }
            | Request::Touch { noreply, .. }
            | Request::FlushAll { noreply, .. }
            | Request::Verbosity { noreply, .. }
            | Request::CacheMemlimit { noreply, .. }
            | Request::Error { noreply, .. } => *noreply,
            _ => false,
        }
    }
}
