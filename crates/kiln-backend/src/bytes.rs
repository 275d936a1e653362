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
            let page = page_size();
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

/// The kernel's base page size (4 KiB on x86-64; 16 or 64 KiB on some Arm
/// kernels): what `madvise` and `munmap` ranges must be whole multiples of.
#[cfg(unix)]
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// The size of a huge page on x86-64 and most 64-bit Arm kernels.
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the whole 2 MiB pages inside `buf` with huge
/// pages (Linux transparent huge pages, which most distributions grant
/// only where a program asks, as here). Works on pages not yet touched,
/// and on a read-only map of a file whose filesystem caches large folios
/// (ext4 and XFS on recent kernels). A decode step streams every weight
/// once, and on 4 KiB pages each 4 KiB costs a page walk the prefetches
/// wait on: a 512 MiB sum read 12-14 GB/s on 4 KiB pages and 15-17 GB/s
/// on 2 MiB pages on one core of the Xeon build machine. Only a hint:
/// where the kernel declines (THP off, memory too fragmented), nothing
/// changes.
pub fn advise_huge_pages(buf: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        let start = buf.as_ptr() as usize;
        let first = start.next_multiple_of(HUGE_PAGE);
        let end = (start + buf.len()) / HUGE_PAGE * HUGE_PAGE;
        if end > first {
            // SAFETY: whole pages inside memory `buf` borrows for the
            // call; MADV_HUGEPAGE changes how later faults are served,
            // never the contents.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Zeroed memory for a layout the backend builds at load (the packed
/// weights) that starts on a 2 MiB boundary and is advised onto huge
/// pages before it is written ([`advise_huge_pages`]): from the heap, a
/// 2.4 MB matrix often spanned no whole huge page at all, and a Llama-3.2-
/// 1B model's weights sat 73% on huge pages; aligned, all but each
/// matrix's last partial 2 MiB. Below 2 MiB, or where the map fails, it is
/// a plain vector.
pub(crate) struct LayoutBuf(Inner);

enum Inner {
    Heap(Vec<u8>),
    /// `len` bytes mapped at `ptr` (2 MiB aligned), unmapped on drop.
    #[cfg(target_os = "linux")]
    Map {
        ptr: std::ptr::NonNull<u8>,
        len: usize,
    },
}

// SAFETY: the map is owned memory, like a `Vec<u8>`'s; it is written only
// through `&mut self` and read through `&self`.
unsafe impl Send for LayoutBuf {}
// SAFETY: as above.
unsafe impl Sync for LayoutBuf {}

impl LayoutBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if len >= HUGE_PAGE {
            if let Some(ptr) = Self::map_aligned(len) {
                return Self(Inner::Map { ptr, len });
            }
        }
        Self(Inner::Heap(vec![0u8; len]))
    }

    /// Maps `len` zero bytes at a 2 MiB boundary: `len + 2 MiB` anonymous
    /// bytes, less what lies before the boundary and after its `len`
    /// bytes, with the rest advised onto huge pages.
    #[cfg(target_os = "linux")]
    fn map_aligned(len: usize) -> Option<std::ptr::NonNull<u8>> {
        let span = len.checked_add(HUGE_PAGE)?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let base = base as usize;
        let start = base.next_multiple_of(HUGE_PAGE);
        // The map, and the part of it kept, end on whole pages.
        let page = page_size();
        let (end, mapped_end) = (
            (start + len).next_multiple_of(page),
            base + span.next_multiple_of(page),
        );
        // SAFETY: both ranges are whole pages of the map just made, outside
        // the `len` bytes kept.
        unsafe {
            if start > base {
                libc::munmap(base as *mut libc::c_void, start - base);
            }
            if mapped_end > end {
                libc::munmap(end as *mut libc::c_void, mapped_end - end);
            }
        }
        let ptr = std::ptr::NonNull::new(start as *mut u8)?;
        // SAFETY: `len` bytes mapped at `ptr`, zero, not yet touched.
        advise_huge_pages(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len) });
        Some(ptr)
    }

    /// The bytes, to write the layout into.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Inner::Heap(v) => v,
            // SAFETY: `len` bytes mapped read-write at `ptr` for as long as
            // `self` lives, borrowed mutably through `self`.
            #[cfg(target_os = "linux")]
            Inner::Map { ptr, len } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), *len)
            },
        }
    }

    /// The buffer is on a 2 MiB boundary (a map, not the heap).
    #[cfg(test)]
    pub fn is_aligned_map(&self) -> bool {
        !matches!(self.0, Inner::Heap(_))
            && (self.as_ref().as_ptr() as usize).is_multiple_of(HUGE_PAGE)
    }
}

impl AsRef<[u8]> for LayoutBuf {
    fn as_ref(&self) -> &[u8] {
        match &self.0 {
            Inner::Heap(v) => v,
            // SAFETY: as in `as_mut_slice`, borrowed shared.
            #[cfg(target_os = "linux")]
            Inner::Map { ptr, len } => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), *len) },
        }
    }
}

impl Drop for LayoutBuf {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Inner::Map { ptr, len } = self.0 {
            // SAFETY: the pages `map_aligned` kept, mapped once, unmapped
            // once here.
            unsafe {
                libc::munmap(ptr.as_ptr().cast(), len.next_multiple_of(page_size()));
            }
        }
    }
}

impl From<LayoutBuf> for HostBytes {
    fn from(b: LayoutBuf) -> Self {
        let len = b.as_ref().len();
        Self {
            owner: Arc::new(b),
            start: 0,
            len,
            file_mapped: false,
        }
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

    /// A layout buffer is zeroed and writable whatever its size; from
    /// 2 MiB on, on Linux, it starts on a huge-page boundary, and it
    /// keeps what was written once shared as host bytes.
    #[test]
    fn layout_buffers_are_zeroed_aligned_and_kept() {
        for len in [0, 100, HUGE_PAGE - 1, HUGE_PAGE, 3 * HUGE_PAGE + 12345] {
            let mut b = LayoutBuf::zeroed(len);
            assert_eq!(b.as_ref().len(), len);
            assert!(b.as_ref().iter().all(|&x| x == 0), "{len} bytes not zero");
            #[cfg(target_os = "linux")]
            assert_eq!(b.is_aligned_map(), len >= HUGE_PAGE, "{len} bytes");
            for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
                *x = (i % 251) as u8;
            }
            let h = HostBytes::from(b);
            assert_eq!(h.len(), len);
            assert!(h.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
        }
    }
}
