//! The one choice of the instruction sets the CPU kernels use, made once
//! per process and asked by every kernel that has a vector path: the
//! matrix products, attention, the activation quantizer and the gated
//! activation.
//!
//! `KILN_CPU_ISA` caps the choice, for comparisons and tests: `portable`
//! (no vector code at all), `avx2`, `avxvnni`, `avx512vnni` (everything
//! below AMX), `amx` or unset (everything this CPU has). Every path
//! honours it, so a run capped to `portable` computes with the portable
//! reference code throughout.

use std::sync::OnceLock;

/// The vector instruction sets the x86 kernels are built for, best last.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX2 plus the VEX-encoded `vpdpbusd` (AVX-VNNI).
    AvxVnni,
    /// AVX2 plus AVX512-VNNI's `vpdpbusd` on 256-bit registers (AVX512VL).
    Avx512Vnni,
}

#[cfg(target_arch = "x86_64")]
impl Isa {
    /// Whether this CPU has the set (the hardware, whatever the cap).
    fn supported(self) -> bool {
        use std::arch::is_x86_feature_detected as has;
        let base = has!("avx2") && has!("fma") && has!("f16c");
        base && match self {
            Isa::Avx2 => true,
            Isa::AvxVnni => has!("avxvnni"),
            Isa::Avx512Vnni => {
                has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni")
            }
        }
    }

    /// Every instruction set this CPU runs, whatever `KILN_CPU_ISA` caps
    /// the kernels' choice to: for tests that call each kernel directly.
    pub fn all_supported() -> Vec<Isa> {
        [Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }
}

/// What the kernels may use: the hardware's features under the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Choice {
    /// The vector set of the matrix products and attention, or `None`:
    /// then the portable code runs.
    #[cfg(target_arch = "x86_64")]
    pub simd: Option<Isa>,
    /// AVX-512 F and BW for the activation quantizer (allowed where the
    /// cap admits AVX512-VNNI).
    pub avx512: bool,
    /// AMX-TILE and AMX-INT8 tiles for the block formats' prompt path,
    /// with the tile state granted to this process.
    pub amx: bool,
    /// AMX-BF16 too, for F16 and BF16 weights (when asked for, see
    /// `arch::x86::amx_float::serves`).
    pub amx_bf16: bool,
}

impl Choice {
    /// Whether any vector code may run (AVX2 at least): the gated
    /// activation's vector loop, for one.
    pub fn vector(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.simd.is_some()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// The cap `KILN_CPU_ISA` sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cap {
    Portable,
    Avx2,
    AvxVnni,
    Avx512Vnni,
    All,
}

impl Cap {
    /// `KILN_CPU_ISA`'s value (unset and unknown values cap nothing, as
    /// they always did).
    fn parse(v: Option<&str>) -> Cap {
        match v {
            Some("portable") => Cap::Portable,
            Some("avx2") => Cap::Avx2,
            Some("avxvnni") => Cap::AvxVnni,
            None | Some("amx") => Cap::All,
            Some(_) => Cap::Avx512Vnni,
        }
    }
}

/// The kernels' choice for this process: decided once, from this CPU's
/// features and `KILN_CPU_ISA`.
pub(crate) fn chosen() -> Choice {
    static CHOICE: OnceLock<Choice> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let choice = decide(Cap::parse(std::env::var("KILN_CPU_ISA").ok().as_deref()));
        tracing::debug!("CPU kernels: {choice:?}");
        choice
    })
}

/// The choice under `cap`.
fn decide(cap: Cap) -> Choice {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let simd = if cap == Cap::Portable {
            None
        } else {
            let top = match cap {
                Cap::Avx2 => Isa::Avx2,
                Cap::AvxVnni => Isa::AvxVnni,
                _ => Isa::Avx512Vnni,
            };
            Isa::all_supported().into_iter().filter(|&i| i <= top).max()
        };
        let avx512 = cap >= Cap::Avx512Vnni && has!("avx512f") && has!("avx512bw");
        let amx = cap == Cap::All && amx_granted();
        // CPUID leaf 7: EDX bit 22 is AMX-BF16.
        let amx_bf16 = amx && (std::arch::x86_64::__cpuid_count(7, 0).edx >> 22) & 1 == 1;
        Choice {
            simd,
            avx512,
            amx,
            amx_bf16,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = cap;
        Choice {
            avx512: false,
            amx: false,
            amx_bf16: false,
        }
    }
}

/// Whether the CPU has AMX-TILE and AMX-INT8 (and the AVX-512 the AMX
/// epilogue uses), and Linux granted this process the tile state.
#[cfg(target_arch = "x86_64")]
fn amx_granted() -> bool {
    /// Linux's `arch_prctl` request for permission to use an extended
    /// state component, and the component of AMX tile data.
    const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;
    use std::arch::is_x86_feature_detected as has;
    if !(has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni")) {
        return false;
    }
    // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8 (leaf 7
    // exists: AVX-512 is reported there).
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if (leaf.edx >> 24) & 3 != 3 {
        return false;
    }
    // SAFETY: a plain system call with integer arguments; it fails
    // (harmlessly) on kernels without AMX support.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    } == 0;
    if granted {
        tracing::debug!("CPU kernels: AMX tiles for the block formats' prompt path");
    }
    granted
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cap's values keep the meanings they had when each path read
    /// `KILN_CPU_ISA` itself: AMX only when unset or `amx`, AVX-512 for
    /// every value but the three lower caps.
    #[test]
    fn caps_parse_as_before() {
        assert_eq!(Cap::parse(None), Cap::All);
        assert_eq!(Cap::parse(Some("amx")), Cap::All);
        assert_eq!(Cap::parse(Some("avx512vnni")), Cap::Avx512Vnni);
        assert_eq!(Cap::parse(Some("avx2")), Cap::Avx2);
        assert_eq!(Cap::parse(Some("avxvnni")), Cap::AvxVnni);
        assert_eq!(Cap::parse(Some("portable")), Cap::Portable);
        let portable = decide(Cap::Portable);
        assert!(!portable.vector() && !portable.avx512 && !portable.amx && !portable.amx_bf16);
        let avx2 = decide(Cap::Avx2);
        assert!(!avx2.avx512 && !avx2.amx);
        #[cfg(target_arch = "x86_64")]
        assert!(avx2.simd <= Some(Isa::Avx2));
    }
}
