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
# 4. The reference request ({"seq_length": 2048, "text": [two prompts]} with
#    max_new_tokens 16 on /predictions) three times, and decode time per token
#    (the same one-prompt request at 40 and at 8 new tokens, the difference
#    over 32).
#
# The checkpoint goes to $DIR (default ~/.cache/kiln/bench-scale/<shape>;
# a sharded one there with model.safetensors.index.json, as
# `scale_fixtures.sh opt13b` writes, is used as it is), the cache to
# $DIR.cache (removed at the end unless KEEP=1): the 2.7B shape takes 5.3 GB
# and its cache 5.7 GB; the 13B one 25.7 GB and 13.7 GB. KILN: the binary
# (default $CARGO_TARGET_DIR or target, release). PYTHON: a Python with numpy and
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
if [ ! -f "$DIR/model.safetensors" ] && [ ! -f "$DIR/model.safetensors.index.json" ]; then
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
    log.flush()
    log_from = os.path.getsize(cache + ".log")
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
            # A model that fails to load leaves the server up without it.
            with open(cache + ".log", "rb") as f:
                f.seek(log_from)
                if b"failed to load" in f.read():
                    p.terminate()
                    sys.exit(f"startup_large.sh: the model failed to load (see {cache}.log)")
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

def post(port, route, body):
    """Seconds one request took, and its parsed answer."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=1200) as r:
        answer = json.loads(r.read())
    return time.perf_counter() - t0, answer

def request(port, new_tokens=8):
    return post(port, "/invocations", {"model": "default", "inputs": "The quick brown fox jumps over",
                "parameters": {"max_new_tokens": new_tokens, "do_sample": False, "ignore_eos": True}})[0]

gb = lambda b: f"{b / 1e9:.2f}"
print("| start | to /ping (s) | CPU (s, user + system) | peak RSS (GB, VmHWM) | peak anonymous (GB) | peak file-backed (GB) |")
print("| --- | --- | --- | --- | --- | --- |")
p, port, took, peak = start()
stop(p)
print(f"| first (convert, write the prepared and layout files) | {took:.1f} | {peak['cpu']:.1f} | {gb(peak['VmHWM'])} | {gb(peak['RssAnon'])} | {gb(peak['RssFile'])} |", flush=True)
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
short, long_ = request(port, 8), request(port, 40)
texts = ["Hello, I am a language model,", "Welcome to Amazon Elastic Compute Cloud,"]
reference = []
for _ in range(3):
    took, answer = post(port, "/predictions/default",
                        {"seq_length": 2048, "text": texts, "parameters": {"max_new_tokens": 16}})
    if not (isinstance(answer, list) and len(answer) == 2):
        sys.exit(f"startup_large.sh: the reference request did not give two texts: {answer}")
    reference.append(took)
peak_hwm = status(p.pid).get("VmHWM", 0)
stop(p)
print()
print(f"Requests after the last cache hit (8 prompt + 8 output tokens, one at a time): "
      f"first {times[0]:.2f} s, tenth {times[9]:.2f} s, median of 2-10 {sorted(times[1:])[4]:.2f} s; "
      f"RSS after them {gb(after.get('VmRSS', 0))} GB ({gb(after.get('RssFile', 0))} file-backed); "
      f"reading the cache's files once ({gb(read)} GB) took {read_s:.2f} s")
print()
print(f"Decode, one request: {(long_ - short) / 32:.3f} s per token (40 new tokens {long_:.2f} s, 8 new {short:.2f} s)")
print(f"The reference request (seq_length 2048, two prompts, max_new_tokens 16): "
      + ", ".join(f"{t:.2f}" for t in reference) + f" s; peak RSS of the serving process {gb(peak_hwm)} GB")
EOF
if [ "${KEEP:-0}" != 1 ]; then rm -rf "$CACHE" "$CACHE.store"; fi
