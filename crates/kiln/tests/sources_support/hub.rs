//! A stand-in for the Hugging Face Hub, NOT the Hub: a small HTTP server on
//! loopback that serves a model under the Hub's URL layout, as `hf-hub`
//! expects it (`HF_ENDPOINT` points kiln at it):
//!
//! - `GET /api/models/{org}/{name}/revision/{rev}?blobs=true`: the listing
//!   (`sha` = the commit, `siblings` with `rfilename`, `size`, `blobId`, and
//!   `lfs.sha256` for weights);
//! - `GET /{org}/{name}/resolve/{rev}/{file}`: the file, with `etag`,
//!   `x-repo-commit`, `x-linked-etag` / `x-linked-size` for LFS files,
//!   `accept-ranges`, and `206` + `content-range` for `Range: bytes=N-`.
//!
//! It can demand a token, cut one download short, or serve bytes that do not
//! match the listing's sha256, and it records every request.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha2::Digest;

/// The commit every file is served at.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the stand-in serves and how it misbehaves.
#[derive(Default)]
pub struct HubConfig {
    /// The repository, `org/name`.
    pub repo: String,
    /// Files by name.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Names served as LFS files (with a sha256 in the listing).
    pub lfs: Vec<String>,
    /// The bearer token every request must carry, if any.
    pub token: Option<String>,
    /// The first download of this file stops after this many bytes.
    pub cut_first: Option<(String, usize)>,
    /// Files whose served bytes differ (last byte flipped) from the listing.
    pub corrupt: Vec<String>,
}

/// One request: path (with query) and its `Range` header.
pub type Seen = (String, Option<String>);

/// A running stand-in.
pub struct Hub {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Hub {
    pub fn start(config: HubConfig) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the hub stand-in");
        let port = listener.local_addr().expect("address").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let config = Arc::new(Mutex::new(config));
        let s = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (c, s) = (config.clone(), s.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &c, &s);
                });
            }
        });
        Hub { port, seen }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn git_blob_id(bytes: &[u8]) -> String {
    // Not git's sha1, but as opaque as the Hub's blob ids are to a client.
    sha256_hex(bytes)[..40].to_string()
}

fn handle(
    conn: TcpStream,
    config: &Mutex<HubConfig>,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split(' ').nth(1).unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    seen.lock()
        .unwrap()
        .push((path.clone(), headers.get("range").cloned()));
    let mut cfg = config.lock().unwrap();
    let mut out = conn;
    if let Some(token) = &cfg.token {
        if headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return respond(&mut out, 401, &[], b"{\"error\":\"Invalid credentials\"}");
        }
    }
    let api_prefix = format!("/api/models/{}/revision/", cfg.repo);
    if let Some(rest) = path.strip_prefix(&api_prefix) {
        let rev = rest.split('?').next().unwrap_or("");
        if rev != "main" && rev != COMMIT {
            return respond(&mut out, 404, &[], b"{\"error\":\"Revision Not Found\"}");
        }
        let siblings: Vec<serde_json::Value> = cfg
            .files
            .iter()
            .map(|(name, bytes)| {
                let mut s = serde_json::json!({
                    "rfilename": name,
                    "size": bytes.len(),
                    "blobId": git_blob_id(bytes),
                });
                if cfg.lfs.contains(name) {
                    s["lfs"] = serde_json::json!({
                        "sha256": sha256_hex(bytes),
                        "size": bytes.len(),
                        "pointerSize": 134,
                    });
                }
                s
            })
            .collect();
        let body = serde_json::json!({
            "id": cfg.repo,
            "sha": COMMIT,
            "siblings": siblings,
        });
        return respond(&mut out, 200, &[], body.to_string().as_bytes());
    }
    let file_prefix = format!("/{}/resolve/", cfg.repo);
    let Some(rest) = path.strip_prefix(&file_prefix) else {
        return respond(&mut out, 404, &[], b"{\"error\":\"Repository Not Found\"}");
    };
    let (rev, name) = rest.split_once('/').unwrap_or((rest, ""));
    let Some(bytes) = cfg.files.get(name).cloned() else {
        return respond(&mut out, 404, &[], b"{\"error\":\"Entry not found\"}");
    };
    if rev != "main" && rev != COMMIT {
        return respond(&mut out, 404, &[], b"{\"error\":\"Revision Not Found\"}");
    }
    let mut served = bytes.clone();
    if cfg.corrupt.contains(&name.to_string()) {
        if let Some(last) = served.last_mut() {
            *last ^= 0xff;
        }
    }
    let lfs = cfg.lfs.contains(&name.to_string());
    let etag = if lfs {
        sha256_hex(&bytes)
    } else {
        git_blob_id(&bytes)
    };
    let mut extra = vec![
        ("etag".to_string(), format!("\"{etag}\"")),
        ("x-repo-commit".to_string(), COMMIT.to_string()),
        ("accept-ranges".to_string(), "bytes".to_string()),
    ];
    if lfs {
        extra.push(("x-linked-etag".into(), format!("\"{etag}\"")));
        extra.push(("x-linked-size".into(), bytes.len().to_string()));
    }
    let start = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let (status, body) = match start {
        Some(s) if s < served.len() => {
            extra.push((
                "content-range".into(),
                format!("bytes {s}-{}/{}", served.len() - 1, served.len()),
            ));
            (206, served[s..].to_vec())
        }
        Some(_) => return respond(&mut out, 416, &[], b""),
        None => (200, served),
    };
    let cut = match &cfg.cut_first {
        Some((file, n)) if file == name => Some(*n),
        _ => None,
    };
    if let Some(n) = cut {
        cfg.cut_first = None;
        drop(cfg);
        // Promise the whole body, send part of it, hang up.
        write_head(&mut out, status, &extra, body.len())?;
        out.write_all(&body[..n.min(body.len())])?;
        out.flush()?;
        return out.shutdown(std::net::Shutdown::Both);
    }
    drop(cfg);
    respond(&mut out, status, &extra, &body)
}

fn write_head(
    out: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    len: usize,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Error",
    };
    let mut head =
        format!("HTTP/1.1 {status} {reason}\r\ncontent-length: {len}\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn respond(
    out: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    write_head(out, status, headers, body.len())?;
    out.write_all(body)?;
    out.flush()
}
