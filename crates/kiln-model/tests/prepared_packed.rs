//! Packed prepared models (`kiln_model::prepared`, "each weight once on
//! disk"): a conversion for the CPU backend writes every matrix the backend
//! rearranges only to the layout file and the rest to the GGUF file, so the
//! two files together are one copy of the converted weights (the whole
//! prepared GGUF's size, within a few per cent), not two; loading them
//! back gives bit for bit the logits and tokens of converting again, tied
//! embeddings included (the table stays in the GGUF file); a layout file
//! that does not hold every matrix left out is an error naming it, never a
//! model computed from placeholders; and the GGUF half says it is one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_backend::cpu::CpuBackend;
use kiln_backend::{Backend, GgmlType, StepInput};
use kiln_model::fixtures::{self, TinySpec};
use kiln_model::layouts::{LayoutFile, LayoutRecorder, Layouts};
use kiln_model::prepared::{self, PackedTensors, PreparedInfo, Settings, ARTIFACT_VERSION};
use kiln_model::{load, LoadOptions, LoadedModel};

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
        .0 as u32
}

/// Every prompt position's logits, then 6 greedy tokens.
fn run(m: &LoadedModel<CpuBackend>) -> (Vec<f32>, Vec<u32>) {
    let prompt = [72, 101, 108, 108, 111, 32, 119, 111];
    let be = CpuBackend::new();
    let (all, mut kv) = fixtures::prefill(&be, &m.decoder, &prompt, 6).expect("prefill");
    let vocab = m.decoder.config().vocab_size;
    let mut next = argmax(&all[all.len() - vocab..]);
    let mut out = vec![next];
    for pos in prompt.len()..prompt.len() + 5 {
        let step = StepInput::single_sequence(pos, &[next], fixtures::TEST_BLOCK_SIZE);
        next = argmax(&m.decoder.forward(&be, &mut kv, &step).expect("decode"));
        out.push(next);
    }
    (all, out)
}

const KEY: &str = "0123abcd";

fn info(opts: &LoadOptions) -> PreparedInfo {
    PreparedInfo {
        key: KEY.into(),
        source: "/models/x".into(),
        identity: "[]".into(),
        settings: Settings::of(opts),
        artifact_version: ARTIFACT_VERSION,
    }
}

/// A packed conversion of `src` into `dir` (model.gguf, weights.layout):
/// the model loaded while writing, and the two files' sizes.
fn write_packed(
    be: &CpuBackend,
    layout: &str,
    src: &Path,
    opts: &LoadOptions,
    dir: &Path,
) -> (LoadedModel<CpuBackend>, u64, u64) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let tracker = PackedTensors::new();
    let rec = LayoutRecorder::streaming(&dir.join("weights.layout"))
        .expect("layout file")
        .telling(Arc::clone(&tracker));
    let layouts = Layouts::Record(rec);
    let (model, gguf) = prepared::load_and_prepare_packed(
        be,
        src,
        opts,
        &info(opts),
        &dir.join("model.gguf"),
        &layouts,
        tracker,
        layout,
    )
    .expect("packed conversion");
    let Layouts::Record(rec) = &layouts else {
        panic!("not a recorder")
    };
    let lbytes = rec.finish(layout, KEY).expect("finish the layout file");
    (model, gguf, lbytes)
}

fn spec(tied: bool) -> TinySpec {
    TinySpec {
        hidden: 256,
        ffn: 512,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        tied,
        ..TinySpec::default()
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").len()
}

#[test]
fn a_packed_entry_holds_the_weights_once_and_maps_to_the_same_model() {
    let be = CpuBackend::new();
    let Some(layout) = be.weight_layout() else {
        return; // KILN_CPU_REPACK=0: the CPU backend keeps the GGUF's rows.
    };
    let tmp = tempfile::tempdir().expect("tmp");
    for (tied, ty) in [(false, GgmlType::Q8_0), (true, GgmlType::Q4_0)] {
        let src = tmp.path().join(format!("src-{tied}"));
        fixtures::write_tiny_llama_hf(&src, &spec(tied), 11).expect("fixture");
        let opts = LoadOptions {
            quantize: Some(ty),
            ..LoadOptions::default()
        };
        let converted = run(&load(&be, &src, &opts).expect("converting load"));

        // One copy of the converted weights: the whole prepared GGUF.
        let whole_dir = tmp.path().join(format!("whole-{tied}"));
        std::fs::create_dir_all(&whole_dir).expect("mkdir");
        let whole_file = whole_dir.join("model.gguf");
        let (_, whole) =
            prepared::load_and_prepare(&be, &src, &opts, &info(&opts), &whole_file, &Layouts::Off)
                .expect("whole prepared file");

        let dir = tmp.path().join(format!("packed-{tied}"));
        let (while_writing, gguf, lbytes) = write_packed(&be, layout, &src, &opts, &dir);
        let (gguf_file, layout_file) = (dir.join("model.gguf"), dir.join("weights.layout"));
        assert_eq!(gguf, file_len(&gguf_file));
        assert_eq!(lbytes, file_len(&layout_file));
        assert_eq!(
            std::fs::read_dir(&dir).expect("ls").count(),
            2,
            "model.gguf and weights.layout only (no spool left)"
        );
        let total = gguf + lbytes;
        eprintln!(
            "tied={tied} {ty:?}: whole GGUF {whole} bytes; packed GGUF {gguf} + layout {lbytes} \
             = {total} ({:.3}x)",
            total as f64 / whole as f64
        );
        assert!(
            total as f64 <= whole as f64 * 1.04 && total as f64 >= whole as f64 * 0.96,
            "the packed entry is {total} bytes, one copy of the weights is {whole}"
        );
        assert!(
            gguf < whole / 2,
            "the GGUF half ({gguf} bytes) holds no rearranged matrix (whole: {whole})"
        );
        assert_eq!(
            run(&while_writing),
            converted,
            "the model served while writing"
        );
        drop(while_writing);

        // A later start maps both files: bit for bit the converted model.
        let mapped = LayoutFile::open(&layout_file, layout, KEY).expect("open layout");
        let hit = prepared::load_packed(&be, &gguf_file, &prepared::as_prepared(&opts), mapped)
            .expect("load the packed entry");
        assert_eq!(run(&hit), converted, "the packed entry's model");
        assert_eq!(
            prepared::packed_layout(&gguf_file)
                .expect("read")
                .as_deref(),
            Some(layout)
        );
        assert_eq!(prepared::packed_layout(&whole_file).expect("read"), None);
        assert!(
            load(&be, &gguf_file, &LoadOptions::default()).is_err(),
            "the GGUF half does not load alone"
        );
    }
}

/// The packed entry of `tied` in `tmp`, written anew.
fn packed(be: &CpuBackend, layout: &str, tmp: &Path, tied: bool) -> PathBuf {
    let src = tmp.join(format!("src-{tied}"));
    fixtures::write_tiny_llama_hf(&src, &spec(tied), 5).expect("fixture");
    let opts = LoadOptions {
        quantize: Some(GgmlType::Q8_0),
        ..LoadOptions::default()
    };
    let dir = tmp.join(format!("packed-{tied}"));
    write_packed(be, layout, &src, &opts, &dir);
    dir
}

#[test]
fn a_layout_file_without_the_left_out_matrices_is_an_error_not_placeholders() {
    let be = CpuBackend::new();
    let Some(layout) = be.weight_layout() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let untied = packed(&be, layout, tmp.path(), false);
    let tied = packed(&be, layout, tmp.path(), true);
    // The tied model's layout file lacks the untied model's output matrix.
    let other = tied.join("weights.layout");
    let mapped = LayoutFile::open(&other, layout, KEY).expect("open layout");
    let e = match prepared::load_packed(
        &be,
        &untied.join("model.gguf"),
        &LoadOptions::default(),
        mapped,
    ) {
        Ok(_) => panic!("a model loaded with matrices missing from its layout file"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&other.display().to_string()), "{e}");
    assert!(e.contains("does not hold output.weight"), "{e}");

    // A truncated layout file does not open.
    let file = untied.join("weights.layout");
    let len = file_len(&file);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open")
        .set_len(len - 10)
        .expect("truncate");
    let e = match LayoutFile::open(&file, layout, KEY) {
        Ok(_) => panic!("a truncated layout file opened"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("truncated"), "{e}");
}
