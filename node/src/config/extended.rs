//! memcached's `-o` extended options (1.6.18), parsed as memcached parses them.
//!
//! Options with a meaning in kache are applied (through the fields below); the others are
//! accepted and reported as a one-line notice each. An unknown option, or a value memcached
//! refuses, is refused with memcached's own message and exit code.

/// What the `-o` options of a command line set, with memcached's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Extended {
    pub maxconns_fast: bool,
    pub hashpower_init: u32,
    pub slab_reassign: bool,
    pub slab_automove: u32,
    pub slab_automove_ratio: f64,
    pub slab_automove_window: u32,
    pub tail_repair_time: u32,
    pub hash_algorithm: &'static str,
    /// The crawler (kache's background expiry sweeper) runs.
    pub lru_crawler: bool,
    pub lru_crawler_sleep: u32,
    pub lru_crawler_tocrawl: u32,
    /// Whether memcached would start its LRU maintainer (`no_lru_maintainer`, `no_modern`
    /// turn it off); kache has none, but `temporary_ttl` is checked against it as memcached
    /// does.
    pub lru_maintainer: bool,
    pub hot_lru_pct: u32,
    pub warm_lru_pct: u32,
    pub hot_max_factor: f64,
    pub warm_max_factor: f64,
    pub temp_lru: bool,
    pub temporary_ttl: u32,
    /// Seconds a connection may stay idle before it is closed (0: never).
    pub idle_timeout: u32,
    /// Bytes buffered per `watch` connection.
    pub watcher_logbuf_size: u32,
    pub worker_logbuf_size: u32,
    /// `slab_sizes` as given; checked by [`parse_slab_sizes`] once `-n` is known.
    pub slab_sizes: Option<String>,
    /// `slab_chunk_max` in bytes, when given (or implied by `no_chunked_items`, `no_modern`).
    pub slab_chunk_max: Option<usize>,
    /// Whether `slab_chunk_max` was given explicitly.
    pub slab_chunk_max_set: bool,
    pub track_sizes: bool,
    pub read_buf_mem_limit: u32,
    pub drop_privileges: bool,
    pub ssl_chain_cert: Option<String>,
    pub ssl_key: Option<String>,
    pub ssl_verify_mode: u32,
    pub ssl_ca_cert: Option<String>,
    pub ssl_min_version: u32,
    /// One line per option accepted without effect in kache.
    pub notices: Vec<String>,
}

impl Default for Extended {
    fn default() -> Self {
        Extended {
            maxconns_fast: true,
            hashpower_init: 0,
            slab_reassign: true,
            slab_automove: 1,
            slab_automove_ratio: 0.8,
            slab_automove_window: 30,
            tail_repair_time: 0,
            hash_algorithm: "murmur3",
            lru_crawler: true,
            lru_crawler_sleep: 100,
            lru_crawler_tocrawl: 0,
            lru_maintainer: true,
            hot_lru_pct: 20,
            warm_lru_pct: 40,
            hot_max_factor: 0.2,
            warm_max_factor: 2.0,
            temp_lru: false,
            temporary_ttl: 61,
            idle_timeout: 0,
            watcher_logbuf_size: 256 * 1024,
            worker_logbuf_size: 64 * 1024,
            slab_sizes: None,
            slab_chunk_max: None,
            slab_chunk_max_set: false,
            track_sizes: false,
            read_buf_mem_limit: 0,
            drop_privileges: false,
            ssl_chain_cert: None,
            ssl_key: None,
            ssl_verify_mode: 0,
            ssl_ca_cert: None,
            ssl_min_version: 2,
            notices: Vec::new(),
        }
    }
}

/// A command line memcached would refuse, with memcached's message and exit code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    /// Refused while reading the options (memcached exits 1).
    #[error("{0}")]
    Option(String),
    /// Refused by the checks after reading them (`EX_USAGE`, 64).
    #[error("{0}")]
    Usage(String),
    /// `-u` names no user (`EX_NOUSER`, 67).
    #[error("{0}")]
    NoUser(String),
    /// The operating system refused (`EX_OSERR`, 71).
    #[error("{0}")]
    Os(String),
}

impl FlagError {
    /// The exit code memcached uses for this refusal.
    pub fn exit_code(&self) -> u8 {
        match self {
            FlagError::Option(_) => 1,
            FlagError::Usage(_) => 64,
            FlagError::NoUser(_) => 67,
            FlagError::Os(_) => 71,
        }
    }
}

fn refuse(message: impl Into<String>) -> FlagError {
    FlagError::Option(message.into())
}

/// C's `atoi`: leading blanks, an optional sign, digits; anything else ends it (0 if none).
fn atoi(text: &str) -> i64 {
    let t = text.trim_start();
    let (sign, digits) = match t.as_bytes().first() {
        Some(b'-') => (-1, &t[1..]),
        Some(b'+') => (1, &t[1..]),
        _ => (1, t),
    };
    let end = digits
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    sign * digits[..end].parse::<i64>().unwrap_or(0)
}

/// C's `atof` on what memcached accepts: a decimal number (0 if none).
fn atof(text: &str) -> f64 {
    let t = text.trim_start();
    let end = t
        .char_indices()
        .take_while(|&(i, c)| c.is_ascii_digit() || c == '.' || (i == 0 && (c == '-' || c == '+')))
        .map(|(i, c)| i + c.len_utf8())
        .last()
        .unwrap_or(0);
    t[..end].parse().unwrap_or(0.0)
}

/// memcached's `safe_strtoul`: a whole unsigned 32-bit number.
fn strtoul(text: &str) -> Option<u32> {
    text.trim().parse().ok()
}

/// Options memcached 1.6.18 accepts that have no effect in kache, and why.
fn no_effect(name: &str) -> Option<&'static str> {
    Some(match name {
        "maxconns_fast" => "kache always answers connections over -c with an error and closes them",
        "no_maxconns_fast" => {
            "kache always answers connections over -c with an error and closes them"
        }
        "no_hashexpand" => "kache's hash tables always grow",
        "slab_reassign"
        | "no_slab_reassign"
        | "slab_automove"
        | "no_slab_automove"
        | "slab_automove_ratio"
        | "slab_automove_window"
        | "slab_automove_freeratio" => {
            "kache keeps items in segments any size of item shares: there are no slab pages to move"
        }
        "tail_repair_time" => "kache items have no reference counts to repair",
        "hash_algorithm" => "kache hashes keys with its own hash",
        "lru_maintainer" | "no_lru_maintainer" | "hot_lru_pct" | "warm_lru_pct"
        | "hot_max_factor" | "warm_max_factor" | "temporary_ttl" => {
            "kache evicts by merging segments per shard: there are no hot, warm, cold or temporary LRUs"
        }
        "worker_logbuf_size" => "kache's workers log straight into each watcher's buffer",
        "no_inline_ascii_resp" | "inline_ascii_resp" => "memcached ignores it too",
        "modern" => "memcached ignores it too",
        "no_drop_privileges" | "drop_privileges" => "kache does not install a system-call filter",
        "read_buf_mem_limit" => "every kache connection buffer is already bounded",
        "ssl_keyformat" | "ssl_ciphers" | "ssl_wbuf_size" | "ssl_session_cache"
        | "ssl_kernel_tls" => "kache's TLS (rustls) uses its own defaults for this",
        "sock_cookie_id" => "kache sets no socket cookie",
        _ if name.starts_with("ext_") => {
            "kache keeps every item in memory: there is no external storage"
        }
        _ => return None,
    })
}

/// memcached's external-storage options (given to its `storage_read_config`).
const EXT_OPTIONS: &[&str] = &[
    "ext_page_size",
    "ext_wbuf_size",
    "ext_threads",
    "ext_io_depth",
    "ext_path",
    "ext_item_size",
    "ext_item_age",
    "ext_low_ttl",
    "ext_recache_rate",
    "ext_compact_under",
    "ext_drop_under",
    "ext_max_sleep",
    "ext_max_frag",
    "ext_drop_unread",
    "slab_automove_freeratio",
];

/// memcached's `_parse_slab_sizes`: `-`-separated, increasing, 8 bytes apart at least.
pub fn parse_slab_sizes(text: &str, min: usize, max: usize) -> Result<Vec<usize>, FlagError> {
    let usage = |m: String| FlagError::Usage(m);
    if text.is_empty() {
        return Err(usage(String::new()));
    }
    let mut sizes: Vec<usize> = Vec::new();
    for piece in text.split('-').filter(|p| !p.is_empty()) {
        let size = strtoul(piece).map_or(0, |s| s as usize);
        if size < min || size > max {
            return Err(usage(format!("slab size {size} is out of valid range")));
        }
        let last = sizes.last().copied().unwrap_or(0);
        if last >= size {
            return Err(usage(format!(
                "slab size {size} cannot be lower than or equal to a previous class size"
            )));
        }
        if size <= last + 8 {
            return Err(usage(format!(
                "slab size {size} must be at least 8 bytes larger than previous class"
            )));
        }
        sizes.push(size);
        if sizes.len() >= 63 {
            return Err(usage("too many slab classes specified".into()));
        }
    }
    Ok(sizes)
}

impl Extended {
    /// Reads every `-o` argument (each a comma-separated list), in order.
    pub fn parse<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<Extended, FlagError> {
        let mut ext = Extended::default();
        for arg in args {
            for option in arg.split(',').filter(|o| !o.is_empty()) {
                ext.apply(option)?;
            }
        }
        Ok(ext)
    }

    fn note(&mut self, option: &str, why: &str) {
        self.notices
            .push(format!("-o {option} accepted, not applied: {why}"));
    }

    fn apply(&mut self, option: &str) -> Result<(), FlagError> {
        let (name, value) = match option.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (option, None),
        };
        let need = |what: &str| value.ok_or_else(|| refuse(what.to_string()));
        match name {
            "hashpower" => {
                let v = atoi(need("Missing numeric argument for hashpower")?);
                if v < 12 {
                    return Err(refuse(format!(
                        "Initial hashtable multiplier of {v} is too low"
                    )));
                }
                if v > 32 {
                    return Err(refuse(format!(
                        "Initial hashtable multiplier of {v} is too high\nChoose a value based on \"STAT hash_power_level\" from a running instance"
                    )));
                }
                self.hashpower_init = v as u32;
            }
            "slab_reassign" => self.slab_reassign = true,
            "no_slab_reassign" => self.slab_reassign = false,
            "slab_automove" => {
                self.slab_automove = match value {
                    None => 1,
                    Some(v) => match atoi(v) {
                        n @ 0..=2 => n as u32,
                        _ => return Err(refuse("slab_automove must be between 0 and 2")),
                    },
                };
            }
            "no_slab_automove" => self.slab_automove = 0,
            "slab_automove_ratio" => {
                let r = atof(need("Missing slab_automove_ratio argument")?);
                if r <= 0.0 || r > 1.0 {
                    return Err(refuse("slab_automove_ratio must be > 0 and < 1"));
                }
                self.slab_automove_ratio = r;
            }
            "slab_automove_window" => {
                let w = atoi(need("Missing slab_automove_window argument")?);
                if w < 3 {
                    return Err(refuse("slab_automove_window must be > 2"));
                }
                self.slab_automove_window = w as u32;
            }
            "tail_repair_time" => {
                let t = atoi(need("Missing numeric argument for tail_repair_time")?);
                if t < 10 {
                    return Err(refuse(
                        "Cannot set tail_repair_time to less than 10 seconds",
                    ));
                }
                self.tail_repair_time = t as u32;
            }
            "hash_algorithm" => {
                self.hash_algorithm = match need("Missing hash_algorithm argument")? {
                    "jenkins" => "jenkins",
                    "murmur3" => "murmur3",
                    "xxh3" => "xxh3",
                    _ => {
                        return Err(refuse(
                            "Unknown hash_algorithm option (jenkins, murmur3, xxh3)",
                        ))
                    }
                };
            }
            "lru_crawler" => self.lru_crawler = true,
            "no_lru_crawler" => self.lru_crawler = false,
            "lru_crawler_sleep" => {
                let s = atoi(need("Missing lru_crawler_sleep value")?);
                if !(0..=1_000_000).contains(&s) {
                    return Err(refuse("LRU crawler sleep must be between 0 and 1 second"));
                }
                self.lru_crawler_sleep = s as u32;
            }
            "lru_crawler_tocrawl" => {
                self.lru_crawler_tocrawl = strtoul(need("Missing lru_crawler_tocrawl value")?)
                    .ok_or_else(|| refuse("lru_crawler_tocrawl takes a numeric 32bit value"))?;
            }
            "lru_maintainer" => self.lru_maintainer = true,
            "no_lru_maintainer" => self.lru_maintainer = false,
            "hot_lru_pct" | "warm_lru_pct" => {
                let p = atoi(need(&format!("Missing {name} argument"))?);
                if !(1..80).contains(&p) {
                    return Err(refuse(format!("{name} must be > 1 and < 80")));
                }
                if name == "hot_lru_pct" {
                    self.hot_lru_pct = p as u32;
                } else {
                    self.warm_lru_pct = p as u32;
                }
            }
            "hot_max_factor" | "warm_max_factor" => {
                let f = atof(need(&format!("Missing {name} argument"))?);
                if f <= 0.0 {
                    return Err(refuse(format!("{name} must be > 0")));
                }
                if name == "hot_max_factor" {
                    self.hot_max_factor = f;
                } else {
                    self.warm_max_factor = f;
                }
            }
            "temporary_ttl" => {
                self.temp_lru = true;
                self.temporary_ttl = atoi(need("Missing temporary_ttl argument")?) as u32;
            }
            "idle_timeout" => {
                let t = atoi(need("Missing numeric argument for idle_timeout")?);
                self.idle_timeout = t.clamp(0, i64::from(u32::MAX)) as u32;
            }
            "watcher_logbuf_size" | "worker_logbuf_size" => {
                let kib = strtoul(need(&format!("Missing {name} argument"))?)
                    .ok_or_else(|| refuse(format!("could not parse argument to {name}")))?;
                let bytes = kib.saturating_mul(1024);
                if name == "watcher_logbuf_size" {
                    self.watcher_logbuf_size = bytes;
                } else {
                    self.worker_logbuf_size = bytes;
                }
            }
            "slab_sizes" => self.slab_sizes = Some(value.unwrap_or_default().to_string()),
            "slab_chunk_max" => match value.and_then(|v| v.trim().parse::<i64>().ok()) {
                Some(bytes) if bytes > 0 => {
                    self.slab_chunk_max = Some(bytes as usize);
                    self.slab_chunk_max_set = true;
                }
                // memcached prints the complaint and carries on with what it had.
                _ => self.notices.push(match value {
                    None => "Missing slab_chunk_max argument".into(),
                    Some(_) => "could not parse argument to slab_chunk_max".into(),
                }),
            },
            "track_sizes" => self.track_sizes = true,
            "no_chunked_items" => self.slab_chunk_max = Some(crate::store::classes::PAGE_SIZE),
            "no_modern" => {
                if !self.slab_chunk_max_set {
                    self.slab_chunk_max = Some(crate::store::classes::PAGE_SIZE);
                }
                self.slab_reassign = false;
                self.slab_automove = 0;
                self.maxconns_fast = false;
                self.hash_algorithm = "jenkins";
                self.lru_crawler = false;
                self.lru_maintainer = false;
                self.note(option, "kache has no segmented LRU, slab mover or maxconns mode to turn off; the crawler and slab_chunk_max follow it");
            }
            "resp_obj_mem_limit" => self.notices.push(
                "DEPRECATED: resp_obj_mem_limit no longer used. See read_buf_mem_limit,".into(),
            ),
            "read_buf_mem_limit" => {
                let mb = strtoul(need("Missing read_buf_mem_limit argument")?)
                    .ok_or_else(|| refuse("could not parse argument to read_buf_mem_limit"))?;
                self.read_buf_mem_limit = mb.saturating_mul(1024 * 1024);
            }
            "drop_privileges" => self.drop_privileges = true,
            "no_drop_privileges" => self.drop_privileges = false,
            "ssl_chain_cert" => {
                self.ssl_chain_cert = Some(need("Missing ssl_chain_cert argument")?.to_string())
            }
            "ssl_key" => self.ssl_key = Some(need("Missing ssl_key argument")?.to_string()),
            "ssl_ca_cert" => {
                self.ssl_ca_cert = Some(need("Missing ssl_ca_cert argument")?.to_string())
            }
            "ssl_verify_mode" => {
                let v = need("Missing ssl_verify_mode argument")?;
                let mode: i64 = v
                    .trim()
                    .parse()
                    .map_err(|_| refuse("could not parse argument to ssl_verify_mode"))?;
                if !(0..=3).contains(&mode) {
                    return Err(refuse(
                        "Invalid ssl_verify_mode. Use help to see valid options.",
                    ));
                }
                self.ssl_verify_mode = mode as u32;
            }
            "ssl_min_version" => {
                let v = need("Missing ssl_min_version argument")?;
                let version: i64 = v
                    .trim()
                    .parse()
                    .map_err(|_| refuse("could not parse argument to ssl_min_version"))?;
                if !(0..=3).contains(&version) {
                    return Err(refuse(
                        "Invalid ssl_min_version. Use help to see valid options.",
                    ));
                }
                self.ssl_min_version = version as u32;
            }
            "ssl_keyformat" | "ssl_ciphers" | "ssl_wbuf_size" => {
                need(&format!("Missing {name} argument"))?;
            }
            "ssl_session_cache" | "ssl_kernel_tls" | "sock_cookie_id" => {}
            "maxconns_fast" => self.maxconns_fast = true,
            "no_maxconns_fast" => self.maxconns_fast = false,
            "no_hashexpand" | "modern" | "no_inline_ascii_resp" | "inline_ascii_resp" => {}
            _ if EXT_OPTIONS.contains(&name) => {
                if value.is_none() && name != "ext_drop_unread" {
                    return Err(refuse(match name {
                        "ext_path" => {
                            "missing argument to ext_path, ie: ext_path=/d/file:5G".to_string()
                        }
                        _ => format!("Missing {name} argument"),
                    }));
                }
            }
            // memcached hands what it does not know to its storage options, which refuse it.
            _ => return Err(refuse(format!("Illegal suboption \"{option}\""))),
        }
        if let Some(why) = no_effect(name) {
            if name != "no_modern" {
                self.note(option, why);
            }
        }
        Ok(())
    }
}
