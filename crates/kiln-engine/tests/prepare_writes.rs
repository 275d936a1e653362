//! What a first start (a conversion into the prepared-model cache) writes
//! to disk, from the kernel's count for this process (`write_bytes` of
//! `/proc/self/io`: bytes it made dirty in the page cache, bound for the
//! storage layer): on the CPU the entry is packed (each converted matrix
//! streamed once, straight to its place in the entry's layout file; the
//! GGUF file holds only the rest), so the bytes written are at most 1.1x the
//! entry's size, where writing the model as a GGUF file and again as a
//! layout file wrote three times it (spool, GGUF, layout). A cache hit
//! writes none of the weights.
//!
//! One `#[test]` only: the count is the whole process's.

use std::path::Path;

use kiln_backend::{Backend, Device, GgmlType};
use kiln_engine::load::{load, LoadReport};
use kiln_engine::{LoadSpec, ModelLocation};
use kiln_model::fixtures::{self, TinySpec};
use kiln_model::LoadOptions;
use kiln_sources::DownloadDir;

/// `write_bytes` of `/proc/self/io`, where the kernel counts it.
fn write_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/io").ok()?;
    let line = text.lines().find(|l| l.starts_with("write_bytes:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn start(model: &Path, opts: &LoadOptions, cache: &Path) -> LoadReport {
    let spec = LoadSpec {
        downloads: DownloadDir::new(cache.to_path_buf()),
        layout_cache: true,
        ..LoadSpec::new(
            ModelLocation::Local(model.to_path_buf()),
            Device::Cpu,
            opts.clone(),
        )
    };
    match load(&spec) {
        Ok(l) => l.report,
        Err(e) => panic!("{}: {e}", model.display()),
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("ls")
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.metadata().expect("stat").len())
        .sum()
}

#[test]
fn a_first_start_writes_the_entry_once() {
    if kiln_backend::cpu::CpuBackend::new()
        .weight_layout()
        .is_none()
    {
        return; // KILN_CPU_REPACK=0: nothing is packed.
    }
    // On disk (not tmpfs), where the kernel counts page-cache writes.
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kiln-prepare-writes-{}", std::process::id()));
    let model = root.join("src");
    let spec = TinySpec {
        hidden: 256,
        layers: 6,
        heads: 4,
        kv_heads: 4,
        ffn: 1024,
        max_positions: 64,
        tied: false,
    };
    fixtures::write_tiny_llama_hf(&model, &spec, 3).expect("fixture");
    let q8 = LoadOptions {
        quantize: Some(GgmlType::Q8_0),
        ..LoadOptions::default()
    };
    let cache = root.join("cache");
    let Some(before) = write_bytes() else {
        return; // no per-process I/O accounting on this kernel
    };
    let report = start(&model, &q8, &cache);
    let written = write_bytes().unwrap_or(0) - before;
    let LoadReport::Converted { file, bytes, .. } = report else {
        panic!("the first start did not convert: {report:?}")
    };
    let entry = file.parent().expect("entry dir");
    let on_disk = dir_bytes(entry);
    assert_eq!(bytes, on_disk, "the report counts both files");
    eprintln!(
        "first start: wrote {written} bytes for an entry of {on_disk} ({:.3}x)",
        written as f64 / on_disk as f64
    );
    if written == 0 {
        let _ = std::fs::remove_dir_all(&root);
        return; // a file system the kernel does not count (tmpfs)
    }
    assert!(
        written as f64 <= on_disk as f64 * 1.1,
        "the first start wrote {written} bytes for an entry of {on_disk}"
    );

    let before = write_bytes().unwrap_or(0);
    let report = start(&model, &q8, &cache);
    let written = write_bytes().unwrap_or(0) - before;
    assert!(
        matches!(report, LoadReport::Mapped { .. }),
        "second start: {report:?}"
    );
    assert!(
        written < on_disk / 20,
        "a cache hit wrote {written} bytes (the entry is {on_disk})"
    );
    let _ = std::fs::remove_dir_all(&root);
}
