//! Throughput of the CPU `linear` op on the default model's shapes.
//!
//! `cargo run --release -p kiln-backend --example linear_bench [FORMAT ...]`
//! prints, for each weight format (default: all; names as `GgmlType`'s,
//! e.g. `Q4K BF16`) and batch size, the best of several runs in GMAC/s
//! (multiply-accumulates per second) and, for one row, in GB/s of weights
//! streamed. The last column divides by the process's CPU time instead of
//! the wall clock: on a shared machine, where other processes take turns
//! on the cores, it still measures the kernels (with `RAYON_NUM_THREADS=1`
//! it is one core's rate). `KILN_BENCH_COLD=1` cycles through copies of
//! each matrix filling 1 GB, so the weights come from memory, not cache.

use std::time::Instant;

use kiln_backend::cpu::{CpuBackend, CpuTensor};
use kiln_backend::{Backend, GgmlType, WeightData};

fn bytes_for(ty: GgmlType, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let (block, bb) = ty.block();
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(n * k / block * bb);
    for _ in 0..n * k / block {
        let start = out.len();
        for _ in 0..bb {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            out.push(s as u8);
        }
        // Small positive f16 scales (and minimums) where each format keeps them.
        for &o in ty.f16_fields() {
            out[start + o..start + o + 2].copy_from_slice(&0x2000u16.to_le_bytes());
        }
        if ty == GgmlType::MXFP4 {
            // Its scale is an E8M0 exponent byte: 2^-8.
            out[start] = 120;
        }
    }
    if matches!(ty, GgmlType::F16 | GgmlType::BF16) {
        // Ordinary values (no NaN or subnormal bit patterns): 0x3c00 is 1.0 in
        // f16, 0x3f80 in bf16; vary the low mantissa bits.
        let one: u16 = if ty == GgmlType::F16 { 0x3c00 } else { 0x3f80 };
        for (i, pair) in out.chunks_exact_mut(2).enumerate() {
            pair.copy_from_slice(&(one | (i as u16 & 0x3f)).to_le_bytes());
        }
    }
    out
}

/// CPU time of the whole process so far (user + system), in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn main() {
    let be = CpuBackend::new();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let formats: Vec<GgmlType> = kiln_backend::quant::WEIGHT_FORMATS
        .into_iter()
        .filter(|ty| args.is_empty() || args.iter().any(|a| *a == format!("{ty:?}")))
        .collect();
    // The default model's shapes (K-quants need rows of whole 256-blocks),
    // or `KILN_BENCH_SHAPES=NxK,...`: shapes larger than the last-level
    // cache, where one row streams its weights from memory.
    let shapes: Vec<(usize, usize)> = match std::env::var("KILN_BENCH_SHAPES") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                let (n, k) = s.split_once('x').expect("KILN_BENCH_SHAPES is NxK,...");
                (n.trim().parse().expect("N"), k.trim().parse().expect("K"))
            })
            .collect(),
        Err(_) => vec![(1536, 576), (576, 1536), (49152, 576)],
    };
    let batches: Vec<usize> = match std::env::var("KILN_BENCH_BATCHES") {
        Ok(list) => list
            .split(',')
            .map(|m| m.trim().parse().expect("batch"))
            .collect(),
        Err(_) => vec![1, 16, 512],
    };
    println!("| format | n x k | m | best ms | GMAC/s | GB/s (weights) | GMAC per CPU-s |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for ty in formats {
        for &(n, k) in &shapes {
            let k = if ty.block().0 == 256 {
                k.next_multiple_of(256)
            } else {
                k
            };
            if ty == GgmlType::F32 && n > 10_000 {
                continue;
            }
            let data = if ty == GgmlType::F32 {
                WeightData::F32(
                    (0..n * k)
                        .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
                        .collect(),
                )
            } else {
                WeightData::Ggml {
                    ty,
                    bytes: bytes_for(ty, n, k, 7).into(),
                }
            };
            let wbytes = match &data {
                WeightData::F32(v) => v.len() * 4,
                WeightData::Ggml { bytes, .. } => bytes.len(),
            };
            // `KILN_BENCH_COLD=1`: enough copies of the matrix to fill 1 GB,
            // used in turn, so every product streams its weights from
            // memory as a model's do (one copy stays in the last-level
            // cache when it fits).
            let copies = if std::env::var_os("KILN_BENCH_COLD").is_some() {
                1_000_000_000usize.div_ceil(wbytes)
            } else {
                1
            };
            let ws: Vec<_> = (0..copies)
                .map(|_| be.upload_weight(n, k, data.clone()).expect("weight"))
                .collect();
            for &m in &batches {
                if n > 10_000 && m > 16 {
                    continue;
                }
                let x = CpuTensor::new(
                    vec![m, k],
                    (0..m * k).map(|i| ((i % 89) as f32) / 89.0).collect(),
                )
                .expect("x");
                let reps = (2_000_000_000 / (m * n * k)).clamp(3, 200).max(copies);
                let (mut best, mut best_cpu) = (f64::INFINITY, f64::INFINITY);
                for _ in 0..5 {
                    let (t, c) = (Instant::now(), cpu_seconds());
                    // On a pool worker, as a model step runs (`execute`):
                    // from outside the pool every product would pay a
                    // hand-over to the pool and back, tens of microseconds
                    // that a one-row product of a few MB is not.
                    be.execute(|| {
                        for r in 0..reps {
                            let w = &ws[r % copies];
                            std::hint::black_box(be.linear(&x, w, None).expect("linear"));
                        }
                    });
                    best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                    best_cpu = best_cpu.min((cpu_seconds() - c) / reps as f64);
                }
                let gmac = (m * n * k) as f64 / best / 1e9;
                let gbs = if m == 1 {
                    format!("{:.1}", wbytes as f64 / best / 1e9)
                } else {
                    "-".into()
                };
                let cpu_gmac = (m * n * k) as f64 / best_cpu / 1e9;
                println!(
                    "| {ty:?} | {n} x {k} | {m} | {:.3} | {gmac:.1} | {gbs} | {cpu_gmac:.1} |",
                    best * 1e3
                );
            }
        }
    }
}
