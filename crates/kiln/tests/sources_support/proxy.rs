//! A TCP proxy between kiln and a store that can hold a download half way
//! (to kill or race it at a known point) or cut it off (a truncated
//! transfer), and counts the bytes it passed back.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does with the store's answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Pass everything.
    Pass,
    /// Pass this many bytes in all, then hold every connection open and
    /// silent until the mode changes.
    StallAfter(u64),
    /// Pass this many bytes in all, then close that connection and refuse
    /// every later one.
    CutAfter(u64),
}

/// A running proxy to one upstream address.
pub struct Proxy {
    pub port: u16,
    mode: Arc<Mutex<Mode>>,
    passed: Arc<AtomicU64>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub fn start(upstream: u16, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let mode = Arc::new(Mutex::new(mode));
        let passed = Arc::new(AtomicU64::new(0));
        let (m, p) = (mode.clone(), passed.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (m, p) = (m.clone(), p.clone());
                std::thread::spawn(move || serve(client, upstream, m, p));
            }
        });
        Proxy { port, mode, passed }
    }

    /// Changes what the proxy does (held connections resume on `Pass`).
    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Bytes passed from the store to kiln so far.
    pub fn passed(&self) -> u64 {
        self.passed.load(Ordering::SeqCst)
    }

    /// Starts counting from zero again.
    pub fn reset_count(&self) {
        self.passed.store(0, Ordering::SeqCst);
    }
}

fn serve(client: TcpStream, upstream: u16, mode: Arc<Mutex<Mode>>, passed: Arc<AtomicU64>) {
    if let Mode::CutAfter(limit) = *mode.lock().unwrap() {
        if passed.load(Ordering::SeqCst) >= limit {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut s_write);
        let _ = s_write.shutdown(Shutdown::Write);
    });
    let (mut s_read, mut c_write) = (server, client);
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = s_read.read(&mut buf) {
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            let current = *mode.lock().unwrap();
            let done = passed.load(Ordering::SeqCst);
            let allowed = match current {
                Mode::Pass => chunk.len() as u64,
                Mode::StallAfter(limit) | Mode::CutAfter(limit) => {
                    limit.saturating_sub(done).min(chunk.len() as u64)
                }
            };
            if allowed == 0 {
                if let Mode::CutAfter(_) = current {
                    let _ = c_write.shutdown(Shutdown::Both);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let (now, rest) = chunk.split_at(allowed as usize);
            if c_write.write_all(now).is_err() {
                return;
            }
            passed.fetch_add(now.len() as u64, Ordering::SeqCst);
            chunk = rest;
        }
    }
    let _ = c_write.shutdown(Shutdown::Write);
}
