//! kache-loadgen: a tiny closed-loop load generator for the memcached text protocol.
//!
//! Used by `bench/compare.py` to get exact latency percentiles (HDR histogram) from
//! both kache-node and memcached with the same client. It is deliberately simple:
//!
//! * `--fill N`: store keys `key:0000000 .. key:{N-1}` with deterministic values,
//!   pipelined in batches (`--batch`), one connection per thread.
//! * `--verify N`: read back N keys spread over the filled range and compare the
//!   values byte for byte.
//! * `--duration S`: closed loop over `--conns` connections on `--threads` threads
//!   (mio, edge-triggered): each connection sends one request, waits for the whole
//!   response, records the latency, and sends the next one (no pipelining, no think
//!   time). `--set-ratio` of the requests are `set`, the rest `get`, keys uniform in
//!   `[0, --keys)`. The first `--warmup` seconds are not measured.
//!
//! Every phase prints one JSON object on its own line to stdout. Only loopback
//! addresses are accepted, and the process exits by itself (`--timeout`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream, ToSocketAddrs};
use std::process::exit;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

struct Opts {
    server: SocketAddr,
    fill: u64,
    verify: u64,
    keys: u64,
    conns: usize,
    threads: usize,
    duration: f64,
    warmup: f64,
    set_ratio: f64,
    value_size: usize,
    batch: usize,
    noreply: bool,
    timeout: f64,
    timeline_ms: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: kache-loadgen --server 127.0.0.1:PORT [--fill N] [--verify N] [--duration SECS]\n\
         \x20     [--keys K] [--conns C] [--threads T] [--warmup SECS] [--set-ratio F]\n\
         \x20     [--value-size BYTES] [--batch N] [--noreply] [--timeout SECS]\n\
         \x20     [--timeline-ms MS]  (also report max latency and ops per MS-long interval)"
    );
    exit(2)
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        server: "127.0.0.1:11211".parse().unwrap_or_else(|_| usage()),
        fill: 0,
        verify: 0,
        keys: 0,
        conns: 32,
        threads: 2,
        duration: 0.0,
        warmup: 1.0,
        set_ratio: 0.1,
        value_size: 100,
        batch: 1000,
        noreply: false,
        timeout: 0.0,
        timeline_ms: 0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        if flag == "--noreply" {
            o.noreply = true;
            i += 1;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            usage();
        }
        let val = args.get(i + 1).cloned().unwrap_or_else(|| usage());
        fn num<T: std::str::FromStr>(flag: &str, v: &str) -> T {
            v.parse().unwrap_or_else(|_| {
                eprintln!("bad value for {flag}: {v}");
                exit(2)
            })
        }
        match flag {
            "--server" => {
                let addr = val
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .unwrap_or_else(|| {
                        eprintln!("cannot resolve {val}");
                        exit(2)
                    });
                if !addr.ip().is_loopback() {
                    eprintln!("refusing non-loopback server address {addr}");
                    exit(2)
                }
                o.server = addr;
            }
            "--fill" => o.fill = num(flag, &val),
            "--verify" => o.verify = num(flag, &val),
            "--keys" => o.keys = num(flag, &val),
            "--conns" => o.conns = num(flag, &val),
            "--threads" => o.threads = num(flag, &val),
            "--duration" => o.duration = num(flag, &val),
            "--warmup" => o.warmup = num(flag, &val),
            "--set-ratio" => o.set_ratio = num(flag, &val),
            "--value-size" => o.value_size = num(flag, &val),
            "--batch" => o.batch = num(flag, &val),
            "--timeout" => o.timeout = num(flag, &val),
            "--timeline-ms" => o.timeline_ms = num(flag, &val),
            _ => usage(),
        }
        i += 2;
    }
    if o.keys == 0 {
        o.keys = if o.fill > 0 { o.fill } else { 100_000 };
    }
    o.threads = o.threads.max(1);
    o.conns = o.conns.max(1);
    o.batch = o.batch.max(1);
    if o.timeout <= 0.0 {
        o.timeout = o.duration + o.warmup + 120.0;
    }
    o
}

fn key(buf: &mut Vec<u8>, idx: u64) {
    // key:%07d
    let _ = write!(buf, "key:{idx:07}");
}

/// Deterministic value for a key, so that `--verify` can check exact bytes.
fn value_byte(idx: u64, i: usize) -> u8 {
    b'a' + ((idx.wrapping_mul(7).wrapping_add(i as u64)) % 26) as u8
}

fn push_set(buf: &mut Vec<u8>, idx: u64, vsize: usize, noreply: bool) {
    buf.extend_from_slice(b"set ");
    key(buf, idx);
    let _ = write!(buf, " 0 0 {vsize}");
    if noreply {
        buf.extend_from_slice(b" noreply");
    }
    buf.extend_from_slice(b"\r\n");
    buf.extend((0..vsize).map(|i| value_byte(idx, i)));
    buf.extend_from_slice(b"\r\n");
}

fn push_get(buf: &mut Vec<u8>, idx: u64) {
    buf.extend_from_slice(b"get ");
    key(buf, idx);
    buf.extend_from_slice(b"\r\n");
}

fn connect_std(addr: SocketAddr) -> io::Result<StdTcpStream> {
    let s = StdTcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    Ok(s)
}

// ---------------------------------------------------------------- fill / verify

fn fill(o: &Opts) -> Result<(), String> {
    let start = Instant::now();
    let n = o.fill;
    let threads = o.threads as u64;
    let per = n.div_ceil(threads);
    let mut handles = Vec::new();
    for t in 0..threads {
        let lo = t * per;
        let hi = ((t + 1) * per).min(n);
        if lo >= hi {
            continue;
        }
        let (addr, vsize, batch, noreply) = (o.server, o.value_size, o.batch as u64, o.noreply);
        handles.push(std::thread::spawn(move || -> Result<(), String> {
            let s = connect_std(addr).map_err(|e| format!("connect {addr}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            let mut w = s.try_clone().map_err(|e| e.to_string())?;
            let mut r = BufReader::with_capacity(1 << 16, s);
            let mut buf = Vec::with_capacity((batch as usize) * (vsize + 40));
            let mut line = String::new();
            let mut idx = lo;
            while idx < hi {
                let end = (idx + batch).min(hi);
                buf.clear();
                for k in idx..end {
                    // With --noreply only the last set of a batch asks for a reply,
                    // which keeps the client and the server in step.
                    push_set(&mut buf, k, vsize, noreply && k + 1 != end);
                }
                w.write_all(&buf).map_err(|e| format!("write: {e}"))?;
                let expect = if noreply { 1 } else { end - idx };
                for _ in 0..expect {
                    line.clear();
                    let got = r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
                    if got == 0 {
                        return Err("server closed the connection during fill".into());
                    }
                    if line != "STORED\r\n" {
                        return Err(format!("unexpected reply to set: {:?}", line.trim_end()));
                    }
                }
                idx = end;
            }
            Ok(())
        }));
    }
    for h in handles {
        h.join().map_err(|_| "fill thread panicked".to_string())??;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"mode\":\"fill\",\"items\":{n},\"value_size\":{},\"seconds\":{secs:.3},\"items_per_sec\":{:.0}}}",
        o.value_size,
        n as f64 / secs
    );
    Ok(())
}

fn verify(o: &Opts) -> Result<(), String> {
    let filled = if o.fill > 0 { o.fill } else { o.keys };
    let n = o.verify.min(filled).max(1);
    let step = (filled / n).max(1);
    let s = connect_std(o.server).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let (mut ok, mut missing, mut wrong) = (0u64, 0u64, 0u64);
    let mut line = String::new();
    let mut req = Vec::new();
    for j in 0..n {
        let idx = (j * step + step / 2).min(filled - 1);
        req.clear();
        push_get(&mut req, idx);
        w.write_all(&req).map_err(|e| format!("write: {e}"))?;
        line.clear();
        r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
        if line == "END\r\n" {
            missing += 1;
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() < 4 || parts[0] != "VALUE" {
            return Err(format!("unexpected reply to get: {:?}", line.trim_end()));
        }
        let len: usize = parts[3]
            .parse()
            .map_err(|_| format!("bad VALUE line {line:?}"))?;
        let mut data = vec![0u8; len + 2];
        r.read_exact(&mut data).map_err(|e| format!("read: {e}"))?;
        line.clear();
        r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
        if line != "END\r\n" {
            return Err(format!("missing END after value: {:?}", line.trim_end()));
        }
        let expect: Vec<u8> = (0..o.value_size).map(|i| value_byte(idx, i)).collect();
        if len == o.value_size && data[..len] == expect[..] {
            ok += 1;
        } else {
            wrong += 1;
        }
    }
    println!("{{\"mode\":\"verify\",\"checked\":{n},\"ok\":{ok},\"missing\":{missing},\"wrong\":{wrong}}}");
    Ok(())
}

// ---------------------------------------------------------------- closed loop run

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(PartialEq)]
enum Parse {
    Incomplete,
    Hit,
    Miss,
    Stored,
    Error,
}

/// Parses one complete response to a single `get` or `set` at the start of `buf`.
fn parse_response(buf: &[u8], is_get: bool, vsize: usize) -> Parse {
    let Some(nl) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Parse::Incomplete;
    };
    let line = &buf[..nl];
    if !is_get {
        return if line == b"STORED" {
            Parse::Stored
        } else {
            Parse::Error
        };
    }
    if line == b"END" {
        return Parse::Miss;
    }
    if !line.starts_with(b"VALUE ") {
        return Parse::Error;
    }
    let len: usize = match std::str::from_utf8(line)
        .ok()
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
    {
        Some(v) => v,
        None => return Parse::Error,
    };
    let need = nl + 2 + len + 2 + 5;
    if buf.len() < need {
        return Parse::Incomplete;
    }
    if &buf[need - 5..need] != b"END\r\n" || len != vsize {
        return Parse::Error;
    }
    Parse::Hit
}

struct Conn {
    stream: TcpStream,
    wbuf: Vec<u8>,
    wpos: usize,
    rbuf: Vec<u8>,
    is_get: bool,
    started: Instant,
    rng: Rng,
    busy: bool,
}

#[derive(Default)]
struct Counts {
    gets: u64,
    sets: u64,
    hits: u64,
    misses: u64,
    errors: u64,
}

struct ThreadResult {
    hist: Histogram<u64>,
    counts: Counts,
    /// Per interval of --timeline-ms since the measurement start: (completions, max ns).
    timeline: Vec<(u64, u64)>,
}

fn new_hist() -> Histogram<u64> {
    // nanoseconds, 1 ns .. 100 s, 3 significant digits
    Histogram::new_with_bounds(1, 100_000_000_000, 3).unwrap_or_else(|e| {
        eprintln!("histogram: {e}");
        exit(1)
    })
}

fn run_thread(
    o: &Opts,
    conn_ids: Vec<usize>,
    measure_from: Instant,
    measure_to: Instant,
    hard_deadline: Instant,
) -> Result<ThreadResult, String> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(1024);
    let mut conns = Vec::with_capacity(conn_ids.len());
    for (slot, id) in conn_ids.iter().enumerate() {
        let s = connect_std(o.server).map_err(|e| format!("connect {}: {e}", o.server))?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut stream = TcpStream::from_std(s);
        poll.registry()
            .register(
                &mut stream,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| e.to_string())?;
        conns.push(Conn {
            stream,
            wbuf: Vec::with_capacity(256),
            wpos: 0,
            rbuf: Vec::with_capacity(4096),
            is_get: true,
            started: Instant::now(),
            rng: Rng(0x9E37_79B9_7F4A_7C15 ^ ((*id as u64 + 1) * 0x1000_0001)),
            busy: false,
        });
    }
    let mut hist = new_hist();
    let mut counts = Counts::default();
    let mut timeline: Vec<(u64, u64)> = Vec::new();
    let (keys, vsize, set_ratio) = (o.keys.max(1), o.value_size, o.set_ratio);

    // Starts the next request on a connection and tries to write it at once.
    fn issue(c: &mut Conn, keys: u64, vsize: usize, set_ratio: f64) -> io::Result<()> {
        let idx = c.rng.next() % keys;
        c.is_get = c.rng.unit() >= set_ratio;
        c.wbuf.clear();
        c.wpos = 0;
        c.rbuf.clear();
        if c.is_get {
            push_get(&mut c.wbuf, idx);
        } else {
            push_set(&mut c.wbuf, idx, vsize, false);
        }
        c.started = Instant::now();
        c.busy = true;
        flush(c)
    }
    fn flush(c: &mut Conn) -> io::Result<()> {
        while c.wpos < c.wbuf.len() {
            match c.stream.write(&c.wbuf[c.wpos..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "closed")),
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    for c in conns.iter_mut() {
        issue(c, keys, vsize, set_ratio).map_err(|e| format!("write: {e}"))?;
    }
    let mut tmp = vec![0u8; 64 * 1024];
    let mut stopping = false;
    loop {
        let now = Instant::now();
        if now >= measure_to {
            stopping = true;
        }
        if stopping && conns.iter().all(|c| !c.busy) {
            break;
        }
        if now >= hard_deadline || (stopping && now >= measure_to + Duration::from_secs(2)) {
            // Outstanding requests at the end are simply abandoned.
            break;
        }
        match poll.poll(&mut events, Some(Duration::from_millis(50))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            if ev.is_writable() && c.busy && c.wpos < c.wbuf.len() {
                flush(c).map_err(|e| format!("write: {e}"))?;
            }
            if !ev.is_readable() && !ev.is_read_closed() {
                continue;
            }
            // Edge-triggered: drain the socket.
            loop {
                match c.stream.read(&mut tmp) {
                    Ok(0) => return Err("server closed a connection".into()),
                    Ok(n) => c.rbuf.extend_from_slice(&tmp[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
            if !c.busy {
                continue;
            }
            let res = parse_response(&c.rbuf, c.is_get, vsize);
            if res == Parse::Incomplete {
                continue;
            }
            let done = Instant::now();
            c.busy = false;
            if c.started >= measure_from && done <= measure_to {
                let ns = done.duration_since(c.started).as_nanos() as u64;
                hist.saturating_record(ns.max(1));
                if let Some(at) = done
                    .duration_since(measure_from)
                    .as_millis()
                    .checked_div(u128::from(o.timeline_ms))
                {
                    let at = at as usize;
                    if timeline.len() <= at {
                        timeline.resize(at + 1, (0, 0));
                    }
                    timeline[at].0 += 1;
                    timeline[at].1 = timeline[at].1.max(ns);
                }
                if c.is_get {
                    counts.gets += 1;
                } else {
                    counts.sets += 1;
                }
                match res {
                    Parse::Hit => counts.hits += 1,
                    Parse::Miss => counts.misses += 1,
                    Parse::Error => counts.errors += 1,
                    _ => {}
                }
            }
            if res == Parse::Error && counts.errors > 1000 {
                return Err(format!(
                    "too many error replies, last: {:?}",
                    String::from_utf8_lossy(&c.rbuf[..c.rbuf.len().min(80)])
                ));
            }
            if !stopping && done < measure_to {
                issue(c, keys, vsize, set_ratio).map_err(|e| format!("write: {e}"))?;
            }
        }
    }
    Ok(ThreadResult {
        hist,
        counts,
        timeline,
    })
}

fn run(o: &Opts) -> Result<(), String> {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(o.warmup + 0.2);
    let measure_to = measure_from + Duration::from_secs_f64(o.duration);
    let hard_deadline = start + Duration::from_secs_f64(o.timeout);
    let threads = o.threads.min(o.conns);
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for t in 0..threads {
            let ids: Vec<usize> = (0..o.conns).filter(|i| i % threads == t).collect();
            handles.push(
                scope.spawn(move || run_thread(o, ids, measure_from, measure_to, hard_deadline)),
            );
        }
        let mut hist = new_hist();
        let mut c = Counts::default();
        let mut timeline: Vec<(u64, u64)> = Vec::new();
        for h in handles.drain(..) {
            let r = h.join().map_err(|_| "run thread panicked".to_string())??;
            if timeline.len() < r.timeline.len() {
                timeline.resize(r.timeline.len(), (0, 0));
            }
            for (i, (n, mx)) in r.timeline.iter().enumerate() {
                timeline[i].0 += n;
                timeline[i].1 = timeline[i].1.max(*mx);
            }
            hist.add(&r.hist).map_err(|e| e.to_string())?;
            c.gets += r.counts.gets;
            c.sets += r.counts.sets;
            c.hits += r.counts.hits;
            c.misses += r.counts.misses;
            c.errors += r.counts.errors;
        }
        let ops = hist.len();
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        let timeline_json = if o.timeline_ms > 0 {
            let ops: Vec<String> = timeline.iter().map(|t| t.0.to_string()).collect();
            let max: Vec<String> = timeline
                .iter()
                .map(|t| format!("{:.0}", t.1 as f64 / 1000.0))
                .collect();
            format!(
                ",\"timeline_ms\":{},\"timeline_ops\":[{}],\"timeline_max_us\":[{}]",
                o.timeline_ms,
                ops.join(","),
                max.join(",")
            )
        } else {
            String::new()
        };
        println!(
            "{{\"mode\":\"run\",\"conns\":{},\"threads\":{threads},\"keys\":{},\"set_ratio\":{},\
             \"value_size\":{},\"duration_s\":{:.3},\"ops\":{ops},\"ops_per_sec\":{:.1},\
             \"gets\":{},\"sets\":{},\"hits\":{},\"misses\":{},\"errors\":{},\
             \"mean_us\":{:.2},\"min_us\":{:.2},\"p50_us\":{:.2},\"p90_us\":{:.2},\
             \"p99_us\":{:.2},\"p999_us\":{:.2},\"max_us\":{:.2}{timeline_json}}}",
            o.conns,
            o.keys,
            o.set_ratio,
            o.value_size,
            o.duration,
            ops as f64 / o.duration,
            c.gets,
            c.sets,
            c.hits,
            c.misses,
            c.errors,
            hist.mean() / 1000.0,
            hist.min() as f64 / 1000.0,
            us(0.50),
            us(0.90),
            us(0.99),
            us(0.999),
            hist.max() as f64 / 1000.0,
        );
        Ok(())
    })
}

fn main() {
    let o = parse_opts();
    // Belt and braces: never outlive the timeout, whatever the server does.
    let limit = Duration::from_secs_f64(o.timeout.max(1.0));
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("kache-loadgen: timeout after {:.0}s", limit.as_secs_f64());
        exit(3)
    });
    let mut result = Ok(());
    if o.fill > 0 {
        result = fill(&o);
    }
    if result.is_ok() && o.verify > 0 {
        result = verify(&o);
    }
    if result.is_ok() && o.duration > 0.0 {
        result = run(&o);
    }
    if let Err(e) = result {
        eprintln!("kache-loadgen: {e}");
        exit(1)
    }
}
