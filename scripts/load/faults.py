#!/usr/bin/env python3
"""A bounded load-and-fault run of `kiln serve` on loopback.

Starts the server on a free port, then at once: N clients sending LMI
requests (every other one streamed; 503 answers are retried after their
Retry-After, as a client should), sockets that send a request head one byte
a second, sockets that connect and send nothing, slow bodies, and clients
that go away in the middle of a stream. /ping is timed throughout and the
server's RSS sampled. Then streams are opened and the server gets SIGTERM in
the middle of them: each must end with a last line, and the process must
exit 0 within the grace period.

Prints one JSON report; exits 1 when a request was lost (no answer, a broken
answer, or a 5xx other than 503), when a hostile socket was still open at the
end, or when the shutdown went wrong.

    scripts/load/faults.py target/release/kiln [--clients 200] [--requests 3]

Only loopback is used. Needs python3 and the default model in the cache.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def start(binary, args):
    proc = subprocess.Popen(
        [binary, "serve", "--port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KILN_LOG": "warn", "NO_COLOR": "1"},
    )
    lines = []
    port = None
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith("kiln: listening on http://"):
            port = int(line.rsplit(":", 1)[1])
            break
    if port is None:
        proc.kill()
        sys.exit("kiln serve did not start:\n" + "\n".join(lines))
    threading.Thread(target=lambda: [lines.append(l.rstrip()) for l in proc.stderr], daemon=True).start()
    return proc, port, lines


def wait_ready(port):
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/ping")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("the server did not become ready")


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.lost = []

    def add(self, key, detail=None):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            if key == "lost":
                self.lost.append(detail)


def one_request(port, i, stream, tally):
    """Sends one request until it is answered (503s are retried); records how it went."""
    body = json.dumps({"inputs": f"Request {i}: the capital of France is", "stream": stream,
                       "parameters": {"max_new_tokens": 4, "ignore_eos": True, "details": True}})
    for _ in range(200):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            c.request("POST", "/predictions/default", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
        except OSError as e:
            tally.add("lost", f"request {i}: {e}")
            return
        if r.status == 503:
            tally.add("retried_503")
            time.sleep(float(r.getheader("Retry-After") or "1"))
            continue
        if r.status != 200:
            tally.add("lost", f"request {i}: {r.status} {data[:200]!r}")
            return
        try:
            if stream:
                last = json.loads(data.decode().strip().splitlines()[-1])
            else:
                last = json.loads(data)
            reason = last["details"]["finish_reason"]
        except (ValueError, KeyError, IndexError) as e:
            tally.add("lost", f"request {i}: a broken answer ({e}): {data[:200]!r}")
            return
        tally.add("ok" if reason == "length" else f"finished_{reason}")
        return
    tally.add("lost", f"request {i}: still refused after 200 tries")


def slow_head(port, seconds, out):
    """Sends a request head one byte a second; records when the server closed it."""
    s = socket.create_connection(("127.0.0.1", port))
    t0 = time.time()
    head = b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    try:
        for b in head:
            s.send(bytes([b]))
            time.sleep(1)
            if time.time() - t0 > seconds:
                break
        out.append(("open", time.time() - t0))
    except OSError:
        out.append(("closed", time.time() - t0))
    finally:
        s.close()


def idle_socket(port, seconds, out):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(seconds)
    t0 = time.time()
    try:
        closed = s.recv(1) == b""
        out.append(("closed" if closed else "open", time.time() - t0))
    except socket.timeout:
        out.append(("open", time.time() - t0))
    except OSError:
        out.append(("closed", time.time() - t0))
    finally:
        s.close()


def slow_body(port, seconds, out):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(seconds)
    t0 = time.time()
    s.send(b"POST /predictions/default HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
    try:
        data = s.recv(4096)
        out.append(("answered " + data.split(b" ")[1].decode() if data else "closed", time.time() - t0))
    except socket.timeout:
        out.append(("open", time.time() - t0))
    except OSError:
        out.append(("closed", time.time() - t0))
    finally:
        s.close()


def disconnect_mid_stream(port, i, tally):
    s = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"inputs": f"Story {i}:", "stream": True,
                       "parameters": {"max_new_tokens": 200, "ignore_eos": True}}).encode()
    s.send(b"POST /predictions/default HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    s.settimeout(120)
    try:
        s.recv(4096)
        tally.add("disconnected_mid_stream")
    except OSError as e:
        tally.add("lost", f"disconnect {i}: {e}")
    s.close()


def sigterm_mid_stream(binary, n_streams, grace):
    proc, port, lines = start(binary, ["--kv-cache-mib", "256", "--grace-period", str(grace)])
    wait_ready(port)
    socks = []
    body = json.dumps({"inputs": "Count to one thousand:", "stream": True,
                       "parameters": {"max_new_tokens": 600, "ignore_eos": True, "details": True}}).encode()
    for _ in range(n_streams):
        s = socket.create_connection(("127.0.0.1", port))
        s.send(b"POST /predictions/default HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        s.settimeout(grace + 30)
        s.recv(1)
        socks.append(s)
    time.sleep(1)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    endings = []
    for s in socks:
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        s.close()
        # The last JSON line of a chunked body.
        last = None
        for line in data.split(b"\n"):
            line = line.strip()
            if line.startswith(b"{"):
                last = line
        try:
            d = json.loads(last)
            endings.append(d.get("details", {}).get("finish_reason") or "no finish reason")
        except (TypeError, ValueError):
            endings.append("cut")
    try:
        code = proc.wait(timeout=grace + 20)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "did not exit"
    return {"streams": n_streams, "endings": endings, "exit": code,
            "exit_after_s": round(time.time() - t0, 2), "grace_s": grace}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("binary")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--hostile", type=int, default=50, help="slow-head and idle sockets, each")
    ap.add_argument("--grace", type=int, default=5)
    a = ap.parse_args()

    logs = tempfile.mkdtemp(prefix="kiln-faults-")
    proc, port, lines = start(a.binary, [
        "--kv-cache-mib", "128", "--log-dir", logs, "--job-queue-size", "64",
        "--header-read-timeout", "3", "--idle-timeout", "5", "--body-read-timeout", "5"])
    wait_ready(port)
    tally = Tally()
    rss = []
    pings = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss.append(rss_kib(proc.pid))
            t = time.time()
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request("GET", "/ping")
                c.getresponse().read()
                pings.append(time.time() - t)
            except OSError:
                pings.append(None)
            time.sleep(0.5)

    hostile = {"slow_head": [], "idle": [], "slow_body": []}
    threads = [threading.Thread(target=sample)]
    for i in range(a.hostile):
        threads.append(threading.Thread(target=slow_head, args=(port, 20, hostile["slow_head"])))
        threads.append(threading.Thread(target=idle_socket, args=(port, 20, hostile["idle"])))
    for i in range(a.hostile // 5):
        threads.append(threading.Thread(target=slow_body, args=(port, 20, hostile["slow_body"])))
        threads.append(threading.Thread(target=disconnect_mid_stream, args=(port, i, tally)))

    def client(c):
        for r in range(a.requests):
            one_request(port, c * a.requests + r, (c + r) % 2 == 0, tally)

    clients = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
    t0 = time.time()
    for t in threads[1:] + clients:
        t.start()
    threads[0].start()
    for t in clients + threads[1:]:
        t.join()
    load_s = time.time() - t0
    done.set()
    threads[0].join()
    proc.send_signal(signal.SIGTERM)
    first_exit = proc.wait(timeout=60)

    shutdown = sigterm_mid_stream(a.binary, 8, a.grace)
    still_open = {k: sum(1 for s, _ in v if s == "open") for k, v in hostile.items()}
    good_pings = [p for p in pings if p is not None]
    kib = [r for r in rss if r]
    report = {
        "clients": a.clients,
        "requests": a.clients * a.requests,
        "outcomes": tally.counts,
        "lost": len(tally.lost),
        "lost_examples": tally.lost[:5],
        "hostile_sockets": {k: len(v) for k, v in hostile.items()},
        "hostile_still_open_at_end": still_open,
        "hostile_closed_after_s": {k: round(max((t for s, t in v if s != "open"), default=0), 1)
                                   for k, v in hostile.items()},
        "load_s": round(load_s, 1),
        "ping_ms": {"max": round(max(good_pings, default=0) * 1e3, 1),
                    "median": round(sorted(good_pings)[len(good_pings) // 2] * 1e3, 1) if good_pings else None,
                    "failed": pings.count(None)},
        "rss_mib": {"first": round(kib[0] / 1024, 1) if kib else None,
                    "max": round(max(kib) / 1024, 1) if kib else None,
                    "last": round(kib[-1] / 1024, 1) if kib else None,
                    "series": " ".join(str(round(k / 1024)) for k in kib[:: max(1, len(kib) // 40)])},
        "exit_after_load": first_exit,
        "sigterm_mid_stream": shutdown,
    }
    print(json.dumps(report, indent=1))
    bad = (len(tally.lost) > 0 or any(still_open.values()) or first_exit != 0
           or shutdown["exit"] != 0 or any(e in ("cut", "no finish reason") for e in shutdown["endings"]))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
