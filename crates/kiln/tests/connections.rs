//! Hostile and forgetful clients against the real binary: slow headers,
//! slow bodies, idle sockets, more connections than allowed, oversized
//! `Expect: 100-continue` bodies, and stopping with such clients connected.
//!
//! The servers here serve an empty model store, so they start at once; the
//! connection handling does not depend on the models.

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
