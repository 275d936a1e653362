//! `--threads`: the CPU backend computes on as many threads as asked
//! (issue 9: thread scaling), and refuses nonsense.

mod support;

use std::process::Command;

fn bench(threads: &str) -> std::process::Output {
    let model = support::model_file();
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["bench", "--threads", threads, "--model"])
        .arg(&model)
        .args([
            "--repeats",
            "1",
            "--concurrency",
            "0",
            "--prompt-tokens",
            "4",
        ])
        .args(["--gen-tokens", "2", "--json"])
        .env_remove("RAYON_NUM_THREADS")
        .env_remove("KILN_THREADS")
        // No weight-layout entry left in the user's cache by a test.
        .env("KILN_LAYOUT_CACHE", "0")
        .output()
        .expect("run kiln")
}

#[test]
fn bench_computes_on_the_threads_asked_for() {
    for n in [1usize, 3] {
        let o = bench(&n.to_string());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(v["threads"].as_u64(), Some(n as u64), "{v}");
        let backend = v["backend"].as_str().unwrap_or_default();
        assert!(backend.contains(&format!("({n} threads)")), "{backend}");
    }
}

#[test]
fn zero_threads_is_refused_by_name() {
    let o = bench("0");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--threads"), "{err}");
}
