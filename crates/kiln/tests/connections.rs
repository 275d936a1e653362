//! Hostile and forgetful clients against the real binary: slow headers,
//! slow bodies, idle sockets, clients that never read their answers, more
//! connections than allowed, oversized `Expect: 100-continue` bodies,
//! requests without a `Host` or with a transfer coding kiln does not
//! decode, and stopping with such clients connected.
//!
//! The servers here serve an empty model store, so they start at once; the
//! connection handling does not depend on the models. The clients that stop
//! reading need a large answer, which `/tokenize` of the default model gives.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
    tempdir("empty-store-").display().to_string()
}

/// Timeouts of one second.
fn quick() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        Server::ready(Opts {
            args: vec![
                "--model-store".into(),
                empty_store(),
                "--header-read-timeout".into(),
                "1".into(),
                "--body-read-timeout".into(),
                "1".into(),
                "--idle-timeout".into(),
                "1".into(),
                "--max-request-bytes".into(),
                "1000".into(),
            ],
            watchdog: true,
            cwd: Some(tempdir("cwd-")),
            ..Opts::default()
        })
    })
}

fn connect(s: &Server) -> TcpStream {
    let c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c
}

/// Reads until the server closes the connection; how long that took.
fn time_to_close(c: &mut TcpStream) -> Duration {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return t0.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("still open after {:?}", t0.elapsed())
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("still open after {:?}", t0.elapsed())
            }
            Err(_) => return t0.elapsed(),
        }
    }
}

fn status_line(c: &mut TcpStream) -> String {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).expect("read the status line");
    line
}

#[test]
fn a_slow_request_head_is_cut_off() {
    let s = quick();
    let mut c = connect(s);
    c.write_all(b"GET /ping HTTP/1.1\r\nHo").unwrap();
    let took = time_to_close(&mut c);
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(s.get("/ping").status, 200);
}

#[test]
fn idle_connections_are_closed() {
    let s = quick();
    // Never sends a byte.
    let mut c = connect(s);
    let took = time_to_close(&mut c);
    assert!(took < Duration::from_secs(4), "{took:?}");
    // Keep-alive, idle after one request.
    let mut c = connect(s);
    c.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(status_line(&mut c).contains("200"));
    let took = time_to_close(&mut c);
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn a_slow_body_gets_408() {
    let s = quick();
    let mut c = connect(s);
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .unwrap();
    let t0 = Instant::now();
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("--body-read-timeout"), "{text}");
}

#[test]
fn expect_100_continue_over_the_limit_gets_413_and_no_100() {
    let s = quick();
    let mut c = connect(s);
    c.write_all(
        b"POST /predictions/x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(
        body.contains("\"code\":413") && body.contains("1000 bytes"),
        "{text}"
    );
    // Within the limit, the client is told to go on.
    let mut c = connect(s);
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    assert!(status_line(&mut c).contains("100"), "no 100 Continue");
}

#[test]
fn over_the_connection_cap_the_longest_idle_connection_is_shed() {
    let s = Server::ready(in_tmp(&[
        "--model-store",
        &empty_store(),
        "--max-connections",
        "8",
        "--idle-timeout",
        "120",
        "--header-read-timeout",
        "120",
    ]));
    // Eight idle connections, oldest first; the first also began a request head.
    let mut idle: Vec<TcpStream> = Vec::new();
    for i in 0..8 {
        let mut c = connect(&s);
        if i == 0 {
            c.write_all(b"GET /ping HTTP/1.1\r\n").unwrap();
        }
        idle.push(c);
        std::thread::sleep(Duration::from_millis(30));
    }
    std::thread::sleep(Duration::from_millis(200));
    // The server still answers: each new connection closes the oldest idle one.
    for _ in 0..3 {
        let t0 = Instant::now();
        assert_eq!(s.get("/ping").status, 200);
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
    let took = time_to_close(&mut idle[0]);
    assert!(took < Duration::from_secs(2), "{took:?}");
    let shed = eventually(Duration::from_secs(5), || {
        s.stderr()
            .contains("connection limit reached")
            .then_some(())
    });
    assert!(shed.is_some(), "no log line:\n{}", s.stderr());
    // The newest idle one is still open.
    idle[7]
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    let r = idle[7].read(&mut b);
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "{r:?}"
    );
}

#[test]
fn sigterm_does_not_wait_for_a_half_sent_request() {
    let s = Server::ready(in_tmp(&[
        "--model-store",
        &empty_store(),
        "--grace-period",
        "30",
        "--header-read-timeout",
        "60",
    ]));
    let mut c = connect(&s);
    c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConte")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    s.signal("TERM");
    let st = s.wait_exit(Duration::from_secs(20)).expect("did not exit");
    assert!(st.success(), "{st:?}\n{}", s.stderr());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn a_second_ctrl_c_exits_at_once() {
    let s = Server::ready(in_tmp(&[
        "--model-store",
        &empty_store(),
        "--grace-period",
        "60",
        "--body-read-timeout",
        "60",
    ]));
    // A request in progress (its body is still coming) holds the first stop.
    let mut c = connect(&s);
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.signal("INT");
    assert!(
        s.wait_exit(Duration::from_secs(2)).is_none(),
        "exited before the grace period with a request in flight"
    );
    let t0 = Instant::now();
    s.signal("INT");
    let st = s.wait_exit(Duration::from_secs(10)).expect("did not exit");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(st.code(), Some(130), "{}", s.stderr());
}

#[test]
fn requests_hyper_cannot_parse_get_json_errors() {
    let s = quick();
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let huge_header = format!(
        "GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(500_000)
    );
    let cases: [(&[u8], &str); 4] = [
        (b"GARBAGE\r\n\r\n", "400"),
        (b"GET /ping HTTP/1.1\r\nBad Header\r\n\r\n", "400"),
        (long_uri.as_bytes(), "4"),
        (huge_header.as_bytes(), "431"),
    ];
    for (raw, status) in cases {
        let mut c = connect(s);
        let _ = c.write_all(raw);
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        let shown: String = String::from_utf8_lossy(&raw[..raw.len().min(40)]).into();
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status}")),
            "{shown}: {text}"
        );
        assert!(
            text.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{shown}: {text}"
        );
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{shown}: {e}: {text}"));
        assert!(v["error"].is_string() && v["code"].is_u64(), "{v}");
    }
    assert_eq!(s.get("/ping").status, 200);
}

#[test]
fn a_burst_of_connections_does_not_overshoot_the_cap() {
    let s = Server::ready(in_tmp(&[
        "--model-store",
        &empty_store(),
        "--max-connections",
        "8",
        "--idle-timeout",
        "120",
    ]));
    // Connected as fast as the kernel allows: the server must not hold more
    // than its cap (plus the few it is closing) once it has caught up.
    let mut socks: Vec<TcpStream> = (0..200).map(|_| connect(&s)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let mut open = 0;
    for c in &mut socks {
        c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut b = [0u8; 1];
        if matches!(c.read(&mut b), Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
        {
            open += 1;
        }
    }
    assert!(
        open <= 10,
        "{open} of 200 connections still open with a cap of 8"
    );
    assert_eq!(s.get("/ping").status, 200);
}

/// Reads a whole answer from a fresh connection after sending `raw`.
fn exchange(s: &Server, raw: &[u8]) -> String {
    let mut c = connect(s);
    let _ = c.write_all(raw);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body of a whole answer (panics, showing it, when it is not).
fn json_body(text: &str) -> serde_json::Value {
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn host_headers_and_transfer_codings_are_checked_as_rfc_9112_asks() {
    let s = quick();
    let refused: [(&[u8], &str, &str); 6] = [
        (b"GET /ping HTTP/1.1\r\nConnection: close\r\n\r\n", "400", "must have a Host"),
        (
            b"GET /ping HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
            "400",
            "2 Host headers",
        ),
        (
            b"GET /ping HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
            "400",
            "2 Host headers",
        ),
        (
            b"GET /ping HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
            "400",
            "not a host",
        ),
        // hyper decodes the chunks and would drop the gzip on the floor.
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            "501",
            "'gzip' is not implemented",
        ),
        (
            b"POST /predictions/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            "501",
            "'gzip' is not implemented",
        ),
    ];
    for (raw, status, why) in refused {
        let text = exchange(s, raw);
        let shown = String::from_utf8_lossy(&raw[..raw.len().min(60)]).into_owned();
        // hyper answers an HTTP/1.0 request in HTTP/1.0.
        assert_eq!(text.split(' ').nth(1), Some(status), "{shown}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{shown}: {text}"
        );
        let v = json_body(&text);
        // The OpenAI routes answer in OpenAI's error shape.
        let message = v["error"]["message"].as_str().or(v["error"].as_str());
        assert!(message.is_some_and(|m| m.contains(why)), "{shown}: {text}");
    }
    // One Host (empty is allowed), or none in HTTP/1.0, is served.
    for raw in [
        &b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\n\r\n",
        b"GET /ping HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        b"GET /ping HTTP/1.0\r\n\r\n",
    ] {
        let text = exchange(s, raw);
        assert_eq!(text.split(' ').nth(1), Some("200"), "{text}");
    }
}

#[test]
fn over_the_cap_with_every_connection_busy_the_refusal_is_a_json_503_not_a_reset() {
    let s = Server::ready(in_tmp(&[
        "--model-store",
        &empty_store(),
        "--max-connections",
        "2",
        "--body-read-timeout",
        "60",
    ]));
    // Two requests in progress: their bodies are still coming.
    let open_busy = || {
        let mut c = connect(&s);
        c.write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .unwrap();
        c
    };
    let mut busy: Vec<TcpStream> = (0..2).map(|_| open_busy()).collect();
    // A connection whose head is not parsed yet counts as idle, and the
    // readiness probe's connection (closed by the client, not yet noticed by
    // the server) may have become idle after it: the server then sheds the
    // fresh one. Open again any that was shed, until both are in progress
    // (a connection waiting for its body is never shed, however long).
    let mut settled = false;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(300));
        settled = true;
        for c in busy.iter_mut() {
            if closed_by_server(c) {
                *c = open_busy();
                settled = false;
            }
        }
        if settled {
            break;
        }
    }
    assert!(settled, "the two busy connections kept being shed");
    // A reset would come back as an error (or a cut answer) here.
    for i in 0..20 {
        let mut c = connect(&s);
        c.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nUser-Agent: kiln-test\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        let r = c.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(r.is_ok(), "refusal {i}: {r:?} after {text:?}");
        assert!(text.starts_with("HTTP/1.1 503"), "refusal {i}: {text}");
        let lower = text.to_ascii_lowercase();
        assert!(lower.contains("retry-after: 1\r\n"), "{text}");
        assert!(lower.contains("content-type: application/json"), "{text}");
        assert_eq!(json_body(&text)["code"], 503, "{text}");
    }
    drop(busy);
}

/// Whether the server has closed (or answered on) `c`, without waiting.
fn closed_by_server(c: &TcpStream) -> bool {
    c.set_nonblocking(true).expect("non-blocking");
    let mut b = [0u8; 1];
    let r = c.peek(&mut b);
    c.set_nonblocking(false).expect("blocking");
    !matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A server of the default model (its answers can be large) with `extra`
/// flags, taking prompts of up to 8 MB.
fn model_server(extra: &[&str]) -> Server {
    let mut args = vec!["--kv-cache-mib", "128", "--max-request-bytes", "8000000"];
    args.extend_from_slice(extra);
    Server::ready(in_tmp(&args))
}

/// A connection with a small receive window (4 KiB, 536-byte segments), so
/// that a client that stops reading stops the server's writes after tens
/// of kilobytes instead of the megabytes loopback sockets otherwise buffer.
fn small_window(s: &Server) -> TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: a fresh socket, options of plain integers, and a sockaddr_in
    // that outlives the calls; the descriptor is owned by the TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let set = |level, name, value: libc::c_int| {
            let r = libc::setsockopt(
                fd,
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
        };
        set(libc::SOL_SOCKET, libc::SO_RCVBUF, 4096);
        set(libc::IPPROTO_TCP, libc::TCP_MAXSEG, 536);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = s.port.to_be();
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let r = libc::connect(
            fd,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

/// Starts a streamed completion (four choices, each token with its 20 most
/// likely alternatives: kilobytes a step) and reads nothing after its
/// status line.
fn stop_reading_a_stream(s: &Server) -> TcpStream {
    let body = serde_json::json!({"prompt": "Once upon a time", "max_tokens": 500,
        "ignore_eos": true, "stream": true, "logprobs": 20, "n": 4})
    .to_string();
    let mut c = small_window(s);
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body.as_bytes()).unwrap();
    let mut status = [0u8; 12];
    c.read_exact(&mut status).expect("a status line");
    assert_eq!(&status, b"HTTP/1.1 200", "the stream did not start");
    c
}

/// Tokens of the prompt [`stop_reading_an_answer`] sends; its answer takes
/// 10 bytes a token, well over what loopback sockets buffer (about 4 MB).
const STALLING_TOKENS: usize = 1_000_000;

/// Sends a `/tokenize` request whose answer (every token's id and text, one
/// 10 MB body) is handed to the socket whole, and reads none of it.
fn stop_reading_an_answer(s: &Server) -> TcpStream {
    let prompt = " a".repeat(STALLING_TOKENS);
    let body = serde_json::json!({"prompt": prompt, "return_token_strs": true}).to_string();
    let mut c = connect(s);
    let head = format!(
        "POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body.as_bytes()).unwrap();
    c
}

/// Reads what the server sent until it closes: the bytes, or `None` when
/// the connection is still open after `wait`.
fn read_until_closed(c: &mut TcpStream, wait: Duration) -> Option<usize> {
    let deadline = Instant::now() + wait;
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        c.set_read_timeout(Some(left)).unwrap();
        match c.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(_) => return Some(got),
        }
    }
}

#[test]
fn a_client_that_stops_reading_its_answer_is_cut_off_by_the_write_timeout() {
    let s = model_server(&["--write-timeout", "1", "--body-read-timeout", "3"]);
    let logged = |n: usize| {
        eventually(Duration::from_secs(60), || {
            let log = s.stderr();
            (log.matches("read nothing of its answer for 1s (--write-timeout)")
                .count()
                >= n)
                .then_some(())
        })
    };
    // A stream still being generated (the request is in progress).
    let mut c = stop_reading_a_stream(&s);
    assert!(logged(1).is_some(), "not cut off:\n{}", s.stderr());
    let got = read_until_closed(&mut c, Duration::from_secs(10));
    assert!(got.is_some(), "still open");
    assert_eq!(s.get("/ping").status, 200);
    // A whole answer handed to the socket at once.
    let mut c = stop_reading_an_answer(&s);
    assert!(logged(2).is_some(), "not cut off:\n{}", s.stderr());
    let got = read_until_closed(&mut c, Duration::from_secs(10));
    assert!(
        got.is_some_and(|n| n < STALLING_TOKENS * 10),
        "{got:?} bytes: the whole answer came, or it is still open"
    );

    // Waiting for an answer is not a stalled write: a request whose body is
    // late gets its 408 after the body timeout (3 s), not the write timeout.
    let mut c = connect(&s);
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .unwrap();
    let t0 = Instant::now();
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(t0.elapsed() > Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[test]
fn clients_that_stop_reading_are_shed_at_the_cap() {
    // The write timeout is long: shedding, not the timeout, frees them.
    let s = model_server(&["--max-connections", "3", "--write-timeout", "300"]);
    let mut stalled: Vec<TcpStream> = (0..3).map(|_| stop_reading_a_stream(&s)).collect();
    // Busy while their answers stream (503s), then a new connection closes
    // the one that has read nothing longest.
    let answered = eventually(Duration::from_secs(60), || {
        (s.get("/ping").status == 200).then_some(())
    });
    assert!(answered.is_some(), "/ping unreachable:\n{}", s.stderr());
    // The one shed ends; the others are still open.
    let closed: Vec<bool> = stalled
        .iter_mut()
        .map(|c| read_until_closed(c, Duration::from_millis(500)).is_some())
        .collect();
    assert_eq!(
        closed.iter().filter(|&&c| c).count(),
        1,
        "{closed:?}\n{}",
        s.stderr()
    );
}

#[test]
fn ping_stays_fast_while_huge_answers_are_built() {
    // Two answers of 10 MB each (every token's id and text), built and
    // serialized at once: on the threads that answer HTTP they held /ping
    // for over a second.
    let s = model_server(&[]);
    let port = s.port;
    let body =
        serde_json::json!({"prompt": " a".repeat(STALLING_TOKENS), "return_token_strs": true})
            .to_string();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                request(
                    port,
                    "POST",
                    "/tokenize",
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                )
            })
        })
        .collect();
    let mut times = Vec::new();
    while clients.iter().any(|c| !c.is_finished()) {
        let t = Instant::now();
        assert_eq!(s.get("/ping").status, 200);
        times.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in clients {
        let r = c.join().expect("a client");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.body.len() > STALLING_TOKENS * 10,
            "{} bytes",
            r.body.len()
        );
    }
    let worst = times.iter().max().copied().unwrap_or_default();
    eprintln!(
        "/ping while the answers were made: worst {worst:?} of {}",
        times.len()
    );
    assert!(times.len() >= 10, "{} pings", times.len());
    assert!(worst < Duration::from_millis(500), "worst {worst:?}");
}
