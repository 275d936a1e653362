//! What the server tests share: starting `kiln serve` on a free loopback
//! port, and a small HTTP/1.1 client over `std::net::TcpStream` (one
//! connection per request, `Connection: close`), which gives full control of
//! the socket for streaming and disconnect tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The one default-model server a test binary's tests share (128 MiB of
/// KV cache, the watchdog on), started by the first test that asks.
pub fn shared_server() -> &'static Server {
    static S: std::sync::OnceLock<Server> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        Server::ready(Opts {
            args: vec!["--kv-cache-mib".into(), "128".into()],
            watchdog: true,
            ..Opts::default()
        })
    })
}

/// How long a test waits for any one response before failing.
pub const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// The default model file (the server serves it as `default` when started
/// with no models; tests register it again under other names).
pub fn model_file() -> PathBuf {
    kiln_model::default_model::default_model_path()
        .unwrap_or_else(|e| panic!("{e} (scripts/fetch-assets.sh fetches it)"))
}

/// A temporary directory that lives until the test binary exits: under
/// `$TMPDIR/kiln-test-<pid>/`, which the next run removes once this process
/// is gone (servers kept in statics are never dropped, so neither are the
/// directories they use).
pub fn tempdir(prefix: &str) -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let stale = name
                    .strip_prefix("kiln-test-")
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if stale {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let root = tmp.join(format!("kiln-test-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("create the test directory");
        root
    });
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(root)
        .expect("create a temporary directory")
        .keep()
}

/// A running `kiln serve`.
pub struct Server {
    child: Mutex<Option<Child>>,
    /// The server's own process id (for signals).
    pub pid: u32,
    pub port: u16,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// Options for [`Server::start`].
#[derive(Default, Clone)]
pub struct Opts {
    /// Extra arguments after `kiln serve --port 0`.
    pub args: Vec<String>,
    /// Environment variables to set.
    pub env: Vec<(String, String)>,
    /// Working directory (default: the test's).
    pub cwd: Option<PathBuf>,
    /// Run under a watchdog shell that kills the server when the test
    /// binary exits, for servers kept in statics (which are never dropped).
    pub watchdog: bool,
}

impl Opts {
    pub fn args(args: &[&str]) -> Self {
        Self {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Self::default()
        }
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

impl Server {
    /// Starts `kiln serve --port 0 <args>` and waits for it to listen (not
    /// for its models to load: see [`Server::wait_ready`]).
    pub fn start(opts: Opts) -> Server {
        let bin = env!("CARGO_BIN_EXE_kiln");
        let mut cmd = if opts.watchdog {
            // The server runs in the background with its stdin closed; the shell
            // waits for its own stdin (a pipe from this process) to close, which
            // happens when the test binary exits however it exits, and then
            // kills the server. The first line the shell prints is the server's pid.
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(r#""$0" "$@" </dev/null & p=$!; echo "kiln-pid $p" >&2; cat >/dev/null; kill -9 $p 2>/dev/null; wait $p"#)
                .arg(bin);
            c.stdin(Stdio::piped());
            c
        } else {
            let mut c = Command::new(bin);
            c.stdin(Stdio::null());
            c
        };
        cmd.args(["serve", "--port", "0"])
            .args(&opts.args)
            .env("KILN_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("KILN_API_KEY")
            .env_remove("KILN_MODEL_STORE")
            .env_remove("KILN_PORT")
            .env_remove("KILN_HOST")
            .env_remove("HF_MODEL_ID")
            // Downloads and prepared models of each server in its own
            // directory (tests that share one set it in `opts.env`), so a
            // run neither reads what an earlier run prepared nor leaves
            // entries in the user's cache.
            .env("SERVING_DOWNLOAD_DIR", tempdir("downloads-"))
            // Nor does each server store the default model's rearranged
            // weights (100 MB) in that fresh directory: every start would
            // write them once for nothing. Tests of that cache set it to 1.
            .env("KILN_LAYOUT_CACHE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some(dir) = &opts.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().expect("start kiln serve");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<(Option<u32>, Option<u16>)>();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    if let Some(pid) = line.strip_prefix("kiln-pid ") {
                        let _ = tx.send((pid.trim().parse().ok(), None));
                    }
                    if let Some(rest) = line.strip_prefix("kiln: listening on http://") {
                        let port = rest.rsplit(':').next().and_then(|p| p.trim().parse().ok());
                        let _ = tx.send((None, port));
                    }
                    if std::env::var_os("KILN_TEST_ECHO").is_some() {
                        eprintln!("[server] {line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let mut pid = (!opts.watchdog).then(|| child.id());
        let mut port = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Under the watchdog, the shell's pid line and the server's port line
        // may come in either order.
        let port = loop {
            if let (Some(_), Some(port)) = (pid, port) {
                break port;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((p, q)) => {
                    pid = pid.or(p);
                    port = port.or(q);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "kiln serve did not start listening:\n{}",
                        lines.lock().unwrap().join("\n")
                    );
                }
            }
        };
        Server {
            child: Mutex::new(Some(child)),
            pid: pid.expect("the server's pid"),
            port,
            stderr: lines,
        }
    }

    /// Starts a server and waits until `/ping` says every model is ready.
    pub fn ready(opts: Opts) -> Server {
        let s = Server::start(opts);
        s.wait_ready();
        s
    }

    /// Waits until `GET /ping` answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.get("/ping");
            if r.status == 200 {
                return;
            }
            assert!(
                r.status == 503 && Instant::now() < deadline,
                "the server did not become ready: {} {}\n{}",
                r.status,
                r.text(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Whether the server's stderr comes to hold `needle` within `limit`: a
    /// line logged as an answer is sent may reach the reader thread after
    /// the client has the answer.
    pub fn stderr_soon_contains(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.stderr().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.port, "GET", path, &[], b"")
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        request(
            self.port,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    pub fn req(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        request(self.port, method, path, headers, body)
    }

    /// Opens a streamed request and reads its head.
    pub fn stream(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Streaming {
        Streaming::open(
            self.port,
            "POST",
            path,
            headers,
            body.to_string().as_bytes(),
        )
    }

    /// Sends a request and returns without reading the answer (drop it to go away).
    pub fn stream_open(&self, path: &str, body: &Value) -> TcpStream {
        let mut s = connect(self.port);
        write_request(
            &mut s,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
        .expect("send the request");
        s
    }

    /// Sends a signal to the server (`TERM`, `KILL`).
    pub fn signal(&self, sig: &str) {
        // The shell's built-in kill: no dependency on a kill binary.
        let st = Command::new("sh")
            .args(["-c", &format!("kill -s {sig} {}", self.pid)])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} {} failed", self.pid);
    }

    /// Waits for the process to exit (at most `limit`).
    pub fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let mut guard = self.child.lock().unwrap();
        let child = guard.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A value from `GET /server/metrics` (`name{labels}`), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let r = self.get("/server/metrics");
        assert_eq!(r.status, 200, "{}", r.text());
        metric_value(&r.text(), series)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().ok().and_then(|mut c| c.take()) {
            if child.id() != self.pid {
                // Under the watchdog the child is the shell: killing only it
                // would leave the server running, orphaned.
                let _ = Command::new("kill")
                    .args(["-9", &self.pid.to_string()])
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of one series in a Prometheus exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A header's value (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: the body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the server");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn write_request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut buf = head.into_bytes();
    buf.extend_from_slice(body);
    s.write_all(&buf)
}

fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).expect("read the status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("read a header");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (status, headers)
}

/// Reads one chunk of a chunked body; `None` at the end.
fn read_chunk(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed inside a chunked body",
        ));
    }
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|_| std::io::Error::other(format!("bad chunk size line {line:?}")))?;
    if size == 0 {
        // Trailers, then the blank line.
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
        }
        return Ok(None);
    }
    let mut data = vec![0; size];
    r.read_exact(&mut data)?;
    let mut crlf = [0; 2];
    r.read_exact(&mut crlf)?;
    Ok(Some(data))
}

/// Sends one request and reads the whole response.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = connect(port);
    // A server may answer (413) before reading the whole body and close; the
    // response is still there to read.
    let _ = write_request(&mut s, method, path, headers, body);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let body = if header(&headers, "transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        let mut body = Vec::new();
        while let Some(c) = read_chunk(&mut r).expect("read the body") {
            body.extend_from_slice(&c);
        }
        body
    } else if let Some(n) = header(&headers, "content-length").and_then(|n| n.parse().ok()) {
        let mut body = vec![0; n];
        r.read_exact(&mut body).expect("read the body");
        body
    } else {
        let mut body = Vec::new();
        r.read_to_end(&mut body).expect("read the body");
        body
    };
    Response {
        status,
        headers,
        body,
    }
}

/// A response read as it arrives.
pub struct Streaming {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    buf: Vec<u8>,
    ended: bool,
    chunked: bool,
}

impl Streaming {
    pub fn open(
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Streaming {
        let mut s = connect(port);
        write_request(&mut s, method, path, headers, body).expect("send the request");
        let mut reader = BufReader::new(s);
        let (status, headers) = read_head(&mut reader);
        let chunked = header(&headers, "transfer-encoding").is_some_and(|t| t.contains("chunked"));
        Streaming {
            reader,
            status,
            headers,
            buf: Vec::new(),
            ended: false,
            chunked,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    fn fill(&mut self) -> bool {
        if self.ended {
            return false;
        }
        if self.chunked {
            match read_chunk(&mut self.reader).expect("read a chunk") {
                Some(c) => {
                    self.buf.extend_from_slice(&c);
                    true
                }
                None => {
                    self.ended = true;
                    false
                }
            }
        } else {
            let mut b = [0; 4096];
            let n = self.reader.read(&mut b).expect("read the body");
            if n == 0 {
                self.ended = true;
                return false;
            }
            self.buf.extend_from_slice(&b[..n]);
            true
        }
    }

    /// The next piece of the body up to and including `sep`, without `sep`;
    /// `None` at the end of the body (a trailing piece without `sep` is returned).
    pub fn next_until(&mut self, sep: &[u8]) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(sep.len()).position(|w| w == sep) {
                let piece: Vec<u8> = self.buf.drain(..i + sep.len()).take(i).collect();
                return Some(String::from_utf8(piece).expect("UTF-8 body"));
            }
            if !self.fill() {
                if self.buf.is_empty() {
                    return None;
                }
                let rest = std::mem::take(&mut self.buf);
                return Some(String::from_utf8(rest).expect("UTF-8 body"));
            }
        }
    }

    /// The next JSON line (`application/jsonlines`).
    pub fn next_json_line(&mut self) -> Option<Value> {
        loop {
            let line = self.next_until(b"\n")?;
            if line.trim().is_empty() {
                continue;
            }
            return Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}")));
        }
    }

    /// The data of the next server-sent event (`data: ...`).
    pub fn next_event(&mut self) -> Option<String> {
        loop {
            let ev = self.next_until(b"\n\n")?;
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if data.is_empty() {
                continue;
            }
            return Some(data.join("\n"));
        }
    }

    /// Everything left of the body.
    pub fn rest(&mut self) -> String {
        while self.fill() {}
        String::from_utf8(std::mem::take(&mut self.buf)).expect("UTF-8 body")
    }

    /// Reads JSON lines until the body ends or the connection breaks:
    /// (lines read, whether the body ended properly).
    pub fn drain_lenient(&mut self) -> (usize, bool) {
        let mut lines = 0;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                self.buf.drain(..=i);
                lines += 1;
                continue;
            }
            if self.ended {
                return (lines, true);
            }
            let more = if self.chunked {
                match read_chunk(&mut self.reader) {
                    Ok(Some(c)) => {
                        self.buf.extend_from_slice(&c);
                        true
                    }
                    Ok(None) => {
                        self.ended = true;
                        true
                    }
                    Err(_) => false,
                }
            } else {
                let mut b = [0; 4096];
                match self.reader.read(&mut b) {
                    Ok(n) if n > 0 => {
                        self.buf.extend_from_slice(&b[..n]);
                        true
                    }
                    _ => false,
                }
            };
            if !more {
                return (lines, false);
            }
        }
    }

    /// Goes away without reading the rest.
    pub fn disconnect(self) {
        let _ = self.reader.get_ref().shutdown(Shutdown::Both);
    }
}

/// Writes `text` to `path`, creating parent directories.
pub fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Polls `f` until it returns `Some` or `limit` passes.
pub fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Starts a server on the model store `root/models` (logs in `root/logs`,
/// a 32 MiB KV cache per model) and waits until its `count` models have
/// finished loading, ready or failed; returns it with their statuses, in
/// `/models` order, joined by commas.
pub fn store_server(root: &Path, count: usize) -> (Server, String) {
    let s = Server::start(Opts {
        args: vec![
            "--model-store".into(),
            root.join("models").display().to_string(),
            "--log-dir".into(),
            root.join("logs").display().to_string(),
            "--kv-cache-mib".into(),
            "32".into(),
        ],
        watchdog: true,
        ..Opts::default()
    });
    let settled = eventually(Duration::from_secs(120), || {
        let v = s.get("/models").json();
        let states: Vec<&str> = v["models"]
            .as_array()?
            .iter()
            .map(|m| m["status"].as_str().unwrap_or(""))
            .collect();
        (states.len() == count && !states.contains(&"Loading")).then(|| states.join(","))
    });
    let states = settled.unwrap_or_else(|| panic!("{}", s.stderr()));
    (s, states)
}
