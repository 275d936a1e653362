//! What the model source tests share: a real S3 server, a proxy that can
//! hold or cut a download, a stand-in for the Hugging Face Hub, and the tiny
//! test model's files.

#![allow(dead_code)]

pub mod hub;
pub mod proxy;
pub mod s3;

use std::path::{Path, PathBuf};

/// The tiny random-weight llama the tests serve (`testdata/tiny/llama`).
pub fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny/llama")
}

/// The files of the tiny model that kiln needs (its `golden.json` is not one).
pub const TINY_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
];

/// The tiny model's files by name, with `extra` files kiln must not fetch.
pub fn tiny_files() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = TINY_FILES
        .iter()
        .map(|n| {
            let bytes = std::fs::read(tiny_dir().join(n)).expect("read the tiny model");
            (n.to_string(), bytes)
        })
        .collect();
    let golden = std::fs::read(tiny_dir().join("golden.json")).expect("golden.json");
    out.push(("golden.json".into(), golden));
    out.push(("README.md".into(), b"# tiny\n".to_vec()));
    out
}

/// Bytes of the files kiln needs, in all.
pub fn tiny_bytes() -> u64 {
    TINY_FILES
        .iter()
        .map(|n| std::fs::metadata(tiny_dir().join(n)).expect("stat").len())
        .sum()
}

/// The complete entries of a download cache (directories named by key alone).
pub fn complete_entries(cache: &Path) -> Vec<PathBuf> {
    dir_entries(&cache.join("download"))
        .into_iter()
        .filter(|p| p.is_dir() && p.extension().is_none())
        .collect()
}

/// The in-progress (`.partial`) directories of a download cache.
pub fn partial_entries(cache: &Path) -> Vec<PathBuf> {
    dir_entries(&cache.join("download"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "partial"))
        .collect()
}

/// The size of a partial `model.safetensors` in any `.partial` directory.
pub fn partial_weights(cache: &Path) -> Option<u64> {
    partial_entries(cache)
        .iter()
        .filter_map(|d| std::fs::metadata(d.join("model.safetensors.part")).ok())
        .map(|m| m.len())
        .max()
}

pub fn dir_entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Asserts that `entry` holds exactly the tiny model's needed files, byte
/// for byte, and its manifest.
pub fn assert_tiny_entry(entry: &Path) {
    for n in TINY_FILES {
        let want = std::fs::read(tiny_dir().join(n)).expect("source file");
        let got = std::fs::read(entry.join(n)).unwrap_or_else(|e| panic!("{n} in the cache: {e}"));
        assert!(
            got == want,
            "{n} in {} differs from the source",
            entry.display()
        );
    }
    let mut names: Vec<String> = dir_entries(entry)
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(String::from))
        .collect();
    names.sort();
    let mut want: Vec<String> = TINY_FILES.iter().map(|s| s.to_string()).collect();
    want.push(".kiln-source.json".into());
    want.sort();
    assert_eq!(
        names, want,
        "the entry holds the model's files and nothing else"
    );
}
