//! The consistent-hash ring, computed exactly as libmemcached's weighted ketama
//! (`MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED`, the libketama-compatible continuum).
//!
//! Every member contributes 160 points (for equal weights): for `i` in `0..40` the MD5 of
//! `"<host>:<port>-<i>"` (or `"<host>-<i>"` when the port is memcached's default 11211) gives
//! four 32-bit little-endian points. A key belongs to the member owning the first point at or
//! after the key's hash (the first four bytes of its MD5, little-endian), wrapping around.
//! Because the node, the proxy and libmemcached-based clients all compute this same ring,
//! every party agrees on each key's owner. Replicas go to the next distinct members
//! clockwise, which are the members a ketama client fails over to when the owner is removed.

use md5::{Digest, Md5};

/// libmemcached's `MEMCACHED_POINTS_PER_SERVER_KETAMA`.
const POINTS_PER_SERVER: f32 = 160.0;
/// Points taken from each MD5 digest.
const POINTS_PER_HASH: u32 = 4;
/// memcached's default port: libmemcached leaves it out of the point names.
const DEFAULT_PORT: u16 = 11211;

/// One ring member: where clients reach it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RingNode {
    pub host: String,
    pub port: u16,
}

impl RingNode {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        RingNode {
            host: host.into(),
            port,
        }
    }
}

/// A ketama continuum over a list of nodes.
#[derive(Clone, Debug, Default)]
pub struct Ring {
    nodes: Vec<RingNode>,
    /// (point, index into `nodes`), sorted by point then index as libmemcached sorts them.
    points: Vec<(u32, u32)>,
}

/// The ketama hash of a key: the first four bytes of its MD5, little-endian.
pub fn key_hash(key: &[u8]) -> u32 {
    let digest = Md5::digest(key);
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

impl Ring {
    /// Builds the continuum. Node order only breaks ties between equal points, as in
    /// libmemcached; callers pass nodes in member-list order.
    pub fn new(nodes: Vec<RingNode>) -> Ring {
        let count = nodes.len();
        let mut points = Vec::with_capacity(count * POINTS_PER_SERVER as usize);
        if count > 0 {
            // libmemcached computes the per-server share in single precision; the same
            // arithmetic gives the same number of points (equal weights: 160 each).
            let pct = 1.0f32 / count as f32;
            let share = pct * POINTS_PER_SERVER / 4.0 * count as f32 + 0.000_000_000_1f32;
            let per_server = (f64::from(share).floor() as u32) * POINTS_PER_HASH;
            for (index, node) in nodes.iter().enumerate() {
                for i in 0..per_server / POINTS_PER_HASH {
                    let name = if node.port == DEFAULT_PORT {
                        format!("{}-{}", node.host, i)
                    } else {
                        format!("{}:{}-{}", node.host, node.port, i)
                    };
                    let digest = Md5::digest(name.as_bytes());
                    for align in 0..POINTS_PER_HASH as usize {
                        let b = &digest[align * 4..align * 4 + 4];
                        let point = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        points.push((point, index as u32));
                    }
                }
            }
            points.sort_unstable();
        }
        Ring { nodes, points }
    }

    pub fn nodes(&self) -> &[RingNode] {
        &self.nodes
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Position in the continuum of the first point at or after `hash`, wrapping around.
    fn position(&self, hash: u32) -> usize {
        let i = self.points.partition_point(|&(point, _)| point < hash);
        if i == self.points.len() {
            0
        } else {
            i
        }
    }

    /// Index (into `nodes`) of the key's owner, or `None` for an empty ring.
    pub fn owner(&self, key: &[u8]) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        Some(self.points[self.position(key_hash(key))].1 as usize)
    }

    /// The key's owner followed by up to `count - 1` further distinct nodes clockwise: the
    /// nodes that hold its replicas, in the order a ketama client fails over to them.
    pub fn owners(&self, key: &[u8], count: usize) -> Vec<usize> {
        let want = count.min(self.nodes.len());
        let mut owners = Vec::with_capacity(want);
        if want == 0 {
            return owners;
        }
        let start = self.position(key_hash(key));
        for step in 0..self.points.len() {
            let index = self.points[(start + step) % self.points.len()].1 as usize;
            if !owners.contains(&index) {
                owners.push(index);
                if owners.len() == want {
                    break;
                }
            }
        }
        owners
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ports: &[u16]) -> Ring {
        Ring::new(
            ports
                .iter()
                .map(|&p| RingNode::new("127.0.0.1", p))
                .collect(),
        )
    }

    #[test]
    fn every_node_gets_160_points() {
        for n in 1..=10u16 {
            let ports: Vec<u16> = (0..n).map(|i| 20000 + i).collect();
            assert_eq!(ring(&ports).points.len(), 160 * n as usize, "n={n}");
        }
    }

    #[test]
    fn key_hash_is_md5_little_endian() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(key_hash(b""), 0xd98c_1dd4);
    }

    #[test]
    fn owners_are_distinct_and_start_with_the_owner() {
        let r = ring(&[1, 2, 3, 4]);
        for i in 0..1000 {
            let key = format!("key{i}");
            let owners = r.owners(key.as_bytes(), 3);
            assert_eq!(owners.len(), 3);
            assert_eq!(Some(owners[0]), r.owner(key.as_bytes()));
            let mut sorted = owners.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 3);
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_keys_to_the_next_owner() {
        let full = ring(&[1, 2, 3, 4]);
        let without_two = Ring::new(
            full.nodes()
                .iter()
                .filter(|n| n.port != 2)
                .cloned()
                .collect(),
        );
        for i in 0..5000 {
            let key = format!("k{i}");
            let owners = full.owners(key.as_bytes(), 2);
            let before = &full.nodes()[owners[0]];
            let after = &without_two.nodes()[without_two.owner(key.as_bytes()).unwrap()];
            if before.port == 2 {
                // The failover target is the second owner on the full ring.
                assert_eq!(after, &full.nodes()[owners[1]]);
            } else {
                assert_eq!(after, before);
            }
        }
    }

    #[test]
    fn keys_spread_roughly_evenly() {
        let r = ring(&[1, 2, 3]);
        let mut counts = [0usize; 3];
        for i in 0..30_000 {
            counts[r.owner(format!("key:{i}").as_bytes()).unwrap()] += 1;
        }
        for c in counts {
            assert!((7_000..13_000).contains(&c), "{counts:?}");
        }
    }
}
