//! What a new user meets first: `--help`, the messages of a failed start,
//! and what `kiln serve` prints to a stderr that is not a terminal.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{tempdir, write};

fn kiln(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args)
        .env_remove("KILN_MODEL_STORE")
        .env_remove("KILN_PORT")
        .env_remove("KILN_HOST")
        .env_remove("KILN_MODEL")
        .current_dir(tempdir("cwd-"))
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run kiln")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_every_command_and_no_missing_one() {
    let o = kiln(&["--help"], &[]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for cmd in ["serve", "generate", "bench", "inspect"] {
        assert!(text.contains(cmd), "{cmd} missing from:\n{text}");
    }
    assert!(!text.contains("pull"), "{text}");
}

/// Every `--model...` flag named in `text` is one that `kiln serve` takes.
fn only_serve_flags(text: &str) {
    for (i, _) in text.match_indices("--model") {
        let rest = &text[i + "--model".len()..];
        assert!(
            rest.starts_with('s') || rest.starts_with("-store"),
            "the hint names a flag kiln serve rejects: {text}"
        );
    }
}

#[test]
fn serve_without_the_default_model_names_serve_flags() {
    let cache = tempdir("empty-cache-");
    let o = kiln(
        &["serve", "--port", "0"],
        &[("KILN_CACHE", cache.to_str().unwrap())],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("default model"), "{err}");
    assert!(
        err.contains("--models") && err.contains("--model-store"),
        "{err}"
    );
    only_serve_flags(&err);
    // generate, which does take --model, still says so.
    let o = kiln(
        &["generate", "hi"],
        &[("KILN_CACHE", cache.to_str().unwrap())],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--model"), "{}", stderr(&o));
}

#[test]
fn address_in_use_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let store = tempdir("empty-store-");
    let o = kiln(
        &[
            "serve",
            "--port",
            &port.to_string(),
            "--model-store",
            store.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("--port"), "{err}");
}

#[test]
fn a_missing_file_is_reported_once() {
    let o = kiln(
        &["generate", "--model", "/nonexistent/model.gguf", "hi"],
        &[],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn serve_logs_without_colours_to_a_pipe_and_says_listening_once() {
    // A store whose one model is broken: its load fails with an ERROR log
    // line, which a terminal would get in colour.
    let root = tempdir("colour-store-");
    write(&root.join("broken/model.gguf"), "GGUF not really");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--port", "0", "--model-store"])
        .arg(&root)
        .arg("--log-dir")
        .arg(root.join("logs"))
        .env("KILN_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln serve");
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let failed = line.contains("failed to load");
        lines.push(line);
        if failed {
            break;
        }
    }
    // Anything printed right after.
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
        lines.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = lines.join("\n");
    assert!(text.contains("failed to load"), "{text}");
    assert!(!text.contains('\u{1b}'), "ANSI codes on a pipe:\n{text}");
    assert_eq!(text.matches("listening on").count(), 1, "{text}");
    let log = std::fs::read_to_string(root.join("logs/serving.log")).unwrap_or_default();
    assert!(log.contains("listening on http://"), "{log}");
}
