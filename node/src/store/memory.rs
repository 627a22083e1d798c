//! The memory segments live in: the heap, or the mapped `-e` file.
//!
//! A segment's buffer is allocated once, the first time the segment is used, and then
//! reused for the life of the store: freeing and refilling segments never goes back to
//! the allocator, so resident memory cannot grow with churn. With `-e`, every segment is a
//! region of the mapped file from the start, with a 64-byte entry of the file's segment
//! table that says what the segment holds (see `persist`).

use super::mapping::Region;

#[derive(Debug)]
enum Mem {
    Heap(Box<[u8]>),
    Mapped(Region),
}

/// One segment's bytes, owned by whichever shard uses the segment (or by the pool).
#[derive(Debug)]
pub(crate) struct SegBuf {
    data: Mem,
    /// The segment's entry in the file's segment table (mapped segments only).
    entry: Option<Region>,
    /// The segment's number in the file (0 for heap segments).
    id: u32,
}

impl SegBuf {
    /// A zero-filled heap buffer. Large zeroed allocations come straight from the kernel,
    /// so pages count as resident only once written.
    pub fn zeroed(len: usize) -> SegBuf {
        SegBuf {
            data: Mem::Heap(vec![0u8; len].into_boxed_slice()),
            entry: None,
            id: 0,
        }
    }

    /// Segment `id` of the mapped file, with its table entry.
    pub fn mapped(id: u32, data: Region, entry: Region) -> SegBuf {
        SegBuf {
            data: Mem::Mapped(data),
            entry: Some(entry),
            id,
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Mem::Heap(b) => b.len(),
            Mem::Mapped(r) => r.len(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Mem::Heap(b) => b,
            Mem::Mapped(r) => r.bytes(),
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.data {
            Mem::Heap(b) => b,
            Mem::Mapped(r) => r.bytes_mut(),
        }
    }

    /// Whether the segment lives in the `-e` file.
    pub fn mapped_id(&self) -> Option<u32> {
        self.entry.as_ref().map(|_| self.id)
    }

    /// The segment's table entry, for segments in the `-e` file.
    pub fn entry_mut(&mut self) -> Option<&mut [u8]> {
        self.entry.as_mut().map(Region::bytes_mut)
    }

    /// The table entry (mutable) and the segment's bytes, together.
    pub fn entry_and_bytes_mut(&mut self) -> (Option<&mut [u8]>, &[u8]) {
        let data: &[u8] = match &self.data {
            Mem::Heap(b) => b,
            Mem::Mapped(r) => r.bytes(),
        };
        (self.entry.as_mut().map(Region::bytes_mut), data)
    }

    pub fn entry(&self) -> Option<&[u8]> {
        self.entry.as_ref().map(Region::bytes)
    }

    /// Gives a file segment's pages back (the budget no longer covers it); a heap
    /// segment is simply dropped by its owner.
    pub fn discard(&mut self) {
        if let Mem::Mapped(r) = &mut self.data {
            r.discard();
        }
    }
}
