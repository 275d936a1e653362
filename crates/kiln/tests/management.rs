//! The management plane is safe by default: the routes that change what is
//! served answer 403 on the inference address unless enabled; a separate
//! `--management-address` serves them; `POST /models?url=` takes only the
//! model store and kiln's cache (or `--model-url-pattern`), without telling
//! what exists elsewhere; the same weights are not loaded twice unless asked.

mod support;

use std::time::Duration;

use support::*;

/// Options for a server run in a temporary directory (its default `logs/`
/// lands there).
fn in_tmp(args: &[&str]) -> Opts {
    Opts {
        cwd: Some(tempdir("cwd-")),
        ..Opts::args(args)
    }
}

fn empty_store() -> String {
    tempdir("mgmt-store-").display().to_string()
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The port of the `--management-address` listener, from the server's stderr.
fn management_port(s: &Server) -> u16 {
    eventually(Duration::from_secs(10), || {
        let err = s.stderr();
        let line = err
            .lines()
            .find(|l| l.starts_with("kiln: management API on http://"))?
            .to_string();
        line.rsplit(':').next()?.trim().parse().ok()
    })
    .unwrap_or_else(|| panic!("no management address in:\n{}", s.stderr()))
}

fn message(r: &Response) -> String {
    r.json()["error"].as_str().unwrap_or_default().to_string()
}

/// `POST /models?{query}` on the inference address.
fn register(s: &Server, query: &str) -> Response {
    s.req("POST", &format!("/models?{query}"), &[], b"")
}

/// A server with an empty store, management on its inference port, a 16
/// MiB KV cache and `--memory-budget-mib budget`, plus `extra` arguments.
fn budget_server(budget: &str, extra: &[&str]) -> Server {
    let store = empty_store();
    let mut args = vec![
        "--model-store",
        store.as_str(),
        "--management-on-inference-port",
        "--kv-cache-mib",
        "16",
        "--memory-budget-mib",
        budget,
    ];
    args.extend_from_slice(extra);
    Server::ready(in_tmp(&args))
}

#[test]
fn changing_models_is_refused_by_default_and_reading_is_not() {
    let s = Server::ready(in_tmp(&["--model-store", &empty_store()]));
    let file = url_escape(&model_file().display().to_string());
    for (method, path) in [
        ("POST", format!("/models?url={file}&model_name=m")),
        ("PUT", "/models/default?max_worker=2".to_string()),
        ("DELETE", "/models/default".to_string()),
    ] {
        let r = s.req(method, &path, &[], b"");
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        let msg = message(&r);
        for option in [
            "--management-address",
            "--api-key",
            "--management-on-inference-port",
        ] {
            assert!(msg.contains(option), "{msg}");
        }
    }
    assert_eq!(s.get("/models").status, 200);
    // Inference on /models/{name}/invoke is not management.
    let r = s.req("POST", "/models/none/invoke", &[], b"Hi");
    assert_eq!(r.status, 404, "{}", r.text());
}

#[test]
fn the_management_address_serves_them_and_checks_urls() {
    let s = Server::ready(in_tmp(&[
        "--model-store",
        &empty_store(),
        "--management-address",
        "127.0.0.1:0",
        "--kv-cache-mib",
        "16",
    ]));
    let mport = management_port(&s);
    let on_mgmt = |method: &str, path: &str| request(mport, method, path, &[], b"");
    let file = url_escape(&model_file().display().to_string());

    // Outside the store and the cache: refused alike whether the path exists,
    // is a file or a directory, or is reached through `..`.
    let cache = kiln_model::default_model::cache_dir().display().to_string();
    let refusals: Vec<String> = [
        "/etc/passwd".to_string(),
        "/etc".to_string(),
        "/nonexistent/model.gguf".to_string(),
        format!("{cache}/../../../../../../etc/passwd"),
    ]
    .iter()
    .map(|u| {
        let r = on_mgmt(
            "POST",
            &format!("/models?url={}&model_name=x", url_escape(u)),
        );
        assert_eq!(r.status, 403, "{u}: {}", r.text());
        message(&r).replace(u.as_str(), "URL")
    })
    .collect();
    assert!(refusals.iter().all(|m| *m == refusals[0]), "{refusals:#?}");
    assert!(
        refusals[0].contains("--model-url-pattern"),
        "{}",
        refusals[0]
    );

    // The cache is allowed; the inference address still refuses.
    let r = on_mgmt("POST", &format!("/models?url={file}&model_name=a"));
    assert_eq!(r.status, 200, "{}", r.text());
    // The same weights again: refused unless asked.
    let r = on_mgmt("POST", &format!("/models?url={file}&model_name=b"));
    assert_eq!(r.status, 409, "{}", r.text());
    let msg = message(&r);
    assert!(
        msg.contains("'a'") && msg.contains("allow_duplicate"),
        "{msg}"
    );
    let r = on_mgmt(
        "POST",
        &format!("/models?url={file}&model_name=b&allow_duplicate=true&synchronous=false"),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(s.req("DELETE", "/models/a", &[], b"").status, 403);
    // A browser page from another origin cannot use it either.
    let r = request(
        mport,
        "DELETE",
        "/models/a",
        &[("Origin", "http://evil.example")],
        b"",
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(on_mgmt("DELETE", "/models/a").status, 200);
    assert_eq!(on_mgmt("DELETE", "/models/b").status, 200);
}

#[test]
fn a_model_url_pattern_replaces_the_default_places() {
    let s = Server::ready(in_tmp(&[
        "--model-store",
        &empty_store(),
        "--management-on-inference-port",
        "--model-url-pattern",
        r"/nowhere/.*\.gguf",
    ]));
    let file = url_escape(&model_file().display().to_string());
    let r = register(&s, &format!("url={file}&model_name=m"));
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(message(&r).contains("--model-url-pattern"), "{}", r.text());
    // Matched: what happens next is the usual registration (here: not found).
    let r = register(&s, "url=/nowhere/m.gguf&model_name=m");
    assert_eq!(r.status, 400, "{}", r.text());
}

#[test]
fn open_management_on_a_public_address_is_warned_about() {
    let s = Server::start(in_tmp(&[
        "--model-store",
        &empty_store(),
        "--host",
        "0.0.0.0",
        "--management-on-inference-port",
    ]));
    let warned = eventually(Duration::from_secs(10), || {
        s.stderr()
            .contains("--management-on-inference-port on 0.0.0.0")
            .then_some(())
    });
    assert!(warned.is_some(), "{}", s.stderr());
}

#[test]
fn registering_checks_the_memory_budget_first() {
    // The default model is 93.8 MiB; with a 16 MiB KV cache it needs 109 MiB.
    let s = budget_server("100", &[]);
    let file = url_escape(&model_file().display().to_string());
    let r = register(&s, &format!("url={file}&model_name=m"));
    assert_eq!(r.status, 507, "{}", r.text());
    let msg = message(&r);
    assert!(
        msg.contains("109 MiB") && msg.contains("--memory-budget-mib"),
        "{msg}"
    );
    assert_eq!(s.get("/models").json()["models"], serde_json::json!([]));
    let s = budget_server("200", &[]);
    let r = register(&s, &format!("url={file}&model_name=m"));
    assert_eq!(r.status, 200, "{}", r.text());
    // A second copy would take the total to 219 MiB.
    let r = register(
        &s,
        &format!("url={file}&model_name=m2&allow_duplicate=true"),
    );
    assert_eq!(r.status, 507, "{}", r.text());
}

/// The memory check counts a model's own `option.kv_cache_memory_bytes`,
/// not the server's `--kv-cache-mib`: the default model (93.8 MiB) with the
/// server's 16 MiB cache fits a 150 MiB budget, the same weights asking for
/// a 96 MiB cache in their serving.properties do not, and the message says
/// so with the model's figure.
#[test]
fn the_memory_check_counts_the_models_own_kv_cache_size() {
    let dir = tempdir("mgmt-kv-");
    write(
        &dir.join("big/serving.properties"),
        &format!(
            "option.model_id={}\noption.kv_cache_memory_bytes=96M\n",
            model_file().display()
        ),
    );
    let s = budget_server("150", &["--model-url-pattern", ".*"]);
    let big = url_escape(&dir.join("big").display().to_string());
    let r = register(&s, &format!("url={big}&model_name=big"));
    assert_eq!(r.status, 507, "{}", r.text());
    let msg = message(&r);
    assert!(
        msg.contains("a 96 MiB KV cache") && msg.contains("--memory-budget-mib"),
        "{msg}"
    );
    let file = url_escape(&model_file().display().to_string());
    let r = register(&s, &format!("url={file}&model_name=m"));
    assert_eq!(r.status, 200, "{}", r.text());
}
