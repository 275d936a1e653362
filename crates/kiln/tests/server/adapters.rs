//! LoRA adapters over HTTP: a model directory with `option.enable_lora`
//! and an `adapters/` folder, DJL's adapter management API, vLLM's
//! load/unload routes, every way a request picks an adapter (DJL's
//! `"adapters"`, SageMaker's header, the OpenAI `model`), `/v1/models`
//! with `parent`, and every bad input refused with a clear 4xx while the
//! base model keeps serving.

use super::*;

/// `testdata/tiny/llama/<name>` (the adapters of scripts/golden/tiny_lora.py).
fn tiny(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/tiny")
        .join(path)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn lmi(s: &Server, model: &str, extra: Value, headers: &[(&str, &str)]) -> Response {
    let mut body =
        json!({"inputs": "The cat", "parameters": {"max_new_tokens": 8, "do_sample": false}});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    s.req(
        "POST",
        &format!("/predictions/{model}"),
        &[&[("Content-Type", "application/json")], headers].concat(),
        body.to_string().as_bytes(),
    )
}

fn generated(r: &Response) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["generated_text"].as_str().unwrap().to_string()
}

fn completion(s: &Server, model: &str) -> Response {
    s.post_json(
        "/v1/completions",
        &json!({"model": model, "prompt": "The cat", "max_tokens": 8, "temperature": 0}),
    )
}

#[test]
fn adapters_are_registered_picked_listed_and_refused_over_http() {
    let s = shared();
    let _g = models_lock();
    let dir = tempdir("lora-model-").join("tinylora");
    write(
        &dir.join("serving.properties"),
        &format!(
            "option.model_id={}\noption.enable_lora=true\noption.max_loras=2\noption.max_lora_rank=4\n",
            tiny("llama").display()
        ),
    );
    copy_dir(&tiny("llama/lora_a"), &dir.join("adapters/a"));
    // A broken adapter in the folder is skipped; the model still starts.
    write(&dir.join("adapters/broken/adapter_config.json"), "{");
    let r = register(s, &format!("url={}&model_name=tinylora", url_escape(&dir)));
    assert_eq!(r.status, 200, "{}", r.text());
    let base = "/models/tinylora/adapters";

    // The folder's adapter, described and listed as DJL does.
    let d = s.get(&format!("{base}/a")).json();
    assert_eq!(d[0]["name"], "a");
    assert_eq!(d[0]["src"], dir.join("adapters/a").display().to_string());
    let names = |s: &Server| -> Vec<String> {
        s.get(base).json()["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(s), vec!["a"]);

    // Register by the management API.
    let src = url_escape(&tiny("llama/lora_c"));
    let r = s.req("POST", &format!("{base}?name=c&src={src}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "Adapter c registered");
    assert_eq!(names(s), vec!["a", "c"]);
    let page = s.get(&format!("{base}?limit=1")).json();
    assert_eq!(page["adapters"].as_array().unwrap().len(), 1);
    assert_eq!(page["nextPageToken"], "1");

    // Every way to pick adapter a gives the same text, and not the base's.
    let on_base = generated(&lmi(s, "tinylora", json!({}), &[]));
    let on_a = generated(&lmi(s, "tinylora", json!({"adapters": "a"}), &[]));
    assert_ne!(on_a, on_base);
    assert_eq!(
        generated(&lmi(
            s,
            "tinylora",
            json!({}),
            &[("X-Amzn-SageMaker-Adapter-Identifier", "a")]
        )),
        on_a
    );
    let on_c = generated(&lmi(s, "tinylora", json!({"adapters": "c"}), &[]));
    assert_ne!(on_c, on_a);
    let r = completion(s, "a");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "a");
    assert_eq!(r.json()["choices"][0]["text"], on_a.as_str());
    let r = completion(s, "tinylora");
    assert_eq!(r.json()["choices"][0]["text"], on_base.as_str());

    // /v1/models lists each adapter with its parent.
    let models = s.get("/v1/models").json();
    let entry = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "c")
        .cloned()
        .unwrap_or_else(|| panic!("{models}"));
    assert_eq!(entry["parent"], "tinylora");

    // vLLM's routes.
    let r = s.post_json(
        "/v1/load_lora_adapter",
        &json!({"model": "tinylora", "lora_name": "v", "lora_path": tiny("llama/lora_a")}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "Success: LoRA adapter 'v' added successfully.");
    assert_eq!(
        r.status,
        completion(s, "v").status,
        "a vLLM-loaded adapter serves"
    );
    assert_eq!(
        completion(s, "v").json()["choices"][0]["text"],
        on_a.as_str()
    );
    let r = s.post_json(
        "/v1/load_lora_adapter",
        &json!({"model": "tinylora", "lora_name": "v", "lora_path": tiny("llama/lora_a")}),
    );
    assert_openai_error(&r, 409, "already registered");
    let r = s.post_json(
        "/v1/unload_lora_adapter",
        &json!({"model": "tinylora", "lora_name": "v"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "Success: LoRA adapter 'v' removed successfully.");
    let r = s.post_json(
        "/v1/unload_lora_adapter",
        &json!({"model": "tinylora", "lora_name": "v"}),
    );
    assert_openai_error(&r, 404, "not registered");
    let r = s.post_json(
        "/v1/load_lora_adapter",
        &json!({"model": "tinylora", "lora_name": "w"}),
    );
    assert_openai_error(&r, 400, "'lora_path' is required");

    // Bad inputs, each a clear 4xx.
    let reg = |q: &str| s.req("POST", &format!("{base}?{q}"), &[], b"");
    assert_djl_error(&reg(&format!("src={src}")), 400, "'name' is required");
    assert_djl_error(&reg("name=x"), 400, "'src' is required");
    let missing = url_escape(&dir.join("nowhere"));
    assert_djl_error(&reg(&format!("name=x&src={missing}")), 400, "not found");
    let broken = url_escape(&dir.join("adapters/broken"));
    assert_djl_error(&reg(&format!("name=x&src={broken}")), 400, "not valid JSON");
    let rank8 = url_escape(&tiny("llama/lora_b"));
    assert_djl_error(
        &reg(&format!("name=x&src={rank8}")),
        400,
        "rank 8 exceeds max_lora_rank 4",
    );
    let phi3 = url_escape(&tiny("phi3/lora"));
    assert_djl_error(
        &reg(&format!("name=x&src={phi3}")),
        400,
        "target module 'qkv_proj' does not exist in this llama model",
    );
    assert_djl_error(
        &reg(&format!("name=c&src={src}")),
        409,
        "already registered",
    );
    assert_djl_error(
        &reg(&format!("name=..%2Fx&src={src}")),
        400,
        "invalid adapter name",
    );
    let r = s.req(
        "POST",
        &format!("/models/nosuch/adapters?name=x&src={src}"),
        &[],
        b"",
    );
    assert_djl_error(&r, 404, "not registered");
    // A model without option.enable_lora.
    let r = s.req(
        "POST",
        &format!("/models/default/adapters?name=x&src={src}"),
        &[],
        b"",
    );
    assert_djl_error(&r, 400, "option.enable_lora");
    assert_djl_error(&s.get(&format!("{base}/x")), 404, "not registered");
    assert_eq!(names(s), vec!["a", "c"]);

    // Update, then unregister: requests naming it are refused after.
    let r = s.req(
        "POST",
        &format!("{base}/c/update?src={}", url_escape(&tiny("llama/lora_a"))),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "Adapter c updated");
    assert_eq!(
        generated(&lmi(s, "tinylora", json!({"adapters": "c"}), &[])),
        on_a
    );
    let r = s.req("DELETE", &format!("{base}/a"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "Adapter a unregistered");
    assert_djl_error(
        &s.req("DELETE", &format!("{base}/a"), &[], b""),
        404,
        "not registered",
    );
    let r = lmi(s, "tinylora", json!({"adapters": "a"}), &[]);
    assert!(r.status == 400 || r.status == 424, "{}", r.text());
    assert!(
        r.text().contains("adapter 'a' is not registered"),
        "{}",
        r.text()
    );
    assert_openai_error(&completion(s, "a"), 404, "not registered");
    let r = lmi(s, "tinylora", json!({"adapters": 5}), &[]);
    assert!(r.status == 400 || r.status == 424, "{}", r.text());

    // The base model kept serving throughout.
    assert_eq!(generated(&lmi(s, "tinylora", json!({}), &[])), on_base);
    let r = s.req("DELETE", "/models/tinylora", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn an_adapter_outside_the_url_policy_is_forbidden() {
    let (s, _) = guarded();
    let src = url_escape(&tiny("llama/lora_a"));
    let r = s.req(
        "POST",
        &format!("/models/default/adapters?name=x&src={src}"),
        &[AUTH],
        b"",
    );
    assert_djl_error(&r, 403, "not inside the model store");
    let r = s.req(
        "POST",
        "/v1/load_lora_adapter",
        &[AUTH, ("Content-Type", "application/json")],
        json!({"model": "default", "lora_name": "x", "lora_path": tiny("llama/lora_a")})
            .to_string()
            .as_bytes(),
    );
    assert_openai_error(&r, 403, "not inside the model store");
}

#[test]
fn preload_and_pin_are_djls_over_http() {
    let s = shared();
    let _g = models_lock();
    let dir = tempdir("lora-pin-").join("tinypin");
    write(
        &dir.join("serving.properties"),
        &format!(
            "option.model_id={}\noption.enable_lora=true\noption.max_loras=1\noption.max_cpu_loras=2\n",
            tiny("llama").display()
        ),
    );
    let r = register(s, &format!("url={}&model_name=tinypin", url_escape(&dir)));
    assert_eq!(r.status, 200, "{}", r.text());
    let base = "/models/tinypin/adapters";
    let reg = |q: &str| s.req("POST", &format!("{base}?{q}"), &[], b"");
    let src = |a: &str| url_escape(&tiny(&format!("llama/{a}")));
    let describe = |name: &str| s.get(&format!("{base}/{name}")).json()[0].clone();

    // pin=true: read now and pinned.
    let r = reg(&format!("name=p&src={}&pin=true", src("lora_a")));
    assert_eq!(r.status, 200, "{}", r.text());
    let d = describe("p");
    assert_eq!(
        (d["pin"].clone(), d["loaded"].clone()),
        (json!(true), json!(true))
    );
    // preload=false: registered, read at its first request.
    let r = reg(&format!("name=lazy&src={}&preload=false", src("lora_b")));
    assert_eq!(r.status, 200, "{}", r.text());
    let d = describe("lazy");
    assert_eq!(
        (d["loaded"].clone(), d["rank"].clone()),
        (json!(false), json!(0))
    );
    let r = completion(s, "lazy");
    assert_eq!(r.status, 200, "{}", r.text());
    let d = describe("lazy");
    assert_eq!(
        (d["loaded"].clone(), d["rank"].clone()),
        (json!(true), json!(8))
    );
    assert_djl_error(
        &reg(&format!("name=x&src={}&pin=maybe", src("lora_c"))),
        400,
        "'pin' must be true or false, got 'maybe'",
    );

    // update?pin=true pins without reading again; now both slots are pinned.
    let r = s.req("POST", &format!("{base}/lazy/update?pin=true"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "Adapter lazy updated");
    assert_eq!(describe("lazy")["pin"], true);
    let full = "all 2 of option.max_cpu_loras's slots hold pinned adapters (lazy, p)";
    assert_djl_error(
        &reg(&format!("name=c&src={}&pin=true", src("lora_c"))),
        400,
        full,
    );
    assert_djl_error(&reg(&format!("name=c&src={}", src("lora_c"))), 400, full);
    // Registered without preload, it cannot be loaded for a request either.
    let r = reg(&format!("name=c&src={}&preload=false", src("lora_c")));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = completion(s, "c");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains(full), "{}", r.text());
    // The pinned adapters and the base keep serving; unpinning frees a slot.
    assert_eq!(completion(s, "p").status, 200);
    assert_eq!(completion(s, "tinypin").status, 200);
    let r = s.req("POST", &format!("{base}/p/update?pin=false"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = completion(s, "c");
    assert_eq!(r.status, 200, "{}", r.text());
    let listed: Vec<(String, bool)> = s.get(base).json()["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap().to_string(), a["pin"] == true))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("c".into(), false),
            ("lazy".into(), true),
            ("p".into(), false)
        ]
    );
    let r = s.req("DELETE", "/models/tinypin", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_mixture_of_experts_model_serves_its_adapters() {
    let s = shared();
    let _g = models_lock();
    let dir = tempdir("lora-moe-").join("tinymoe");
    write(
        &dir.join("serving.properties"),
        &format!(
            "option.model_id={}\noption.enable_lora=true\n",
            tiny("mixtral").display()
        ),
    );
    copy_dir(&tiny("mixtral/lora"), &dir.join("adapters/moe"));
    let r = register(s, &format!("url={}&model_name=tinymoe", url_escape(&dir)));
    assert_eq!(r.status, 200, "{}", r.text());
    let text = |m: &str| {
        let r = completion(s, m);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    // The router and expert deltas change the text; picked by the DJL
    // field too.
    let (on_base, on_moe) = (text("tinymoe"), text("moe"));
    assert_ne!(on_moe, on_base);
    assert_eq!(
        generated(&lmi(s, "tinymoe", json!({"adapters": "moe"}), &[])),
        on_moe
    );
    let r = s.req("DELETE", "/models/tinymoe", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
}
