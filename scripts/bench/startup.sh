#!/usr/bin/env bash
# Start-up time of `kiln serve` on the default model: from starting the
# process to the first 200 on /ping, for a first start (an empty
# prepared-model cache: the CPU weight layout is made and written) and for
# later starts (the layout is mapped), several runs each.
#
#   scripts/bench/startup.sh                  # kiln on PATH, else target/release/kiln
#   KILN=path/to/kiln BASE=path/to/old/kiln RUNS=7 scripts/bench/startup.sh
#
# BASE, when set, is a second binary measured in the same run, its starts
# interleaved with KILN's (a build of main, to compare before and after on
# the same machine under the same load). Each binary first starts once
# untimed, so the model file is in the page cache for every timed start.
# Prints a Markdown header (date, CPU, load) and table; raw times go to
# $OUT/times.tsv.
set -euo pipefail

NAME=startup.sh
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUNS="${RUNS:-5}"
die() { echo "$NAME: $*" >&2; exit 1; }

if [ -z "${KILN:-}" ]; then
  if command -v kiln >/dev/null; then KILN=kiln; else KILN="${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln"; fi
fi
for b in "$KILN" ${BASE:+"$BASE"}; do
  command -v "$b" >/dev/null || die "no kiln binary at '$b'; build it (cargo build --release) or set KILN / BASE"
done
command -v python3 >/dev/null || die "python3 is needed for the timing loop"
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/kiln-startup.XXXXXX")}"
mkdir -p "$OUT"

echo "# kiln serve start-up: process start to the first 200 on /ping (default model)"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "- cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(nproc) cores available"
echo "- kiln: $KILN ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'))${BASE:+; base: $BASE}"
echo "- runs: $RUNS per binary and kind of start; raw times in $OUT/times.tsv"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$OUT" "$RUNS" "$KILN" ${BASE:+"$BASE"} <<'EOF'
import os, shutil, socket, statistics, subprocess, sys, tempfile, time

out, runs, binaries = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
env = {k: v for k, v in os.environ.items() if k not in ("KILN_LAYOUT_CACHE", "KILN_MODEL", "KILN_MODEL_STORE", "HF_MODEL_ID")}

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

def start(binary, cache):
    """Seconds from spawning `kiln serve` to its first 200 on /ping."""
    port = free_port()
    e = dict(env, SERVING_DOWNLOAD_DIR=cache, KILN_LOG="warn")
    t0 = time.perf_counter()
    p = subprocess.Popen([binary, "serve", "--port", str(port)], env=e,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(out, "serve.log"), "ab"))
    try:
        while not pinged(port):
            if p.poll() is not None:
                sys.exit(f"startup.sh: {binary} exited with {p.returncode} (see {out}/serve.log)")
            if time.perf_counter() - t0 > 120:
                sys.exit(f"startup.sh: {binary} not ready after 120 s")
            time.sleep(0.002)
        return time.perf_counter() - t0
    finally:
        p.terminate()
        p.wait()

caches = {b: tempfile.mkdtemp(prefix="later-", dir=out) for b in binaries}
for b in binaries:
    start(b, caches[b])  # untimed: pages the model in, and fills `later`'s cache
times = {(b, k): [] for b in binaries for k in ("first", "later")}
for _ in range(runs):
    for b in binaries:
        fresh = tempfile.mkdtemp(prefix="first-", dir=out)
        times[(b, "first")].append(start(b, fresh))
        shutil.rmtree(fresh)
        times[(b, "later")].append(start(b, caches[b]))
for c in caches.values():
    shutil.rmtree(c)

with open(os.path.join(out, "times.tsv"), "w") as f:
    for (b, k), ts in times.items():
        for t in ts:
            f.write(f"{b}\t{k}\t{t:.4f}\n")
ms = lambda t: f"{t * 1000:.0f}"
print(f"- load average at end: {' '.join(open('/proc/loadavg').read().split()[:3])}")
print()
print("| binary | start | median ms | min ms | max ms | every run, ms |")
print("| --- | --- | ---: | ---: | ---: | --- |")
for (b, k), ts in times.items():
    print(f"| {b} | {k} | {ms(statistics.median(ts))} | {ms(min(ts))} | {ms(max(ts))} | {' '.join(ms(t) for t in ts)} |")
EOF
