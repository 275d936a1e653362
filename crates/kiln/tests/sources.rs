//! Model sources end to end, through the real binary: `s3://` models from a
//! real S3-protocol server on loopback (`s3s-fs`, built by
//! `scripts/fetch-assets.sh --tests`), and Hugging Face ids from a stand-in
//! for the Hub (a local HTTP server with the Hub's URL layout; not the Hub).
//!
//! Served from a model store, registered by `POST /models?url=` and fetched
//! by `kiln generate --model`; killed half way and restarted (it resumes and
//! ends verified); two servers on one cache (one downloads, the other waits
//! on the lock, both serve); bad
//! credentials, a missing bucket or prefix, a cut transfer, a truncated or
//! corrupt object, a store that never answers or stops sending: each a clear
//! error naming the URL, with no complete-looking entry left in the cache.

mod sources_support;
mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sources_support::hub::{Hub, HubConfig, COMMIT};
use sources_support::proxy::{Mode, Proxy};
use sources_support::s3::{self, S3Server};
use sources_support::*;
use support::*;

const URL: &str = "s3://models/tiny-llama";
/// Where a held download stops: a third of the tiny model's weights.
const HOLD_AT: u64 = 150_000;

/// A store root with bucket `models`: the tiny model (and files kiln must not
/// fetch) under `tiny-llama/`, the same with its weights cut in half under
/// `broken/`, and only a README under `docs/`.
fn bucket_root() -> PathBuf {
    let root = tempdir("s3-root-");
    let put = |dir: &str, name: &str, bytes: &[u8]| {
        let d = root.join("models").join(dir);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join(name), bytes).expect("write");
    };
    for (name, bytes) in tiny_files() {
        put("tiny-llama", &name, &bytes);
        let cut = if name == "model.safetensors" {
            &bytes[..bytes.len() / 2]
        } else {
            &bytes[..]
        };
        put("broken", &name, cut);
    }
    put("docs", "README.md", b"# nothing to serve\n");
    root
}

/// A model store with `tiny` from `model_id` and `local`, the same model
/// from the repository, to compare answers with.
fn store(model_id: &str) -> String {
    let store = tempdir("store-");
    for (name, id) in [
        ("tiny", model_id.to_string()),
        ("local", tiny_dir().display().to_string()),
    ] {
        let d = store.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(
            d.join("serving.properties"),
            format!("option.model_id={id}\n"),
        )
        .expect("write");
    }
    store.display().to_string()
}

fn serve_opts(store: &str, store_port: u16, cache: &Path) -> Opts {
    Opts {
        args: vec!["--model-store".into(), store.into()],
        env: s3::env(store_port, cache),
        cwd: Some(tempdir("cwd-")),
        ..Opts::default()
    }
}

/// The greedy answer of `model` to a fixed prompt.
fn answer(server: &Server, model: &str) -> String {
    let body = json!({"inputs": "The cat", "parameters": {"max_new_tokens": 12}});
    let r = server.post_json(&format!("/predictions/{model}"), &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["generated_text"]
        .as_str()
        .expect("generated_text")
        .to_string()
}

#[test]
fn an_s3_model_killed_half_way_resumes_verified_and_serves() {
    let s3 = S3Server::start(&bucket_root());
    let proxy = Proxy::start(s3.port, Mode::StallAfter(HOLD_AT));
    let cache = tempdir("cache-");
    let opts = serve_opts(&store(URL), proxy.port, &cache);

    let first = Server::start(opts.clone());
    let held = eventually(Duration::from_secs(60), || {
        partial_weights(&cache).filter(|&n| n >= HOLD_AT / 2)
    });
    assert!(
        held.is_some(),
        "no partial download appeared:\n{}",
        first.stderr()
    );
    assert_eq!(first.get("/ping").status, 503, "still loading while held");
    drop(first); // SIGKILL, half way through the weights
    assert!(
        complete_entries(&cache).is_empty(),
        "nothing complete after a kill"
    );

    proxy.set(Mode::Pass);
    proxy.reset_count();
    let second = Server::start(opts);
    second.wait_ready();
    let log = second.stderr();
    assert!(
        log.contains(&format!("{URL}: resuming model.safetensors at byte ")),
        "{log}"
    );
    assert!(
        proxy.passed() < tiny_bytes(),
        "the restart fetched {} bytes, the whole model is {}",
        proxy.passed(),
        tiny_bytes()
    );
    let entries = complete_entries(&cache);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_tiny_entry(&entries[0]);
    assert!(
        partial_entries(&cache).is_empty(),
        "the partial directory became the entry"
    );
    let from_s3 = answer(&second, "tiny");
    assert!(!from_s3.is_empty());
    assert_eq!(
        from_s3,
        answer(&second, "local"),
        "same weights, same answer"
    );
}

#[test]
fn two_servers_on_one_cache_download_once_and_both_serve() {
    let s3 = S3Server::start(&bucket_root());
    let proxy = Proxy::start(s3.port, Mode::StallAfter(HOLD_AT));
    let cache = tempdir("cache-");
    let opts = serve_opts(&store(URL), proxy.port, &cache);
    let a = Server::start(opts.clone());
    let b = Server::start(opts);
    let waiting = eventually(Duration::from_secs(60), || {
        let (la, lb) = (a.stderr(), b.stderr());
        (la.contains("waiting for its lock") || lb.contains("waiting for its lock")).then_some(())
    });
    assert!(
        waiting.is_some(),
        "neither server waited on the lock:\n--- a\n{}\n--- b\n{}",
        a.stderr(),
        b.stderr()
    );
    proxy.set(Mode::Pass);
    a.wait_ready();
    b.wait_ready();
    let logs = [a.stderr(), b.stderr()];
    let downloaded = logs
        .iter()
        .filter(|l| l.contains(": downloading 4 files"))
        .count();
    let waited = logs
        .iter()
        .filter(|l| l.contains(&format!("{URL}: downloaded by another process")))
        .count();
    assert_eq!((downloaded, waited), (1, 1), "{logs:#?}");
    assert_eq!(complete_entries(&cache).len(), 1);
    assert_tiny_entry(&complete_entries(&cache)[0]);
    assert_eq!(answer(&a, "tiny"), answer(&b, "tiny"));
}

/// `kiln generate --model MODEL` with `env`, greedy, a few tokens.
fn generate(model: &str, env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args([
        "generate",
        "--model",
        model,
        "--max-new-tokens",
        "6",
        "The cat",
    ])
    .env("KILN_LOG", "info")
    .env("NO_COLOR", "1")
    .env("HF_HOME", tempdir("hf-home-"))
    .env_remove("HF_TOKEN")
    .env_remove("HUGGING_FACE_HUB_TOKEN")
    .env_remove("KILN_MODEL")
    .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run kiln generate")
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `kiln generate` on `model`, expecting a failure whose message names
/// `url` and says `why`, with no complete entry left in `cache`.
fn assert_fails(model: &str, env: &[(String, String)], cache: &Path, url: &str, why: &str) {
    let out = generate(model, env);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{model} succeeded:\n{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{err}"));
    assert!(line.contains(url), "the error names {url}: {line}");
    assert!(line.contains(why), "the error says '{why}': {line}");
    assert!(
        complete_entries(cache).is_empty(),
        "{model}: nothing may look complete: {:?}",
        complete_entries(cache)
    );
}

#[test]
fn s3_errors_name_the_url_and_leave_nothing_complete() {
    let s3 = S3Server::start(&bucket_root());
    let fresh = || tempdir("cache-");

    let cache = fresh();
    let mut env = s3::env(s3.port, &cache);
    env.push(("AWS_SECRET_ACCESS_KEY".into(), "not-the-secret".into()));
    assert_fails(URL, &env, &cache, URL, "access denied");

    let cache = fresh();
    let env = s3::env(s3.port, &cache);
    assert_fails(
        "s3://no-such-bucket/tiny",
        &env,
        &cache,
        "s3://no-such-bucket/tiny",
        "not found",
    );
    assert_fails(
        "s3://models/no-such-model",
        &env,
        &cache,
        "s3://models/no-such-model",
        "no model files there (nothing is listed under it)",
    );
    assert_fails(
        "s3://models/docs",
        &env,
        &cache,
        "s3://models/docs",
        "none of them weights",
    );

    // A transfer cut off a third of the way into the weights (and every
    // retry refused): an error, the partial copy kept aside for resuming.
    let proxy = Proxy::start(s3.port, Mode::CutAfter(HOLD_AT));
    let cache = fresh();
    let env = s3::env(proxy.port, &cache);
    // Which file's request meets the cut first depends on scheduling.
    assert_fails(URL, &env, &cache, URL, ": downloading ");
    assert_eq!(partial_entries(&cache).len(), 1, "kept to resume from");
    let held = partial_weights(&cache).unwrap_or(0);
    assert!(held < tiny_bytes());
    proxy.set(Mode::Pass);
    let out = generate(URL, &env);
    assert!(out.status.success(), "{}", stderr_of(&out));
    if held > 0 {
        assert!(stderr_of(&out).contains("resuming model.safetensors at byte "));
    }
    assert_tiny_entry(&complete_entries(&cache)[0]);
    assert!(partial_entries(&cache).is_empty());

    // An object that is itself truncated downloads as it is (the store's size
    // and ETag agree with it) and then fails to load, naming the URL.
    let cache = fresh();
    let env = s3::env(s3.port, &cache);
    let out = generate("s3://models/broken", &env);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .expect("error line");
    assert!(line.contains("s3://models/broken"), "{line}");
    assert!(line.contains("model.safetensors"), "{line}");
}

#[test]
fn post_models_takes_an_s3_url_like_a_store_does() {
    let s3 = S3Server::start(&bucket_root());
    let cache = tempdir("cache-");
    let server = Server::start(Opts {
        args: [
            "--model-store",
            &tempdir("empty-store-").display().to_string(),
            "--management-on-inference-port",
            "--model-url-pattern",
            "s3://models/.*|/.*",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        env: s3::env(s3.port, &cache),
        cwd: Some(tempdir("cwd-")),
        ..Opts::default()
    });
    // Named after the prefix's last segment, downloaded, then served.
    let r = server.req("POST", &format!("/models?url={URL}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let local = format!("/models?url={}&model_name=local", tiny_dir().display());
    let r = server.req("POST", &local, &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(answer(&server, "tiny-llama"), answer(&server, "local"));
    assert_tiny_entry(&complete_entries(&cache)[0]);

    // A prefix with nothing under it fails to load, naming the URL.
    let r = server.req(
        "POST",
        "/models?url=s3://models/no-such-model&model_name=missing",
        &[],
        b"",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text()
            .contains("s3://models/no-such-model: no model files there"),
        "{}",
        r.text()
    );
    // A url outside the pattern is refused before anything is fetched.
    let r = server.req("POST", "/models?url=s3://other-bucket/m", &[], b"");
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(complete_entries(&cache).len(), 1);
}

fn hub_files() -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let mut files = tiny_files();
    // Other formats and folders a Hub repository holds, which kiln must not fetch.
    files.push(("pytorch_model.bin".into(), vec![7u8; 4096]));
    files.push(("original/consolidated.00.pth".into(), vec![9u8; 4096]));
    let lfs = [
        "model.safetensors",
        "pytorch_model.bin",
        "original/consolidated.00.pth",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    (files, lfs)
}

const REPO: &str = "kiln-test/tiny-llama";
const TOKEN: &str = "hf_kiln_test_token";

fn hub_env(hub: &Hub, cache: &Path, token: bool) -> Vec<(String, String)> {
    let mut env = vec![
        ("HF_ENDPOINT".to_string(), hub.endpoint()),
        ("KILN_CACHE".to_string(), cache.display().to_string()),
        ("SERVING_DOWNLOAD_DIR".to_string(), String::new()),
    ];
    if token {
        env.push(("HF_TOKEN".into(), TOKEN.into()));
    }
    env
}

#[test]
fn a_hub_model_downloads_only_what_it_needs_resumes_and_is_cached() {
    let (files, lfs) = hub_files();
    let hub = Hub::start(HubConfig {
        repo: REPO.into(),
        files: files.into_iter().collect(),
        lfs,
        token: Some(TOKEN.into()),
        cut_first: Some(("model.safetensors".into(), 100_000)),
        corrupt: vec![],
    });
    let cache = tempdir("cache-");
    let env = hub_env(&hub, &cache, true);
    let url = format!("hf://{REPO}");

    // The first download is cut short, and not tried again: an error naming
    // the model.
    let mut once = env.clone();
    once.push(("KILN_DOWNLOAD_RETRIES".into(), "0".into()));
    assert_fails(REPO, &once, &cache, &url, "model.safetensors");
    assert_eq!(partial_weights(&cache), Some(100_000));

    // The next run resumes it with a range request, at the pinned commit.
    let out = generate(REPO, &env);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        hub.seen().iter().any(
            |(p, r)| p.ends_with("/model.safetensors") && r.as_deref() == Some("bytes=100000-")
        ),
        "{:#?}",
        hub.seen()
    );
    let entries = complete_entries(&cache);
    assert_eq!(entries.len(), 1);
    assert_tiny_entry(&entries[0]);
    let mut fetched: Vec<String> = hub
        .seen()
        .iter()
        .filter_map(|(p, _)| p.split_once("/resolve/").map(|(_, rest)| rest.to_string()))
        .collect();
    fetched.sort();
    fetched.dedup();
    let want: Vec<String> = TINY_FILES.iter().map(|f| format!("{COMMIT}/{f}")).collect();
    assert_eq!(
        fetched, want,
        "only the model's files, all at the listed commit"
    );

    // The same answer as the model read from the repository.
    let local = generate(&tiny_dir().display().to_string(), &env);
    assert!(local.status.success(), "{}", stderr_of(&local));
    assert_eq!(out.stdout, local.stdout);

    // Cached: the next run asks the Hub nothing.
    hub.clear();
    let again = generate(&format!("hf://{REPO}"), &env);
    assert!(again.status.success(), "{}", stderr_of(&again));
    assert_eq!(again.stdout, local.stdout);
    assert!(hub.seen().is_empty(), "{:#?}", hub.seen());
}

#[test]
fn hub_errors_name_the_model_and_leave_nothing_complete() {
    let (files, lfs) = hub_files();
    let hub = Hub::start(HubConfig {
        repo: REPO.into(),
        files: files.clone().into_iter().collect(),
        lfs: lfs.clone(),
        token: Some(TOKEN.into()),
        ..HubConfig::default()
    });
    let url = format!("hf://{REPO}");
    let cache = tempdir("cache-");
    assert_fails(
        REPO,
        &hub_env(&hub, &cache, false),
        &cache,
        &url,
        "HF_TOKEN",
    );
    let cache = tempdir("cache-");
    assert_fails(
        "hf://kiln-test/tiny-llama@no-such-branch",
        &hub_env(&hub, &cache, true),
        &cache,
        "hf://kiln-test/tiny-llama@no-such-branch",
        "no such model or revision",
    );

    // Bytes that do not hash to the listing's sha256 are discarded.
    let bad = Hub::start(HubConfig {
        repo: REPO.into(),
        files: files.into_iter().collect(),
        lfs,
        corrupt: vec!["model.safetensors".into()],
        ..HubConfig::default()
    });
    let cache = tempdir("cache-");
    assert_fails(REPO, &hub_env(&bad, &cache, false), &cache, &url, "sha256");
    assert_eq!(partial_weights(&cache), None, "the corrupt copy is gone");
}

/// A loopback listener that accepts every connection and never answers
/// (nor closes); counts the connections.
fn silent_store() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            held.push(c);
        }
    });
    (port, count)
}

/// Download settings short enough for a test: 1 s, `retries` further tries.
fn impatient(env: &mut Vec<(String, String)>, retries: u32) {
    env.push(("KILN_DOWNLOAD_TIMEOUT".into(), "1".into()));
    env.push(("KILN_DOWNLOAD_RETRIES".into(), retries.to_string()));
}

#[test]
fn a_store_that_never_answers_fails_the_load_and_the_server_stays_ready() {
    let (port, connections) = silent_store();
    let cache = tempdir("cache-");
    let mut env = s3::env(port, &cache);
    impatient(&mut env, 1);
    let server = Server::ready(Opts {
        args: [
            "--models",
            &format!("local={}", tiny_dir().display()),
            "--management-on-inference-port",
            "--model-url-pattern",
            "s3://.*",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        env,
        cwd: Some(tempdir("cwd-")),
        ..Opts::default()
    });
    let r = server.req(
        "POST",
        "/models?url=s3://models/stuck&synchronous=false",
        &[],
        b"",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    // While it loads, the model that serves keeps the server in service
    // (DJL's ping answers 200 while a registered model is pending).
    let ping = server.get("/ping");
    assert_eq!(ping.status, 200, "{}", ping.text());
    assert_eq!(ping.json()["loading"], json!(["stuck"]), "{}", ping.text());
    let ready = server.get("/health/ready");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert!(!answer(&server, "local").is_empty());
    // Then it fails, naming the URL and the wait, after one further try.
    let failed = eventually(Duration::from_secs(30), || {
        let d = server.get("/models/stuck").json();
        let m = &d[0]["models"][0];
        (m["status"] == "Failed").then(|| m["error"].as_str().unwrap_or("").to_string())
    });
    let error = failed.unwrap_or_else(|| panic!("still loading:\n{}", server.stderr()));
    assert!(
        error.contains("s3://models/stuck: listing: an answer did not come within 1s"),
        "{error}"
    );
    assert!(error.contains("tried 2 times"), "{error}");
    assert_eq!(connections.load(Ordering::SeqCst), 2, "{error}");
    assert!(complete_entries(&cache).is_empty());
    // A synchronous registration gets the failure as its answer.
    let r = server.req("POST", "/models?url=s3://models/stuck2", &[], b"");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("did not come within 1s"), "{}", r.text());
}

#[test]
fn stalled_downloads_fail_clearly_and_broken_ones_resume_in_the_same_run() {
    // A Hub that never answers.
    let (port, _) = silent_store();
    let cache = tempdir("cache-");
    let mut env = vec![
        (
            "HF_ENDPOINT".to_string(),
            format!("http://127.0.0.1:{port}"),
        ),
        ("KILN_CACHE".to_string(), cache.display().to_string()),
        ("SERVING_DOWNLOAD_DIR".to_string(), String::new()),
    ];
    impatient(&mut env, 0);
    let url = format!("hf://{REPO}");
    assert_fails(
        REPO,
        &env,
        &cache,
        &url,
        "did not come within 1s (KILN_DOWNLOAD_TIMEOUT) (tried once",
    );

    // An S3 store that stops sending a third of the way into the weights,
    // and holds every later request: each wait ends, then the download.
    let s3 = S3Server::start(&bucket_root());
    let proxy = Proxy::start(s3.port, Mode::StallAfter(HOLD_AT));
    let cache = tempdir("cache-");
    let mut env = s3::env(proxy.port, &cache);
    impatient(&mut env, 1);
    assert_fails(URL, &env, &cache, URL, "did not come within 1s");
    assert_eq!(partial_entries(&cache).len(), 1, "kept to resume from");

    // A Hub transfer cut half way is resumed at once, with a range request.
    let (files, lfs) = hub_files();
    let hub = Hub::start(HubConfig {
        repo: REPO.into(),
        files: files.into_iter().collect(),
        lfs,
        cut_first: Some(("model.safetensors".into(), 100_000)),
        ..HubConfig::default()
    });
    let cache = tempdir("cache-");
    let out = generate(REPO, &hub_env(&hub, &cache, false));
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("trying again from what arrived"), "{err}");
    assert!(
        hub.seen().iter().any(
            |(p, r)| p.ends_with("/model.safetensors") && r.as_deref() == Some("bytes=100000-")
        ),
        "{:#?}",
        hub.seen()
    );
    assert_tiny_entry(&complete_entries(&cache)[0]);
}
