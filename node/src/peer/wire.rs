//! The peer protocol: the one definition of what nodes send each other on `--peer-port`.
//!
//! Frames are length-prefixed: `u32 length (big-endian, of what follows) | u8 kind | body`.
//! Decoding is pure and bounded: `decode` returns `Incomplete` until a whole frame is
//! buffered and refuses frames over `MAX_FRAME` or with malformed bodies, so garbage on the
//! peer port closes that connection and nothing else.
//!
//! - `Hello` opens a connection: who is calling, and the cluster's shared peer secret. The
//!   receiver answers `Ack` with sequence number 0 once it accepts the caller (a wrong secret
//!   or a refused certificate closes the connection instead), so a caller knows at once
//!   whether its link works; callers number their own requests from 1.
//! - `Records` carries a batch of item changes (replication, hand-off, refill), acknowledged
//!   by `Ack` with the same sequence number once applied.
//! - `Fetch` asks for one key (read-through while a hand-off is under way); `Fetched`
//!   answers with the record or nothing.
//! - `Pull` asks for every item the receiver holds that the sender owns under the given
//!   ring version (refill after an empty restart); answered by `Records` then `PullDone`.
//! - Anti-entropy (see `anti_entropy`): `Digests` carries the sender's digest of each ring
//!   arc for the keys both nodes own, answered by `DigestDiff` naming the arcs that differ;
//!   `Versions` lists the sender's (key hash, version) pairs in some of those arcs, answered
//!   by `Records` holding the receiver's newer items (at most `max_bytes`), then `PullDone`.

use bytes::{Buf, BufMut, BytesMut};

use crate::record::{Op, Record};

/// Largest frame accepted: a batch, or one item of the largest allowed size plus headers.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Largest item a cluster node accepts (`-I`): a full batch plus one such item fits a frame.
pub const MAX_PEER_ITEM: usize = 8 * 1024 * 1024;
/// Records per batch a sender aims for; batches also stop at `BATCH_BYTES`.
pub const BATCH_RECORDS: usize = 512;
pub const BATCH_BYTES: usize = 1024 * 1024;

const HEADER: usize = 5;
/// Longest peer secret carried in a hello.
pub const MAX_SECRET: usize = 1024;

/// Bytes `put_record` writes for `r`.
fn encoded_len(r: &Record) -> usize {
    1 + 1 + r.key.len() + 8 + 4 + 4 + 4 + r.value.len()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello {
        node: String,
        ring_version: u64,
        /// The shared peer secret (empty when the cluster has none).
        secret: Vec<u8>,
    },
    Records {
        seq: u64,
        records: Vec<Record>,
    },
    Ack {
        seq: u64,
    },
    Fetch {
        seq: u64,
        key: Vec<u8>,
    },
    Fetched {
        seq: u64,
        record: Option<Record>,
    },
    Pull {
        seq: u64,
        ring_version: u64,
    },
    PullDone {
        seq: u64,
        sent: u64,
    },
    Digests {
        seq: u64,
        digests: Vec<u64>,
    },
    DigestDiff {
        seq: u64,
        arcs: Vec<u32>,
    },
    Versions {
        seq: u64,
        /// Most bytes of records the answer may carry.
        max_bytes: u32,
        arcs: Vec<u32>,
        /// (key hash, version) of every item the sender holds in `arcs`, tombstones included.
        entries: Vec<(u64, u64)>,
    },
}

const KIND_HELLO: u8 = 1;
const KIND_RECORDS: u8 = 2;
const KIND_ACK: u8 = 3;
const KIND_FETCH: u8 = 4;
const KIND_FETCHED: u8 = 5;
const KIND_PULL: u8 = 6;
const KIND_PULL_DONE: u8 = 7;
const KIND_DIGESTS: u8 = 8;
const KIND_DIGEST_DIFF: u8 = 9;
const KIND_VERSIONS: u8 = 10;

/// Why bytes on the peer port were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("peer frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unknown peer frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed peer frame")]
    Malformed,
}

/// Result of looking at buffered bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Frame(Frame, usize),
    Incomplete,
}

fn put_record(out: &mut BytesMut, r: &Record) {
    out.put_u8(r.op as u8);
    out.put_u8(r.key.len().min(255) as u8);
    out.put_slice(&r.key[..r.key.len().min(255)]);
    out.put_u64(r.version);
    out.put_u32(r.flags);
    out.put_u32(r.exptime);
    out.put_u32(r.value.len() as u32);
    out.put_slice(&r.value);
}

fn put_arcs(out: &mut BytesMut, arcs: &[u32]) {
    out.put_u32(arcs.len() as u32);
    for a in arcs {
        out.put_u32(*a);
    }
}

/// Appends `frame` to `out`.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32(0);
    match frame {
        Frame::Hello {
            node,
            ring_version,
            secret,
        } => {
            out.put_u8(KIND_HELLO);
            out.put_u64(*ring_version);
            let name = &node.as_bytes()[..node.len().min(255)];
            out.put_u8(name.len() as u8);
            out.put_slice(name);
            let secret = &secret[..secret.len().min(MAX_SECRET)];
            out.put_u16(secret.len() as u16);
            out.put_slice(secret);
        }
        Frame::Records { seq, records } => {
            out.put_u8(KIND_RECORDS);
            out.put_u64(*seq);
            out.put_u32(records.len() as u32);
            out.reserve(records.iter().map(encoded_len).sum());
            for r in records {
                put_record(out, r);
            }
        }
        Frame::Ack { seq } => {
            out.put_u8(KIND_ACK);
            out.put_u64(*seq);
        }
        Frame::Fetch { seq, key } => {
            out.put_u8(KIND_FETCH);
            out.put_u64(*seq);
            out.put_u8(key.len().min(255) as u8);
            out.put_slice(&key[..key.len().min(255)]);
        }
        Frame::Fetched { seq, record } => {
            out.put_u8(KIND_FETCHED);
            out.put_u64(*seq);
            match record {
                Some(r) => {
                    out.put_u8(1);
                    put_record(out, r);
                }
                None => out.put_u8(0),
            }
        }
        Frame::Pull { seq, ring_version } => {
            out.put_u8(KIND_PULL);
            out.put_u64(*seq);
            out.put_u64(*ring_version);
        }
        Frame::PullDone { seq, sent } => {
            out.put_u8(KIND_PULL_DONE);
            out.put_u64(*seq);
            out.put_u64(*sent);
        }
        Frame::Digests { seq, digests } => {
            out.put_u8(KIND_DIGESTS);
            out.put_u64(*seq);
            out.put_u32(digests.len() as u32);
            for d in digests {
                out.put_u64(*d);
            }
        }
        Frame::DigestDiff { seq, arcs } => {
            out.put_u8(KIND_DIGEST_DIFF);
            out.put_u64(*seq);
            put_arcs(out, arcs);
        }
        Frame::Versions {
            seq,
            max_bytes,
            arcs,
            entries,
        } => {
            out.put_u8(KIND_VERSIONS);
            out.put_u64(*seq);
            out.put_u32(*max_bytes);
            put_arcs(out, arcs);
            out.put_u32(entries.len() as u32);
            for (hash, version) in entries {
                out.put_u64(*hash);
                out.put_u64(*version);
            }
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// A bounds-checked reader over one frame body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.0.len() < n {
            Err(WireError::Malformed)
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        self.need(n)?;
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn record(&mut self) -> Result<Record, WireError> {
        let op = Op::from_u8(self.u8()?).ok_or(WireError::Malformed)?;
        let key_len = usize::from(self.u8()?);
        let key = self.bytes(key_len)?.to_vec();
        let version = self.u64()?;
        let flags = self.u32()?;
        let exptime = self.u32()?;
        let value_len = self.u32()? as usize;
        let value = self.bytes(value_len)?.to_vec();
        Ok(Record {
            op,
            key,
            version,
            flags,
            exptime,
            value,
        })
    }
    /// A count of items of `size` bytes each that must fit in what is left.
    fn count(&mut self, size: usize) -> Result<usize, WireError> {
        let count = self.u32()? as usize;
        if count > self.0.len() / size {
            return Err(WireError::Malformed);
        }
        Ok(count)
    }
    fn arcs(&mut self) -> Result<Vec<u32>, WireError> {
        let count = self.count(4)?;
        (0..count).map(|_| self.u32()).collect()
    }
    fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed)
        }
    }
}

/// Decodes one frame from the front of `buf`.
pub fn decode(buf: &[u8]) -> Result<Decoded, WireError> {
    if buf.len() < 4 {
        return Ok(Decoded::Incomplete);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    if len == 0 {
        return Err(WireError::Malformed);
    }
    if buf.len() < 4 + len {
        return Ok(Decoded::Incomplete);
    }
    let kind = buf[4];
    let mut body = Body(&buf[HEADER..4 + len]);
    let frame = match kind {
        KIND_HELLO => {
            let ring_version = body.u64()?;
            let n = usize::from(body.u8()?);
            let node =
                String::from_utf8(body.bytes(n)?.to_vec()).map_err(|_| WireError::Malformed)?;
            let len = usize::from(body.u16()?);
            if len > MAX_SECRET {
                return Err(WireError::Malformed);
            }
            let secret = body.bytes(len)?.to_vec();
            Frame::Hello {
                node,
                ring_version,
                secret,
            }
        }
        KIND_RECORDS => {
            let seq = body.u64()?;
            let count = body.u32()? as usize;
            // Each record takes at least 22 bytes: a count beyond that is a lie.
            if count > body.0.len() / 22 {
                return Err(WireError::Malformed);
            }
            let mut records = Vec::with_capacity(count);
            for _ in 0..count {
                records.push(body.record()?);
            }
            Frame::Records { seq, records }
        }
        KIND_ACK => Frame::Ack { seq: body.u64()? },
        KIND_FETCH => {
            let seq = body.u64()?;
            let n = usize::from(body.u8()?);
            Frame::Fetch {
                seq,
                key: body.bytes(n)?.to_vec(),
            }
        }
        KIND_FETCHED => {
            let seq = body.u64()?;
            let record = match body.u8()? {
                0 => None,
                1 => Some(body.record()?),
                _ => return Err(WireError::Malformed),
            };
            Frame::Fetched { seq, record }
        }
        KIND_PULL => Frame::Pull {
            seq: body.u64()?,
            ring_version: body.u64()?,
        },
        KIND_PULL_DONE => Frame::PullDone {
            seq: body.u64()?,
            sent: body.u64()?,
        },
        KIND_DIGESTS => {
            let seq = body.u64()?;
            let count = body.count(8)?;
            let digests = (0..count).map(|_| body.u64()).collect::<Result<_, _>>()?;
            Frame::Digests { seq, digests }
        }
        KIND_DIGEST_DIFF => Frame::DigestDiff {
            seq: body.u64()?,
            arcs: body.arcs()?,
        },
        KIND_VERSIONS => {
            let seq = body.u64()?;
            let max_bytes = body.u32()?;
            let arcs = body.arcs()?;
            let count = body.count(16)?;
            let entries = (0..count)
                .map(|_| Ok((body.u64()?, body.u64()?)))
                .collect::<Result<_, WireError>>()?;
            Frame::Versions {
                seq,
                max_bytes,
                arcs,
                entries,
            }
        }
        other => return Err(WireError::UnknownKind(other)),
    };
    body.end()?;
    Ok(Decoded::Frame(frame, 4 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str) -> Record {
        Record {
            op: Op::Set,
            key: key.as_bytes().to_vec(),
            version: 42,
            flags: 7,
            exptime: 100,
            value: b"value".to_vec(),
        }
    }

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello {
                node: "kache-0".into(),
                ring_version: 3,
                secret: b"s3cret".to_vec(),
            },
            Frame::Records {
                seq: 9,
                records: vec![record("a"), record("bb")],
            },
            Frame::Ack { seq: 9 },
            Frame::Fetch {
                seq: 1,
                key: b"k".to_vec(),
            },
            Frame::Fetched {
                seq: 1,
                record: Some(record("k")),
            },
            Frame::Fetched {
                seq: 2,
                record: None,
            },
            Frame::Pull {
                seq: 5,
                ring_version: 8,
            },
            Frame::PullDone { seq: 5, sent: 1000 },
            Frame::Digests {
                seq: 6,
                digests: vec![0, u64::MAX, 42],
            },
            Frame::DigestDiff {
                seq: 6,
                arcs: vec![2, 900],
            },
            Frame::Versions {
                seq: 7,
                max_bytes: 1 << 20,
                arcs: vec![2],
                entries: vec![(0xdead_beef, 9), (1, u64::MAX)],
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_even_when_fed_byte_by_byte() {
        let mut buf = BytesMut::new();
        for f in all_frames() {
            encode(&f, &mut buf);
        }
        let bytes = buf.to_vec();
        let mut decoded = Vec::new();
        let mut start = 0;
        for end in 0..=bytes.len() {
            if let Decoded::Frame(f, used) = decode(&bytes[start..end]).unwrap() {
                decoded.push(f);
                start += used;
            }
        }
        assert_eq!(decoded, all_frames());
        assert_eq!(start, bytes.len());
    }

    #[test]
    fn garbage_is_refused_not_trusted() {
        assert_eq!(
            decode(b"GET / HTTP/1.1\r\n"),
            Err(WireError::TooLarge(0x4745_5420))
        );
        assert_eq!(decode(&[0, 0, 0, 1, 99]), Err(WireError::UnknownKind(99)));
        assert_eq!(decode(&[0, 0, 0, 0]), Err(WireError::Malformed));
        // A Records frame claiming a billion records in a few bytes.
        let mut bad = vec![0, 0, 0, 13, KIND_RECORDS];
        bad.extend_from_slice(&1u64.to_be_bytes());
        bad.extend_from_slice(&1_000_000_000u32.to_be_bytes());
        assert_eq!(decode(&bad), Err(WireError::Malformed));
        // Digests claiming more entries than the frame holds.
        let mut bad = vec![0, 0, 0, 17, KIND_DIGESTS];
        bad.extend_from_slice(&1u64.to_be_bytes());
        bad.extend_from_slice(&2u32.to_be_bytes());
        bad.extend_from_slice(&[0; 4]);
        assert_eq!(decode(&bad), Err(WireError::Malformed));
        // Trailing bytes inside a frame.
        let mut buf = BytesMut::new();
        encode(&Frame::Ack { seq: 1 }, &mut buf);
        let mut v = buf.to_vec();
        v[3] += 1;
        v.push(0);
        assert_eq!(decode(&v), Err(WireError::Malformed));
    }
}
