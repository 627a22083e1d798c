//! memcached's LRU crawler, mapped onto kache: the background sweeper that reclaims expired
//! items is the crawler (`lru_crawler enable|disable`, `-o no_lru_crawler`), and
//! `lru_crawler crawl` runs one full pass over the chosen classes at once, sleeping
//! `lru_crawler sleep` microseconds every 1000 items and looking at no more than
//! `lru_crawler tocrawl` items per class. One crawl or metadump runs at a time.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::protocol::admin::ClassSelection;
use crate::store::classes::MAX_CLASSES;
use crate::store::{now_secs, ScanCursor, Store};

/// The sweeper wakes this often and looks at this many records per shard each time (and
/// drops the wholly expired segments), holding a shard's lock only for that.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
const SWEEP_BUDGET: usize = 512;
/// Records one step of a crawl looks at under a shard's lock.
const CRAWL_CHUNK: usize = 512;
/// memcached's `crawls_persleep`: items between two sleeps of a crawl.
const ITEMS_PER_SLEEP: u32 = 1000;

pub struct Crawler {
    enabled: AtomicBool,
    sleep_us: AtomicU32,
    tocrawl: AtomicU32,
    /// A crawl or a metadump is running.
    busy: AtomicBool,
    starts: AtomicU64,
    pending: Mutex<Option<ClassSelection>>,
    wake: Condvar,
}

impl Crawler {
    pub fn new(enabled: bool, sleep_us: u32, tocrawl: u32) -> Crawler {
        Crawler {
            enabled: AtomicBool::new(enabled),
            sleep_us: AtomicU32::new(sleep_us),
            tocrawl: AtomicU32::new(tocrawl),
            busy: AtomicBool::new(false),
            starts: AtomicU64::new(0),
            pending: Mutex::new(None),
            wake: Condvar::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Turns the crawler on or off; returns whether it was on.
    pub fn set_enabled(&self, on: bool) -> bool {
        self.enabled.swap(on, Ordering::Relaxed)
    }

    pub fn sleep_us(&self) -> u32 {
        self.sleep_us.load(Ordering::Relaxed)
    }

    pub fn set_sleep(&self, us: u32) {
        self.sleep_us.store(us, Ordering::Relaxed);
    }

    pub fn tocrawl(&self) -> u32 {
        self.tocrawl.load(Ordering::Relaxed)
    }

    pub fn set_tocrawl(&self, n: u32) {
        self.tocrawl.store(n, Ordering::Relaxed);
    }

    /// `lru_crawler_running`.
    pub fn running(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    /// `lru_crawler_starts`.
    pub fn starts(&self) -> u64 {
        self.starts.load(Ordering::Relaxed)
    }

    /// Takes the crawler for a crawl or a metadump; false when one is running.
    pub fn try_hold(&self) -> bool {
        let taken = self
            .busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if taken {
            self.starts.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    pub fn release(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// Asks the crawler thread for a pass over `selection`; false when one is running.
    pub fn request_crawl(&self, selection: ClassSelection) -> bool {
        if !self.try_hold() {
            return false;
        }
        *self.pending.lock() = Some(selection);
        self.wake.notify_one();
        true
    }

    /// The crawler thread: sweeps expired items while enabled and runs requested crawls,
    /// until `stop`.
    pub fn run(&self, store: &Store, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let job = {
                let mut pending = self.pending.lock();
                if pending.is_none() {
                    self.wake.wait_for(&mut pending, SWEEP_INTERVAL);
                }
                pending.take()
            };
            if let Some(selection) = job {
                self.crawl(store, selection, stop);
                self.release();
            } else if self.enabled() {
                store.sweep(now_secs(), SWEEP_BUDGET);
            }
        }
    }

    fn crawl(&self, store: &Store, selection: ClassSelection, stop: &AtomicBool) {
        let tocrawl = self.tocrawl();
        let sleep = Duration::from_micros(u64::from(self.sleep_us()));
        let mut checked = [0u32; MAX_CLASSES];
        let mut since_sleep = 0;
        for shard in 0..store.shard_count() {
            let mut start = ScanCursor::default();
            loop {
                let mut looked = 0;
                let next = store.crawl(shard, start, CRAWL_CHUNK, now_secs(), |class| {
                    let seen = &mut checked[usize::from(class) % MAX_CLASSES];
                    if !selection.includes(class) || (tocrawl != 0 && *seen >= tocrawl) {
                        return false;
                    }
                    *seen += 1;
                    looked += 1;
                    true
                });
                since_sleep += looked;
                if since_sleep >= ITEMS_PER_SLEEP && !sleep.is_zero() {
                    std::thread::sleep(sleep);
                    since_sleep = 0;
                }
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match next {
                    Some(at) => start = at,
                    None => break,
                }
            }
        }
    }
}
