//! The prepared-model cache end to end, through the real binary and a real
//! S3-protocol server on loopback (`s3s-fs`, built by
//! `scripts/fetch-assets.sh --tests`):
//!
//! - `kiln prepare --quantize q8_0 --output s3://…` uploads a prepared file
//!   that a server then serves from that prefix (downloaded once, mapped,
//!   nothing converted) with the same greedy answer as converting at load;
//!   a larger one goes up as a multipart upload;
//! - the second start with the same model and settings maps the cache entry
//!   and converts nothing; on the CPU that entry is packed (the rearranged
//!   matrices only in its weights.layout, the rest in its model.gguf: one
//!   copy of the weights); `kiln prepare --output DIR` writes a whole GGUF
//!   file, a directory that serves the same way; a changed source file is a
//!   new key;
//! - `--cache-max-gib` evicts the least recently used entry, never one a
//!   running server maps; `kiln cache ls` and `kiln cache rm KEY|--all`;
//! - a truncated or corrupt prepared file is an error naming the file, and
//!   the entry is gone afterwards;
//! - two processes starting at once on one cache convert once: the other
//!   waits on the entry's lock and maps the first one's file;
//! - the default model's weights in the CPU layout are written by the first
//!   `kiln serve` and mapped by the next (the same greedy answers), a
//!   truncated or overwritten layout file is written again, and
//!   `KILN_LAYOUT_CACHE=0` leaves the cache alone.

mod sources_support;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::json;
use sources_support::s3::{self, S3Server};
use sources_support::tiny_dir;
use support::*;

/// Runs `kiln ARGS` with `env`, logging at info.
fn kiln(args: &[&str], env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args)
        .env("KILN_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("KILN_MODEL")
        .env_remove("KILN_CACHE_MAX_GIB")
        .env_remove("KILN_UPLOAD_PART_MIB")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run kiln")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `kiln generate` of a fixed prompt, greedy, which must succeed; returns
/// (text, stderr).
fn generate(model: &str, extra: &[&str], env: &[(String, String)]) -> (String, String) {
    let mut args = vec!["generate", "--model", model, "--max-new-tokens", "8"];
    args.extend_from_slice(extra);
    args.push("The cat");
    let o = kiln(&args, env);
    assert!(o.status.success(), "kiln generate failed:\n{}", err(&o));
    (out(&o), err(&o))
}

/// Only the cache directory (no S3 server needed).
fn cache_env(cache: &Path) -> Vec<(String, String)> {
    vec![
        ("KILN_CACHE".into(), cache.display().to_string()),
        ("SERVING_DOWNLOAD_DIR".into(), String::new()),
    ]
}

/// The keys of the prepared models `kiln cache ls` lists, most recently
/// used first.
fn ls_keys(env: &[(String, String)]) -> Vec<String> {
    ls(env, false)
}

/// The keys of the prepared models (or, with `layouts`, of the weight
/// layouts) `kiln cache ls` lists, most recently used first.
fn ls(env: &[(String, String)], layouts: bool) -> Vec<String> {
    let o = kiln(&["cache", "ls"], env);
    assert!(o.status.success(), "{}", err(&o));
    out(&o)
        .lines()
        .skip(1)
        .filter(|l| l.contains(" layout=") == layouts)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|k| k.len() == 32)
        .map(String::from)
        .collect()
}

fn prepared_dir(cache: &Path) -> PathBuf {
    cache.join("prepared")
}

fn converted(stderr: &str) -> bool {
    stderr.contains("not in the cache; converting") && stderr.contains("quantizing float weight")
}

fn mapped(stderr: &str) -> bool {
    stderr.contains("nothing converted") && !stderr.contains("quantizing float weight")
}

#[test]
fn a_prepared_model_round_trips_through_s3_and_serves_without_converting() {
    let root = tempdir("s3-root-");
    std::fs::create_dir_all(root.join("models")).expect("bucket");
    let s3 = S3Server::start(&root);
    let tiny = tiny_dir().display().to_string();

    // Prepare with one cache, serve with another (another machine).
    let prep_cache = tempdir("cache-prep-");
    let o = kiln(
        &[
            "prepare",
            &tiny,
            "--quantize",
            "q8_0",
            "--output",
            "s3://models/tiny-q8",
        ],
        &s3::env(s3.port, &prep_cache),
    );
    assert!(o.status.success(), "kiln prepare:\n{}", err(&o));
    assert!(
        out(&o).contains("s3://models/tiny-q8/model.gguf"),
        "{}",
        out(&o)
    );
    assert!(converted(&err(&o)), "{}", err(&o));
    let object = root.join("models/tiny-q8/model.gguf");
    let local = std::fs::read_dir(prepared_dir(&prep_cache))
        .expect("ls")
        .flatten()
        .map(|e| e.path().join("model.gguf"))
        .find(|p| p.is_file())
        .expect("the local cache keeps a copy");
    assert_eq!(
        std::fs::read(&object).expect("uploaded"),
        std::fs::read(&local).expect("local"),
        "the uploaded object is the prepared file"
    );

    let store = tempdir("store-");
    for (name, id) in [("fromS3", "s3://models/tiny-q8"), ("local", tiny.as_str())] {
        write(
            &store.join(name).join("serving.properties"),
            &format!("option.model_id={id}\noption.quantize=q8_0\n"),
        );
    }
    let serve_cache = tempdir("cache-serve-");
    let env = s3::env(s3.port, &serve_cache);
    let server = Server::start(Opts {
        args: vec!["--model-store".into(), store.display().to_string()],
        env: env.clone(),
        cwd: Some(tempdir("cwd-")),
        ..Opts::default()
    });
    server.wait_ready();
    let answer = |model: &str| {
        let body = json!({"inputs": "The cat", "parameters": {"max_new_tokens": 12}});
        let r = server.post_json(&format!("/predictions/{model}"), &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["generated_text"]
            .as_str()
            .expect("text")
            .to_string()
    };
    assert_eq!(answer("fromS3"), answer("local"));
    let logs = server.stderr();
    assert!(
        logs.contains("is a prepared model (quantize=q8_0 dtype=auto"),
        "{logs}"
    );
    // Only the local model was converted.
    assert_eq!(
        logs.matches("quantizing float weight matrices").count(),
        1,
        "{logs}"
    );
    // The downloaded prefix holds the prepared file alone.
    let downloads: Vec<PathBuf> = std::fs::read_dir(serve_cache.join("download"))
        .expect("downloads")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.extension().is_none())
        .collect();
    assert_eq!(downloads.len(), 1);
    assert!(downloads[0].join("model.gguf").is_file());

    // The server maps the local model's entry: rm keeps it.
    let keys = ls_keys(&env);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let o = kiln(&["cache", "rm", "--all"], &env);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains(&format!("kept {}", keys[0])),
        "{}",
        err(&o)
    );
    assert!(err(&o).contains("in use by a running kiln process"));
    let o = kiln(&["cache", "rm", &keys[0]], &env);
    assert!(!o.status.success());
    assert!(err(&o).contains("in use"), "{}", err(&o));
    drop(server);
    let o = kiln(&["cache", "rm", &keys[0]], &env);
    assert!(o.status.success(), "{}", err(&o));
    assert!(ls_keys(&env).is_empty());
}

#[test]
fn a_large_prepared_file_goes_up_in_parts_and_serves_the_same() {
    let root = tempdir("s3-root-");
    std::fs::create_dir_all(root.join("models")).expect("bucket");
    let s3 = S3Server::start(&root);
    // About 23 MB in f16: five 5 MiB parts.
    let src = tempdir("big-src-");
    let spec = kiln_model::fixtures::TinySpec {
        hidden: 512,
        ffn: 1536,
        layers: 4,
        heads: 8,
        kv_heads: 4,
        ..Default::default()
    };
    kiln_model::fixtures::write_tiny_llama_hf(&src, &spec, 3).expect("fixture");
    let src = src.display().to_string();
    let cache = tempdir("cache-");
    let mut env = s3::env(s3.port, &cache);
    env.push(("KILN_UPLOAD_PART_MIB".into(), "5".into()));
    let o = kiln(
        &[
            "prepare",
            &src,
            "--dtype",
            "fp16",
            "--output",
            "s3://models/big",
        ],
        &env,
    );
    assert!(o.status.success(), "kiln prepare:\n{}", err(&o));
    let size = std::fs::metadata(root.join("models/big/model.gguf"))
        .expect("uploaded")
        .len();
    assert!(size > 10 << 20, "{size} bytes: more than two parts");
    assert!(
        err(&o).contains(&format!(
            "s3://models/big: uploaded model.gguf in {} parts of 5 MiB",
            size.div_ceil(5 << 20)
        )),
        "{}",
        err(&o)
    );

    let fresh = s3::env(s3.port, &tempdir("cache-2-"));
    let (from_s3, logs) = generate("s3://models/big", &["--dtype", "fp16"], &fresh);
    assert!(logs.contains("is a prepared model"), "{logs}");
    let (local, _) = generate(&src, &["--dtype", "fp16"], &cache_env(&tempdir("cache-3-")));
    assert_eq!(from_s3, local);
}

#[test]
fn the_second_start_maps_the_entry_and_a_changed_source_is_a_new_key() {
    let cache = tempdir("cache-");
    let env = cache_env(&cache);
    let src = tempdir("src-");
    // The checkpoint's files (its folder also holds LoRA adapters' folders).
    for e in std::fs::read_dir(tiny_dir()).expect("ls").flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), src.join(e.file_name())).expect("copy");
        }
    }
    let src = src.display().to_string();
    let q8 = ["--quantize", "q8_0"];
    let (first, logs) = generate(&src, &q8, &env);
    assert!(converted(&logs), "{logs}");
    let (second, logs) = generate(&src, &q8, &env);
    assert!(mapped(&logs), "{logs}");
    assert!(logs.contains("prepared model "), "{logs}");
    // The converted weights' CPU layout, written by the first start under
    // the prepared file's key, is mapped too.
    assert!(layout_mapped(&logs), "{logs}");
    assert_eq!(first, second, "the same greedy text");
    assert_eq!(ls_keys(&env).len(), 1);
    // One packed entry: the CPU layout of the matrices beside the GGUF
    // file holding the rest, each weight once; no layout entry of its own.
    assert!(ls(&env, true).is_empty(), "{:?}", ls(&env, true));
    let entry = prepared_dir(&cache).join(&ls_keys(&env)[0]);
    let gguf = tensor_bytes(&entry.join("model.gguf"));
    let layout = std::fs::metadata(entry.join("weights.layout"))
        .expect("layout")
        .len() as usize;
    assert!(
        gguf < layout / 2,
        "model.gguf holds {gguf} bytes of tensors, weights.layout {layout}"
    );

    // `kiln prepare --output DIR` writes a whole, portable GGUF file (an
    // entry of its own, one copy of the weights: the packed entry's size);
    // DIR serves as it is.
    let dir = tempdir("prepared-out-").join("tiny-q8");
    let dir = dir.display().to_string();
    let o = kiln(
        &["prepare", &src, "--quantize", "q8_0", "--output", &dir],
        &env,
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(converted(&err(&o)), "a whole file is written: {}", err(&o));
    // Tensor bytes: each file's header holds room of its own.
    let whole = tensor_bytes(&Path::new(&dir).join("model.gguf"));
    let packed = (gguf + layout) as f64;
    assert!(
        (packed / whole as f64 - 1.0).abs() < 0.04,
        "the packed entry ({packed} bytes) is one copy of the weights ({whole})"
    );
    assert_eq!(ls_keys(&env).len(), 2);
    let fresh = cache_env(&tempdir("cache-other-"));
    let (from_dir, logs) = generate(&dir, &q8, &fresh);
    assert!(logs.contains("is a prepared model"), "{logs}");
    assert_eq!(from_dir, first);

    // Without --quantize nothing is converted (only the weights' CPU
    // layout is stored).
    let (_, logs) = generate(&src, &[], &env);
    assert!(!logs.contains("prepared model"), "{logs}");

    // Rewriting a file (a new mtime) is a new source identity.
    let cfg = Path::new(&src).join("config.json");
    let text = std::fs::read(&cfg).expect("read");
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&cfg, text).expect("rewrite");
    let (_, logs) = generate(&src, &q8, &env);
    assert!(converted(&logs), "{logs}");
    assert_eq!(ls_keys(&env).len(), 3);
}

#[test]
fn the_cache_bound_evicts_the_least_recently_used_entry() {
    let cache = tempdir("cache-");
    let env = cache_env(&cache);
    let tiny = tiny_dir().display().to_string();
    // The tiny model's Q8_0 file is about 130 KiB and its Q4_0 file 90 KiB:
    // 200 KiB holds one of them, not both.
    let bound = format!("{}", 200.0 * 1024.0 / (1u64 << 30) as f64);
    let with = |q: &'static str| -> Vec<&str> { vec!["--quantize", q, "--cache-max-gib", &bound] };
    let (_, logs) = generate(&tiny, &with("q8_0"), &env);
    assert!(converted(&logs), "{logs}");
    let q8_key = ls_keys(&env);
    assert_eq!(q8_key.len(), 1);
    let (_, logs) = generate(&tiny, &with("q4_0"), &env);
    assert!(converted(&logs), "{logs}");
    assert!(
        logs.contains(&format!("prepared model {}: evicted", q8_key[0])),
        "{logs}"
    );
    let q4_key = ls_keys(&env);
    assert_eq!(q4_key.len(), 1);
    assert_ne!(q4_key, q8_key);
    assert!(!prepared_dir(&cache).join(&q8_key[0]).exists());

    // Unbounded, both stay; ls shows them with their settings, newest first.
    let (_, logs) = generate(&tiny, &["--quantize", "q8_0"], &env);
    assert!(converted(&logs), "{logs}");
    let o = kiln(&["cache", "ls"], &env);
    let listing = out(&o);
    assert!(listing.contains("quantize=q8_0 dtype=auto"), "{listing}");
    assert!(listing.contains("quantize=q4_0 dtype=auto"), "{listing}");
    assert!(listing.contains(
        &tiny_dir()
            .canonicalize()
            .expect("path")
            .display()
            .to_string()
    ));
    assert!(listing.contains("2 prepared models"), "{listing}");
    assert_eq!(ls_keys(&env), vec![q8_key[0].clone(), q4_key[0].clone()]);

    let o = kiln(&["cache", "rm", &q4_key[0]], &env);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(ls_keys(&env), q8_key);
    let o = kiln(&["cache", "rm", &q4_key[0]], &env);
    assert!(!o.status.success(), "removed twice");
    assert!(err(&o).contains("no prepared model"), "{}", err(&o));
    let o = kiln(&["cache", "rm", "--all"], &env);
    assert!(
        out(&o).contains(&format!("removed {}", q8_key[0])),
        "{}",
        out(&o)
    );
    assert!(ls_keys(&env).is_empty());
}

#[test]
fn a_truncated_or_corrupt_prepared_file_is_an_error_naming_it_and_is_removed() {
    let cache = tempdir("cache-");
    let env = cache_env(&cache);
    let tiny = tiny_dir().display().to_string();
    let q8 = ["--quantize", "q8_0"];
    let fails = |what: &str| {
        let file = {
            let (_, logs) = generate(&tiny, &q8, &env);
            assert!(converted(&logs) || mapped(&logs), "{logs}");
            let key = ls_keys(&env).pop().expect("an entry");
            prepared_dir(&cache).join(&key).join("model.gguf")
        };
        match what {
            "truncated" => {
                let len = std::fs::metadata(&file).expect("stat").len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&file)
                    .expect("open")
                    .set_len(len / 2)
                    .expect("truncate");
            }
            _ => {
                let mut bytes = std::fs::read(&file).expect("read");
                bytes[..4].copy_from_slice(b"XXXX");
                std::fs::write(&file, bytes).expect("write");
            }
        }
        let o = kiln(
            &[
                "generate",
                "--model",
                &tiny,
                "--quantize",
                "q8_0",
                "The cat",
            ],
            &env,
        );
        assert!(!o.status.success(), "a {what} prepared file loaded");
        let e = err(&o);
        let line = e
            .lines()
            .find(|l| l.starts_with("error:"))
            .expect("error line");
        assert!(line.contains(&file.display().to_string()), "{line}");
        assert!(
            line.contains("removed from the prepared-model cache"),
            "{line}"
        );
        assert!(ls_keys(&env).is_empty(), "{what}: the entry is gone");
        assert!(!file.exists());
        line.to_string()
    };
    let line = fails("truncated");
    assert!(line.contains("truncated"), "{line}");
    let line = fails("corrupt");
    assert!(line.contains("bad magic"), "{line}");
    // The next start prepares it again.
    let (_, logs) = generate(&tiny, &q8, &env);
    assert!(converted(&logs), "{logs}");
}

#[test]
fn two_processes_starting_at_once_prepare_one_entry() {
    let cache = tempdir("cache-");
    let env = cache_env(&cache);
    // A model big enough that its conversion overlaps the other start.
    let src = tempdir("src-");
    let spec = kiln_model::fixtures::TinySpec {
        hidden: 512,
        ffn: 1536,
        layers: 4,
        heads: 8,
        kv_heads: 4,
        ..Default::default()
    };
    kiln_model::fixtures::write_tiny_llama_hf(&src, &spec, 5).expect("fixture");
    let src = src.display().to_string();
    let spawn = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(["generate", "--model", &src, "--quantize", "q4_k"])
            .args(["--max-new-tokens", "4", "The cat"])
            .env("KILN_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("KILN_CACHE_MAX_GIB")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn kiln")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (
        a.wait_with_output().expect("a"),
        b.wait_with_output().expect("b"),
    );
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        err(&a),
        err(&b)
    );
    let logs = [err(&a), err(&b)];
    let converting = logs.iter().filter(|l| converted(l)).count();
    assert_eq!(converting, 1, "exactly one converts:\n{logs:#?}");
    let other = logs.iter().find(|l| !converted(l)).expect("the other");
    assert!(mapped(other), "the other maps its file:\n{other}");
    eprintln!(
        "the other waited on the lock: {}",
        other.contains("another kiln process is preparing it")
    );
    assert_eq!(out(&a), out(&b), "both answer alike");
    assert_eq!(ls_keys(&env).len(), 1);
}

/// A greedy completion from `server`'s default model.
fn greedy(server: &Server) -> String {
    let body = json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 16}});
    let r = server.post_json("/invocations", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["generated_text"]
        .as_str()
        .expect("text")
        .to_string()
}

/// `kiln serve` of the default model with its prepared-model cache in
/// `downloads` and the layout cache on; returns the greedy answer and the
/// server's log.
fn serve_default(downloads: &Path) -> (String, String) {
    let server = Server::ready(Opts {
        env: vec![
            (
                "SERVING_DOWNLOAD_DIR".into(),
                downloads.display().to_string(),
            ),
            ("KILN_LAYOUT_CACHE".into(), "1".into()),
        ],
        ..Opts::default()
    });
    (greedy(&server), server.stderr())
}

fn layout_written(logs: &str) -> bool {
    logs.contains("not in the cache; rearranged") && logs.contains("later starts map it")
}

fn layout_mapped(logs: &str) -> bool {
    logs.contains("nothing rearranged") && !layout_written(logs)
}

#[test]
fn the_second_start_of_the_default_model_maps_its_weight_layout() {
    let downloads = tempdir("downloads-layout-");
    let env = &[(
        "SERVING_DOWNLOAD_DIR".to_string(),
        downloads.display().to_string(),
    )];
    let (first, logs) = serve_default(&downloads);
    assert!(layout_written(&logs), "{logs}");
    let keys = ls(env, true);
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        ls_keys(env).is_empty(),
        "no prepared model: nothing converts"
    );
    let key = &keys[0];
    let file = prepared_dir(&downloads).join(key).join("weights.layout");
    let whole = std::fs::metadata(&file).expect("the layout file").len();
    // About the model's size (98 MB of Q4_1 and F32 norms).
    assert!((80 << 20..130 << 20).contains(&whole), "{whole} bytes");
    let listing = out(&kiln(&["cache", "ls"], env));
    assert!(
        listing.contains("layout=cpu-interleaved-16-v1"),
        "{listing}"
    );
    assert!(
        listing.contains(
            &model_file()
                .canonicalize()
                .expect("path")
                .display()
                .to_string()
        ),
        "{listing}"
    );
    assert!(
        listing.contains("0 prepared models, 1 weight layouts"),
        "{listing}"
    );

    let (second, logs) = serve_default(&downloads);
    assert!(layout_mapped(&logs), "{logs}");
    assert!(
        logs.contains(&format!("weight layout {key}: mapped {}", file.display())),
        "{logs}"
    );
    assert_eq!(
        second, first,
        "the same greedy answer from the mapped layout"
    );

    // A truncated file is found out, served around and written again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open")
        .set_len(whole / 2)
        .expect("truncate");
    let (third, logs) = serve_default(&downloads);
    assert!(logs.contains("truncated"), "{logs}");
    assert!(layout_written(&logs), "{logs}");
    assert_eq!(third, first);
    assert_eq!(std::fs::metadata(&file).expect("rewritten").len(), whole);

    // So is one overwritten in place at its recorded size (its header's
    // length no longer the file's: here, a zeroed header).
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[..64].fill(0);
    std::fs::write(&file, &bytes).expect("overwrite");
    let (fourth, logs) = serve_default(&downloads);
    assert!(logs.contains("bad magic"), "{logs}");
    assert!(layout_written(&logs), "{logs}");
    assert_eq!(fourth, first);
    let (fifth, logs) = serve_default(&downloads);
    assert!(layout_mapped(&logs), "{logs}");
    assert_eq!(fifth, first);
    assert_eq!(ls(env, true), keys, "the same entry throughout");

    // KILN_LAYOUT_CACHE=0: every weight rearranged, the cache left alone.
    let server = Server::ready(Opts {
        env: vec![
            (
                "SERVING_DOWNLOAD_DIR".into(),
                downloads.display().to_string(),
            ),
            ("KILN_LAYOUT_CACHE".into(), "0".into()),
        ],
        ..Opts::default()
    });
    assert_eq!(greedy(&server), first);
    assert!(
        !server.stderr().contains("weight layout"),
        "{}",
        server.stderr()
    );
}

/// The bytes of the tensors a GGUF file holds (its header left out).
fn tensor_bytes(path: &Path) -> usize {
    let file = kiln_model::gguf::GgufFile::open(path).expect("a GGUF file");
    file.tensors
        .values()
        .map(|t| file.tensor_bytes(t).len())
        .sum()
}
