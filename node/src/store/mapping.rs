//! The memory-mapped `-e` file, cut into regions that are each owned by one holder.
//!
//! The only module of the workspace allowed `unsafe`: a shared file mapping is memory Rust
//! cannot see the ownership of, so this module establishes it. The file is opened, sized
//! and locked (`flock`, exclusive) by the caller before it is mapped; the mapping is then
//! split once into disjoint regions, and every access goes through a region's `&self` or
//! `&mut self`, so Rust's aliasing rules hold as for one `Box<[u8]>` per region.

#![allow(unsafe_code)]

use std::fs::File;
use std::sync::Arc;

use memmap2::{MmapRaw, UncheckedAdvice};

/// A mapped file. Regions keep it (and the lock on the file) alive.
#[derive(Debug)]
pub(crate) struct MappedFile {
    map: MmapRaw,
    /// Holds the exclusive lock for as long as any region is in use.
    _file: File,
}

/// A byte range of the mapping, owned by whoever holds it.
#[derive(Debug)]
pub(crate) struct Region {
    file: Arc<MappedFile>,
    offset: usize,
    len: usize,
}

/// Why a mapping could not be split as asked.
#[derive(Debug, thiserror::Error)]
#[error("regions overlap or leave the {len}-byte mapping")]
pub(crate) struct BadRegions {
    len: usize,
}

impl MappedFile {
    /// Maps all of `file` (read-write, shared). The caller has locked it for this process.
    pub fn map(file: File) -> std::io::Result<MappedFile> {
        let map = MmapRaw::map_raw(&file)?;
        Ok(MappedFile { map, _file: file })
    }

    /// Cuts the mapping into `bounds` (offset, length), which must be sorted and disjoint.
    /// Consumes the mapping, so no range can be handed out twice.
    pub fn split(self, bounds: &[(usize, usize)]) -> Result<Vec<Region>, BadRegions> {
        let len = self.map.len();
        let mut end = 0;
        for &(offset, region) in bounds {
            let ok = offset >= end && offset.checked_add(region).is_some_and(|e| e <= len);
            if !ok {
                return Err(BadRegions { len });
            }
            end = offset + region;
        }
        let file = Arc::new(self);
        Ok(bounds
            .iter()
            .map(|&(offset, len)| Region {
                file: file.clone(),
                offset,
                len,
            })
            .collect())
    }
}

impl Region {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `offset..offset + len` lies inside the mapping (checked by `split`), which
        // lives as long as `self.file`. No other region covers these bytes and regions are
        // not `Clone`, so the only references to them derive from this region: `&self`
        // here, excluding `&mut self` below. No other process writes the file: the caller
        // holds an exclusive lock on it while it is mapped. The mapping is never shrunk
        // (the file is sized before it is mapped and not truncated afterwards).
        unsafe { std::slice::from_raw_parts(self.file.map.as_ptr().add(self.offset), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        unsafe {
            std::slice::from_raw_parts_mut(self.file.map.as_mut_ptr().add(self.offset), self.len)
        }
    }

    /// Gives the region's pages back (the file's blocks are freed; it reads as zeros after).
    /// For regions at page boundaries; others are left as they are.
    pub fn discard(&mut self) {
        let page = 4096;
        if !self.offset.is_multiple_of(page) || !self.len.is_multiple_of(page) {
            return;
        }
        // SAFETY: MADV_REMOVE only changes the contents of this region (to zeros), and
        // `&mut self` guarantees no reference into it is alive.
        let result = unsafe {
            self.file
                .map
                .unchecked_advise_range(UncheckedAdvice::Remove, self.offset, self.len)
        };
        if let Err(error) = result {
            tracing::debug!(%error, "could not release the pages of a memory-file segment");
        }
    }

    /// Writes the mapping's dirty pages back to the file (for files not on tmpfs).
    pub fn flush_file(&self) -> std::io::Result<()> {
        self.file.map.flush()
    }
}
