//! SageMaker stateful sessions, as DJL's LMI handler offers them
//! (`djl_python/lmi_vllm/vllm_async_service.py` with
//! `session_utils.py` and `session_manager.py`).
//!
//! - A body `{"requestType": "NEW_SESSION"}` on an LMI route creates a
//!   session: `{"result": "Session <id> created"}`, and the header
//!   `X-Amzn-SageMaker-Session-Id: <id>; Expires=<UTC time>`.
//! - `{"requestType": "CLOSE"}` with `X-Amzn-SageMaker-Session-Id: <id>`
//!   closes it: `{"result": "Session <id> closed"}`, and the header
//!   `X-Amzn-SageMaker-Closed-Session-Id: <id>` (`session_utils.py`
//!   `close_session`), which SageMaker reads to end the session. Closing an
//!   id that is not open (never created, already closed, or expired) is a
//!   424 `Failed to close session: session not found: <id>`, as DJL's
//!   `SessionManager.close_session` raises for an id it does not hold.
//! - Any request may carry the header; an id that is not a UUID is a 424
//!   (`invalid session_id`). With sessions off
//!   (`option.enable_stateful_sessions=false`) the header, and session
//!   requests, are 424s naming why.
//!
//! What a session holds: in DJL's vLLM handler nothing the inference
//! reads (a session is a directory custom handlers may write into, under
//! `option.sessions_path`); kiln keeps the same contract, with the sessions
//! in memory (so `option.sessions_path` is not used, and sessions do not
//! outlive the server). Multi-turn reuse of a conversation's prompt is what
//! the engine's prefix cache does for every request, session or not.
//! Sessions end `option.sessions_expiration` seconds after they begin
//! (expired ones are removed when a session is created, as DJL does).
//!
//! Bounds. DJL's `SessionManager.create_session` has none: every
//! `NEW_SESSION` makes a directory under `sessions_path`, whoever asks, and
//! only expiry removes them, so one client can create sessions until the
//! disk (`/dev/shm` by default) is full. kiln keeps at most [`MAX_SESSIONS`]
//! per model, and at most `option.max_sessions_per_client` (default
//! [`DEFAULT_MAX_SESSIONS_PER_CLIENT`]) created from one client address, so
//! that one client cannot fill the table and lock everyone else out of new
//! sessions until its sessions expire: past its share a client gets 429
//! until it closes some or they expire. (Behind a proxy that is the only
//! client, as SageMaker's front end may be, raise the share to
//! [`MAX_SESSIONS`].)

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::ApiError;
use crate::properties::chat::SessionOptions;
/// The bounds on sessions, kept with the option that sets them.
pub use crate::properties::chat::{DEFAULT_MAX_SESSIONS_PER_CLIENT, MAX_SESSIONS};

/// The header that names a request's session (and, on creation, carries
/// the new id and its expiry).
pub const SESSION_HEADER: &str = "X-Amzn-SageMaker-Session-Id";

/// The header a CLOSE answer names the closed session in (DJL's
/// `HEADER_SAGEMAKER_CLOSED_SESSION_ID`).
pub const CLOSED_SESSION_HEADER: &str = "X-Amzn-SageMaker-Closed-Session-Id";

/// A session request: the body's `requestType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRequest {
    /// `NEW_SESSION`.
    New,
    /// `CLOSE`.
    Close,
}

impl SessionRequest {
    /// Reads a body's `requestType`.
    pub fn parse(value: &serde_json::Value) -> Result<SessionRequest, ApiError> {
        match value.as_str() {
            Some("NEW_SESSION") => Ok(SessionRequest::New),
            Some("CLOSE") => Ok(SessionRequest::Close),
            _ => Err(ApiError::bad_request(format!(
                "invalid payload. request type must be one of NEW_SESSION, CLOSE, not {value}"
            ))),
        }
    }
}

/// One open session.
#[derive(Debug, Clone, Copy)]
struct Session {
    expires: Instant,
    /// The address that created it (`None` when the server does not know,
    /// which only in-process callers are).
    client: Option<IpAddr>,
}

/// A model's sessions.
#[derive(Debug)]
pub struct Sessions {
    options: SessionOptions,
    live: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// No sessions yet, under `options`.
    pub fn new(options: SessionOptions) -> Self {
        Self {
            options,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Checks a request's session header: refused when sessions are off,
    /// or when the id is not a UUID. (An unknown or expired id passes, as
    /// in DJL, where such a request simply has no session.)
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(v) = headers.get(SESSION_HEADER) else {
            return Ok(());
        };
        if !self.options.enabled {
            return Err(ApiError::bad_request(format!(
                "invalid payload. stateful sessions not enabled, {SESSION_HEADER} header not \
                 supported (option.enable_stateful_sessions=false)"
            )));
        }
        session_id(v).map(|_| ())
    }

    /// Answers a session request that came from `client`.
    pub fn answer(
        &self,
        req: SessionRequest,
        headers: &HeaderMap,
        client: Option<IpAddr>,
    ) -> Result<Response, ApiError> {
        if !self.options.enabled {
            let name = match req {
                SessionRequest::New => "NEW_SESSION",
                SessionRequest::Close => "CLOSE",
            };
            return Err(ApiError::bad_request(format!(
                "invalid payload. stateful sessions not enabled, {name} not supported \
                 (option.enable_stateful_sessions=false)"
            )));
        }
        let mut live = self.live.lock().map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the session table is unavailable",
            )
        })?;
        match req {
            SessionRequest::New => {
                let now = Instant::now();
                // One pass drops the expired and counts the client's own.
                let mut own = 0usize;
                live.retain(|_, s| {
                    let keep = s.expires > now;
                    own += usize::from(keep && client.is_some() && s.client == client);
                    keep
                });
                if let Some(ip) = client.filter(|_| own >= self.options.max_per_client) {
                    tracing::warn!(client = %ip, open = own, "session creation refused: the client's share is used");
                    return Err(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        format!(
                            "Failed to create session: {own} sessions created from {ip} are \
                             open, the most one client may have \
                             (option.max_sessions_per_client={}); close one with \
                             {{\"requestType\": \"CLOSE\"}} or wait for one to expire",
                            self.options.max_per_client
                        ),
                    ));
                }
                if live.len() >= MAX_SESSIONS {
                    return Err(ApiError::bad_request(format!(
                        "Failed to create session: {MAX_SESSIONS} sessions are open"
                    )));
                }
                let id = new_id()?;
                let life = Duration::from_secs(self.options.expiration_s);
                live.insert(
                    id.clone(),
                    Session {
                        expires: now + life,
                        client,
                    },
                );
                let expires_at = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    .saturating_add(self.options.expiration_s);
                let expires = kiln_model::chat::format_utc(expires_at, "%Y-%m-%dT%H:%M:%SZ");
                tracing::info!(session = %id, "session created");
                answer_with_header(
                    format!("Session {id} created"),
                    SESSION_HEADER,
                    &format!("{id}; Expires={expires}"),
                    "Failed to create session",
                )
            }
            SessionRequest::Close => {
                let id = headers
                    .get(SESSION_HEADER)
                    .map(session_id)
                    .transpose()?
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "Failed to close session: a CLOSE request names the session in the \
                             {SESSION_HEADER} header"
                        ))
                    })?;
                // An expired session is gone, even if no creation has
                // swept it out of the table yet.
                let open = live.remove(&id).is_some_and(|s| s.expires > Instant::now());
                if !open {
                    return Err(ApiError::bad_request(format!(
                        "Failed to close session: session not found: {id} (it was never \
                         opened, is already closed, or has expired)"
                    )));
                }
                tracing::info!(session = %id, "session closed");
                answer_with_header(
                    format!("Session {id} closed"),
                    CLOSED_SESSION_HEADER,
                    &id,
                    "Failed to close session",
                )
            }
        }
    }
}

/// A session request's answer: `{"result": result}` with the header
/// `name: value` (`failed`: how the error begins if `value` cannot be a
/// header).
fn answer_with_header(
    result: String,
    name: &'static str,
    value: &str,
    failed: &str,
) -> Result<Response, ApiError> {
    let bad = |e: &dyn std::fmt::Display| ApiError::bad_request(format!("{failed}: {e}"));
    // `from_bytes` lower-cases the header's (constant) name.
    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad(&e))?;
    let value = HeaderValue::from_str(value).map_err(|e| bad(&e))?;
    let mut resp = axum::Json(json!({ "result": result })).into_response();
    resp.headers_mut().insert(name, value);
    Ok(resp)
}

/// The session id a header carries: a UUID (36 characters of hex digits
/// and dashes, as DJL's pattern), lower-cased.
fn session_id(v: &HeaderValue) -> Result<String, ApiError> {
    let s = v.to_str().unwrap_or("").trim();
    let ok = s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if !ok {
        let shown: String = s.chars().take(64).collect();
        return Err(ApiError::bad_request(format!(
            "invalid session_id: {shown:?} (a UUID is expected)"
        )));
    }
    Ok(s.to_ascii_lowercase())
}

/// A random (version 4) UUID from the operating system's generator.
fn new_id() -> Result<String, ApiError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| ApiError::bad_request(format!("Failed to create session: {e}")))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(SESSION_HEADER, HeaderValue::from_str(id).unwrap());
        h
    }

    #[test]
    fn ids_are_random_version_4_uuids() {
        let (a, b) = (new_id().unwrap(), new_id().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(session_id(&HeaderValue::from_str(&a).unwrap()).is_ok());
    }

    #[test]
    fn headers_are_checked_and_sessions_open_and_close() {
        let s = Sessions::new(SessionOptions::default());
        assert!(s.check(&HeaderMap::new()).is_ok());
        let e = s.check(&header("not-a-uuid")).unwrap_err();
        assert!(e.message.contains("invalid session_id"), "{}", e.message);
        let r = s
            .answer(SessionRequest::New, &HeaderMap::new(), None)
            .unwrap();
        let v = r.headers()[SESSION_HEADER].to_str().unwrap().to_string();
        let (id, expires) = v.split_once("; Expires=").unwrap();
        assert!(expires.ends_with('Z') && expires.contains('T'), "{v}");
        assert!(s.check(&header(id)).is_ok());
        assert_eq!(s.live.lock().unwrap().len(), 1);
        let r = s.answer(SessionRequest::Close, &header(id), None).unwrap();
        assert_eq!(r.headers()[CLOSED_SESSION_HEADER], id);
        assert!(s.live.lock().unwrap().is_empty());
        let e = s
            .answer(SessionRequest::Close, &HeaderMap::new(), None)
            .unwrap_err();
        assert!(e.message.contains(SESSION_HEADER), "{}", e.message);
    }

    #[test]
    fn expired_sessions_are_dropped_and_off_means_refused() {
        let s = Sessions::new(SessionOptions {
            expiration_s: 0,
            ..SessionOptions::default()
        });
        s.answer(SessionRequest::New, &HeaderMap::new(), None)
            .unwrap();
        s.answer(SessionRequest::New, &HeaderMap::new(), None)
            .unwrap();
        // Each creation drops those that expired (all, at 0 seconds).
        assert_eq!(s.live.lock().unwrap().len(), 1);
        let off = Sessions::new(SessionOptions {
            enabled: false,
            ..SessionOptions::default()
        });
        let id = "0b7e4f0a-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
        assert!(off
            .check(&header(id))
            .unwrap_err()
            .message
            .contains("not enabled"));
        let e = off
            .answer(SessionRequest::New, &HeaderMap::new(), None)
            .unwrap_err();
        assert!(
            e.message.contains("NEW_SESSION not supported"),
            "{}",
            e.message
        );
        assert!(SessionRequest::parse(&json!("OPEN")).is_err());
    }

    fn new_id_of(s: &Sessions, client: Option<IpAddr>) -> Result<String, ApiError> {
        let r = s.answer(SessionRequest::New, &HeaderMap::new(), client)?;
        let v = r.headers()[SESSION_HEADER].to_str().unwrap();
        Ok(v.split(';').next().unwrap().to_string())
    }

    /// DJL's `close_session` raises "session not found" for an id it does
    /// not hold; closing twice, or an expired session, is the same.
    #[test]
    fn closing_what_is_not_open_is_refused() {
        let s = Sessions::new(SessionOptions::default());
        let never = "0b7e4f0a-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
        let e = s
            .answer(SessionRequest::Close, &header(never), None)
            .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("session not found"), "{}", e.message);
        let id = new_id_of(&s, None).unwrap();
        s.answer(SessionRequest::Close, &header(&id), None).unwrap();
        assert!(s.answer(SessionRequest::Close, &header(&id), None).is_err());
        let short = Sessions::new(SessionOptions {
            expiration_s: 0,
            ..SessionOptions::default()
        });
        let id = new_id_of(&short, None).unwrap();
        assert!(short
            .answer(SessionRequest::Close, &header(&id), None)
            .is_err());
    }

    /// One address cannot take more than its share; others still can, and
    /// closing one gives the share back.
    #[test]
    fn one_client_cannot_fill_the_table() {
        let s = Sessions::new(SessionOptions {
            max_per_client: 3,
            ..SessionOptions::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let ids: Vec<String> = (0..3).map(|_| new_id_of(&s, Some(a)).unwrap()).collect();
        let e = new_id_of(&s, Some(a)).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            e.message.contains("10.0.0.1") && e.message.contains("max_sessions_per_client=3"),
            "{}",
            e.message
        );
        assert!(new_id_of(&s, Some(b)).is_ok());
        s.answer(SessionRequest::Close, &header(&ids[0]), None)
            .unwrap();
        assert!(new_id_of(&s, Some(a)).is_ok());
        assert!(new_id_of(&s, Some(a)).is_err());
    }
}
