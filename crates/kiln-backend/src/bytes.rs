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
}

impl HostBytes {
    /// `range` of `owner`, or `None` when the range does not fit inside it.
    pub fn shared(owner: ByteOwner, range: Range<usize>) -> Option<Self> {
        let total = (*owner).as_ref().len();
        (range.start <= range.end && range.end <= total).then(|| Self {
            owner,
            start: range.start,
            len: range.end - range.start,
        })
    }

    /// `range` of these bytes (relative to their start), sharing the owner.
    pub fn slice(&self, range: Range<usize>) -> Option<Self> {
        (range.start <= range.end && range.end <= self.len).then(|| Self {
            owner: self.owner.clone(),
            start: self.start + range.start,
            len: range.end - range.start,
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
