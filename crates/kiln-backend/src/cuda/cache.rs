//! The on-disk cache of compiled kernels, so that NVRTC runs once per
//! (source, architecture, compiler) and a second start compiles nothing.
//!
//! An entry's key is everything that changes the compiled code: the SHA-256
//! of the full source (preludes included) and of the compile options, the
//! target architecture and output kind, and NVRTC's version. Its file name
//! is derived from the key, so a changed source or a new compiler simply
//! misses and writes a new entry. Each file carries a header with a
//! checksum of its payload: a truncated or corrupted entry is detected,
//! removed and compiled again, never handed to the driver.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What NVRTC is asked to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Output {
    /// PTX for a virtual architecture (`compute_90`): portable text the driver finishes.
    Ptx,
    /// Machine code for a real architecture (`sm_90`): loads without JIT.
    Cubin,
}

impl Output {
    fn extension(self) -> &'static str {
        match self {
            Output::Ptx => "ptx",
            Output::Cubin => "cubin",
        }
    }
}

/// A GPU architecture as a compute capability (`sm_90` is 9.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl Arch {
    /// The capability `major.minor`.
    pub fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// NVRTC's `--gpu-architecture` value for `output`: `compute_90` for PTX, `sm_90` for a cubin.
    pub fn nvrtc_name(&self, output: Output) -> String {
        let prefix = match output {
            Output::Ptx => "compute",
            Output::Cubin => "sm",
        };
        format!("{prefix}_{}{}", self.major, self.minor)
    }

    /// Parses `sm_90`, `compute_80`, `90` or `9.0`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let digits = s
            .strip_prefix("sm_")
            .or_else(|| s.strip_prefix("compute_"))
            .unwrap_or(s);
        if let Some((a, b)) = digits.split_once('.') {
            return Some(Self::new(a.parse().ok()?, b.parse().ok()?));
        }
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (a, b) = digits.split_at(digits.len() - 1);
        Some(Self::new(a.parse().ok()?, b.parse().ok()?))
    }
}

/// Everything that determines one compiled kernel unit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The unit's name (for a readable file name; the hash decides).
    pub unit: String,
    /// Hex SHA-256 of the source and the compile options.
    pub digest: String,
    pub arch: Arch,
    pub output: Output,
    /// NVRTC's (major, minor) version.
    pub nvrtc: (u32, u32),
}

impl CacheKey {
    /// The key of compiling `source` with `options` for `arch` with NVRTC `nvrtc`.
    pub fn new(
        unit: &str,
        source: &str,
        options: &[String],
        arch: Arch,
        output: Output,
        nvrtc: (u32, u32),
    ) -> Self {
        let mut h = Sha256::new();
        // Lengths first, so that no two (source, options) lists hash alike by concatenation.
        h.update((source.len() as u64).to_le_bytes());
        h.update(source.as_bytes());
        for o in options {
            h.update((o.len() as u64).to_le_bytes());
            h.update(o.as_bytes());
        }
        let digest = h
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        Self {
            unit: unit.to_string(),
            digest,
            arch,
            output,
            nvrtc,
        }
    }

    /// The entry's file name: `norm-sm_90-nvrtc13.0-<hash>.cubin`.
    pub fn file_name(&self) -> String {
        format!(
            "{}-{}-nvrtc{}.{}-{}.{}",
            self.unit,
            self.arch.nvrtc_name(self.output),
            self.nvrtc.0,
            self.nvrtc.1,
            &self.digest[..24],
            self.output.extension()
        )
    }
}

/// Magic bytes at the start of every entry (format version 1).
const MAGIC: &[u8; 8] = b"KILNKC1\n";
/// Header: magic, payload length (u64 LE), payload SHA-256.
const HEADER: usize = 8 + 8 + 32;
/// The largest entry read back; compiled kernels are a few MiB at most.
pub const MAX_ENTRY_BYTES: u64 = 256 << 20;

/// How a lookup went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The entry was there and intact.
    Hit,
    /// No entry: compiled and stored.
    Compiled,
    /// An entry was there but damaged: removed, compiled and stored again.
    Replaced,
}

/// Errors of the cache itself (not of compiling).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("kernel cache {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A directory of compiled kernels.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    /// A cache in `dir` (created when the first entry is written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `$KILN_CACHE/kernels`, else `$XDG_CACHE_HOME/kiln/kernels`, else
    /// `~/.cache/kiln/kernels` (kiln's cache directory rule).
    pub fn default_dir() -> PathBuf {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let base = var("KILN_CACHE")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("kiln")))
            .or_else(|| var("HOME").map(|h| h.join(".cache/kiln")))
            .unwrap_or_else(|| PathBuf::from(".kiln-cache"));
        base.join("kernels")
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `key`'s entry lives.
    pub fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// The payload stored under `key`: `Ok(None)` when absent, `Err` with
    /// the reason when present but unreadable or damaged.
    pub fn read(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, String> {
        let path = self.path(key);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len > MAX_ENTRY_BYTES {
            return Err(format!(
                "{len} bytes, more than the {MAX_ENTRY_BYTES} allowed"
            ));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(MAX_ENTRY_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| e.to_string())?;
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err("not a kiln kernel cache entry".into());
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&bytes[8..16]);
        let n = u64::from_le_bytes(n);
        let payload = &bytes[HEADER..];
        if payload.len() as u64 != n {
            return Err(format!("{} payload bytes, header says {n}", payload.len()));
        }
        if Sha256::digest(payload).as_slice() != &bytes[16..HEADER] {
            return Err("checksum mismatch".into());
        }
        Ok(Some(payload.to_vec()))
    }

    /// Stores `payload` under `key`, atomically: written to a temporary file
    /// in the same directory, then renamed, so a reader never sees half an entry.
    pub fn write(&self, key: &CacheKey, payload: &[u8]) -> Result<(), CacheError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let path = self.path(key);
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", key.file_name(), std::process::id()));
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        header.extend_from_slice(&Sha256::digest(payload));
        f.write_all(&header)
            .and_then(|()| f.write_all(payload))
            .and_then(|()| f.sync_all())
            .map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(&path)(e)
        })
    }

    /// The entry for `key`, compiling and storing it when it is missing or
    /// damaged. A cache that cannot be written is logged and the compiled
    /// code used anyway (the next start compiles again).
    pub fn get_or_compile<E>(
        &self,
        key: &CacheKey,
        compile: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<(Vec<u8>, Lookup), E> {
        let outcome = match self.read(key) {
            Ok(Some(bytes)) => return Ok((bytes, Lookup::Hit)),
            Ok(None) => Lookup::Compiled,
            Err(why) => {
                let path = self.path(key);
                tracing::warn!(
                    "kernel cache entry {} is damaged ({why}); compiling again",
                    path.display()
                );
                let _ = fs::remove_file(&path);
                Lookup::Replaced
            }
        };
        let bytes = compile()?;
        if let Err(e) = self.write(key, &bytes) {
            tracing::warn!("{e}; the kernels will be compiled again at the next start");
        }
        Ok((bytes, outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(source: &str) -> CacheKey {
        CacheKey::new(
            "norm",
            source,
            &["-std=c++17".into()],
            Arch::new(9, 0),
            Output::Cubin,
            (13, 0),
        )
    }

    #[test]
    fn the_key_changes_with_every_input_and_only_then() {
        let base = key("kernel a");
        assert_eq!(base, key("kernel a"));
        assert_eq!(base.digest.len(), 64);
        let variants = [
            key("kernel b"),
            CacheKey::new(
                "norm",
                "kernel a",
                &[],
                Arch::new(9, 0),
                Output::Cubin,
                (13, 0),
            ),
            CacheKey::new(
                "norm",
                "kernel a",
                &["-std=c++17".into()],
                Arch::new(8, 0),
                Output::Cubin,
                (13, 0),
            ),
            CacheKey::new(
                "norm",
                "kernel a",
                &["-std=c++17".into()],
                Arch::new(9, 0),
                Output::Ptx,
                (13, 0),
            ),
            CacheKey::new(
                "norm",
                "kernel a",
                &["-std=c++17".into()],
                Arch::new(9, 0),
                Output::Cubin,
                (13, 1),
            ),
        ];
        for v in &variants {
            assert_ne!(v.file_name(), base.file_name(), "{v:?}");
        }
        // Moving text between the source and the options is a different key.
        let a = CacheKey::new(
            "u",
            "ab",
            &["c".into()],
            Arch::new(9, 0),
            Output::Ptx,
            (13, 0),
        );
        let b = CacheKey::new(
            "u",
            "a",
            &["bc".into()],
            Arch::new(9, 0),
            Output::Ptx,
            (13, 0),
        );
        assert_ne!(a.digest, b.digest);
        assert!(
            base.file_name().starts_with("norm-sm_90-nvrtc13.0-"),
            "{}",
            base.file_name()
        );
        assert!(base.file_name().ends_with(".cubin"));
    }

    #[test]
    fn arch_names_parse_and_print() {
        for s in ["sm_90", "compute_90", "90", "9.0"] {
            assert_eq!(Arch::parse(s), Some(Arch::new(9, 0)), "{s}");
        }
        assert_eq!(Arch::parse("sm_100"), Some(Arch::new(10, 0)));
        assert_eq!(Arch::parse("sm_86"), Some(Arch::new(8, 6)));
        for bad in ["", "sm_", "9", "sm_9x", "x.0"] {
            assert_eq!(Arch::parse(bad), None, "{bad}");
        }
        assert_eq!(Arch::new(8, 0).nvrtc_name(Output::Ptx), "compute_80");
        assert_eq!(Arch::new(9, 0).nvrtc_name(Output::Cubin), "sm_90");
    }

    #[test]
    fn a_second_lookup_compiles_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = KernelCache::new(dir.path().join("kernels"));
        let k = key("src");
        let compiled = std::cell::Cell::new(0);
        let compile = || -> Result<Vec<u8>, String> {
            compiled.set(compiled.get() + 1);
            Ok(b"\x7fELF fake cubin".to_vec())
        };
        let (first, how) = cache.get_or_compile(&k, compile).expect("first");
        assert_eq!(how, Lookup::Compiled);
        let (second, how) = cache.get_or_compile(&k, compile).expect("second");
        assert_eq!(how, Lookup::Hit);
        assert_eq!(first, second);
        assert_eq!(compiled.get(), 1);
        // Another architecture is another entry.
        let other = CacheKey {
            arch: Arch::new(8, 0),
            ..k.clone()
        };
        let (_, how) = cache.get_or_compile(&other, compile).expect("other");
        assert_eq!(how, Lookup::Compiled);
        assert_eq!(compiled.get(), 2);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(cache.dir())
            .expect("dir")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn damaged_entries_are_detected_and_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = KernelCache::new(dir.path());
        let k = key("src");
        let payload = b"compiled code".to_vec();
        cache.write(&k, &payload).expect("write");
        assert_eq!(cache.read(&k).expect("read"), Some(payload.clone()));
        let path = cache.path(&k);
        let good = fs::read(&path).expect("bytes");

        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let damages: [(&str, Vec<u8>); 4] = [
            ("flipped byte", flipped),
            ("truncated", good[..good.len() - 3].to_vec()),
            ("short header", good[..10].to_vec()),
            (
                "foreign file",
                b"not a cache entry at all, but long enough for a header".to_vec(),
            ),
        ];
        for (what, bytes) in damages {
            fs::write(&path, &bytes).expect("damage");
            assert!(cache.read(&k).is_err(), "{what} read as intact");
            let (got, how) = cache
                .get_or_compile(&k, || Ok::<_, String>(payload.clone()))
                .expect("recompile");
            assert_eq!(
                (got.as_slice(), how),
                (payload.as_slice(), Lookup::Replaced),
                "{what}"
            );
            assert_eq!(
                cache.read(&k).expect("read"),
                Some(payload.clone()),
                "{what}"
            );
        }
        // A compile error is returned and leaves no entry.
        let k2 = key("broken");
        let err = cache.get_or_compile(&k2, || Err::<Vec<u8>, _>("syntax error".to_string()));
        assert_eq!(err.expect_err("fails"), "syntax error");
        assert_eq!(cache.read(&k2).expect("read"), None);
    }
}
