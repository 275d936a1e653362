//! What the CPU kernels' tests share: deterministic random inputs, weight
//! bytes of every format, and [`Coverage`], which fails a test whose loops
//! skipped a kernel path this CPU has. A leaf: it imports no kernel, so
//! every kernel's tests may import it.

#[cfg(target_arch = "x86_64")]
use super::isa::Isa;
use crate::GgmlType;

/// Deterministic pseudo-random values in [-1, 1).
pub(super) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A kernel path a test can compare: the portable (canonical) one, or one
/// of the vector instruction sets, and AMX tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Path {
    Portable,
    Avx2,
    AvxVnni,
    Avx512,
    Amx,
}

impl Path {
    /// The path of a vector instruction set.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn of(isa: Isa) -> Self {
        match isa {
            Isa::Avx2 => Path::Avx2,
            Isa::AvxVnni => Path::AvxVnni,
            Isa::Avx512Vnni => Path::Avx512,
        }
    }

    /// Whether this CPU runs the path, from its feature flags directly
    /// (not from the kernels' own choice, which is what is checked).
    pub(super) fn on_this_cpu(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            let avx512 =
                has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni");
            match self {
                Path::Portable => true,
                Path::Avx2 => avx2,
                Path::AvxVnni => avx2 && has!("avxvnni"),
                Path::Avx512 => avx2 && avx512,
                // Also needs the kernel's grant of the tile state (and no
                // KILN_CPU_ISA cap): only the module itself can say.
                Path::Amx => avx2 && super::isa::chosen().amx,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Path::Portable
        }
    }
}

/// The kernel paths a test compared. [`Coverage::finish`] fails the test
/// when a path it expects and this CPU has did not run (a loop over an
/// empty list of instruction sets compares nothing and passes), and says
/// loudly, on stderr, which expected paths this CPU lacks: a test that
/// expects only paths this CPU lacks covers nothing and says so.
pub(super) struct Coverage {
    test: &'static str,
    ran: std::collections::BTreeSet<Path>,
}

impl Coverage {
    pub(super) fn new(test: &'static str) -> Self {
        Self {
            test,
            ran: Default::default(),
        }
    }

    /// Records that `path` was compared.
    pub(super) fn ran(&mut self, path: Path) {
        self.ran.insert(path);
    }

    /// Checks every path of `expected` ran where this CPU has it.
    #[track_caller]
    pub(super) fn finish(self, expected: &[Path]) {
        for &p in expected {
            if p.on_this_cpu() {
                assert!(
                    self.ran.contains(&p),
                    "{}: this CPU has {p:?}, but its kernels were not compared (ran: {:?})",
                    self.test,
                    self.ran
                );
            } else {
                let cap = if p == Path::Amx {
                    " (or KILN_CPU_ISA turns it off)"
                } else {
                    ""
                };
                eprintln!(
                    "SKIPPED: no {p:?} on this CPU{cap}: {} did not check those kernels",
                    self.test
                );
            }
        }
    }
}

/// [`Coverage`] fails a test whose loops skipped a path this CPU has.
#[test]
fn coverage_fails_when_a_path_this_cpu_has_did_not_run() {
    let mut cov = Coverage::new("demo");
    cov.ran(Path::Portable);
    cov.finish(&[Path::Portable]);
    for missing in [Path::Avx2, Path::Avx512] {
        let mut cov = Coverage::new("demo");
        cov.ran(Path::Portable);
        let r = std::panic::catch_unwind(move || cov.finish(&[Path::Portable, missing]));
        assert_eq!(r.is_err(), missing.on_this_cpu(), "{missing:?}");
    }
}

/// Every weight format the CPU backend computes with.
pub(super) use crate::quant::WEIGHT_FORMATS as ALL_FORMATS;

/// `values` encoded as rows of a float format (F32, F16 or BF16).
pub(super) fn float_weight_bytes(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Random ggml blocks with sane f16 scales (random bytes elsewhere).
pub(super) fn random_blocks(ty: GgmlType, blocks: usize, seed: u64) -> Vec<u8> {
    let (_, bb) = ty.block();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut scale = || half::f16::from_f32((next() % 1000) as f32 / 1000.0 - 0.3).to_le_bytes();
    let mut out = Vec::with_capacity(blocks * bb);
    for _ in 0..blocks {
        let start = out.len();
        out.extend((0..bb).map(|i| (seed as usize * 31 + start + i * 17) as u8 ^ 0x5a));
        for &o in ty.f16_fields() {
            out[start + o..start + o + 2].copy_from_slice(&scale());
        }
        if ty == GgmlType::MXFP4 {
            // Its scale is an E8M0 exponent: 2^-5 .. 2^0 (and now and then
            // 0, 2^-128, the smallest, to cover the subnormal scales).
            let r = scale()[0];
            out[start] = if r % 16 == 0 { 0 } else { 122 + r % 6 };
        }
    }
    out
}
