//! `/v1/embeddings` on the tiny encoders of `scripts/golden/tiny_encoders.py`
//! (`testdata/tiny/{bert,xlmr,qwen3_embed}`), served with `--models` beside
//! a generation model: every input shape, float and base64 vectors equal to
//! the sentence-transformers goldens, prompts, `dimensions` on a model
//! marked matryoshka (and refused on others), usage, OpenAI-shaped errors,
//! the API key, the body limit, the access log and the route's metrics;
//! `/v1/rerank` / `/rerank` on the tiny cross-encoders (`bert_rerank`,
//! `xlmr_rerank`); and, on the shared server, encoders registered, listed,
//! described and removed through the management API, and a client's
//! disconnect dropping or stopping its work.

use super::*;

fn tiny(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/tiny")
        .join(name)
}

fn golden(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(tiny(name).join("golden.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Decodes standard base64 (the test's own decoder, not the server's encoder).
fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 byte {c}"),
    } as u32;
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let n = chunk
            .iter()
            .map(|&c| if c == b'=' { 0 } else { val(c) })
            .fold(0u32, |acc, v| acc << 6 | v);
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    out
}

/// A server with an API key, a 4096-byte body limit and a log directory,
/// serving `bert`, `xlmr`, `bertm` (bert marked matryoshka), `qwen` (a
/// decoder embedder), `rr` (a cross-encoder) and `gen` (a generation model).
fn server() -> &'static (Server, std::path::PathBuf) {
    static S: OnceLock<(Server, std::path::PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let logs = tempdir("embed-logs-");
        let m = tempdir("bertm-");
        for f in [
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "modules.json",
            "sentence_bert_config.json",
        ] {
            std::fs::copy(tiny("bert").join(f), m.join(f)).unwrap();
        }
        for d in ["1_Pooling", "2_Normalize"] {
            std::fs::create_dir_all(m.join(d)).unwrap();
            std::fs::copy(
                tiny("bert").join(d).join("config.json"),
                m.join(d).join("config.json"),
            )
            .unwrap();
        }
        let mut cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(tiny("bert").join("config.json")).unwrap(),
        )
        .unwrap();
        cfg["matryoshka_dimensions"] = json!([8, 16, 32]);
        write(&m.join("config.json"), &cfg.to_string());
        let models = format!(
            "bert={},xlmr={},bertm={},gen={},rr={},qwen={},xrr={}",
            tiny("bert").display(),
            tiny("xlmr").display(),
            m.display(),
            model_file().display(),
            tiny("bert_rerank").display(),
            tiny("qwen3_embed").display(),
            tiny("xlmr_rerank").display()
        );
        let s = Server::ready(Opts {
            args: vec![
                "--models".into(),
                models,
                "--api-key".into(),
                KEY.into(),
                "--max-request-bytes".into(),
                "4096".into(),
                "--kv-cache-mib".into(),
                "16".into(),
                "--log-dir".into(),
                logs.display().to_string(),
            ],
            watchdog: true,
            ..Opts::default()
        });
        (s, logs)
    })
}

fn post(s: &Server, body: &Value) -> Response {
    s.req(
        "POST",
        "/v1/embeddings",
        &[AUTH, ("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn ok(s: &Server, body: &Value) -> Value {
    let r = post(s, body);
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    r.json()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let d = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-4, "{what}: max |diff| {d}");
}

#[test]
fn embeddings_match_sentence_transformers_for_every_input_shape() {
    let (s, _) = server();
    for name in ["bert", "xlmr"] {
        let g = golden(name);
        let texts = g["texts"].as_array().unwrap();
        let strings: Vec<&str> = texts.iter().map(|t| t["text"].as_str().unwrap()).collect();
        let ids: Vec<Value> = texts.iter().map(|t| t["ids"].clone()).collect();
        let want: Vec<Vec<f32>> = texts.iter().map(|t| floats(&t["embedding"])).collect();
        let n_tokens: usize = ids.iter().map(|i| i.as_array().unwrap().len()).sum();
        // A single string.
        let v = ok(s, &json!({"model": name, "input": strings[1]}));
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], name);
        assert_eq!(v["data"][0]["object"], "embedding");
        assert_close(&floats(&v["data"][0]["embedding"]), &want[1], name);
        assert_eq!(
            v["usage"]["prompt_tokens"],
            ids[1].as_array().unwrap().len()
        );
        // A list of strings: in order, usage summed, and the same bits as one at a time.
        let v = ok(s, &json!({"model": name, "input": strings}));
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), strings.len());
        for (i, d) in data.iter().enumerate() {
            assert_eq!(d["index"], i);
            assert_close(&floats(&d["embedding"]), &want[i], name);
            let one = ok(s, &json!({"model": name, "input": strings[i]}));
            assert_eq!(
                floats(&one["data"][0]["embedding"]),
                floats(&d["embedding"]),
                "{name} batch vs single"
            );
        }
        assert_eq!(v["usage"]["prompt_tokens"], n_tokens);
        assert_eq!(v["usage"]["total_tokens"], n_tokens);
        // Token ids, one list and several.
        let one = ok(s, &json!({"model": name, "input": ids[2]}));
        assert_close(&floats(&one["data"][0]["embedding"]), &want[2], name);
        let all = ok(s, &json!({"model": name, "input": ids}));
        assert_eq!(all["data"], v["data"], "{name}: ids vs text");
        // base64: the same floats, little-endian.
        let b = ok(
            s,
            &json!({"model": name, "input": strings, "encoding_format": "base64"}),
        );
        for (i, d) in b["data"].as_array().unwrap().iter().enumerate() {
            let bytes = unbase64(d["embedding"].as_str().unwrap());
            let f: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(f, floats(&v["data"][i]["embedding"]), "{name}: base64");
        }
    }
}

#[test]
fn decoder_embedder_applies_the_default_or_named_prompt() {
    let (s, _) = server();
    let g = golden("qwen3_embed");
    let texts = g["texts"].as_array().unwrap();
    let strings: Vec<&str> = texts.iter().map(|t| t["text"].as_str().unwrap()).collect();
    for (body_extra, key) in [(json!(null), ""), (json!("document"), "document_")] {
        let mut body = json!({"model": "qwen", "input": strings});
        if !body_extra.is_null() {
            body["prompt_name"] = body_extra.clone();
        }
        let v = ok(s, &body);
        let mut tokens = 0;
        for (i, t) in texts.iter().enumerate() {
            assert_close(
                &floats(&v["data"][i]["embedding"]),
                &floats(&t[format!("{key}embedding")]),
                &format!("qwen {key}{i}"),
            );
            tokens += t[format!("{key}ids")].as_array().unwrap().len();
            // One at a time: the same bits as in the batch.
            let mut one = body.clone();
            one["input"] = json!(strings[i]);
            let one = ok(s, &one);
            assert_eq!(
                floats(&one["data"][0]["embedding"]),
                floats(&v["data"][i]["embedding"]),
                "qwen batch vs single"
            );
        }
        assert_eq!(v["usage"]["prompt_tokens"], tokens, "{key}");
    }
    assert_openai_error(
        &post(
            s,
            &json!({"model": "qwen", "input": "a", "prompt_name": "passage"}),
        ),
        400,
        "prompt_name 'passage' is not one of the model's prompts (document, query)",
    );
    assert_openai_error(
        &post(
            s,
            &json!({"model": "xlmr", "input": "a", "prompt_name": "passage"}),
        ),
        400,
        "prompt_name 'passage' is not one of the model's prompts (document, query)",
    );
    // sentence-transformers writes empty "query" and "document" prompts.
    let a = ok(s, &json!({"model": "bert", "input": "kiln"}));
    let b = ok(
        s,
        &json!({"model": "bert", "input": "kiln", "prompt_name": "query"}),
    );
    assert_eq!(a["data"], b["data"]);
    assert_openai_error(
        &post(s, &json!({"model": "qwen", "input": "a", "prompt_name": 1})),
        400,
        "'prompt_name' must be a string",
    );
}

#[test]
fn dimensions_truncate_and_renormalise_only_where_supported() {
    let (s, _) = server();
    let full = ok(s, &json!({"model": "bertm", "input": "the cat"}));
    let full = floats(&full["data"][0]["embedding"]);
    let v = ok(
        s,
        &json!({"model": "bertm", "input": "the cat", "dimensions": 8}),
    );
    let cut = floats(&v["data"][0]["embedding"]);
    assert_eq!(cut.len(), 8);
    let norm: f32 = full[..8].iter().map(|x| x * x).sum::<f32>().sqrt();
    let want: Vec<f32> = full[..8].iter().map(|x| x / norm).collect();
    assert_close(&cut, &want, "renormalised");
    let unit: f32 = cut.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((unit - 1.0).abs() < 1e-5, "{unit}");
    assert_openai_error(
        &post(
            s,
            &json!({"model": "bertm", "input": "a", "dimensions": 12}),
        ),
        400,
        "[8, 16, 32]",
    );
    assert_openai_error(
        &post(s, &json!({"model": "bert", "input": "a", "dimensions": 8})),
        400,
        "does not support 'dimensions'",
    );
}

#[test]
fn bad_requests_get_openai_errors() {
    let (s, _) = server();
    assert_openai_error(
        &post(s, &json!({"model": "nope", "input": "a"})),
        404,
        "nope",
    );
    assert_openai_error(
        &post(s, &json!({"model": "gen", "input": "a"})),
        400,
        "not an embedding model",
    );
    assert_openai_error(
        &post(s, &json!({"model": "bert", "input": []})),
        400,
        "empty",
    );
    assert_openai_error(
        &post(s, &json!({"model": "bert", "input": ""})),
        400,
        "empty",
    );
    assert_openai_error(
        &post(s, &json!({"model": "bert", "input": [1, 99999]})),
        400,
        "outside the vocabulary",
    );
    assert_openai_error(
        &post(s, &json!({"model": "bert", "input": vec![5; 65]})),
        400,
        "more than the model's maximum",
    );
    assert_openai_error(
        &post(
            s,
            &json!({"model": "bert", "input": "a", "encoding_format": "int8"}),
        ),
        400,
        "encoding_format",
    );
    assert_openai_error(
        &post(s, &json!({"model": "bert", "input": "a", "n": 2})),
        400,
        "unknown field 'n'",
    );
    assert_openai_error(&post(s, &json!({"input": "a"})), 400, "'model' is required");
    // The API key, as on every route.
    let r = s.req(
        "POST",
        "/v1/embeddings",
        &[("Content-Type", "application/json")],
        json!({"model": "bert", "input": "a"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 401, "{}", r.text());
    // The body limit.
    let big = json!({"model": "bert", "input": "a ".repeat(4000)});
    assert_eq!(post(s, &big).status, 413);
}

#[test]
fn access_log_and_metrics_see_embeddings() {
    let (s, logs) = server();
    let v = ok(
        s,
        &json!({"model": "xlmr", "input": ["kiln", "the cat sat on the mat"]}),
    );
    let line = format!(
        "\"POST /v1/embeddings\" model=xlmr status=200 tokens_in={} ",
        v["usage"]["prompt_tokens"]
    );
    let found = eventually(Duration::from_secs(5), || {
        let log = std::fs::read_to_string(logs.join("access.log")).ok()?;
        log.lines().any(|l| l.contains(&line)).then_some(())
    });
    assert!(found.is_some(), "no access.log line with {line}");
    let metrics = s.req("GET", "/server/metrics", &[AUTH], b"").text();
    let m = metric_value(
        &metrics,
        r#"kiln_http_requests_total{route="/v1/embeddings",status="200"}"#,
    );
    assert!(m.unwrap_or(0.0) >= 1.0, "{metrics}");
}

#[test]
fn lmi_route_answers_a_list_of_vectors() {
    let (s, _) = server();
    let g = golden("bert");
    let texts = g["texts"].as_array().unwrap();
    let r = s.req(
        "POST",
        "/predictions/bert",
        &[AUTH, ("Content-Type", "application/json")],
        json!({"inputs": [texts[0]["text"], texts[1]["text"]]})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let list = v.as_array().unwrap_or_else(|| panic!("not a list: {v}"));
    assert_eq!(list.len(), 2);
    for (i, vec) in list.iter().enumerate() {
        assert_close(&floats(vec), &floats(&texts[i]["embedding"]), "lmi");
    }
    let r = s.req(
        "POST",
        "/predictions/bert",
        &[AUTH, ("Content-Type", "application/json")],
        json!({"inputs": "kiln"}).to_string().as_bytes(),
    );
    assert_eq!(r.json().as_array().map(Vec::len), Some(1), "{}", r.text());
    let r = s.req(
        "POST",
        "/predictions/bert",
        &[AUTH, ("Content-Type", "application/json")],
        json!({"inputs": [1, 2]}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("'inputs' must be"), "{}", r.text());
}

#[test]
fn rerank_orders_documents_by_cross_encoder_score() {
    rerank_case("rr", "bert_rerank");
}

#[test]
fn xlmr_rerank_orders_documents_by_cross_encoder_score() {
    rerank_case("xrr", "xlmr_rerank");
}

fn rerank_case(model: &str, dir: &str) {
    let (s, _) = server();
    let g = golden(dir);
    let pairs = g["pairs"].as_array().unwrap();
    let docs: Vec<&str> = pairs
        .iter()
        .map(|p| p["document"].as_str().unwrap())
        .collect();
    let want: Vec<f32> = pairs
        .iter()
        .map(|p| p["score"].as_f64().unwrap() as f32)
        .collect();
    let tokens: usize = pairs
        .iter()
        .map(|p| p["ids"].as_array().unwrap().len())
        .sum();
    for route in ["/v1/rerank", "/rerank"] {
        let r = s.req(
            "POST",
            route,
            &[AUTH, ("Content-Type", "application/json")],
            json!({"model": model, "query": g["query"], "documents": docs})
                .to_string()
                .as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), docs.len());
        let mut last = f32::INFINITY;
        for res in results {
            let i = res["index"].as_u64().unwrap() as usize;
            let score = res["relevance_score"].as_f64().unwrap() as f32;
            assert!(
                (score - want[i]).abs() < 1e-5,
                "{route}: doc {i}: {score} vs {}",
                want[i]
            );
            assert!(score <= last, "{route}: not sorted: {v}");
            last = score;
            assert_eq!(res["document"]["text"], docs[i]);
        }
        assert_eq!(v["usage"]["total_tokens"], tokens);
    }
    // top_n, object documents, return_documents false.
    let docs_obj: Vec<Value> = docs.iter().map(|d| json!({"text": d})).collect();
    let r = s.req(
        "POST",
        "/v1/rerank",
        &[AUTH, ("Content-Type", "application/json")],
        json!({"model": model, "query": g["query"], "documents": docs_obj, "top_n": 1,
               "return_documents": false})
        .to_string()
        .as_bytes(),
    );
    let v = r.json();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{v}");
    let best = (0..want.len())
        .max_by(|&a, &b| want[a].total_cmp(&want[b]))
        .unwrap();
    assert_eq!(results[0]["index"], best);
    assert!(results[0].get("document").is_none(), "{v}");
    // Errors: OpenAI-shaped.
    let bad = |body: Value| {
        s.req(
            "POST",
            "/v1/rerank",
            &[AUTH, ("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    assert_openai_error(
        &bad(json!({"model": model, "query": "q", "documents": []})),
        400,
        "documents",
    );
    assert_openai_error(
        &bad(json!({"model": "bert", "query": "q", "documents": ["a"]})),
        400,
        "not a reranker",
    );
    assert_openai_error(
        &bad(json!({"model": "nope", "query": "q", "documents": ["a"]})),
        404,
        "nope",
    );
}

/// `GET /models/{name}`'s model object.
fn described(s: &Server, name: &str) -> Value {
    let r = s.get(&format!("/models/{name}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()[0]["models"][0].clone()
}

#[test]
fn encoders_register_list_describe_and_unregister_at_run_time() {
    let s = shared();
    let _g = models_lock();
    let bert = url_escape(&tiny("bert"));
    let r = register(s, &format!("url={bert}&model_name=emb_rt"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "Model \"emb_rt\" registered.");
    let r = register(
        s,
        &format!("url={}&model_name=rr_rt", url_escape(&tiny("bert_rerank"))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Listed beside the generation models, in both APIs, sorted by name.
    let ids: Vec<String> = s.get("/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&"emb_rt".to_string()), "{ids:?}");
    assert!(ids.contains(&"rr_rt".to_string()), "{ids:?}");
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    let list = s.get("/models?limit=1000").json();
    let row = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["modelName"] == "emb_rt")
        .cloned()
        .unwrap_or_else(|| panic!("emb_rt not in {list}"));
    assert_eq!(row["status"], "Healthy");
    assert_eq!(row["modelUrl"], tiny("bert").display().to_string());
    let d = described(s, "emb_rt");
    assert_eq!(d["kiln"]["task"], "text_embedding");
    assert_eq!(d["kiln"]["dimensions"], 32);
    assert_eq!(described(s, "rr_rt")["kiln"]["task"], "text_classification");
    // Served: the golden vector, and the request counted.
    let g = golden("bert");
    let t = &g["texts"][1];
    let r = s.req(
        "POST",
        "/v1/embeddings",
        &[("Content-Type", "application/json")],
        json!({"model": "emb_rt", "input": t["text"]})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_close(
        &floats(&r.json()["data"][0]["embedding"]),
        &floats(&t["embedding"]),
        "emb_rt",
    );
    let d = described(s, "emb_rt");
    assert_eq!(d["kiln"]["requestsFinished"], 1);
    assert_eq!(d["kiln"]["inputsComputed"], 1);
    let r = s.req(
        "POST",
        "/v1/rerank",
        &[("Content-Type", "application/json")],
        json!({"model": "rr_rt", "query": "q", "documents": ["a", "b"]})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // A name in use is refused, for an encoder and for a generation model.
    let r = register(s, &format!("url={bert}&model_name=emb_rt"));
    assert_djl_error(&r, 409, "already registered");
    let r = register(
        s,
        &format!("url={}&model_name=emb_rt", url_escape(&model_file())),
    );
    assert_djl_error(&r, 409, "already registered");
    // Unregistered: gone from the lists and the routes.
    for name in ["emb_rt", "rr_rt"] {
        let r = s.req("DELETE", &format!("/models/{name}"), &[], b"");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(s.get(&format!("/models/{name}")).status, 404);
    }
    let r = s.req(
        "POST",
        "/v1/embeddings",
        &[("Content-Type", "application/json")],
        json!({"model": "emb_rt", "input": "a"})
            .to_string()
            .as_bytes(),
    );
    assert_openai_error(&r, 404, "emb_rt");
    let ids = s.get("/v1/models").text();
    assert!(!ids.contains("emb_rt") && !ids.contains("rr_rt"), "{ids}");
}

/// A random BERT wide and long enough that a request of 256 inputs of 500
/// tokens takes seconds (8 batches), in a temporary directory.
fn slow_bert() -> std::path::PathBuf {
    let dir = tempdir("slow-bert-");
    let (d, ff, layers, pos, vocab) = (128usize, 512usize, 2usize, 512usize, 112usize);
    let cfg = json!({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": d,
        "num_attention_heads": 4, "num_hidden_layers": layers, "intermediate_size": ff,
        "max_position_embeddings": pos, "vocab_size": vocab, "type_vocab_size": 2,
        "pad_token_id": 0, "hidden_act": "gelu", "layer_norm_eps": 1e-12});
    write(&dir.join("config.json"), &cfg.to_string());
    std::fs::copy(
        tiny("bert").join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![vocab, d]),
        ("embeddings.position_embeddings.weight".into(), vec![pos, d]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, d]),
        ("embeddings.LayerNorm.weight".into(), vec![d]),
        ("embeddings.LayerNorm.bias".into(), vec![d]),
    ];
    for i in 0..layers {
        let p = format!("encoder.layer.{i}");
        for (n, shape) in [
            ("attention.self.query", vec![d, d]),
            ("attention.self.key", vec![d, d]),
            ("attention.self.value", vec![d, d]),
            ("attention.output.dense", vec![d, d]),
            ("intermediate.dense", vec![ff, d]),
            ("output.dense", vec![d, ff]),
        ] {
            let out = shape[0];
            tensors.push((format!("{p}.{n}.weight"), shape));
            tensors.push((format!("{p}.{n}.bias"), vec![out]));
        }
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            tensors.push((format!("{p}.{n}.weight"), vec![d]));
            tensors.push((format!("{p}.{n}.bias"), vec![d]));
        }
    }
    // safetensors: an 8-byte header length, the JSON header, the f32 data.
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    let mut seed = 24u32;
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for _ in 0..n {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            let x = (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            let v = if name.ends_with("LayerNorm.weight") {
                1.0 + 0.1 * x
            } else {
                0.1 * x
            };
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend(h);
    file.extend(data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
    dir
}

#[test]
fn embeddings_client_disconnect_drops_queued_and_stops_running_work() {
    let s = shared();
    let _g = models_lock();
    let dir = slow_bert();
    let r = register(
        s,
        &format!("url={}&model_name=emb_cancel", url_escape(&dir)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let k = |name: &str| described(s, "emb_cancel")["kiln"][name].as_u64().unwrap();
    let field = |name: &str| described(s, "emb_cancel")[name].as_u64().unwrap();
    let ids: Vec<Vec<u32>> = (0..256)
        .map(|i| (0..500).map(|j| 5 + ((i * 7 + j) % 100) as u32).collect())
        .collect();
    let body = json!({"model": "emb_cancel", "input": ids});
    // One request computing, a second one queued behind it.
    let running = s.stream_open("/v1/embeddings", &body);
    let started = eventually(Duration::from_secs(20), || {
        (field("requestInFlight") == 1).then_some(())
    });
    assert!(started.is_some(), "the first request never started");
    let queued = s.stream_open("/v1/embeddings", &body);
    let waiting = eventually(Duration::from_secs(10), || {
        (field("requestInQueue") == 1).then_some(())
    });
    assert!(waiting.is_some(), "the second request never queued");
    // The queued client leaves: its request goes without any work, while
    // the first still runs.
    drop(queued);
    let dropped = eventually(Duration::from_secs(10), || {
        (field("requestInQueue") == 0 && k("requestsCancelled") == 1).then_some(())
    });
    assert!(dropped.is_some(), "the queued request was not dropped");
    assert_eq!(field("requestInFlight"), 1, "the first request stopped too");
    // The running client leaves: its work stops at the next batch.
    drop(running);
    let stopped = eventually(Duration::from_secs(20), || {
        (field("requestInFlight") == 0 && k("requestsCancelled") == 2).then_some(())
    });
    assert!(stopped.is_some(), "the running request did not stop");
    let computed = k("inputsComputed");
    assert!(computed < 256, "computed {computed} inputs of 256");
    assert_eq!(k("requestsFinished"), 0);
    // The model still serves.
    let r = s.req(
        "POST",
        "/v1/embeddings",
        &[("Content-Type", "application/json")],
        json!({"model": "emb_cancel", "input": "the cat"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(k("requestsFinished"), 1);
    let r = s.req("DELETE", "/models/emb_cancel", &[], b"");
    assert_eq!(r.status, 200);
}
