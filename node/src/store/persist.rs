//! The `-e` memory file: its layout, its validation when a node starts on it, and the
//! record a clean shutdown leaves.
//!
//! ```text
//! 0       header (4 KiB): magic, format, geometry, hash seeds, shard count (checksummed
//!         when created); state (running or clean), delayed-flush time, chain order counter
//!         (checksummed by each clean shutdown)
//! 4 KiB   segment table: one 64-byte entry per segment (in use?, shard, TTL bucket, bytes
//!         written, opened at, chain order; a clean shutdown adds CRCs of the entry and of
//!         the segment's bytes), padded to a page
//! ...     the segments, each `segment size` bytes
//! ```
//!
//! Records carry everything else (a dead bit is set in place when a record is unlinked), so
//! the hash table is rebuilt by reading the segments. A file that was shut down cleanly must
//! match every checksum; one left by a crash (`kill -9`, OOM kill) is read with every
//! bound checked and duplicates resolved by version. Anything else — too short, another
//! geometry, not ours, a checksum that fails, an impossible entry — is discarded with a log
//! line, and the node starts empty on a fresh file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::mapping::{MappedFile, Region};
use super::memory::SegBuf;
use super::segment::TTL_BUCKETS;

const MAGIC: &[u8; 8] = b"KACHESEG";
/// 2: records unaligned, with an expiry field only when one is set (format 1 aligned them
/// to 4 bytes and always had one).
const FORMAT: u32 = 2;
pub(super) const HEADER_LEN: usize = 4096;
pub(super) const ENTRY_LEN: usize = 64;
const PAGE: usize = 4096;

// Header fields.
const H_FORMAT: usize = 8;
const H_STATIC_CRC: usize = 12;
const H_SEGMENT_SIZE: usize = 16;
const H_SEGMENT_COUNT: usize = 24;
const H_SHARDS: usize = 32;
const H_SEEDS: usize = 40;
const H_STATIC_END: usize = 128;
const H_STATE: usize = 128;
const H_FLUSH_AT: usize = 132;
const H_ORDER: usize = 136;
const H_DYNAMIC_CRC: usize = 144;
const H_DYNAMIC_END: usize = 144;

const STATE_RUNNING: u32 = 0;
const STATE_CLEAN: u32 = 1;

// Segment table entry fields.
const E_USED: usize = 0;
const E_BUCKET: usize = 2;
const E_SHARD: usize = 4;
const E_WRITE: usize = 8;
const E_CREATED: usize = 12;
const E_ORDER: usize = 16;
const E_DATA_CRC: usize = 24;
const E_CRC: usize = 28;

use super::item::{read_u32 as u32_at, read_u64 as u64_at};

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Size and number of the segments a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileGeometry {
    pub segment_size: usize,
    pub segment_count: usize,
}

impl FileGeometry {
    fn table_len(self) -> usize {
        (self.segment_count * ENTRY_LEN).next_multiple_of(PAGE)
    }

    fn data_offset(self) -> usize {
        HEADER_LEN + self.table_len()
    }

    pub fn file_len(self) -> usize {
        self.data_offset() + self.segment_count * self.segment_size
    }
}

/// What the header says.
#[derive(Clone, Copy, Debug)]
pub(super) struct Header {
    pub geometry: FileGeometry,
    pub shards: usize,
    pub seeds: [u64; 4],
    pub clean: bool,
    pub flush_at: u32,
    pub order: u64,
}

/// What a segment-table entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub used: bool,
    pub bucket: u16,
    pub shard: u32,
    pub write: u32,
    pub created: u32,
    pub order: u64,
}

/// Writes a newly opened segment's entry.
pub(super) fn entry_open(e: &mut [u8], shard: u32, bucket: u16, created: u32, order: u64) {
    e.fill(0);
    e[E_USED] = 1;
    e[E_BUCKET..E_BUCKET + 2].copy_from_slice(&bucket.to_le_bytes());
    put_u32(e, E_SHARD, shard);
    put_u32(e, E_CREATED, created);
    put_u64(e, E_ORDER, order);
}

/// Records how far a segment is written. Called after the bytes themselves are written,
/// so a crash never leaves an entry claiming bytes that are not there.
pub(super) fn entry_set_write(e: &mut [u8], write: usize) {
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    put_u32(e, E_WRITE, write as u32);
}

pub(super) fn entry_set_order(e: &mut [u8], order: u64) {
    put_u64(e, E_ORDER, order);
}

pub(super) fn entry_free(e: &mut [u8]) {
    e.fill(0);
}

fn entry_crc(e: &[u8]) -> u32 {
    crc32fast::hash(&e[..E_CRC])
}

/// Seals an entry at a clean shutdown: the CRC of the segment's bytes, then of the entry.
pub(super) fn entry_seal(e: &mut [u8], data: &[u8]) {
    let write = (u32_at(e, E_WRITE) as usize).min(data.len());
    put_u32(e, E_DATA_CRC, crc32fast::hash(&data[..write]));
    let crc = entry_crc(e);
    put_u32(e, E_CRC, crc);
}

pub(super) fn read_entry(e: &[u8]) -> Entry {
    let mut bucket = [0u8; 2];
    bucket.copy_from_slice(&e[E_BUCKET..E_BUCKET + 2]);
    Entry {
        used: e[E_USED] == 1,
        bucket: u16::from_le_bytes(bucket),
        shard: u32_at(e, E_SHARD),
        write: u32_at(e, E_WRITE),
        created: u32_at(e, E_CREATED),
        order: u64_at(e, E_ORDER),
    }
}

/// Why a file was not used as it was.
#[derive(Debug, thiserror::Error)]
pub enum Discard {
    #[error(
        "it is {found} bytes long, {expected} expected (truncated, or made with another -m/-I)"
    )]
    Length { found: u64, expected: u64 },
    #[error("it is not a kache memory file")]
    Foreign,
    #[error("it has format {0}, this kache reads format {FORMAT}")]
    Format(u32),
    #[error("its header is corrupt")]
    Header,
    #[error("it was made for segments of {found_size} bytes x {found_count}, this node uses {size} x {count} (another -m or -I)")]
    Geometry {
        found_size: u64,
        found_count: u64,
        size: usize,
        count: usize,
    },
    #[error("segment {0} has an impossible table entry")]
    Entry(usize),
    #[error("segment {0} does not match the checksum of the clean shutdown")]
    Checksum(usize),
}

/// A memory file that cannot be used at all (the node does not start).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("memory file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("memory file {0} is in use by another process")]
    Locked(PathBuf),
    #[error("memory file {0}: the mapping could not be divided into segments")]
    Layout(PathBuf),
}

/// The opened file: its header region, every segment (in file order) and what to keep.
pub(super) struct Opened {
    pub header_region: Region,
    pub header: Header,
    pub segments: Vec<SegBuf>,
    /// Whether the segments' contents are to be read back (a valid file).
    pub recovered: bool,
}

fn static_crc(h: &[u8]) -> u32 {
    crc32fast::hash(&h[H_STATIC_CRC + 4..H_STATIC_END])
}

fn dynamic_crc(h: &[u8]) -> u32 {
    crc32fast::hash(&h[H_STATE..H_DYNAMIC_END])
}

fn parse_header(h: &[u8], want: FileGeometry) -> Result<Header, Discard> {
    if h.len() < HEADER_LEN || &h[..8] != MAGIC {
        return Err(Discard::Foreign);
    }
    let format = u32_at(h, H_FORMAT);
    if format != FORMAT {
        return Err(Discard::Format(format));
    }
    if u32_at(h, H_STATIC_CRC) != static_crc(h) {
        return Err(Discard::Header);
    }
    let (found_size, found_count) = (u64_at(h, H_SEGMENT_SIZE), u64_at(h, H_SEGMENT_COUNT));
    if found_size != want.segment_size as u64 || found_count != want.segment_count as u64 {
        return Err(Discard::Geometry {
            found_size,
            found_count,
            size: want.segment_size,
            count: want.segment_count,
        });
    }
    let shards = u32_at(h, H_SHARDS) as usize;
    if shards == 0 || !shards.is_power_of_two() || shards > want.segment_count.max(1) {
        return Err(Discard::Header);
    }
    let mut seeds = [0u64; 4];
    for (i, seed) in seeds.iter_mut().enumerate() {
        *seed = u64_at(h, H_SEEDS + 8 * i);
    }
    let clean = u32_at(h, H_STATE) == STATE_CLEAN;
    if clean && u32_at(h, H_DYNAMIC_CRC) != dynamic_crc(h) {
        return Err(Discard::Header);
    }
    Ok(Header {
        geometry: want,
        shards,
        seeds,
        clean,
        flush_at: u32_at(h, H_FLUSH_AT),
        order: u64_at(h, H_ORDER),
    })
}

fn fresh_header(geometry: FileGeometry, shards: usize) -> (Vec<u8>, Header) {
    let state = ahash::RandomState::new();
    let seeds = [0u64, 1, 2, 3].map(|i| state.hash_one(i));
    let mut h = vec![0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    put_u32(&mut h, H_FORMAT, FORMAT);
    put_u64(&mut h, H_SEGMENT_SIZE, geometry.segment_size as u64);
    put_u64(&mut h, H_SEGMENT_COUNT, geometry.segment_count as u64);
    put_u32(&mut h, H_SHARDS, shards as u32);
    for (i, seed) in seeds.iter().enumerate() {
        put_u64(&mut h, H_SEEDS + 8 * i, *seed);
    }
    let crc = static_crc(&h);
    put_u32(&mut h, H_STATIC_CRC, crc);
    let header = Header {
        geometry,
        shards,
        seeds,
        clean: false,
        flush_at: 0,
        order: 0,
    };
    (h, header)
}

/// Checks every entry (and, after a clean shutdown, every checksum) before anything is kept.
fn check_segments(segments: &[SegBuf], header: &Header) -> Result<(), Discard> {
    for (id, seg) in segments.iter().enumerate() {
        let Some(e) = seg.entry() else {
            return Err(Discard::Entry(id));
        };
        let entry = read_entry(e);
        if e[E_USED] > 1 {
            return Err(Discard::Entry(id));
        }
        if !entry.used {
            continue;
        }
        let write = entry.write as usize;
        let sane = entry.shard < header.shards as u32
            && usize::from(entry.bucket) < TTL_BUCKETS
            && write <= header.geometry.segment_size;
        if !sane {
            return Err(Discard::Entry(id));
        }
        if header.clean {
            let data_ok = u32_at(e, E_DATA_CRC) == crc32fast::hash(&seg.bytes()[..write]);
            if u32_at(e, E_CRC) != entry_crc(e) || !data_ok {
                return Err(Discard::Checksum(id));
            }
        }
    }
    Ok(())
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens (or creates) the memory file at `path` for `geometry` and `shards`. A file that
/// cannot be trusted is logged and replaced by a fresh one.
pub(super) fn open(
    path: &Path,
    geometry: FileGeometry,
    shards: usize,
) -> Result<Opened, OpenError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Err(OpenError::Locked(path.to_path_buf())),
        Err(error) => return Err(io(path)(error.into())),
    }
    let found = file.metadata().map_err(io(path))?.len();
    let expected = geometry.file_len() as u64;
    let existing = if found == 0 {
        None
    } else if found != expected {
        Some(Err(Discard::Length { found, expected }))
    } else {
        let mut h = vec![0u8; HEADER_LEN];
        file.read_exact_at(&mut h, 0).map_err(io(path))?;
        Some(parse_header(&h, geometry))
    };
    if let Some(Ok(header)) = existing {
        let opened = map(path, &file, header, true)?;
        match check_segments(&opened.segments, &opened.header) {
            Ok(()) => {
                tracing::info!(
                    path = %path.display(),
                    clean = header.clean,
                    "memory file: reading back the items it holds"
                );
                return Ok(opened);
            }
            Err(reason) => {
                drop(opened);
                tracing::warn!(path = %path.display(), %reason, "memory file discarded; starting empty");
            }
        }
    } else if let Some(Err(reason)) = existing {
        tracing::warn!(path = %path.display(), %reason, "memory file discarded; starting empty");
    }
    // A fresh file: every page a hole until written (tmpfs allocates on write).
    file.set_len(0).map_err(io(path))?;
    file.set_len(expected).map_err(io(path))?;
    let (bytes, header) = fresh_header(geometry, shards);
    file.write_all_at(&bytes, 0).map_err(io(path))?;
    map(path, &file, header, false)
}

fn map(path: &Path, file: &File, header: Header, recovered: bool) -> Result<Opened, OpenError> {
    let g = header.geometry;
    let mapped = MappedFile::map(file.try_clone().map_err(io(path))?).map_err(io(path))?;
    let mut bounds = Vec::with_capacity(1 + 2 * g.segment_count);
    bounds.push((0, HEADER_LEN));
    bounds.extend((0..g.segment_count).map(|i| (HEADER_LEN + i * ENTRY_LEN, ENTRY_LEN)));
    bounds.extend(
        (0..g.segment_count).map(|i| (g.data_offset() + i * g.segment_size, g.segment_size)),
    );
    let mut regions = mapped
        .split(&bounds)
        .map_err(|_| OpenError::Layout(path.to_path_buf()))?
        .into_iter();
    let Some(header_region) = regions.next() else {
        return Err(OpenError::Layout(path.to_path_buf()));
    };
    let entries: Vec<Region> = regions.by_ref().take(g.segment_count).collect();
    let segments = entries
        .into_iter()
        .zip(regions)
        .enumerate()
        .map(|(id, (entry, data))| SegBuf::mapped(id as u32, data, entry))
        .collect();
    Ok(Opened {
        header_region,
        header,
        segments,
        recovered,
    })
}

/// Marks the file as in use (a crash from now on leaves it "running"), keeping its flush
/// time and order counter.
pub(super) fn mark_running(h: &mut Region, flush_at: u32, order: u64) {
    let b = h.bytes_mut();
    put_u32(b, H_STATE, STATE_RUNNING);
    put_u32(b, H_FLUSH_AT, flush_at);
    put_u64(b, H_ORDER, order);
}

/// Records a delayed flush in the header.
pub(super) fn set_flush_at(h: &mut Region, flush_at: u32) {
    put_u32(h.bytes_mut(), H_FLUSH_AT, flush_at);
}

/// The clean-shutdown record (after every entry has been sealed), written to the file.
pub(super) fn mark_clean(h: &mut Region, flush_at: u32, order: u64) -> std::io::Result<()> {
    let b = h.bytes_mut();
    put_u32(b, H_STATE, STATE_CLEAN);
    put_u32(b, H_FLUSH_AT, flush_at);
    put_u64(b, H_ORDER, order);
    let crc = dynamic_crc(b);
    put_u32(b, H_DYNAMIC_CRC, crc);
    h.flush_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: FileGeometry = FileGeometry {
        segment_size: 4096,
        segment_count: 8,
    };

    #[test]
    fn a_fresh_file_parses_and_a_changed_one_does_not() {
        let (mut h, _) = fresh_header(G, 2);
        let header = parse_header(&h, G).unwrap();
        assert!(!header.clean && header.shards == 2);
        let other = FileGeometry {
            segment_count: 16,
            ..G
        };
        assert!(matches!(
            parse_header(&h, other),
            Err(Discard::Geometry { .. })
        ));
        h[H_SHARDS] ^= 1;
        assert!(matches!(parse_header(&h, G), Err(Discard::Header)));
        h[0] = b'X';
        assert!(matches!(parse_header(&h, G), Err(Discard::Foreign)));
        assert!(matches!(parse_header(&h[..100], G), Err(Discard::Foreign)));
    }

    #[test]
    fn entries_round_trip_and_seal() {
        let mut e = [0u8; ENTRY_LEN];
        entry_open(&mut e, 3, 1023, 77, 9);
        entry_set_write(&mut e, 128);
        let got = read_entry(&e);
        assert_eq!(
            got,
            Entry {
                used: true,
                bucket: 1023,
                shard: 3,
                write: 128,
                created: 77,
                order: 9
            }
        );
        let data = vec![7u8; 4096];
        entry_seal(&mut e, &data);
        assert_eq!(u32_at(&e, E_CRC), entry_crc(&e));
        assert_eq!(u32_at(&e, E_DATA_CRC), crc32fast::hash(&data[..128]));
        entry_free(&mut e);
        assert!(!read_entry(&e).used);
    }
}
