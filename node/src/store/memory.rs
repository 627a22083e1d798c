//! The memory segments live in.
//!
//! A segment's buffer is allocated once, the first time the segment is used, and then
//! reused for the life of the store: freeing and refilling segments never goes back to
//! the allocator, so resident memory cannot grow with churn.

/// One segment's bytes, owned by whichever shard uses the segment (or by the pool).
#[derive(Debug)]
pub(crate) struct SegBuf(Box<[u8]>);

impl SegBuf {
    /// A zero-filled buffer. Large zeroed allocations come straight from the kernel, so
    /// pages count as resident only once written.
    pub fn zeroed(len: usize) -> SegBuf {
        SegBuf(vec![0u8; len].into_boxed_slice())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}
