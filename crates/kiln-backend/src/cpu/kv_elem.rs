//! How the attention kernels read a stored KV element type as f32: one at
//! a time (the portable path) or 8 and 16 at a time (AVX2 with F16C, and
//! AVX-512F). Every widening is exact (f16 and i8 are subsets of f32), so
//! the vector and scalar paths see the same numbers and give the same bits.

use half::f16;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// An element type of the CPU KV cache (f32, f16, or q8_0's i8).
pub(super) trait KvElem: Copy + Send + Sync + 'static {
    /// Whether blocks of `Q8_0_BLOCK` elements carry an f16 scale to multiply by.
    const SCALED: bool;
    /// Whether the element is f32 itself (the kernels then keep masked loads).
    const IS_F32: bool;

    /// The element as f32, exactly (before any scale).
    fn widen(self) -> f32;

    /// Eight elements from `p` as f32.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; eight elements from `p` are readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;

    /// Sixteen elements from `p` as f32.
    ///
    /// # Safety
    /// The CPU has AVX-512F; sixteen elements from `p` are readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> __m512;
}

impl KvElem for f32 {
    const SCALED: bool = false;
    const IS_F32: bool = true;

    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: per the caller.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: per the caller.
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl KvElem for f16 {
    const SCALED: bool = false;
    const IS_F32: bool = false;

    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: per the caller (16 readable bytes; F16C).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: per the caller (32 readable bytes; AVX-512F).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

impl KvElem for i8 {
    const SCALED: bool = true;
    const IS_F32: bool = false;

    #[inline(always)]
    fn widen(self) -> f32 {
        self as f32
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> __m256 {
        // SAFETY: per the caller (8 readable bytes; AVX2).
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const i8) -> __m512 {
        // SAFETY: per the caller (16 readable bytes; AVX-512F).
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))) }
    }
}
