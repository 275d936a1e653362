//! Weights in the CPU backend's layout, stored once and mapped afterwards
//! (`kiln_model::layouts`): the default model loaded from a layout file
//! gives the same logits, bit for bit, and the same greedy tokens as the
//! model rearranged at load, with every matrix taken from the file; a file
//! that is truncated, of another key or layout, or whose index no longer
//! matches the model is refused or reported stale, and the answers stay
//! the same.

use std::path::{Path, PathBuf};

use kiln_backend::cpu::CpuBackend;
use kiln_backend::{Backend, StepInput};
use kiln_model::layouts::{LayoutFile, LayoutRecorder, Layouts};
use kiln_model::{fixtures, load_with, LoadOptions, LoadedModel};

const KEY: &str = "00112233445566778899aabbccddeeff";

fn default_model() -> PathBuf {
    kiln_model::default_model::default_model_path()
        .unwrap_or_else(|e| panic!("{e} (scripts/fetch-assets.sh fetches it)"))
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        assert!(v.is_finite(), "logit {i} is {v}");
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

/// Every prompt position's logits, then 8 greedy tokens.
fn run(m: &LoadedModel<CpuBackend>) -> (Vec<f32>, Vec<u32>) {
    let prompt = m
        .tokenizer
        .encode("The capital of France is", true)
        .expect("encode");
    let be = CpuBackend::new();
    let (all, mut kv) = fixtures::prefill(&be, &m.decoder, &prompt, 8).expect("prefill");
    let vocab = m.decoder.config().vocab_size;
    assert_eq!(all.len(), prompt.len() * vocab);
    let mut next = argmax(&all[all.len() - vocab..]);
    let mut out = vec![next];
    for pos in prompt.len()..prompt.len() + 7 {
        let step = StepInput::single_sequence(pos, &[next], fixtures::TEST_BLOCK_SIZE);
        next = argmax(&m.decoder.forward(&be, &mut kv, &step).expect("decode"));
        out.push(next);
    }
    (all, out)
}

fn assert_same_bits(got: &(Vec<f32>, Vec<u32>), want: &(Vec<f32>, Vec<u32>), what: &str) {
    assert_eq!(got.0.len(), want.0.len(), "{what}: logit count");
    for (i, (a, b)) in got.0.iter().zip(&want.0).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: logit {i}: {a} vs {b}");
    }
    assert_eq!(got.1, want.1, "{what}: greedy tokens");
}

/// Loads the default model rearranging every matrix, and writes what the
/// backend made to `file`; returns the model's answers and the count of
/// matrices written.
fn record(file: &Path) -> ((Vec<f32>, Vec<u32>), usize) {
    let be = CpuBackend::new();
    let layout = be.weight_layout().expect("the CPU backend has a layout");
    let rec = Layouts::Record(LayoutRecorder::default());
    let m = load_with(&be, &default_model(), &LoadOptions::default(), &rec).expect("load");
    let Layouts::Record(r) = &rec else {
        unreachable!()
    };
    let size = r.write(file, layout, KEY).expect("write");
    assert_eq!(size, std::fs::metadata(file).expect("stat").len());
    (run(&m), r.len())
}

/// Every matrix of at least 2 MiB in the layout file at `path` starts on a
/// 2 MiB boundary of the file (so the page cache can hold it in 2 MiB
/// folios), the smaller ones on a 64-byte one, and the file has matrices
/// of both kinds (the default model's output head is 30 MB, its other
/// matrices under 2 MiB).
fn assert_huge_matrices_on_huge_page_boundaries(path: &Path) {
    const HUGE: u64 = 2 << 20;
    let bytes = std::fs::read(path).expect("read");
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let (index_at, index_len) = (word(16) as usize, word(24) as usize);
    let index: serde_json::Value =
        serde_json::from_slice(&bytes[index_at..index_at + index_len]).expect("index");
    let entries = index["entries"].as_array().expect("entries");
    let (mut huge, mut small) = (0, 0);
    for e in entries {
        let (offset, len) = (
            e["offset"].as_u64().expect("offset"),
            e["len"].as_u64().expect("len"),
        );
        if len >= HUGE {
            assert_eq!(offset % HUGE, 0, "{e}: a matrix of {len} bytes at {offset}");
            huge += 1;
        } else {
            assert_eq!(offset % 64, 0, "{e}");
            small += 1;
        }
    }
    assert!(
        huge > 0 && small > 0,
        "{huge} matrices of 2 MiB or more, {small} smaller"
    );
}

/// Loads the default model with the layout file at `path` mapped; returns
/// its answers and what [`Layouts::finish`] said.
fn mapped(path: &Path) -> ((Vec<f32>, Vec<u32>), Result<(), String>) {
    let be = CpuBackend::new();
    let file = LayoutFile::open(path, be.weight_layout().expect("layout"), KEY).expect("open");
    let layouts = Layouts::Mapped(file);
    let m = load_with(&be, &default_model(), &LoadOptions::default(), &layouts).expect("load");
    (run(&m), layouts.finish())
}

#[test]
fn the_default_model_from_a_layout_file_answers_bit_for_bit_as_rearranged() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("weights.layout");
    let (rearranged, written) = record(&path);
    // Every matrix of the decoder: 7 per layer of 30, and the embedding
    // (the output projection is tied to it).
    assert_eq!(written, 30 * 7 + 1);
    let be = CpuBackend::new();
    let layout = be.weight_layout().expect("layout");
    let file = LayoutFile::open(&path, layout, KEY).expect("open");
    assert_eq!(file.len(), written);
    let (from_file, finished) = mapped(&path);
    assert_eq!(finished, Ok(()), "every matrix came from the file");
    assert_same_bits(&from_file, &rearranged, "mapped");

    // And the same as a plain load, which never saw a layout file.
    let plain = kiln_model::load(&be, &default_model(), &LoadOptions::default()).expect("load");
    assert_same_bits(&run(&plain), &rearranged, "plain");
}

#[test]
fn a_damaged_or_foreign_layout_file_is_refused_or_stale_and_never_changes_answers() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("weights.layout");
    let (want, _) = record(&path);
    let be = CpuBackend::new();
    let layout = be.weight_layout().expect("layout");
    let whole = std::fs::read(&path).expect("read");
    let refused = |bytes: &[u8], layout: &str, key: &str| -> String {
        std::fs::write(&path, bytes).expect("write");
        match LayoutFile::open(&path, layout, key) {
            Ok(_) => panic!("a damaged or foreign file was opened"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains(&path.display().to_string()), "{e}");
                e
            }
        }
    };
    let e = refused(&whole[..whole.len() / 2], layout, KEY);
    assert!(e.contains("truncated"), "{e}");
    let e = refused(&whole[..40], layout, KEY);
    assert!(e.contains("truncated"), "{e}");
    let mut bad = whole.clone();
    bad[..4].copy_from_slice(b"XXXX");
    let e = refused(&bad, layout, KEY);
    assert!(e.contains("bad magic"), "{e}");
    let e = refused(&whole, "cpu-interleaved-16-v0", KEY);
    assert!(e.contains("holds layout"), "{e}");
    let e = refused(&whole, layout, "ffeeddccbbaa99887766554433221100");
    assert!(e.contains("cache key"), "{e}");
    let mut bad = whole.clone();
    let last = bad.len() - 2;
    bad[last] = b'!';
    let e = refused(&bad, layout, KEY);
    assert!(e.contains("index"), "{e}");

    // An index that opens but does not match the model: one matrix's row
    // count is off. That matrix is rearranged from the model, the file is
    // reported stale, and the answers are those of the model.
    let find = |from: usize, what: &[u8]| {
        whole[from..]
            .windows(what.len())
            .position(|w| w == what)
            .map(|i| from + i)
    };
    let at = find(0, b"\"name\":\"blk.3.ffn_down.weight\"").expect("its entry");
    let rows = find(at, b"\"rows\":").expect("its rows") + b"\"rows\":".len();
    let mut bad = whole.clone();
    // 576 rows becomes 577: the same number of digits, so nothing moves.
    assert_eq!(&bad[rows..rows + 3], b"576");
    bad[rows + 2] = b'7';
    std::fs::write(&path, &bad).expect("write");
    let (got, finished) = mapped(&path);
    let why = finished.expect_err("stale");
    assert!(why.contains("blk.3.ffn_down.weight"), "{why}");
    assert_same_bits(&got, &want, "stale file");
}

/// A first start that streams each matrix to the file as the backend makes
/// it (and serves it from the file's map) answers bit for bit as one that
/// keeps them in memory, writes a file byte for byte the same as the
/// in-memory recorder's, and that file maps with every matrix used.
#[test]
fn a_streamed_layout_file_serves_and_maps_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tmp");
    let kept = dir.path().join("kept.layout");
    let (want, written) = record(&kept);

    let streamed = dir.path().join("streamed.layout");
    let be = CpuBackend::new();
    let layout = be.weight_layout().expect("the CPU backend has a layout");
    let rec = Layouts::Record(LayoutRecorder::streaming(&streamed).expect("create"));
    let m = load_with(&be, &default_model(), &LoadOptions::default(), &rec).expect("load");
    let Layouts::Record(r) = &rec else {
        unreachable!()
    };
    assert_eq!(r.len(), written);
    // Served from the file being written, before it is finished.
    assert_same_bits(&run(&m), &want, "served from the streamed file");
    assert!(
        r.write(&streamed, layout, KEY).is_err(),
        "write on a stream"
    );
    let size = r.finish(layout, KEY).expect("finish");
    assert_eq!(size, std::fs::metadata(&streamed).expect("stat").len());
    assert_eq!(
        std::fs::read(&streamed).expect("read"),
        std::fs::read(&kept).expect("read"),
        "the streamed file and the kept one differ"
    );
    assert_huge_matrices_on_huge_page_boundaries(&streamed);
    let (from_file, finished) = mapped(&streamed);
    assert_eq!(finished, Ok(()), "every matrix came from the file");
    assert_same_bits(&from_file, &want, "mapped");
    assert!(
        LayoutRecorder::default().finish(layout, KEY).is_err(),
        "finish on an in-memory recorder"
    );
}
