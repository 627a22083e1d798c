//! Parsing of memcached's operations commands: `stats cachedump`, `lru_crawler`, `watch` and
//! `shutdown`, as memcached 1.6.18 reads them. Errors that memcached reports only after its
//! run-time checks (a disabled crawler, `-X`) are kept in the request for the executor.

use super::numbers::parse_u32;
use super::request::Request;
use super::tokens::Tokens;

/// memcached's `MAX_NUMBER_OF_SLAB_CLASSES`: class ids run below it.
const CLASS_LIMIT: u32 = 64;

/// Which classes a crawl or a metadump covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassSelection {
    /// `all`.
    All,
    /// `hash`: walk the hash table instead of the LRUs (for a metadump, every item).
    Hash,
    /// A comma-separated list of class ids, as a bit set (bit `id`).
    Classes(u64),
    /// Not a valid list: memcached answers `BADCLASS invalid class id` (after its other checks).
    Invalid,
}

impl ClassSelection {
    fn parse(text: &[u8]) -> ClassSelection {
        match text {
            b"all" => return ClassSelection::All,
            b"hash" => return ClassSelection::Hash,
            _ => {}
        }
        let mut set = 0u64;
        // memcached's strtok_r: empty pieces between commas are skipped.
        for piece in text.split(|&b| b == b',').filter(|p| !p.is_empty()) {
            match parse_u32(piece) {
                Some(id) if (1..CLASS_LIMIT).contains(&id) => set |= 1 << id,
                _ => return ClassSelection::Invalid,
            }
        }
        ClassSelection::Classes(set)
    }

    /// Whether class `id` is selected (every class for `all` and `hash`).
    pub fn includes(self, id: u8) -> bool {
        match self {
            ClassSelection::All | ClassSelection::Hash => true,
            ClassSelection::Classes(set) => id < 64 && set & (1 << id) != 0,
            ClassSelection::Invalid => false,
        }
    }
}

/// `lru_crawler <subcommand>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrawlerCommand {
    Crawl(ClassSelection),
    Metadump(ClassSelection),
    /// `tocrawl N`: most items looked at per class and crawl (0 for no limit).
    ToCrawl(u32),
    /// `sleep N`: microseconds between batches of items.
    Sleep(u32),
    Enable,
    Disable,
}

/// What `watch` asks for (memcached's log types).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchFlags(pub u16);

impl WatchFlags {
    pub const RAWCMDS: u16 = 1;
    pub const EVICTIONS: u16 = 2;
    pub const FETCHERS: u16 = 4;
    pub const MUTATIONS: u16 = 8;
    pub const SYSEVENTS: u16 = 16;
    pub const CONNEVENTS: u16 = 32;
    pub const PROXYREQS: u16 = 64;
    pub const PROXYEVENTS: u16 = 128;
    pub const PROXYUSER: u16 = 256;

    const NAMES: [(&'static [u8], u16); 9] = [
        (b"rawcmds", Self::RAWCMDS),
        (b"evictions", Self::EVICTIONS),
        (b"fetchers", Self::FETCHERS),
        (b"mutations", Self::MUTATIONS),
        (b"sysevents", Self::SYSEVENTS),
        (b"connevents", Self::CONNEVENTS),
        (b"proxyreqs", Self::PROXYREQS),
        (b"proxyevents", Self::PROXYEVENTS),
        (b"proxyuser", Self::PROXYUSER),
    ];

    pub fn has(self, flag: u16) -> bool {
        self.0 & flag != 0
    }
}

/// An operations command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminRequest {
    /// `stats cachedump <class> <limit>`; `Err` holds the reply for bad arguments, given
    /// only when dumping is allowed (memcached checks `-X` first).
    CacheDump(Result<(u8, u32), &'static str>),
    LruCrawler(CrawlerCommand),
    Watch(WatchFlags),
    /// `shutdown` (`graceful` or not).
    Shutdown {
        graceful: bool,
    },
    /// `shutdown <anything else>`: refused, after the `-A` check.
    ShutdownInvalid,
}

fn admin(request: AdminRequest) -> Request<'static> {
    Request::Admin(request)
}

fn plain_error(reply: &'static str) -> Request<'static> {
    Request::Error {
        reply,
        noreply: false,
    }
}

/// `stats cachedump ...` (memcached's argument checks, in its order).
pub fn parse_cachedump(tokens: &Tokens<'_>) -> Request<'static> {
    if tokens.ntokens() < 5 {
        return admin(AdminRequest::CacheDump(Err(
            "CLIENT_ERROR bad command line",
        )));
    }
    let parsed = match (parse_u32(tokens.get(2)), parse_u32(tokens.get(3))) {
        (Some(id), Some(limit)) if id < CLASS_LIMIT => Ok((id as u8, limit)),
        (Some(_), Some(_)) => Err("CLIENT_ERROR Illegal slab id"),
        _ => Err("CLIENT_ERROR bad command line format"),
    };
    admin(AdminRequest::CacheDump(parsed))
}

/// `lru_crawler ...`.
pub fn parse_lru_crawler(tokens: &Tokens<'_>) -> Request<'static> {
    let sub = tokens.get(1);
    let arg = tokens.get(2);
    let command = match (tokens.ntokens(), sub) {
        (4, b"crawl") => CrawlerCommand::Crawl(ClassSelection::parse(arg)),
        (4, b"metadump") => CrawlerCommand::Metadump(ClassSelection::parse(arg)),
        (4, b"tocrawl") => match parse_u32(arg) {
            Some(n) => CrawlerCommand::ToCrawl(n),
            None => return plain_error("CLIENT_ERROR bad command line format"),
        },
        (4, b"sleep") => match parse_u32(arg) {
            Some(n) if n <= 1_000_000 => CrawlerCommand::Sleep(n),
            Some(_) => return plain_error("CLIENT_ERROR sleep must be one second or less"),
            None => return plain_error("CLIENT_ERROR bad command line format"),
        },
        (3, b"enable") => CrawlerCommand::Enable,
        (3, b"disable") => CrawlerCommand::Disable,
        _ => return plain_error("ERROR"),
    };
    admin(AdminRequest::LruCrawler(command))
}

/// `watch [types...]`; no types means `fetchers`.
pub fn parse_watch(tokens: &Tokens<'_>) -> Request<'static> {
    let noreply = tokens.noreply();
    if tokens.len() == 1 {
        return admin(AdminRequest::Watch(WatchFlags(WatchFlags::FETCHERS)));
    }
    let mut flags = 0;
    for token in tokens.slice(1) {
        match WatchFlags::NAMES.iter().find(|(name, _)| name == token) {
            Some((_, flag)) => flags |= flag,
            // memcached reads a trailing `noreply` as a type too, then stays silent.
            None => {
                return Request::Error {
                    reply: "ERROR",
                    noreply,
                }
            }
        }
    }
    admin(AdminRequest::Watch(WatchFlags(flags)))
}

/// `shutdown [graceful]`.
pub fn parse_shutdown(tokens: &Tokens<'_>) -> Request<'static> {
    match (tokens.ntokens(), tokens.get(1)) {
        (2, _) => admin(AdminRequest::Shutdown { graceful: false }),
        (3, b"graceful") => admin(AdminRequest::Shutdown { graceful: true }),
        _ => admin(AdminRequest::ShutdownInvalid),
    }
}

/// memcached's `uriencode`: what `metadump` and `watch` print keys as (letters, digits and
/// `-._~` stay, every other byte becomes `%XX`).
pub fn uri_encode(key: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in key {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(line: &[u8]) -> Request<'static> {
        let tokens = Tokens::new(line);
        match tokens.get(0) {
            b"stats" => parse_cachedump(&tokens),
            b"lru_crawler" => parse_lru_crawler(&tokens),
            b"watch" => parse_watch(&tokens),
            _ => parse_shutdown(&tokens),
        }
    }

    fn admin_of(request: Request<'_>) -> AdminRequest {
        match request {
            Request::Admin(a) => a,
            other => panic!("not an admin request: {other:?}"),
        }
    }

    fn error_of(request: Request<'_>) -> &'static str {
        match request {
            Request::Error { reply, .. } => reply,
            Request::Admin(AdminRequest::CacheDump(Err(reply))) => reply,
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn class_lists_as_memcached_reads_them() {
        assert_eq!(ClassSelection::parse(b"all"), ClassSelection::All);
        assert_eq!(
            ClassSelection::parse(b"1,3,,63"),
            ClassSelection::Classes((1 << 1) | (1 << 3) | (1 << 63))
        );
        for bad in [&b"0"[..], b"64", b"x", b"1,x"] {
            assert_eq!(ClassSelection::parse(bad), ClassSelection::Invalid);
        }
        assert!(ClassSelection::Classes(1 << 5).includes(5));
        assert!(!ClassSelection::Classes(1 << 5).includes(6));
    }

    #[test]
    fn crawler_subcommands_and_their_errors() {
        assert_eq!(
            admin_of(parsed(b"lru_crawler metadump all")),
            (AdminRequest::LruCrawler(CrawlerCommand::Metadump(ClassSelection::All)))
        );
        assert_eq!(
            admin_of(parsed(b"lru_crawler sleep 1000000")),
            (AdminRequest::LruCrawler(CrawlerCommand::Sleep(1_000_000)))
        );
        assert_eq!(
            error_of(parsed(b"lru_crawler sleep 1000001")),
            "CLIENT_ERROR sleep must be one second or less"
        );
        assert_eq!(
            error_of(parsed(b"lru_crawler tocrawl x")),
            "CLIENT_ERROR bad command line format"
        );
        for line in [
            &b"lru_crawler"[..],
            b"lru_crawler metadump",
            b"lru_crawler bogus",
        ] {
            assert_eq!(error_of(parsed(line)), "ERROR");
        }
    }

    #[test]
    fn cachedump_arguments() {
        assert_eq!(
            admin_of(parsed(b"stats cachedump 3 10")),
            (AdminRequest::CacheDump(Ok((3, 10))))
        );
        assert_eq!(
            error_of(parsed(b"stats cachedump 1")),
            "CLIENT_ERROR bad command line"
        );
        assert_eq!(
            error_of(parsed(b"stats cachedump 64 0")),
            "CLIENT_ERROR Illegal slab id"
        );
        assert_eq!(
            error_of(parsed(b"stats cachedump x 0")),
            "CLIENT_ERROR bad command line format"
        );
    }

    #[test]
    fn watch_types() {
        assert_eq!(
            admin_of(parsed(b"watch")),
            (AdminRequest::Watch(WatchFlags(WatchFlags::FETCHERS)))
        );
        assert_eq!(
            admin_of(parsed(b"watch mutations evictions")),
            (AdminRequest::Watch(WatchFlags(WatchFlags::MUTATIONS | WatchFlags::EVICTIONS)))
        );
        assert!(matches!(
            parsed(b"watch fetchers noreply"),
            Request::Error {
                reply: "ERROR",
                noreply: true
            }
        ));
    }

    #[test]
    fn keys_are_uri_encoded() {
        let mut out = Vec::new();
        uri_encode(b"a b/c~d%", &mut out);
        assert_eq!(out, b"a%20b%2Fc~d%25");
    }
}
