//! memcached's operations surface: `stats slabs|items|sizes|conns|settings|cachedump`,
//! `lru_crawler`, `watch` and `shutdown`, answered with memcached 1.6.18's names and formats
//! and mapped onto kache's store (see README, "Stats and admin commands").
//!
//! The engine hands these requests here; replies are composed with `protocol::reply`.
//! Streams (`lru_crawler metadump`, `watch`) are run by the connection, which writes their
//! output in bounded chunks.

pub mod conns;
pub mod crawler;
pub mod dump;
pub mod stats;
pub mod watch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::watch as signal;

use crate::config::MemcachedOptions;
use crate::protocol::admin::{AdminRequest, ClassSelection, CrawlerCommand, WatchFlags};
use crate::protocol::reply;
use crate::store::Store;

pub use conns::{ConnState, Conns};
pub use crawler::Crawler;
pub use watch::Logger;

/// Settings reported by `stats settings`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub port: u16,
    pub listen: String,
    pub memory_limit: usize,
    pub max_connections: usize,
    pub threads: usize,
    pub max_item_size: usize,
    /// What memcached's other flags resolved to.
    pub memcached: MemcachedSettings,
}

/// The memcached flags `stats settings` reports beyond the basic ones.
#[derive(Clone, Debug)]
pub struct MemcachedSettings {
    pub options: MemcachedOptions,
    pub shutdown_command: bool,
    pub flush_enabled: bool,
    pub dump_enabled: bool,
    pub watch_enabled: bool,
    pub reqs_per_event: u32,
    pub backlog: i32,
    pub prefix_delimiter: u8,
    /// `stats detail` starts on (memcached's `-D`).
    pub detail_enabled: bool,
    pub evictions: bool,
    pub auth_file: Option<String>,
    pub ssl_enabled: bool,
    pub umask: String,
    pub memory_file: Option<String>,
    pub napi_ids: Option<i64>,
}

impl Default for MemcachedSettings {
    fn default() -> Self {
        MemcachedSettings {
            options: MemcachedOptions::default(),
            shutdown_command: false,
            flush_enabled: true,
            dump_enabled: true,
            watch_enabled: true,
            reqs_per_event: 20,
            backlog: 1024,
            prefix_delimiter: b':',
            detail_enabled: false,
            evictions: true,
            auth_file: None,
            ssl_enabled: false,
            umask: "700".into(),
            memory_file: None,
            napi_ids: None,
        }
    }
}

/// How a `shutdown` command asks the node to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownKind {
    /// `shutdown`: stop now.
    Now,
    /// `shutdown graceful`: as SIGTERM, open connections finish first.
    Graceful,
}

/// What the connection does after an operations command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminNext {
    /// The reply is in the output buffer.
    Done,
    /// Stream `lru_crawler metadump` of these classes (the crawler is held for it).
    Metadump(ClassSelection),
    /// Become a `watch` connection.
    Watch(WatchFlags),
    /// Close the connection without a reply (`shutdown`).
    Close,
}

/// State of the operations commands, shared by all connections.
pub struct Admin {
    pub crawler: Crawler,
    pub logger: Arc<Logger>,
    pub conns: Conns,
    shutdown: signal::Sender<Option<ShutdownKind>>,
    sizes_requested: AtomicBool,
}

impl Admin {
    pub fn new(settings: &MemcachedSettings) -> Admin {
        let ext = &settings.options.extended;
        Admin {
            crawler: Crawler::new(
                ext.lru_crawler,
                ext.lru_crawler_sleep,
                ext.lru_crawler_tocrawl,
            ),
            logger: Arc::new(Logger::new(ext.watcher_logbuf_size as usize)),
            conns: Conns::default(),
            shutdown: signal::channel(None).0,
            sizes_requested: AtomicBool::new(ext.track_sizes),
        }
    }

    /// Turns on what the command line asked for that lives in the store.
    pub fn start(&self, store: &Store) {
        if self.sizes_requested.load(Ordering::Relaxed) {
            store.track_sizes(true);
        }
    }

    /// Fires when a `shutdown` command asks the node to stop.
    pub fn shutdown_requests(&self) -> signal::Receiver<Option<ShutdownKind>> {
        self.shutdown.subscribe()
    }

    /// Executes an operations command. `pending` tells whether replies to earlier requests
    /// of the batch are still unsent (memcached refuses to start a stream behind them).
    pub fn execute(
        &self,
        request: AdminRequest,
        settings: &Settings,
        store: &Store,
        now: u32,
        pending: bool,
        out: &mut BytesMut,
    ) -> AdminNext {
        let m = &settings.memcached;
        match request {
            AdminRequest::CacheDump(_) if !m.dump_enabled => {
                reply::line(out, "CLIENT_ERROR stats cachedump not allowed");
            }
            AdminRequest::CacheDump(Err(error)) => reply::line(out, error),
            AdminRequest::CacheDump(Ok((class, limit))) => {
                dump::cachedump(store, class, limit, now, out);
            }
            AdminRequest::LruCrawler(command) => {
                return self.crawler_command(command, m, pending, out)
            }
            AdminRequest::Watch(_) if !m.watch_enabled => {
                reply::line(out, "CLIENT_ERROR watch commands not allowed");
            }
            AdminRequest::Watch(_) if pending => {
                reply::line(out, "ERROR cannot pipeline other commands before watch");
            }
            AdminRequest::Watch(flags) => return AdminNext::Watch(flags),
            AdminRequest::Shutdown { .. } | AdminRequest::ShutdownInvalid
                if !m.shutdown_command =>
            {
                reply::line(out, reply::SHUTDOWN_NOT_ENABLED);
            }
            AdminRequest::ShutdownInvalid => reply::line(out, "CLIENT_ERROR invalid shutdown mode"),
            AdminRequest::Shutdown { graceful } => {
                let kind = if graceful {
                    ShutdownKind::Graceful
                } else {
                    ShutdownKind::Now
                };
                self.shutdown.send_replace(Some(kind));
                return AdminNext::Close;
            }
        }
        AdminNext::Done
    }

    fn crawler_command(
        &self,
        command: CrawlerCommand,
        m: &MemcachedSettings,
        pending: bool,
        out: &mut BytesMut,
    ) -> AdminNext {
        let crawler = &self.crawler;
        let text = match command {
            CrawlerCommand::Crawl(_) | CrawlerCommand::Metadump(_) if !crawler.enabled() => {
                "CLIENT_ERROR lru crawler disabled"
            }
            CrawlerCommand::Crawl(ClassSelection::Invalid)
            | CrawlerCommand::Metadump(ClassSelection::Invalid) => "BADCLASS invalid class id",
            // memcached cannot crawl the hash table for expired items.
            CrawlerCommand::Crawl(ClassSelection::Hash) => "ERROR an unknown error happened",
            CrawlerCommand::Crawl(selection) => {
                if crawler.request_crawl(selection) {
                    "OK"
                } else {
                    "BUSY currently processing crawler request"
                }
            }
            CrawlerCommand::Metadump(_) if !m.dump_enabled => "ERROR metadump not allowed",
            CrawlerCommand::Metadump(_) if pending => {
                "ERROR cannot pipeline other commands before metadump"
            }
            CrawlerCommand::Metadump(selection) => {
                if crawler.try_hold() {
                    return AdminNext::Metadump(selection);
                }
                "BUSY currently processing crawler request"
            }
            CrawlerCommand::ToCrawl(n) => {
                crawler.set_tocrawl(n);
                "OK"
            }
            CrawlerCommand::Sleep(us) => {
                crawler.set_sleep(us);
                "OK"
            }
            CrawlerCommand::Enable => {
                if crawler.set_enabled(true) {
                    "ERROR failed to start lru crawler thread"
                } else {
                    "OK"
                }
            }
            CrawlerCommand::Disable => {
                crawler.set_enabled(false);
                "OK"
            }
        };
        reply::line(out, text);
        AdminNext::Done
    }
}
