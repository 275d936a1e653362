//! `kiln serve`'s KV cache size flags: `--kv-cache-memory-bytes` takes
//! vLLM's byte counts and says how to write one when it is not, and it
//! cannot be given together with `--kv-cache-mib`. (The values' path into
//! the engine is covered by the registry's and `kv_size`'s unit tests.)

use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    let store = std::env::temp_dir().join(format!("kiln-kv-flags-{}", std::process::id()));
    std::fs::create_dir_all(&store).expect("temp store");
    let mut all = vec![
        "serve",
        "--model-store",
        store.to_str().expect("utf-8 path"),
    ];
    all.extend_from_slice(args);
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&all)
        .output()
        .expect("run kiln")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn a_byte_count_that_is_not_one_is_refused_saying_how_to_write_one() {
    let out = kiln(&["--kv-cache-memory-bytes", "4 GB"]);
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("--kv-cache-memory-bytes '4 GB' is not a byte count")
            && t.contains("K/M/G/T (powers of 1024, e.g. 4G)"),
        "{t}"
    );
}

#[test]
fn the_two_size_flags_cannot_both_be_given() {
    let out = kiln(&["--kv-cache-mib", "64", "--kv-cache-memory-bytes", "4G"]);
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("--kv-cache-mib") && t.contains("cannot be used with"),
        "{t}"
    );
}
