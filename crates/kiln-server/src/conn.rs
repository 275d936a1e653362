//! Connections: kiln's own accept loop around hyper, so that slow, idle or
//! hostile clients cannot hold the server.
//!
//! Every connection is watched:
//! - **header timeout**: once the first byte of a request arrives, its whole
//!   head must arrive within `header_read_timeout`;
//! - **body timeout**: a request's whole body must arrive within
//!   `body_read_timeout` of its head (the handler gets a 408);
//! - **idle timeout**: a connection that serves no request and sends nothing
//!   for `idle_timeout` (a fresh one, or a keep-alive one between requests)
//!   is closed;
//! - **write timeout**: a connection whose writes make no progress for
//!   `write_timeout` (its client stopped reading the answer, so the socket
//!   takes nothing more) is closed and logged. Only a blocked write counts:
//!   a stream that is slow because generation is slow never waits on the
//!   socket, so it is not cut;
//! - **connection cap**: at most `max_connections` are open (by default
//!   below the process's file-descriptor limit, leaving room for model files
//!   and logs). A new connection over the cap closes the open connection that
//!   has made no progress longest: an idle one (one sending a request head
//!   counts as idle, so slow senders go first) or one whose client has not
//!   read its answer for a second or more. When every connection is busy
//!   with a request, the new one gets a JSON 503 with `Retry-After`, written
//!   before the connection closes gracefully (what the client sent is read,
//!   so the close is not a reset). Shedding is logged, at most once a second.
//!
//! Bodies declared larger than the request limit are refused with a 413
//! before any of them is read, so `Expect: 100-continue` gets the 413 and
//! never `100 Continue`. An HTTP/1.1 request without exactly one valid
//! `Host` (or any request with several) gets a 400, and a transfer coding
//! other than `chunked` a 501, as RFC 9112 asks (hyper would take the first
//! and ignore `gzip` in `gzip, chunked`). The answers hyper writes itself to
//! requests it cannot parse (400, 414, 431, with empty bodies) get a JSON
//! body like every other error.
//!
//! It does not route or parse requests beyond their head: that is axum's.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use axum::response::IntoResponse;
use axum::Router;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::body::BodyTimeout;
use crate::error::ApiError;
use crate::management::Listener;

/// Limits on connections (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    /// Time from a request's first byte to the end of its head.
    pub header_read_timeout: Duration,
    /// Time from the end of a request's head to the end of its body.
    pub body_read_timeout: Duration,
    /// Time a connection may stay open with no request and no bytes.
    pub idle_timeout: Duration,
    /// Time a connection's writes may make no progress.
    pub write_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Largest request body (a larger `Content-Length` is refused at once).
    pub max_request_bytes: usize,
}

/// Default header timeout: long enough for any real client on a slow link.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default body timeout: a 4 MiB body at 1 Mbit/s takes about 34 s.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Default keep-alive idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default write timeout: a client that reads nothing for a minute is gone.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection whose writes have been blocked this long (or for its write
/// timeout, if shorter) may be shed at the cap like an idle one.
const STALLED_AFTER: Duration = Duration::from_secs(1);
/// Why [`Connections::expired`] closes a connection whose writes are stuck.
const WRITE_TIMEOUT: &str = "write timeout";
/// Refusals (503 at the cap) being written and drained at once; past it a
/// connection over the cap is closed without an answer, so that a flood
/// cannot hold descriptors through its refusals.
const MAX_REFUSING: usize = 64;
/// How long a refusal waits for its client to finish sending and close.
const REFUSAL_DRAIN: Duration = Duration::from_secs(1);
/// Largest request head (request line and headers); a larger one gets 431.
/// Set, rather than left to hyper's read buffer, whose limit depends on how
/// the bytes arrive.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// File descriptors kept for everything but client connections (model
/// files, logs, the listener, engine and loader threads' files).
const FD_RESERVE: usize = 128;

/// The default connection cap: the soft file-descriptor limit less a reserve
/// (at least half the limit), so connections alone can never exhaust it.
pub fn default_max_connections() -> usize {
    let limit = fd_soft_limit().unwrap_or(1024);
    limit.saturating_sub(FD_RESERVE).max(limit / 2).max(1)
}

/// The soft limit on open files (`ulimit -n`), where the system tells it.
pub fn fd_soft_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(usize::MAX / 2);
    }
    soft.parse().ok()
}

/// One open connection's bookkeeping. Times are milliseconds since the
/// table's epoch.
#[derive(Debug)]
struct ConnState {
    /// Requests being served (from the end of their head to the end of their response).
    active: AtomicUsize,
    /// When the connection last became idle (accepted, or a response ended).
    idle_since: AtomicU64,
    /// 1 + when the first byte after `idle_since` came; 0 when none has.
    head_started: AtomicU64,
    /// 1 + when a write first found the socket full since the last write
    /// that made progress; 0 while writes go through.
    write_blocked: AtomicU64,
    /// Set when the connection is to be closed (shed or timed out).
    closing: AtomicBool,
    close: Notify,
}

/// Every open connection and the limits they live under.
pub struct Connections {
    limits: ConnLimits,
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
    /// Notified whenever a connection closes.
    closed: Notify,
    /// Connections shed (or refused) since the last log line, and when that was.
    shed_unlogged: AtomicU64,
    last_shed_log: AtomicU64,
    /// Refusals in progress (see [`MAX_REFUSING`]).
    refusing: AtomicUsize,
}

impl Connections {
    /// An empty table.
    pub fn new(limits: ConnLimits) -> Self {
        Self {
            limits,
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            closed: Notify::new(),
            shed_unlogged: AtomicU64::new(0),
            last_shed_log: AtomicU64::new(0),
            refusing: AtomicUsize::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Connections open now.
    pub fn open_count(&self) -> usize {
        self.open.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Makes room for one more connection: `true` when there is room (after
    /// shedding the one idle or stalled longest if the cap is reached),
    /// `false` when every connection is busy.
    fn make_room(&self) -> bool {
        let Ok(open) = self.open.lock() else {
            return true;
        };
        let live = open
            .values()
            .filter(|c| !c.closing.load(Ordering::Relaxed))
            .count();
        if live < self.limits.max_connections {
            return true;
        }
        let now = self.now();
        let stalled_after = STALLED_AFTER.min(self.limits.write_timeout).as_millis() as u64;
        // Since when each candidate has made no progress: idle connections
        // since their last request, busy ones whose client reads nothing
        // since their writes blocked.
        let victim = open
            .values()
            .filter(|c| !c.closing.load(Ordering::Relaxed))
            .filter_map(|c| {
                let idle = (c.active.load(Ordering::SeqCst) == 0)
                    .then(|| c.idle_since.load(Ordering::Relaxed));
                let stalled = match c.write_blocked.load(Ordering::SeqCst) {
                    0 => None,
                    t => (now.saturating_sub(t - 1) >= stalled_after).then_some(t - 1),
                };
                let since = match (idle, stalled) {
                    (Some(a), Some(b)) => a.min(b),
                    (a, b) => a.or(b)?,
                };
                Some((since, c))
            })
            .min_by_key(|(since, _)| *since)
            .map(|(_, c)| c);
        let shed = match victim {
            Some(v) => {
                v.closing.store(true, Ordering::Relaxed);
                v.close.notify_one();
                true
            }
            None => false,
        };
        drop(open);
        self.log_shed(shed);
        shed
    }

    fn log_shed(&self, shed: bool) {
        let n = self.shed_unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.now();
        let last = self.last_shed_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1000 && last != 0 {
            return;
        }
        if self
            .last_shed_log
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        self.shed_unlogged.store(0, Ordering::Relaxed);
        let max = self.limits.max_connections;
        if shed {
            tracing::warn!(
                "connection limit reached (--max-connections {max}): closed the connection idle or not reading longest ({n} shed or refused since the last report)"
            );
        } else {
            tracing::warn!(
                "connection limit reached (--max-connections {max}) with every connection busy: refused a new one with 503 ({n} shed or refused since the last report)"
            );
        }
    }

    fn insert(&self) -> (u64, Arc<ConnState>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now()),
            head_started: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            close: Notify::new(),
        });
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, state.clone());
        }
        (id, state)
    }

    fn remove(&self, id: u64) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&id);
        }
        self.closed.notify_waiters();
    }

    /// Waits until no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.open_count() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Closes every connection that is not serving a request (at shutdown).
    fn close_idle(&self) {
        if let Ok(open) = self.open.lock() {
            for c in open.values() {
                if c.active.load(Ordering::SeqCst) == 0 {
                    c.closing.store(true, Ordering::Relaxed);
                    c.close.notify_one();
                }
            }
        }
    }

    /// Why a connection should close now, if it should.
    fn expired(&self, c: &ConnState) -> Option<&'static str> {
        let now = self.now();
        let blocked = c.write_blocked.load(Ordering::SeqCst);
        if blocked != 0
            && now.saturating_sub(blocked - 1) > self.limits.write_timeout.as_millis() as u64
        {
            return Some(WRITE_TIMEOUT);
        }
        if c.active.load(Ordering::SeqCst) > 0 {
            return None;
        }
        match c.head_started.load(Ordering::SeqCst) {
            0 => (now.saturating_sub(c.idle_since.load(Ordering::SeqCst))
                > self.limits.idle_timeout.as_millis() as u64)
                .then_some("idle timeout"),
            t => (now.saturating_sub(t - 1) > self.limits.header_read_timeout.as_millis() as u64)
                .then_some("header read timeout"),
        }
    }

    /// How often connections are checked against their timeouts.
    fn tick(&self) -> Duration {
        let shortest = self
            .limits
            .header_read_timeout
            .min(self.limits.idle_timeout)
            .min(self.limits.write_timeout);
        (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// Accepts connections until `stop` carries a value, then asks every open
/// connection to finish its request and close. Returns when it stops accepting.
pub async fn accept_loop(
    listener: TcpListener,
    kind: Listener,
    app: Router,
    conns: Arc<Connections>,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let mut last_error_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(Option::is_some) => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                if !conns.make_room() {
                    if let Some(slot) = Refusing::start(&conns) {
                        tokio::spawn(refuse(tcp, slot));
                    }
                    continue;
                }
                let _ = tcp.set_nodelay(true);
                // Counted before the next accept, so that a burst of
                // connections cannot overshoot the cap while their tasks wait
                // to start.
                let slot = conns.insert();
                tokio::spawn(serve_connection(
                    tcp,
                    peer,
                    slot,
                    kind,
                    app.clone(),
                    conns.clone(),
                    stop.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors (or another transient failure):
                // make room by shedding, and do not spin.
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    tracing::warn!(
                        "cannot accept a connection: {e} ({} open)",
                        conns.open_count()
                    );
                    last_error_log = Some(Instant::now());
                }
                conns.make_room();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    conns.close_idle();
}

/// A refusal in progress, counted while alive.
struct Refusing(Arc<Connections>);

impl Refusing {
    /// A place for one more refusal, unless [`MAX_REFUSING`] are running.
    fn start(conns: &Arc<Connections>) -> Option<Self> {
        let n = conns.refusing.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_REFUSING {
            conns.refusing.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Self(conns.clone()))
    }
}

impl Drop for Refusing {
    fn drop(&mut self) {
        self.0.refusing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Answers a connection over the cap with a 503 and closes it gracefully:
/// the answer, then the end of the server's side, then whatever the client
/// still sends is read (for at most [`REFUSAL_DRAIN`]) until it closes. A
/// socket closed with unread bytes in it is reset, and a reset can destroy
/// the answer before the client reads it.
async fn refuse(mut tcp: TcpStream, _slot: Refusing) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = ApiError::unavailable("the server has too many open connections")
        .body()
        .to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.set_nodelay(true);
    let graceful = async {
        tcp.write_all(resp.as_bytes()).await?;
        tcp.shutdown().await?;
        // A client that sends without end is cut off (reset) after 1 MiB.
        let mut sink = [0u8; 4096];
        let mut left = 1usize << 20;
        while left > 0 {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_DRAIN, graceful).await;
}

/// Serves one connection; `slot` is its entry in the table (id, state).
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: (u64, Arc<ConnState>),
    kind: Listener,
    app: Router,
    conns: Arc<Connections>,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let (id, state) = slot;
    let io = TokioIo::new(TrackedIo {
        inner: tcp,
        state: state.clone(),
        conns: conns.clone(),
        pending: Vec::new(),
    });
    let svc = {
        let state = state.clone();
        let conns = conns.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            handle(req, peer, kind, app.clone(), state.clone(), conns.clone())
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Timeouts are ours (see `expired`), not hyper's.
    builder
        .keep_alive(true)
        .header_read_timeout(None)
        .max_header_size(MAX_HEADER_BYTES);
    let conn = builder.serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    let mut graceful = false;
    let tick = conns.tick();
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(client = %peer, "connection ended: {e}");
                }
                break;
            }
            _ = state.close.notified() => {
                tracing::debug!(client = %peer, "connection closed (shed or server stopping)");
                break;
            }
            _ = tokio::time::sleep(tick) => {
                if let Some(why) = conns.expired(&state) {
                    if why == WRITE_TIMEOUT {
                        tracing::warn!(
                            client = %peer,
                            "closed a connection whose client read nothing of its answer for {:?} (--write-timeout)",
                            conns.limits.write_timeout
                        );
                    } else {
                        tracing::debug!(client = %peer, "connection closed: {why}");
                    }
                    break;
                }
            }
            _ = stop.wait_for(Option::is_some), if !graceful => {
                // Finish the request in progress, then close.
                graceful = true;
                conn.as_mut().graceful_shutdown();
                if state.active.load(Ordering::SeqCst) == 0 {
                    break;
                }
            }
        }
    }
    conns.remove(id);
}

/// One request: refuses oversized declared bodies at once, limits the time
/// the body may take, and keeps the connection's bookkeeping.
async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    kind: Listener,
    app: Router,
    state: Arc<ConnState>,
    conns: Arc<Connections>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let guard = Active::start(state, conns.clone());
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let refusal = head_error(req.version(), req.headers()).or_else(|| {
        declared
            .is_some_and(|n| n > conns.limits.max_request_bytes as u64)
            .then(|| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request body is larger than the server's limit of {} bytes (--max-request-bytes)",
                        conns.limits.max_request_bytes
                    ),
                )
            })
    });
    if let Some(mut err) = refusal {
        if req.uri().path().starts_with("/v1/") {
            err = err.openai();
        }
        if crate::error::is_anthropic_path(req.uri().path()) {
            err = err.anthropic();
        }
        let mut resp = err.into_response();
        // The body was not read, so the connection cannot carry another request.
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return Ok(resp.map(|b| {
            Body::new(Guarded {
                inner: b,
                _guard: guard,
            })
        }));
    }
    let limit = conns.limits.body_read_timeout;
    let mut req = req.map(|b| {
        Body::new(TimedBody {
            inner: b,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
        })
    });
    req.extensions_mut().insert(ConnectInfo(peer));
    req.extensions_mut().insert(kind);
    let mut app = app;
    let resp = match tower_service::Service::call(&mut app, req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    Ok(resp.map(|b| {
        Body::new(Guarded {
            inner: b,
            _guard: guard,
        })
    }))
}

/// What RFC 9112 says a server must refuse in a request head that hyper
/// accepts: an HTTP/1.1 request without a `Host`, any request with several
/// or with an invalid one (section 3.2: 400), and a transfer coding it does
/// not implement (section 6.1: 501; kiln decodes only `chunked`, which may
/// be applied once).
fn head_error(version: Version, headers: &HeaderMap) -> Option<ApiError> {
    let bad = |m: String| Some(ApiError::bad_request(m));
    let hosts: Vec<&HeaderValue> = headers.get_all(header::HOST).iter().collect();
    match hosts.as_slice() {
        [] if version == Version::HTTP_11 => {
            return bad(
                "an HTTP/1.1 request must have a Host header (RFC 9112, section 3.2)".into(),
            )
        }
        [] => {}
        [one] if !valid_host(one.as_bytes()) => {
            return bad(format!(
                "the Host header '{}' is not a host with an optional port (RFC 9112, section 3.2)",
                String::from_utf8_lossy(one.as_bytes())
            ))
        }
        [_] => {}
        _ => {
            return bad(format!(
                "the request has {} Host headers; it must have one (RFC 9112, section 3.2)",
                hosts.len()
            ))
        }
    }
    let mut chunked = 0;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let text = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding != "chunked" {
                return Some(ApiError::new(
                    StatusCode::NOT_IMPLEMENTED,
                    format!(
                        "the transfer coding '{coding}' is not implemented; send the body as is or chunked (RFC 9112, section 6.1)"
                    ),
                ));
            }
            chunked += 1;
        }
    }
    if chunked > 1 {
        return bad("the body is chunked more than once (RFC 9112, section 6.1)".into());
    }
    None
}

/// A `Host` value: empty (allowed when the target has no authority) or a
/// host with an optional port of digits, without user information.
fn valid_host(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    let Ok(a) = axum::http::uri::Authority::try_from(value) else {
        return false;
    };
    let port = a.as_str().get(a.host().len()..).unwrap_or("x");
    !value.contains(&b'@')
        && !a.host().is_empty()
        && (port.is_empty() || port[1..].bytes().all(|b| b.is_ascii_digit()))
}

/// Counts a request as in progress on its connection while alive.
struct Active {
    state: Arc<ConnState>,
    conns: Arc<Connections>,
}

impl Active {
    fn start(state: Arc<ConnState>, conns: Arc<Connections>) -> Self {
        state.active.fetch_add(1, Ordering::SeqCst);
        state.head_started.store(0, Ordering::SeqCst);
        Self { state, conns }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.state
            .idle_since
            .store(self.conns.now(), Ordering::SeqCst);
        self.state.head_started.store(0, Ordering::SeqCst);
        self.state.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted until it is sent or dropped.
struct Guarded {
    inner: Body,
    _guard: Active,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails with [`BodyTimeout`] once its deadline passes.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(r) => Poll::Ready(r.map(|f| f.map_err(Into::into))),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(self.limit))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting when the first byte of a request head arrives, and
/// giving hyper's own error answers a JSON body.
struct TrackedIo {
    inner: TcpStream,
    state: Arc<ConnState>,
    conns: Arc<Connections>,
    /// Bytes accepted from hyper and not yet written (a rewritten answer).
    pending: Vec<u8>,
}

impl TrackedIo {
    /// Writes `buf` to the socket, noting whether the write made progress
    /// or found the socket full (for the write timeout).
    fn write_socket(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        match &r {
            Poll::Ready(Ok(n)) if *n > 0 => self.state.write_blocked.store(0, Ordering::SeqCst),
            Poll::Pending if self.state.write_blocked.load(Ordering::SeqCst) == 0 => {
                let now = self.conns.now() + 1;
                self.state.write_blocked.store(now, Ordering::SeqCst);
            }
            _ => {}
        }
        r
    }

    /// Writes what is pending; ready when nothing is.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            let r = self.write_socket(cx, &pending);
            self.pending = pending;
            match r {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    self.pending.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// hyper's automatic answer to an unparsable request (a bodiless 400, 414 or
/// 431), rewritten with a JSON error body; `None` for anything else.
fn json_parse_error(buf: &[u8]) -> Option<Vec<u8>> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if head_end != buf.len() {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?.to_ascii_lowercase();
    let status: u16 = head.strip_prefix("http/1.1 ")?.get(..3)?.parse().ok()?;
    let message = match status {
        400 => "the request is not valid HTTP/1.1",
        414 => "the request's URI is too long",
        431 => "the request's headers are too large",
        _ => return None,
    };
    if !head.contains("\r\ncontent-length: 0\r\n") || head.contains("\r\ncontent-type:") {
        return None;
    }
    let status = StatusCode::from_u16(status).ok()?;
    let body = ApiError::new(status, message).body().to_string();
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && self.state.active.load(Ordering::SeqCst) == 0
            && self.state.head_started.load(Ordering::SeqCst) == 0
        {
            let now = self.conns.now() + 1;
            self.state.head_started.store(now, Ordering::SeqCst);
        }
        r
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        if self.state.active.load(Ordering::SeqCst) == 0 {
            if let Some(answer) = json_parse_error(buf) {
                self.pending = answer;
                // Taken whole; what the socket does not take now is written
                // by the next write, flush or shutdown.
                let _ = self.drain(cx)?;
                return Poll::Ready(Ok(buf.len()));
            }
        }
        self.write_socket(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_parse_errors_get_json_bodies_and_nothing_else_is_touched() {
        let a = json_parse_error(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
        )
        .unwrap();
        let text = String::from_utf8(a).unwrap();
        assert!(text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(text.ends_with(r#"{"error":"the request's headers are too large","code":431}"#));
        for other in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert!(json_parse_error(other).is_none(), "{other:?}");
        }
    }

    #[test]
    fn hosts_and_transfer_codings_are_checked() {
        let head = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            h
        };
        let status = |v: Version, pairs: &[(&str, &str)]| {
            head_error(v, &head(pairs)).map(|e| e.into_response().status().as_u16())
        };
        let v11 = Version::HTTP_11;
        assert_eq!(status(v11, &[("host", "x")]), None);
        assert_eq!(status(v11, &[("host", "")]), None);
        assert_eq!(status(v11, &[("host", "[::1]:8080")]), None);
        assert_eq!(status(Version::HTTP_10, &[]), None);
        assert_eq!(status(v11, &[]), Some(400));
        assert_eq!(status(v11, &[("host", "x"), ("host", "x")]), Some(400));
        assert_eq!(
            status(Version::HTTP_10, &[("host", "x"), ("host", "y")]),
            Some(400)
        );
        for bad in ["a b", "user@x", ":80", "x:port"] {
            assert_eq!(status(v11, &[("host", bad)]), Some(400), "{bad}");
        }
        let te = |v: &str| status(v11, &[("host", "x"), ("transfer-encoding", v)]);
        assert_eq!(te("chunked"), None);
        assert_eq!(te("Chunked"), None);
        assert_eq!(te("gzip, chunked"), Some(501));
        assert_eq!(te("chunked, chunked"), Some(400));
        assert_eq!(
            status(
                v11,
                &[
                    ("host", "x"),
                    ("transfer-encoding", "identity"),
                    ("transfer-encoding", "chunked")
                ]
            ),
            Some(501)
        );
    }

    #[test]
    fn the_default_cap_stays_below_the_fd_limit() {
        let cap = default_max_connections();
        if let Some(limit) = fd_soft_limit() {
            assert!(cap < limit, "{cap} >= {limit}");
        }
        assert!(cap >= 1);
    }
}
