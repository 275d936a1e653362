//! `kiln bench --bandwidth`: the machine's memory read bandwidth, measured
//! the way a decode step reads weights.
//!
//! Exists because decode speed on a CPU is bound by how fast the weights
//! stream from memory: bytes read per token divided into this bandwidth is
//! the floor (the fastest a token can be made) that `scripts/bench/scale.sh`
//! compares kiln and llama.cpp with. The probe sums a buffer far larger than
//! any cache (512 MiB by default) as 64-bit integers with eight independent
//! accumulators on `--threads` threads, each its own contiguous share, the
//! AVX2 build of the loop where the CPU has it, three ways: as it is,
//! asking for each cache line 4 KiB before it is read, and asking for it
//! 16 KiB before into L2 and again 4 KiB before into L1 (the packed CPU
//! kernels' distances, taken from them: the hardware prefetchers alone
//! restart at every 4 KiB page and left the plain loop about 7% under what
//! the kernels then reached).
//! The best pass of any way is reported, as the first pass also faults the
//! pages in, so the floor is what the best of these reads. The buffer is
//! on 2 MiB pages where the kernel grants them, as kiln's weights are: on
//! 4 KiB pages the same sums read 10-20% less on the Xeon build machine.

use std::time::Instant;

use anyhow::bail;

/// One thread's sum of its share: plain code the compiler vectorises.
#[inline(always)]
fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for c in &mut chunks {
        for (a, &w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(w);
        }
    }
    let tail: u64 = chunks.remainder().iter().fold(0, |a, &w| a.wrapping_add(w));
    acc.iter().fold(tail, |a, &w| a.wrapping_add(w))
}

/// [`sum_words`] compiled for AVX2 (256-bit loads).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_words_avx2(words: &[u64]) -> u64 {
    sum_words(words)
}

/// How a pass of the probe asks for lines ahead of its sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// Not at all: the hardware prefetchers alone.
    None,
    /// Each line 4 KiB ahead, into L1.
    Near,
    /// Each line 16 KiB ahead into L2 and 4 KiB ahead into L1, as the
    /// packed CPU kernels do.
    NearAndFar,
}

/// The passes of one round of the probe, each way once.
pub const AHEAD: [Ahead; 3] = [Ahead::None, Ahead::Near, Ahead::NearAndFar];

impl Ahead {
    /// The way's name in `kiln bench --bandwidth`'s output.
    pub fn name(self) -> &'static str {
        match self {
            Ahead::None => "plain",
            Ahead::Near => "near",
            Ahead::NearAndFar => "near_and_far",
        }
    }
}

/// [`sum_words`] over 4 KiB pieces, each line of the piece asked for
/// before the piece is summed, as far ahead into L1 as the packed kernels
/// ask (and with `far`, as far ahead into L2 as they ask too:
/// [`PREFETCH_NEAR_BYTES`], [`PREFETCH_FAR_BYTES`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_words_prefetched(words: &[u64], far: bool) -> u64 {
    use kiln_backend::cpu::{PREFETCH_FAR_BYTES, PREFETCH_NEAR_BYTES};
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
    const PIECE: usize = 512; // words: 4 KiB
    let mut total = 0u64;
    for (i, piece) in words.chunks(PIECE).enumerate() {
        let ahead = |bytes: usize| words.as_ptr().wrapping_add(i * PIECE + bytes / 8);
        let (near, far_at) = (ahead(PREFETCH_NEAR_BYTES), ahead(PREFETCH_FAR_BYTES));
        for line in 0..PIECE / 8 {
            // A prefetch reads nothing and never faults (the addresses are
            // formed with `wrapping_add`: past the end at the last pieces).
            _mm_prefetch::<_MM_HINT_T0>(near.wrapping_add(8 * line) as *const i8);
            if far {
                _mm_prefetch::<_MM_HINT_T1>(far_at.wrapping_add(8 * line) as *const i8);
            }
        }
        total = total.wrapping_add(sum_words(piece));
    }
    total
}

fn sum(words: &[u64], ahead: Ahead) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU was just checked to have AVX2.
        return unsafe {
            match ahead {
                Ahead::None => sum_words_avx2(words),
                Ahead::Near => sum_words_prefetched(words, false),
                Ahead::NearAndFar => sum_words_prefetched(words, true),
            }
        };
    }
    let _ = ahead;
    sum_words(words)
}

/// What [`measure`] found.
#[derive(Debug, Clone, Copy)]
pub struct Bandwidth {
    /// Bytes per second of the best pass of each way, in [`AHEAD`]'s
    /// order: the plain pass alone is the floor as issue 25 first measured
    /// it, the best of all ([`Bandwidth::bytes_per_s`]) the one kiln is
    /// held to.
    pub by_way: [f64; AHEAD.len()],
    /// The buffer's size.
    pub bytes: usize,
    pub threads: usize,
    pub passes: usize,
}

impl Bandwidth {
    /// Bytes per second of the best pass of any way.
    pub fn bytes_per_s(&self) -> f64 {
        self.by_way.iter().copied().fold(0.0, f64::max)
    }
}

/// Measures read bandwidth over `mib` MiB on `threads` threads, best of `passes`.
pub fn measure(mib: usize, threads: usize, passes: usize) -> anyhow::Result<Bandwidth> {
    if !(64..=16384).contains(&mib) || threads == 0 || passes == 0 {
        bail!("--bandwidth-mib must be 64 to 16384, threads and passes at least 1");
    }
    // The buffer's 8-byte words.
    let n = mib << 17;
    // Zeroed (untouched) first, so that the buffer is on 2 MiB pages as
    // the packed weights are (`kiln_backend::advise_huge_pages`).
    let mut words = vec![0u64; n];
    // SAFETY: the same memory as `words`, viewed as bytes for the call.
    kiln_backend::advise_huge_pages(unsafe {
        std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), n * 8)
    });
    words.iter_mut().zip(0u64..).for_each(|(w, i)| *w = i);
    let share = n.div_ceil(threads);
    let mut best = [f64::INFINITY; AHEAD.len()];
    let mut check = 0u64;
    // Each pass is made every way, alternating.
    for pass in 0..AHEAD.len() * passes {
        let way = pass % AHEAD.len();
        let ahead = AHEAD[way];
        let t0 = Instant::now();
        let total = std::thread::scope(|s| {
            let handles: Vec<_> = words
                .chunks(share)
                .map(|part| s.spawn(move || sum(part, ahead)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        best[way] = best[way].min(t0.elapsed().as_secs_f64());
        check = std::hint::black_box(total);
    }
    // The sum of 0..n, so the loop cannot have been skipped.
    let want = (n as u64).wrapping_mul(n as u64 - 1) / 2;
    if check != want {
        bail!("the bandwidth probe summed {check}, not {want}");
    }
    Ok(Bandwidth {
        by_way: best.map(|t| (n * 8) as f64 / t),
        bytes: n * 8,
        threads,
        passes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sum_covers_every_word() {
        let w: Vec<u64> = (1..=1003).collect();
        for ahead in AHEAD {
            assert_eq!(sum(&w, ahead), 1003 * 1004 / 2, "{ahead:?}");
        }
        assert_eq!(sum_words(&w), 1003 * 1004 / 2);
    }

    #[test]
    fn a_measurement_is_positive_and_bounds_are_refused() {
        let b = measure(64, 2, 2).unwrap_or_else(|e| panic!("{e}"));
        assert!(b.bytes_per_s() > 1e8, "{b:?}");
        assert_eq!(b.bytes, 64 << 20);
        let err = measure(1, 1, 1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--bandwidth-mib must be 64 to 16384"), "{err}");
    }
}
