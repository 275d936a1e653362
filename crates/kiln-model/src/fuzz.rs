//! A small mutation fuzzer for the parsers of outside data, runnable as
//! ordinary tests on stable Rust with no extra dependencies.
//!
//! [`run`] feeds a parser mutated copies of valid seed inputs (bit flips,
//! interesting integers written over length and offset fields, inserted,
//! deleted, duplicated and truncated ranges, with offsets biased towards the
//! first kilobytes where headers live), catches panics, and reports the
//! first panicking input with the seed that reproduces it. [`random_json`]
//! builds JSON documents from a list of field names, for request bodies.
//!
//! `KILN_FUZZ_CASES` sets the number of cases per target (CI runs the
//! default; `FUZZING.md` records longer runs); `KILN_FUZZ_SEED` the seed;
//! `KILN_FUZZ_VERBOSE=1` prints each panic's backtrace as it happens.
//!
//! A test tool, not part of the library users get: compiled only with the
//! `test-support` feature, which every crate's `[dev-dependencies]` turns on.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// A SplitMix64 generator: tiny, seedable and good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Cases per target: `KILN_FUZZ_CASES`, else `default`.
pub fn cases(default: usize) -> usize {
    std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn base_seed() -> u64 {
    std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6b69_6c6e)
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    i64::MAX as u64,
    u64::MAX,
];

/// An offset into `len` bytes, usually in the first 4 KiB.
fn offset(rng: &mut Rng, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    if rng.one_in(2) {
        rng.below(len.min(4096))
    } else {
        rng.below(len)
    }
}

/// A mutated copy of `input`, at most `max_len` bytes long.
pub fn mutate(rng: &mut Rng, input: &[u8], max_len: usize) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(6) {
        let len = b.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = offset(rng, len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = offset(rng, len);
                b[i] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let i = offset(rng, len);
                b[i] = INTERESTING[rng.below(5)] as u8;
            }
            3 if len >= 8 => {
                let i = offset(rng, len - 7);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                if rng.one_in(2) {
                    b[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
                } else {
                    b[i..i + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            4 if len > 0 => {
                let i = offset(rng, len);
                let n = 1 + rng.below((len - i).min(64));
                b.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = offset(rng, len);
                let n = 1 + rng.below((len - i).min(64));
                let copy = b[i..i + n].to_vec();
                let at = offset(rng, len);
                b.splice(at..at, copy);
            }
            6 => {
                let at = offset(rng, len + 1).min(len);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                b.splice(at..at, bytes);
            }
            7 if len > 0 => {
                let at = rng.below(len);
                b.truncate(at);
            }
            _ => {
                // Swap two bytes.
                if len > 1 {
                    let (i, j) = (offset(rng, len), offset(rng, len));
                    b.swap(i, j);
                }
            }
        }
    }
    b.truncate(max_len);
    b
}

/// A random JSON value of at most `depth` levels, whose object keys come
/// mostly from `keys` (so that parsers meet their own fields with every type).
pub fn random_json(rng: &mut Rng, keys: &[&str], depth: usize) -> serde_json::Value {
    use serde_json::Value;
    let leaf = depth == 0 || rng.one_in(3);
    match rng.below(if leaf { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.one_in(2)),
        2 => match rng.below(4) {
            0 => Value::from(INTERESTING[rng.below(INTERESTING.len())]),
            1 => Value::from(-(rng.below(1000) as i64)),
            2 => serde_json::Number::from_f64(f64::from_bits(rng.next_u64()))
                .map_or(Value::Null, Value::Number),
            _ => Value::from(rng.below(100)),
        },
        3 | 4 => {
            let n = rng.below(12);
            let s: String = (0..n)
                .map(|_| match rng.below(6) {
                    0 => char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('\u{fffd}'),
                    1 => ['\n', '\0', '"', '\\', '{', '[', '日', '🙂'][rng.below(8)],
                    _ => (b'a' + rng.below(26) as u8) as char,
                })
                .collect();
            Value::String(s)
        }
        5 => Value::Array(
            (0..rng.below(5))
                .map(|_| random_json(rng, keys, depth - 1))
                .collect(),
        ),
        _ => {
            let mut map = serde_json::Map::new();
            for _ in 0..rng.below(6) {
                let key = if !keys.is_empty() && !rng.one_in(5) {
                    keys[rng.below(keys.len())].to_string()
                } else {
                    format!("k{}", rng.below(10))
                };
                map.insert(key, random_json(rng, keys, depth - 1));
            }
            Value::Object(map)
        }
    }
}

/// What a fuzz run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Inputs tried.
    pub cases: usize,
    /// Inputs the parser accepted (the rest it refused with an error).
    pub accepted: usize,
}

impl Report {
    /// The report, or an error when fewer than `min_share` of the cases
    /// were accepted. A run whose inputs are all refused at the first check
    /// (a magic number, a JSON syntax error) never reaches the code behind
    /// it, and "never panics" then says little.
    pub fn require_accepted(self, name: &str, min_share: f64) -> Result<Self, String> {
        let share = self.accepted as f64 / self.cases.max(1) as f64;
        if self.accepted == 0 || share < min_share {
            return Err(format!(
                "{name}: {} of {} cases accepted ({:.1}%, at least {:.1}% expected): \
                 the mutations no longer reach the success path",
                self.accepted,
                self.cases,
                100.0 * share,
                100.0 * min_share
            ));
        }
        Ok(self)
    }
}

/// `Ok` when `target` accepts every seed, else the first refused one: the
/// mutations of a refused seed start from a failure path and mostly test
/// the same early error. (A seed that panics is reported as refused too.)
pub fn check_seeds(
    name: &str,
    seeds: &[Vec<u8>],
    mut target: impl FnMut(&[u8]) -> bool,
) -> Result<(), String> {
    if seeds.is_empty() {
        return Err(format!("{name}: no seeds"));
    }
    for (i, seed) in seeds.iter().enumerate() {
        if !matches!(catch_unwind(AssertUnwindSafe(|| target(seed))), Ok(true)) {
            let shown = String::from_utf8_lossy(&seed[..seed.len().min(200)]).into_owned();
            return Err(format!(
                "{name}: seed {i} is refused (or panics) before any mutation: {shown:?}"
            ));
        }
    }
    Ok(())
}

/// Runs `target` on `cases` inputs made by `make` (given a generator and the
/// case number); `target` returns whether it accepted the input. A panic
/// fails the run with the input (its first bytes) and the seed of the case.
pub fn run_with(
    name: &str,
    cases: usize,
    mut make: impl FnMut(&mut Rng, usize) -> Vec<u8>,
    mut target: impl FnMut(&[u8]) -> bool,
) -> Result<Report, String> {
    let seed0 = base_seed();
    let mut accepted = 0;
    // Panics are reported below; `KILN_FUZZ_VERBOSE=1` keeps the usual
    // message and backtrace too.
    let hook = std::panic::take_hook();
    if std::env::var_os("KILN_FUZZ_VERBOSE").is_none() {
        std::panic::set_hook(Box::new(|_| {}));
    }
    let mut failure = None;
    for case in 0..cases {
        let seed = seed0 ^ (case as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = Rng::new(seed);
        let input = make(&mut rng, case);
        match catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(p) => {
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let shown = String::from_utf8_lossy(&input[..input.len().min(300)]).into_owned();
                failure = Some(format!(
                    "{name}: case {case} (KILN_FUZZ_SEED={seed0}) panicked: {what}\ninput ({} bytes): {shown:?}",
                    input.len()
                ));
                break;
            }
        }
    }
    std::panic::set_hook(hook);
    match failure {
        Some(f) => Err(f),
        None => Ok(Report { cases, accepted }),
    }
}

/// [`run_with`] on mutations of `seeds` (taken in turn), at most `max_len`
/// bytes, after [`check_seeds`]: an error when `target` refuses a seed.
pub fn run(
    name: &str,
    seeds: &[Vec<u8>],
    cases: usize,
    max_len: usize,
    mut target: impl FnMut(&[u8]) -> bool,
) -> Result<Report, String> {
    check_seeds(name, seeds, &mut target)?;
    run_with(
        name,
        cases,
        |rng, case| {
            let seed = &seeds[case % seeds.len().max(1)];
            if rng.one_in(50) {
                seed.clone()
            } else {
                mutate(rng, seed, max_len)
            }
        },
        target,
    )
}

/// The PyTorch checkpoint reader as a fuzz target: opens `bytes` and reads
/// every tensor it lists, whatever that returns; whether the file opened.
/// The fuzz run and the truncation and corruption tests of
/// `tests/torch_checkpoint.rs` share it, so both drive the same paths.
pub fn read_torch_checkpoint(bytes: Vec<u8>) -> bool {
    match crate::torch::TorchCheckpoint::from_bytes("fuzz.bin", bytes) {
        Ok(c) => {
            let names: Vec<String> = c.names().map(String::from).collect();
            for n in names {
                let _ = c.get(&n);
            }
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_target_is_reported_with_its_seed() {
        let r = run("demo", &[b"abc".to_vec()], 1000, 64, |b| {
            assert!(!b.starts_with(b"abcab"), "found it");
            true
        });
        let msg = r.unwrap_err();
        assert!(
            msg.contains("demo: case") && msg.contains("found it"),
            "{msg}"
        );
        let ok = run("fine", &[b"abc".to_vec()], 100, 64, |b| b.len() == 3).unwrap();
        assert_eq!(ok.cases, 100);
    }

    #[test]
    fn a_refused_seed_or_a_run_that_accepts_too_little_is_an_error() {
        let seeds = [b"good".to_vec(), b"bad".to_vec()];
        let e = run("seeds", &seeds, 10, 64, |b| b.starts_with(b"good")).unwrap_err();
        assert!(e.contains("seed 1 is refused"), "{e}");
        assert!(check_seeds("none", &[], |_| true).is_err());
        // Mutations of "abc" keep its length only now and then.
        let r = run("share", &[b"abc".to_vec()], 400, 64, |b| b.len() == 3).unwrap();
        assert!(r.accepted > 0 && r.accepted < r.cases, "{r:?}");
        assert!(r.require_accepted("share", 0.0001).is_ok());
        let e = r.require_accepted("share", 0.99).unwrap_err();
        assert!(e.contains("no longer reach the success path"), "{e}");
        let none = Report {
            cases: 5,
            accepted: 0,
        };
        assert!(none.require_accepted("none", 0.0).is_err());
    }
}
