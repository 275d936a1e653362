//! `kiln bench --bandwidth`: the machine's memory read bandwidth, measured
//! the way a decode step reads weights.
//!
//! Exists because decode speed on a CPU is bound by how fast the weights
//! stream from memory: bytes read per token divided into this bandwidth is
//! the floor (the fastest a token can be made) that `scripts/bench/scale.sh`
//! compares kiln and llama.cpp with. The probe sums a buffer far larger than
//! any cache (512 MiB by default) as 64-bit integers with eight independent
//! accumulators on `--threads` threads, each its own contiguous share, the
//! AVX2 build of the loop where the CPU has it, once as it is and once
//! asking for each cache line 4 KiB before it is read (as the CPU kernels
//! do: the hardware prefetchers alone restart at every 4 KiB page and left
//! the plain loop about 7% under what the kernels then reached); the best
//! pass of either is reported, as the first pass also faults the pages in.

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

/// [`sum_words`] over 4 KiB pieces, each line of the piece 4 KiB ahead
/// asked for before the piece is summed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_words_prefetched(words: &[u64]) -> u64 {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    const PIECE: usize = 512; // words: 4 KiB
    let mut total = 0u64;
    for (i, piece) in words.chunks(PIECE).enumerate() {
        let ahead = words.as_ptr().wrapping_add((i + 1) * PIECE);
        for line in 0..PIECE / 8 {
            // A prefetch reads nothing and never faults (the address is
            // formed with `wrapping_add`: past the end at the last piece).
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(8 * line) as *const i8);
        }
        total = total.wrapping_add(sum_words(piece));
    }
    total
}

fn sum(words: &[u64], prefetch: bool) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU was just checked to have AVX2.
        return unsafe {
            if prefetch {
                sum_words_prefetched(words)
            } else {
                sum_words_avx2(words)
            }
        };
    }
    let _ = prefetch;
    sum_words(words)
}

/// What [`measure`] found.
#[derive(Debug, Clone, Copy)]
pub struct Bandwidth {
    /// Bytes per second of the best pass.
    pub bytes_per_s: f64,
    /// The buffer's size.
    pub bytes: usize,
    pub threads: usize,
    pub passes: usize,
}

/// Measures read bandwidth over `mib` MiB on `threads` threads, best of `passes`.
pub fn measure(mib: usize, threads: usize, passes: usize) -> anyhow::Result<Bandwidth> {
    if !(64..=16384).contains(&mib) || threads == 0 || passes == 0 {
        bail!("--bandwidth-mib must be 64 to 16384, threads and passes at least 1");
    }
    let n = mib << 17; // 8-byte words
    let words: Vec<u64> = (0..n as u64).collect();
    let share = n.div_ceil(threads);
    let mut best = f64::INFINITY;
    let mut check = 0u64;
    // Each pass is made both ways, alternating.
    for pass in 0..2 * passes {
        let prefetch = pass % 2 == 1;
        let t0 = Instant::now();
        let total = std::thread::scope(|s| {
            let handles: Vec<_> = words
                .chunks(share)
                .map(|part| s.spawn(move || sum(part, prefetch)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        best = best.min(t0.elapsed().as_secs_f64());
        check = std::hint::black_box(total);
    }
    // The sum of 0..n, so the loop cannot have been skipped.
    let want = (n as u64).wrapping_mul(n as u64 - 1) / 2;
    if check != want {
        bail!("the bandwidth probe summed {check}, not {want}");
    }
    Ok(Bandwidth {
        bytes_per_s: (n * 8) as f64 / best,
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
        assert_eq!(sum(&w, false), 1003 * 1004 / 2);
        assert_eq!(sum(&w, true), 1003 * 1004 / 2);
        assert_eq!(sum_words(&w), 1003 * 1004 / 2);
    }

    #[test]
    fn a_measurement_is_positive_and_bounds_are_refused() {
        let b = measure(64, 2, 2).unwrap_or_else(|e| panic!("{e}"));
        assert!(b.bytes_per_s > 1e8, "{b:?}");
        assert_eq!(b.bytes, 64 << 20);
        let err = measure(1, 1, 1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--bandwidth-mib must be 64 to 16384"), "{err}");
    }
}
