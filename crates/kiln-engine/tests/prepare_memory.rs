//! What a first start (conversion into the prepared-model cache) and a
//! later start (a cache hit) hold in memory, counted by this binary's global
//! allocator: a first start streams every tensor into the prepared file and
//! the weight-layout file as it is made, so its peak heap does not grow with
//! the model; a cache hit maps both files, so it copies no weight at all.
//! Two models that differ only in their number of layers (2 and 8) show
//! both: the extra six layers are megabytes of weights, and neither peak
//! may grow by more than a fraction of one layer.
//!
//! One `#[test]` only: the allocator counts every thread of the process, so
//! nothing else may run beside the loads measured.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_backend::{Backend, Device, GgmlType};
use kiln_engine::load::{load, LoadReport};
use kiln_engine::{LoadSpec, ModelLocation};
use kiln_model::fixtures::{self, TinySpec};
use kiln_model::LoadOptions;
use kiln_sources::DownloadDir;

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The heap's peak above its level at the start, while `f` runs, and `f`'s
/// result (dropped after measuring, so what it holds counts).
fn peak_during<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let base = NOW.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (PEAK.load(Ordering::Relaxed).saturating_sub(base), out)
}

fn spec(layers: usize) -> TinySpec {
    TinySpec {
        hidden: 256,
        layers,
        heads: 4,
        kv_heads: 4,
        ffn: 1024,
        max_positions: 64,
        tied: false,
    }
}

/// Loads `model` with `opts` through a prepared-model cache at `cache`;
/// the heap's peak during the load and how it loaded.
fn measured(model: &Path, opts: &LoadOptions, cache: &Path) -> (usize, LoadReport) {
    let spec = LoadSpec {
        downloads: DownloadDir::new(cache.to_path_buf()),
        layout_cache: true,
        ..LoadSpec::new(
            ModelLocation::Local(model.to_path_buf()),
            Device::Cpu,
            opts.clone(),
        )
    };
    let (peak, loaded) = peak_during(|| load(&spec).map(|l| l.report));
    match loaded {
        Ok(report) => (peak, report),
        Err(e) => panic!("{}: {e}", model.display()),
    }
}

/// Every `weights.layout` file under `dir`.
fn layout_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(layout_files(&p));
            } else if p.file_name().is_some_and(|n| n == "weights.layout") {
                out.push(p);
            }
        }
    }
    out
}

struct Peaks {
    first: usize,
    hit: usize,
}

/// A first start and a cache hit of the model at `model`, in a cache of
/// its own.
fn starts(model: &Path, opts: &LoadOptions, converts: bool) -> Peaks {
    let cache = model.with_extension("cache");
    let (first, report) = measured(model, opts, &cache);
    assert_eq!(
        matches!(report, LoadReport::Converted { .. }),
        converts,
        "{}: first start {report:?}",
        model.display()
    );
    assert_eq!(
        layout_files(&cache).len(),
        1,
        "{}: the first start stored the weight layout",
        model.display()
    );
    let (hit, report) = measured(model, opts, &cache);
    assert_eq!(
        matches!(report, LoadReport::Mapped { .. }),
        converts,
        "{}: second start {report:?}",
        model.display()
    );
    Peaks { first, hit }
}

#[test]
fn a_first_start_streams_and_a_hit_copies_no_weight_whatever_the_model_size() {
    if kiln_backend::cpu::CpuBackend::new()
        .weight_layout()
        .is_none()
    {
        return; // KILN_CPU_REPACK=0: no layout to store.
    }
    let root = std::env::temp_dir().join(format!("kiln-prepare-memory-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("tmp");
    // Six layers of 256 x 256 (four) and 256 x 1024 (three) matrices: 6.3
    // million weights, 6.7 MB in q8_0.
    let six_layers_q8 = 6 * (4 * 256 * 256 + 3 * 256 * 1024) / 32 * 34;

    // A 32-bit checkpoint quantized while loading (`option.quantize`).
    let q8 = LoadOptions {
        quantize: Some(GgmlType::Q8_0),
        ..LoadOptions::default()
    };
    let mut hf = Vec::new();
    for layers in [2, 8] {
        let dir = root.join(format!("hf{layers}"));
        fixtures::write_tiny_llama_hf(&dir, &spec(layers), 7).expect("fixture");
        hf.push(starts(&dir, &q8, true));
    }
    // A GGUF already in a block format, served as it is: rearranged once
    // into the layout cache, mapped by later starts.
    let mut gguf = Vec::new();
    for layers in [2, 8] {
        let file = root.join(format!("q8-{layers}.gguf"));
        let bytes = fixtures::tiny_llama_gguf_in_format(&spec(layers), 7, GgmlType::Q8_0, false);
        std::fs::write(&file, bytes).expect("fixture");
        gguf.push(starts(&file, &LoadOptions::default(), false));
    }
    let _ = std::fs::remove_dir_all(&root);

    eprintln!(
        "peak heap, 2 and 8 layers: converting {} / {}, hit {} / {}; \
         GGUF first {} / {}, hit {} / {}; six layers are {six_layers_q8} bytes in q8_0",
        hf[0].first,
        hf[1].first,
        hf[0].hit,
        hf[1].hit,
        gguf[0].first,
        gguf[1].first,
        gguf[0].hit,
        gguf[1].hit
    );
    // Held while converting: the tensor in flight (its quantized bytes and
    // its rearranged copy), whatever the number of layers. A tenth of what
    // six layers weigh leaves room for allocator noise, never a held layer.
    let slack = six_layers_q8 / 10;
    for (what, p) in [("converting", &hf), ("rearranging a GGUF", &gguf)] {
        assert!(
            p[1].first < p[0].first + slack,
            "{what}: the peak heap grew from {} to {} bytes with six more layers",
            p[0].first,
            p[1].first
        );
        assert!(
            p[1].hit < p[0].hit + slack,
            "{what}, then a cache hit: the peak heap grew from {} to {} bytes with six more layers",
            p[0].hit,
            p[1].hit
        );
        // A hit copies no matrix: its whole heap (tokenizer, config, norms)
        // is less than one layer's matrices.
        assert!(
            p[1].hit < six_layers_q8 / 6,
            "{what}, then a cache hit: {} bytes of heap",
            p[1].hit
        );
    }
}
