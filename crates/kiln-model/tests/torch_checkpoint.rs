//! PyTorch checkpoints read without pickle: every fixture tensor has the
//! exact values torch saved (testdata/torch/expected.json, written by
//! scripts/golden/torch_fixtures.py), malicious pickles are refused naming
//! the callable and run nothing, and corrupt files are errors, never panics.

use std::path::{Path, PathBuf};

use kiln_backend::WeightData;
use kiln_model::fuzz::read_torch_checkpoint;
use kiln_model::torch::{TorchCheckpoint, TorchSource};
use kiln_model::weights::{hf_llama_names, WeightSource};
use kiln_model::ModelError;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/torch")
}

fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

fn expected() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    match serde_json::from_str(&text).unwrap() {
        Value::Object(m) => m,
        _ => panic!("expected.json is not an object"),
    }
}

/// The expected shape, dtype and values of one tensor.
struct Want {
    shape: Vec<usize>,
    dtype: String,
    values: Vec<f32>,
}

fn want(v: &Value) -> Want {
    Want {
        shape: v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect(),
        dtype: v["dtype"].as_str().unwrap().to_string(),
        values: v["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect(),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Opens `file` and checks every tensor against expected.json.
fn check_file(file: &str, tensors: &serde_json::Map<String, Value>) {
    let ckpt = TorchCheckpoint::open(&fixture(file)).unwrap();
    let names: Vec<&str> = ckpt.names().collect();
    let want_names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    assert_eq!(names, want_names, "{file}: names");
    for (name, v) in tensors {
        let w = want(v);
        assert_eq!(ckpt.shape(name), Some(w.shape.as_slice()), "{file}:{name}");
        assert_eq!(ckpt.dtype(name), Some(w.dtype.as_str()), "{file}:{name}");
        let t = ckpt.get(name).unwrap();
        assert_eq!(t.shape, w.shape, "{file}:{name}");
        assert_eq!(bits(&t.data), bits(&w.values), "{file}:{name}");
    }
}

#[test]
fn every_fixture_tensor_reads_exactly() {
    let all = expected();
    let mut files = 0;
    let mut tensors = 0;
    for (file, want) in &all {
        if file.starts_with('_') {
            continue;
        }
        let want = want.as_object().unwrap();
        check_file(file, want);
        files += 1;
        tensors += want.len();
    }
    assert_eq!(files, 8);
    assert!(tensors > 50, "{tensors}");
}

#[test]
fn dtypes_scalars_and_parameters() {
    let c = TorchCheckpoint::open(&fixture("dtypes.bin")).unwrap();
    assert_eq!(c.len(), 12);
    assert_eq!(c.dtype("bf16"), Some("bfloat16"));
    assert_eq!(c.dtype("position_ids"), Some("int64"));
    assert_eq!(c.dtype("mask"), Some("bool"));
    let s = c.get("scalar").unwrap();
    assert!(s.shape.is_empty());
    assert_eq!(s.data, vec![2.5]);
    assert_eq!(
        c.get("position_ids").unwrap().data,
        vec![0., 1., 2., 3., 4., 5.]
    );
    // nn.Parameter goes through torch._utils._rebuild_parameter.
    assert_eq!(c.shape("param"), Some(&[3usize][..]));
    let err = c.get("nope").unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor { ref tensor, .. } if tensor == "nope"));
    assert!(err.to_string().contains("dtypes.bin"), "{err}");
}

#[test]
fn views_share_storage_and_materialise_row_major() {
    let c = TorchCheckpoint::open(&fixture("views.bin")).unwrap();
    let base = c.get("base").unwrap();
    assert_eq!(base.shape, vec![3, 4]);
    let at = |r: usize, k: usize| base.data[r * 4 + k];
    let t = c.get("transposed").unwrap();
    assert_eq!(t.shape, vec![4, 3]);
    for r in 0..4 {
        for k in 0..3 {
            assert_eq!(t.data[r * 3 + k], at(k, r));
        }
    }
    assert_eq!(c.get("row").unwrap().data, base.data[4..8]);
    assert_eq!(c.get("slice").unwrap().data, base.data[5..9]);
    assert_eq!(
        c.get("column").unwrap().data,
        vec![at(0, 2), at(1, 2), at(2, 2)]
    );
    let e = c.get("expanded").unwrap();
    assert_eq!(e.shape, vec![2, 3]);
    assert_eq!(e.data[..3], e.data[3..]);
    assert_eq!(c.get("tied_a").unwrap(), c.get("tied_b").unwrap());
    let empty = c.get("empty").unwrap();
    assert_eq!(empty.shape, vec![0, 3]);
    assert!(empty.data.is_empty());
}

#[test]
fn a_zip64_archive_reads_like_the_plain_one() {
    let plain = TorchCheckpoint::open(&fixture("views.bin")).unwrap();
    let z64 = TorchCheckpoint::open(&fixture("zip64.bin")).unwrap();
    assert!(plain.names().eq(z64.names()));
    for n in plain.names() {
        assert_eq!(plain.get(n).unwrap(), z64.get(n).unwrap(), "{n}");
    }
}

#[test]
fn nested_dicts_flatten_with_dots_and_skip_other_values() {
    let c = TorchCheckpoint::open(&fixture("nested.bin")).unwrap();
    assert_eq!(c.names().collect::<Vec<_>>(), ["model.w", "model.inner.b"]);
}

#[test]
fn module_state_dict_with_metadata() {
    let c = TorchCheckpoint::open(&fixture("module.bin")).unwrap();
    assert_eq!(c.shape("0.weight"), Some(&[2usize, 3][..]));
    assert_eq!(c.get("steps").unwrap().data, vec![7.0]);
}

/// Removes a marker file before a test and asserts it never appeared.
struct Marker(PathBuf);

impl Marker {
    fn new(name: &str) -> Self {
        let p = PathBuf::from(format!("/tmp/kiln-torch-pwned-{name}"));
        let _ = std::fs::remove_file(&p);
        Self(p)
    }

    fn assert_absent(&self) {
        assert!(
            !self.0.exists(),
            "{} exists: a payload ran",
            self.0.display()
        );
    }
}

#[test]
fn malicious_pickles_are_refused_naming_the_callable() {
    for (file, callable, marker) in [
        ("evil_os_system.bin", "os.system", "os_system"),
        ("evil_posix_system.bin", "posix.system", "posix_system"),
        ("evil_builtins_eval.bin", "builtins.eval", "eval"),
        ("evil_stack_global.bin", "subprocess.Popen", "stack_global"),
        ("evil_inst.bin", "os.system", "inst"),
        ("evil_in_state_dict.bin", "posix.system", "in_state_dict"),
    ] {
        let marker = Marker::new(marker);
        let err = TorchCheckpoint::open(&fixture(file)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ModelError::Format { .. }), "{file}: {err:?}");
        assert!(msg.contains(file), "{msg}");
        assert!(
            msg.contains(&format!("data.pkl calls {callable}, ")),
            "{msg}"
        );
        assert!(
            msg.contains("refusing to run code from a checkpoint"),
            "{msg}"
        );
        // Going through bytes already read changes nothing.
        let bytes = std::fs::read(fixture(file)).unwrap();
        assert!(TorchCheckpoint::from_bytes(file, bytes).is_err());
        marker.assert_absent();
    }
}

#[test]
fn a_malicious_shard_fails_the_whole_source() {
    let dir = TempDir::new("evil-shard");
    let marker = Marker::new("in_state_dict");
    std::fs::copy(
        fixture("evil_in_state_dict.bin"),
        dir.0.join("pytorch_model.bin"),
    )
    .unwrap();
    let err = TorchSource::open_dir(&dir.0, hf_llama_names).err().unwrap();
    assert!(err.to_string().contains("calls posix.system"), "{err}");
    marker.assert_absent();
}

#[test]
fn the_legacy_format_is_refused_with_advice() {
    let err = TorchCheckpoint::open(&fixture("legacy.bin"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("legacy (before PyTorch 1.6)"), "{err}");
    assert!(err.contains("safetensors"), "{err}");
    let mut tar = vec![0u8; 1024];
    tar[257..262].copy_from_slice(b"ustar");
    let err = TorchCheckpoint::from_bytes("old.tar", tar)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tar file is a legacy"), "{err}");
    let err = TorchCheckpoint::from_bytes("x.bin", b"GGUF....".to_vec())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a PyTorch checkpoint"), "{err}");
}

/// The central directory entry of the member whose name ends with `suffix`.
fn central_entry(bytes: &[u8], suffix: &str) -> usize {
    (0..bytes.len() - 46)
        .find(|&i| {
            if &bytes[i..i + 4] != b"PK\x01\x02" {
                return false;
            }
            let n = u16::from_le_bytes([bytes[i + 28], bytes[i + 29]]) as usize;
            bytes[i + 46..i + 46 + n].ends_with(suffix.as_bytes())
        })
        .unwrap()
}

fn set_size(bytes: &mut [u8], entry: usize, size: u32) {
    bytes[entry + 20..entry + 24].copy_from_slice(&size.to_le_bytes());
    bytes[entry + 24..entry + 28].copy_from_slice(&size.to_le_bytes());
}

fn open_bytes(bytes: Vec<u8>) -> String {
    TorchCheckpoint::from_bytes("t.bin", bytes)
        .unwrap_err()
        .to_string()
}

#[test]
fn broken_archives_are_clear_errors() {
    let good = std::fs::read(fixture("dtypes.bin")).unwrap();

    let mut b = good.clone();
    let pkl = central_entry(&b, "/data.pkl");
    b[pkl + 10] = 8; // deflated
    assert!(open_bytes(b).contains("data.pkl is compressed (method 8)"));

    let mut b = good.clone();
    let e = central_entry(&b, "dtypes/data/0");
    let at = e + 46 + "dtypes/data/".len();
    b[at] = b'X';
    let err = open_bytes(b);
    assert!(
        err.contains("storage '0', but the archive has no dtypes/data/0"),
        "{err}"
    );

    let mut b = good.clone();
    set_size(&mut b, central_entry(&good, "dtypes/data/0"), 8);
    let err = open_bytes(b);
    assert!(
        err.contains("storage '0' holds 6 float32 elements, but its data has only 8 bytes"),
        "{err}"
    );

    let mut b = good.clone();
    let at = central_entry(&b, "/data.pkl") + 46;
    b[at..at + 6].copy_from_slice(b"dtypez");
    b[at + 6..at + 15].copy_from_slice(b"/data.pk_");
    assert!(open_bytes(b).contains("no <archive>/data.pkl"));

    let mut b = good.clone();
    let at = central_entry(&b, "/byteorder");
    let start = local_data_start(&b, at);
    b[start..start + 6].copy_from_slice(b"big\0\0\0");
    set_size(&mut b, at, 3);
    assert!(open_bytes(b).contains("big-endian"));
}

fn local_data_start(b: &[u8], central: usize) -> usize {
    let local = u32::from_le_bytes(b[central + 42..central + 46].try_into().unwrap()) as usize;
    let n = u16::from_le_bytes([b[local + 26], b[local + 27]]) as usize;
    let x = u16::from_le_bytes([b[local + 28], b[local + 29]]) as usize;
    local + 30 + n + x
}

/// The files whose truncated and corrupted copies go through
/// `read_torch_checkpoint` (open, then read every tensor), which must never panic.
const FUZZ_FILES: &[&str] = &[
    "dtypes.bin",
    "views.bin",
    "module.bin",
    "nested.bin",
    "zip64.bin",
    "sharded/pytorch_model-00001-of-00002.bin",
    "evil_in_state_dict.bin",
    "evil_stack_global.bin",
];

#[test]
fn truncated_files_never_panic() {
    let mut cases = 0;
    for file in FUZZ_FILES {
        let bytes = std::fs::read(fixture(file)).unwrap();
        for len in 0..bytes.len() {
            assert!(
                !read_torch_checkpoint(bytes[..len].to_vec()),
                "{file} cut at {len} opened"
            );
            cases += 1;
        }
    }
    assert!(cases > 10_000, "{cases}");
}

/// The fuzzed files whose central directory the tests below can patch
/// (32-bit sizes: all but zip64.bin).
fn patchable() -> impl Iterator<Item = &'static str> {
    FUZZ_FILES.iter().copied().filter(|f| *f != "zip64.bin")
}

#[test]
fn truncated_pickles_never_panic() {
    // The archive stays valid; data.pkl's recorded size shrinks.
    let marker = Marker::new("stack_global");
    for file in patchable() {
        let bytes = std::fs::read(fixture(file)).unwrap();
        let entry = central_entry(&bytes, "/data.pkl");
        let len = u32::from_le_bytes(bytes[entry + 24..entry + 28].try_into().unwrap());
        for cut in 0..len {
            let mut b = bytes.clone();
            set_size(&mut b, entry, cut);
            assert!(
                !read_torch_checkpoint(b),
                "{file} with data.pkl cut at {cut} opened"
            );
        }
    }
    marker.assert_absent();
}

#[test]
fn flipped_pickle_bytes_never_panic() {
    let mut opened = 0;
    let mut cases = 0;
    for file in patchable() {
        let bytes = std::fs::read(fixture(file)).unwrap();
        let entry = central_entry(&bytes, "/data.pkl");
        let start = local_data_start(&bytes, entry);
        let len = u32::from_le_bytes(bytes[entry + 24..entry + 28].try_into().unwrap()) as usize;
        for i in start..start + len {
            for mask in [0x01u8, 0x10, 0x80, 0xFF] {
                let mut b = bytes.clone();
                b[i] ^= mask;
                opened += read_torch_checkpoint(b) as usize;
                cases += 1;
            }
        }
    }
    // Most flips break the pickle; some only change a value or a name.
    assert!(opened > 0 && opened < cases, "{opened} of {cases}");
}

#[test]
fn random_corruption_anywhere_never_panics() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for file in FUZZ_FILES {
        let bytes = std::fs::read(fixture(file)).unwrap();
        for _ in 0..1500 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % b.len() as u64) as usize;
                b[i] = next() as u8;
            }
            read_torch_checkpoint(b);
        }
    }
}

/// A fresh temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-torch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CANONICAL: &[&str] = &[
    "token_embd.weight",
    "blk.0.attn_norm.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.0.attn_v.weight",
    "blk.0.attn_output.weight",
    "blk.0.ffn_norm.weight",
    "blk.0.ffn_gate.weight",
    "blk.0.ffn_up.weight",
    "blk.0.ffn_down.weight",
    "output_norm.weight",
    "output.weight",
];

/// All expected tensors of the llama fixtures, by Hugging Face name.
fn llama_expected() -> serde_json::Map<String, Value> {
    let all = expected();
    all["single/pytorch_model.bin"].as_object().unwrap().clone()
}

fn check_llama_source(dir: &Path) -> TorchSource {
    let src = TorchSource::open_dir(dir, hf_llama_names).unwrap();
    let want = llama_expected();
    for canonical in CANONICAL {
        let hf = hf_llama_names(canonical).unwrap();
        assert!(src.contains(canonical), "{canonical}");
        let w = want_of(&want, &hf);
        let t = src.get(canonical).unwrap();
        assert_eq!(t.shape, w.shape, "{canonical}");
        assert_eq!(bits(&t.data), bits(&w.values), "{canonical}");
        let (shape, data) = src.get_weight(canonical).unwrap();
        assert_eq!(shape, w.shape);
        assert!(matches!(data, WeightData::F32(ref d) if bits(d) == bits(&w.values)));
    }
    src
}

fn want_of(m: &serde_json::Map<String, Value>, name: &str) -> Want {
    want(&m[name])
}

#[test]
fn sharded_checkpoint_through_the_name_map() {
    let dir = fixture("sharded");
    let src = check_llama_source(&dir);
    assert_eq!(src.files().len(), 2);
    assert!(
        src.describe().contains("2 PyTorch shards"),
        "{}",
        src.describe()
    );
    assert!(!src.contains("blk.1.attn_q.weight"));
    let err = src.get("blk.1.attn_q.weight").unwrap_err();
    match &err {
        ModelError::MissingTensor { path, tensor } => {
            assert_eq!(tensor, "model.layers.1.self_attn.q_proj.weight");
            assert!(
                path.ends_with("pytorch_model.bin.index.json"),
                "{}",
                path.display()
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(!src.contains("no.such.name"));
    assert!(matches!(
        src.get("no.such.name"),
        Err(ModelError::MissingTensor { .. })
    ));
}

#[test]
fn single_file_checkpoint_matches_the_shards() {
    let single = check_llama_source(&fixture("single"));
    assert!(single.describe().ends_with("pytorch_model.bin"));
    let sharded = TorchSource::open_dir(&fixture("sharded"), hf_llama_names).unwrap();
    for c in CANONICAL {
        assert_eq!(single.get(c).unwrap(), sharded.get(c).unwrap(), "{c}");
    }
}

#[test]
fn bad_model_directories_are_errors_naming_the_file() {
    let dir = TempDir::new("dirs");
    let err = TorchSource::open_dir(&dir.0, hf_llama_names)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no pytorch_model.bin or pytorch_model.bin.index.json"),
        "{err}"
    );

    let index = dir.0.join("pytorch_model.bin.index.json");
    std::fs::write(&index, r#"{"weight_map": {"a": "../evil.bin"}}"#).unwrap();
    let err = TorchSource::open_dir(&dir.0, hf_llama_names)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("leaves the model directory"), "{err}");

    std::fs::write(&index, r#"{"weight_map": {"a": "missing.bin"}}"#).unwrap();
    let err = TorchSource::open_dir(&dir.0, hf_llama_names)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing.bin"), "{err}");

    std::fs::write(&index, "{").unwrap();
    let err = TorchSource::open_dir(&dir.0, hf_llama_names)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not valid JSON"), "{err}");

    // A corrupt shard names the shard and the tensor.
    std::fs::remove_file(&index).unwrap();
    let mut b = std::fs::read(fixture("single/pytorch_model.bin")).unwrap();
    let entry = central_entry(&b, "/data/0");
    set_size(&mut b, entry, 4);
    std::fs::write(dir.0.join("pytorch_model.bin"), b).unwrap();
    let err = TorchSource::open_dir(&dir.0, hf_llama_names)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("pytorch_model.bin: data.pkl says storage '0'"),
        "{err}"
    );
}
