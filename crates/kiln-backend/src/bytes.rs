//! Shared, immutable host bytes: weight data that can live in an owned
//! buffer or inside a memory-mapped checkpoint without being copied.
//!
//! A GGUF or safetensors file is mapped once; each weight matrix is a range
//! of that map, kept alive by a reference count. The CPU backend computes
//! straight from those pages, so a model's resident memory is the file's
//! size, not the file plus a copy.

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// Anything that holds bytes and can be shared between threads: a `Vec<u8>`,
/// a memory map.
pub type ByteOwner = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A range of bytes inside a shared owner. Cloning and slicing are cheap.
#[derive(Clone)]
pub struct HostBytes {
    owner: ByteOwner,
    start: usize,
    len: usize,
    /// The owner is a read-only map of a file, whose pages can be dropped
    /// and read back from the file at any time.
    file_mapped: bool,
}

impl HostBytes {
    /// `range` of `owner`, or `None` when the range does not fit inside it.
    pub fn shared(owner: ByteOwner, range: Range<usize>) -> Option<Self> {
        let total = (*owner).as_ref().len();
        (range.start <= range.end && range.end <= total).then(|| Self {
            owner,
            start: range.start,
            len: range.end - range.start,
            file_mapped: false,
        })
    }

    /// `range` of a read-only memory map of a file (see
    /// [`HostBytes::release_resident`]), or `None` when it does not fit.
    ///
    /// # Safety
    /// `owner`'s bytes are a read-only shared mapping of a file, so that
    /// dropping their pages loses nothing.
    pub unsafe fn file_mapped(owner: ByteOwner, range: Range<usize>) -> Option<Self> {
        Self::shared(owner, range).map(|b| Self {
            file_mapped: true,
            ..b
        })
    }

    /// Tells the kernel these bytes will not be read soon: the whole pages
    /// inside them leave the process's resident memory (a later read maps
    /// them back from the file). Used once a weight has been copied into
    /// another layout, so the copy does not double the model's memory. A
    /// no-op for bytes that are not a file map.
    pub fn release_resident(&self) {
        #[cfg(unix)]
        if self.file_mapped {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let page = usize::try_from(page).unwrap_or(4096).max(1);
            let start = self.as_ptr() as usize;
            let first = start.next_multiple_of(page);
            let end = (start + self.len) / page * page;
            if end > first {
                // SAFETY: whole pages inside a read-only file mapping
                // (`file_mapped`'s contract) that outlives this call;
                // MADV_DONTNEED only drops them from this process, and
                // later reads fault the file's contents back in.
                unsafe {
                    libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
                }
            }
        }
    }

    /// `range` of these bytes (relative to their start), sharing the owner.
    pub fn slice(&self, range: Range<usize>) -> Option<Self> {
        (range.start <= range.end && range.end <= self.len).then(|| Self {
            owner: self.owner.clone(),
            start: self.start + range.start,
            len: range.end - range.start,
            file_mapped: self.file_mapped,
        })
    }
}

impl From<Vec<u8>> for HostBytes {
    fn from(v: Vec<u8>) -> Self {
        let len = v.len();
        Self {
            owner: Arc::new(v),
            start: 0,
            len,
            file_mapped: false,
        }
    }
}

impl Deref for HostBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }
}

impl PartialEq for HostBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl fmt::Debug for HostBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_share_the_owner_and_check_bounds() {
        let b = HostBytes::from((0u8..100).collect::<Vec<_>>());
        let s = b.slice(10..20).unwrap();
        assert_eq!(&s[..], &(10u8..20).collect::<Vec<_>>()[..]);
        let t = s.slice(5..10).unwrap();
        assert_eq!(&t[..], &[15, 16, 17, 18, 19]);
        assert!(s.slice(5..11).is_none());
        assert!(HostBytes::shared(Arc::new(vec![0u8; 4]), 2..5).is_none());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = b.slice(5..4);
        assert!(reversed.is_none());
    }
}
