#!/usr/bin/env bash
# Peak resident memory of kiln serve with the default model (SmolLM2-135M-
# Instruct Q4_1) drafting for itself ({"model": <the same file>}), against
# the same binary without speculation, for one or two kiln binaries: a build
# that loads the draft a second time against one that shares the target's
# weights (Engine::start_self_draft). `kiln bench` has no speculation
# setting, so the server is measured: each setting is a kiln serve of its
# own that answers one greedy 160-token request on a task that copies from
# its prompt, then its /proc status is read (VmHWM = peak RSS; RssAnon,
# RssFile now) and it is stopped. Rounds alternate the binaries and
# settings so noise hits all alike; medians are printed.
#
#   BEFORE=/path/to/old/kiln KILN=target/release/kiln ROUNDS=3 scripts/bench/self_draft_rss.sh
#
# Env: KILN (binary; default the release build), BEFORE (optional second
# binary, listed first), ROUNDS (default 3), K (guesses per step, 4),
# THREADS (default 2), OUT (raw-output folder).
set -euo pipefail
NAME=self_draft_rss.sh
source "$(dirname "$0")/common.sh"
ROUNDS="${ROUNDS:-3}"
K="${K:-4}"
find_kiln
out_dir kiln-self-rss
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$MODEL" ] || die "no default model at $MODEL; run scripts/fetch-assets.sh"
BINS=()
[ -z "${BEFORE:-}" ] || BINS+=("before=$BEFORE")
BINS+=("after=$KILN")

PID=""
cleanup() { [ -z "$PID" ] || kill "$PID" 2>/dev/null || true; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# one BIN SETTING: serve, one request, print "VmHWM RssAnon RssFile" in KiB.
one() {
  local bin=$1 setting=$2 p
  p=$(port)
  local args=(serve --models "m=$MODEL" --port "$p" --kv-cache-mib 256)
  [ "$setting" = plain ] || args+=(--speculative-config "{\"model\": \"$MODEL\", \"num_speculative_tokens\": $K}")
  KILN_THREADS=$THREADS "$bin" "${args[@]}" >>"$OUT/kiln-$setting.log" 2>&1 &
  PID=$!
  python3 - "$p" <<'PY'
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
TEXT = ("Copy the following list of items exactly, one per line, in the same order.\n\n"
        + "\n".join(f"{i}. {w}" for i, w in enumerate(
            "apples pears plums cherries grapes lemons limes melons peaches figs dates "
            "kiwis mangoes papayas guavas apricots quinces lychees olives raisins".split(), 1))
        + "\n\nCopy:\n1. apples\n2.")
body = json.dumps({"model": "m", "prompt": TEXT, "max_tokens": 160, "temperature": 0}).encode()
for _ in range(1200):
    try:
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            json.load(r)
            sys.exit(0)
    except Exception:
        time.sleep(0.25)
sys.exit("the server never answered")
PY
  awk '/^(VmHWM|RssAnon|RssFile):/ {printf "%s ", $2} END {print ""}' "/proc/$PID/status"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
}

{
  header "Peak RSS of kiln serve, default model drafting for itself (one 160-token request)"
  echo "- K = $K; KiB from /proc/PID/status after the request"
  echo
} | tee "$OUT/report.md"
for r in $(seq 1 "$ROUNDS"); do
  for b in "${BINS[@]}"; do
    for setting in plain self; do
      echo "${b%%=*} $setting $(one "${b#*=}" "$setting")" | tee -a "$RESULTS"
    done
  done
done
python3 - "$RESULTS" <<'PY' | tee -a "$OUT/report.md"
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    b, s, *v = line.split()
    rows.setdefault((b, s), []).append([int(x) for x in v])
print("| binary | setting | peak RSS MiB (median) | RssAnon MiB | RssFile MiB | runs (peak MiB) |")
print("| --- | --- | ---: | ---: | ---: | --- |")
for (b, s), vs in rows.items():
    med = [statistics.median(v[i] for v in vs) / 1024 for i in range(3)]
    runs = ", ".join(f"{v[0] / 1024:.1f}" for v in vs)
    print(f"| {b} | {s} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | {runs} |")
PY
