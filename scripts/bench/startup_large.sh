#!/usr/bin/env bash
# Starting a large model on the CPU: `kiln serve` with `option.quantize` on
# an OPT-shaped fp16 checkpoint of random weights (scripts/bench/startup_opt.py
# writes it), from process start to the first 200 on /ping.
#
#   scripts/bench/startup_large.sh                     # OPT-2.7B shape, q8_0
#   SHAPE=opt-13b QUANT=q8_0 RUNS=5 scripts/bench/startup_large.sh
#
# 1. First start, empty prepared-model cache: the checkpoint is converted
#    into the prepared file and the weight-layout file. Reports the time to
#    /ping and the peak resident memory while it ran (VmHWM, and the peaks of
#    its anonymous and file-backed parts sampled every 50 ms).
# 2. RUNS later starts (cache hits): time to /ping, peak resident memory.
# 3. After the last of them, the same request (8 prompt tokens, 8 output
#    tokens) ten times, one after another: the first pays the page faults of
#    the mapped files, the tenth does not.
#
# The checkpoint goes to $DIR (default ~/.cache/kiln/bench-scale/<shape>),
# the cache to $DIR.cache (removed at the end unless KEEP=1): the 2.7B shape
# takes 5.3 GB and its cache 5.7 GB. KILN: the binary (default
# $CARGO_TARGET_DIR or target, release). PYTHON: a Python with numpy and
# tokenizers (default: the golden venv).
set -euo pipefail

NAME=startup_large.sh
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SHAPE="${SHAPE:-opt-2.7b}"
QUANT="${QUANT:-q8_0}"
RUNS="${RUNS:-3}"
DIR="${DIR:-$HOME/.cache/kiln/bench-scale/$SHAPE}"
PYTHON="${PYTHON:-$HOME/.cache/kiln/venv-golden/bin/python}"
KILN="${KILN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln}"
die() { echo "$NAME: $*" >&2; exit 1; }

command -v "$KILN" >/dev/null || die "no kiln binary at '$KILN'; build it (cargo build --release) or set KILN"
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
if [ ! -f "$DIR/model.safetensors" ]; then
  HF_HUB_OFFLINE=1 "$PYTHON" "$ROOT/scripts/bench/startup_opt.py" "$DIR" --shape "$SHAPE"
fi
CACHE="$DIR.cache"
rm -rf "$CACHE" "$CACHE.store"

echo "# kiln serve start-up on a large model: $SHAPE (fp16 safetensors, random weights), option.quantize=$QUANT"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "- cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(nproc) cores available, $(free -g | awk '/^Mem:/ {print $2}') GiB"
echo "- kiln: $KILN ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "- checkpoint: $DIR ($(du -sh "$DIR" | cut -f1))"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

python3 - "$KILN" "$DIR" "$CACHE" "$QUANT" "$RUNS" <<'EOF'
import json, os, socket, subprocess, sys, time, urllib.request

kiln, model, cache, quant, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
env = {k: v for k, v in os.environ.items() if not k.startswith("OPTION_") and k not in ("KILN_MODEL", "KILN_MODEL_STORE", "KILN_LAYOUT_CACHE")}
env.update(SERVING_DOWNLOAD_DIR=cache, KILN_LOG="info")
store = cache + ".store"
os.makedirs(os.path.join(store, "default"), exist_ok=True)
with open(os.path.join(store, "default", "serving.properties"), "w") as f:
    f.write(f"option.model_id={model}\noption.quantize={quant}\n")
log = open(cache + ".log", "ab")

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def pinged(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False

def status(pid):
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out

def cpu_seconds(pid):
    """User + system CPU seconds the process has used."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0

def start():
    """Starts `kiln serve`; returns (process, port, seconds to /ping, peaks)."""
    port = free_port()
    t0 = time.perf_counter()
    p = subprocess.Popen([kiln, "serve", "--port", str(port), "--model-store", store], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    peak = {"RssAnon": 0, "RssFile": 0}
    next_sample = 0.0
    while not pinged(port):
        if p.poll() is not None:
            sys.exit(f"startup_large.sh: kiln exited with {p.returncode} (see {cache}.log)")
        now = time.perf_counter()
        if now - t0 > 1800:
            p.terminate()
            sys.exit("startup_large.sh: not ready after 30 minutes")
        if now >= next_sample:
            s = status(p.pid)
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            next_sample = now + 0.05
        time.sleep(0.005)
    took = time.perf_counter() - t0
    s = status(p.pid)
    for k in peak:
        peak[k] = max(peak[k], s.get(k, 0))
    peak["VmHWM"] = s.get("VmHWM", 0)
    peak["cpu"] = cpu_seconds(p.pid)
    return p, port, took, peak

def stop(p):
    p.terminate()
    p.wait()

def request(port):
    body = json.dumps({"model": "default", "inputs": "The quick brown fox jumps over",
                       "parameters": {"max_new_tokens": 8, "do_sample": False, "ignore_eos": True}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
    return time.perf_counter() - t0

gb = lambda b: f"{b / 1e9:.2f}"
print("| start | to /ping (s) | CPU (s, user + system) | peak RSS (GB, VmHWM) | peak anonymous (GB) | peak file-backed (GB) |")
print("| --- | --- | --- | --- | --- | --- |")
p, port, took, peak = start()
stop(p)
print(f"| first (convert, write the prepared and layout files) | {took:.1f} | {peak['cpu']:.1f} | {gb(peak['VmHWM'])} | {gb(peak['RssAnon'])} | {gb(peak['RssFile'])} |")
for i in range(runs):
    p, port, took, peak = start()
    print(f"| cache hit {i + 1} | {took:.2f} | {peak['cpu']:.2f} | {gb(peak['VmHWM'])} | {gb(peak['RssAnon'])} | {gb(peak['RssFile'])} |", flush=True)
    if i + 1 < runs:
        stop(p)
# What the first request's page faults are measured against: reading the
# cache's files once (from the page cache, as the faults do).
t0 = time.perf_counter()
read = 0
for d, _, files in os.walk(os.path.join(cache, "prepared")):
    for name in files:
        if name in ("model.gguf", "weights.layout"):
            with open(os.path.join(d, name), "rb") as f:
                while chunk := f.read(1 << 24):
                    read += len(chunk)
read_s = time.perf_counter() - t0
times = [request(port) for _ in range(10)]
after = status(p.pid)
stop(p)
print()
print(f"Requests after the last cache hit (8 prompt + 8 output tokens, one at a time): "
      f"first {times[0]:.2f} s, tenth {times[9]:.2f} s, median of 2-10 {sorted(times[1:])[4]:.2f} s; "
      f"RSS after them {gb(after.get('VmRSS', 0))} GB ({gb(after.get('RssFile', 0))} file-backed); "
      f"reading the cache's files once ({gb(read)} GB) took {read_s:.2f} s")
EOF
if [ "${KEEP:-0}" != 1 ]; then rm -rf "$CACHE" "$CACHE.store"; fi
