//! Lifecycle: `/ping` while models load, SIGTERM drains and exits, the queue
//! size of file models, and `/ping` staying fast under huge prompts.

use super::*;

#[test]
fn ping_is_503_while_startup_models_load_and_200_naming_models_registered_later() {
    // At start-up the server is not ready until its models load (caught
    // here when the load is slower than the first ping; sources.rs holds a
    // start-up download to see it every time).
    let s = Server::start(Opts::args(&[
        "--kv-cache-mib",
        "16",
        "--management-on-inference-port",
    ]));
    let p = s.get("/ping");
    if p.status != 200 {
        assert_eq!(p.status, 503, "{}", p.text());
        assert!(p.header("retry-after").is_some());
        assert_eq!(p.json()["status"], "Loading", "{}", p.text());
        assert_eq!(p.json()["loading"], json!(["default"]), "{}", p.text());
    }
    s.wait_ready();
    // A model registered later does not take the server out of service
    // while it loads (DJL's ping answers 200 while one is pending): it is
    // named under `loading`, and its own requests get 503.
    let file = url_escape(&model_file());
    let mut seen = false;
    for attempt in 0..5 {
        let name = format!("late{attempt}");
        let r = register(
            &s,
            &format!("url={file}&model_name={name}&synchronous=false"),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        let p = s.get("/ping");
        let d = s.get(&format!("/models/{name}")).json();
        let q = s.post_json(&format!("/predictions/{name}"), &json!({"inputs": "Hi"}));
        assert_eq!(p.status, 200, "{}", p.text());
        let v = p.json();
        assert_eq!(v["status"], "Healthy", "{v}");
        assert_eq!(d[0]["models"][0]["loadedAtStartup"], false, "{d}");
        if v.get("loading").is_none() {
            // Loading finished before we asked: try again.
            continue;
        }
        assert_eq!(v["loading"], json!([name]), "{v}");
        if d[0]["models"][0]["status"] == "Loading" {
            assert_djl_error(&q, 503, "loading");
        }
        seen = true;
        break;
    }
    assert!(seen, "never saw /ping name a model while it loaded");
    let d = s.get("/models/default").json();
    assert_eq!(d[0]["models"][0]["loadedAtStartup"], true, "{d}");
}

#[test]
fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0() {
    let s = Server::ready(Opts::args(&[
        "--kv-cache-mib",
        "16",
        "--grace-period",
        "20",
    ]));
    let n = 40;
    let mut st = s.stream(
        "/predictions/default",
        &[("Content-Type", "application/json")],
        &json!({"inputs": "Count to one hundred:", "stream": true,
            "parameters": {"max_new_tokens": n, "ignore_eos": true, "details": true}}),
    );
    let first = st.next_json_line().expect("a first token");
    s.signal("TERM");
    // New connections are refused once the server has seen the signal.
    let refused = eventually(Duration::from_secs(5), || {
        std::net::TcpStream::connect(s.addr())
            .is_err()
            .then_some(())
    });
    assert!(
        refused.is_some(),
        "still accepting connections after SIGTERM"
    );
    let (tokens, last) = read_lmi(&mut st, vec![first]);
    assert_eq!(tokens.len(), n, "the in-flight stream was cut short");
    assert_eq!(last["details"]["finish_reason"], "length");
    // Nothing is left in flight: it exits at once, not at the end of the grace period.
    let status = s
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("did not exit once idle:\n{}", s.stderr()));
    assert!(status.success(), "{status:?}\n{}", s.stderr());
    assert!(s.stderr().contains("shutting down"), "{}", s.stderr());
}

#[test]
fn sigterm_exits_0_when_the_grace_period_is_over() {
    let grace = 8;
    let s = Server::ready(Opts::args(&[
        "--kv-cache-mib",
        "256",
        "--grace-period",
        &grace.to_string(),
    ]));
    let stream = |n: usize| {
        s.stream(
            "/predictions/default",
            &[("Content-Type", "application/json")],
            &json!({"inputs": "Count to one thousand:", "stream": true,
                "parameters": {"max_new_tokens": n, "ignore_eos": true, "details": true}}),
        )
    };
    let (mut short, mut long) = (stream(10), stream(1400));
    let mut chat = s.stream(
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &json!({"model": "default", "stream": true, "max_tokens": 1400, "ignore_eos": true,
            "messages": [{"role": "user", "content": "Count to one thousand."}]}),
    );
    // Without `details`: DJL's last line still says finish_reason "error".
    let mut bare = s.stream(
        "/predictions/default",
        &[("Content-Type", "application/json")],
        &json!({"inputs": "Count to one thousand:", "stream": true,
            "parameters": {"max_new_tokens": 1400, "ignore_eos": true}}),
    );
    let first = short.next_json_line().expect("a first token");
    assert!(long.next_json_line().is_some());
    assert!(chat.next_event().is_some());
    assert!(bare.next_json_line().is_some());
    let t0 = Instant::now();
    s.signal("TERM");
    let (tokens, last) = read_lmi(&mut short, vec![first]);
    assert_eq!(tokens.len(), 10, "the short stream was cut short");
    assert_eq!(last["details"]["finish_reason"], "length");
    // The long ones end when the grace period ends, each with a last line
    // saying so, and the process exits 0 then.
    let (tokens, last) = read_lmi(&mut long, Vec::new());
    assert!(tokens.len() < 1399, "{} tokens", tokens.len());
    assert_eq!(last["details"]["finish_reason"], "error", "{last}");
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("grace period")),
        "{last}"
    );
    // DJL (lmi_input_output_schema.md, "Error Responses"; output_formatter.py
    // get_details_dict; rolling_batch.py stop_on_any_exception): the stream
    // that failed after its 200 ends with details.finish_reason "error" and,
    // where no token came with the failure, the error token (id -1).
    let (_, last) = read_lmi(&mut bare, Vec::new());
    assert_eq!(last["details"]["finish_reason"], "error", "{last}");
    assert_eq!(last["token"]["id"], -1, "{last}");
    assert_eq!(last["code"], 424, "{last}");
    let rest = chat.rest();
    assert!(rest.contains("grace period"), "{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    let status = s
        .wait_exit(Duration::from_secs(grace + 10))
        .unwrap_or_else(|| panic!("did not exit:\n{}", s.stderr()));
    let took = t0.elapsed();
    assert!(status.success(), "{status:?}\n{}", s.stderr());
    assert!(
        took < Duration::from_secs(grace + 2),
        "exited {took:?} after SIGTERM with a grace period of {grace} s"
    );
    assert!(
        s.stderr().contains("grace period of 8s is over"),
        "{}",
        s.stderr()
    );
}

#[test]
fn the_queue_size_of_file_models_comes_from_the_flag_or_the_environment() {
    let file = model_file().display().to_string();
    let queue = |s: &Server, name: &str| {
        s.get(&format!("/models/{name}")).json()[0]["models"][0]["jobQueueSize"].clone()
    };
    let s = Server::start(Opts::args(&[
        "--job-queue-size",
        "7",
        "--kv-cache-mib",
        "16",
    ]));
    assert_eq!(queue(&s, "default"), 7);
    drop(s);
    for (var, n) in [
        ("SERVING_JOB_QUEUE_SIZE", 5),
        ("MAX_CONCURRENT_REQUESTS", 6),
    ] {
        let s = Server::start(Opts {
            args: [
                "--models",
                &format!("m={file}"),
                "--job-queue-size",
                "7",
                "--kv-cache-mib",
                "16",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            env: vec![(var.to_string(), n.to_string())],
            ..Opts::default()
        });
        assert_eq!(queue(&s, "m"), n, "{var}");
    }
}

#[test]
fn ping_stays_fast_while_huge_prompts_are_tokenized() {
    let s = Server::ready(Opts::args(&["--kv-cache-mib", "16"]));
    let port = s.port;
    // Four clients, each sending 3.9 MB prompts (refused as too long, after
    // tokenizing them) one after the other.
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(3_900_000 / 45);
    let body = json!({"inputs": prompt, "parameters": {"max_new_tokens": 1}}).to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (body, stop) = (body.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = support::request(
                        port,
                        "POST",
                        "/predictions/default",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    );
                    // Too long: DJL's 424 for request validation.
                    assert_eq!(r.status, 424, "{}", r.text());
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut times = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        let t = Instant::now();
        assert_eq!(s.get("/ping").status, 200);
        times.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let done: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    times.sort();
    let median = times[times.len() / 2];
    let worst = times[times.len() - 1];
    eprintln!(
        "/ping under {done} huge prompts: median {median:?}, worst {worst:?} of {}",
        times.len()
    );
    assert!(
        done >= 4,
        "the prompts were not being tokenized ({done} done)"
    );
    assert!(median < Duration::from_millis(50), "median {median:?}");
    assert!(worst < Duration::from_millis(500), "worst {worst:?}");
}
