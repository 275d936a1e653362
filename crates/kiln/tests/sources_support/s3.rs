//! A real S3-protocol server on loopback: `s3s-fs` serving a directory
//! (each top-level directory a bucket), built into kiln's tool cache by
//! `scripts/fetch-assets.sh --tests`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The version `scripts/fetch-assets.sh` installs.
const S3S_FS_VERSION: &str = "0.14.1";
pub const ACCESS_KEY: &str = "kiln-test-access";
pub const SECRET_KEY: &str = "kiln-test-secret-key";

/// The `s3s-fs` binary: `$KILN_S3S_FS`, else the one in kiln's tool cache.
/// Missing is a loud failure: these tests need a real S3 server.
fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_S3S_FS").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let p = kiln_model::default_model::cache_dir()
        .join("tools")
        .join(format!("s3s-fs-{S3S_FS_VERSION}"))
        .join("bin")
        .join("s3s-fs");
    assert!(
        p.is_file(),
        "\n\n*** the S3 source tests need the s3s-fs server, and {} is missing ***\n\
         *** run scripts/fetch-assets.sh --tests (it builds s3s-fs {S3S_FS_VERSION} once into \
         kiln's cache), or set KILN_S3S_FS to an s3s-fs binary ***\n",
        p.display()
    );
    p
}

/// A running `s3s-fs`, killed when dropped.
pub struct S3Server {
    pub port: u16,
    pub root: PathBuf,
    child: Child,
}

impl S3Server {
    /// Serves `root` on a free loopback port with the test credentials.
    pub fn start(root: &Path) -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen on {port}");
            std::thread::sleep(Duration::from_millis(25));
        }
        S3Server {
            port,
            root: root.to_path_buf(),
            child,
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment that points kiln at a store on `port` (the server itself,
/// or a proxy in front of it), with a cache of its own.
pub fn env(port: u16, cache: &Path) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ("KILN_CACHE", cache.display().to_string()),
        // The machine's own download directory does not leak in.
        ("SERVING_DOWNLOAD_DIR", String::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
