#!/usr/bin/env bash
# Speculative decoding on the CPU, default model (SmolLM2-135M-Instruct Q4_1):
# decode tokens/s of one greedy request on a task that copies from its prompt
# (re-list a given text) and, for plain and n-gram, on one that does not
# (a free-form story: guesses mostly miss, so adaptive speculation pauses
# them and n-gram should cost nothing), against kiln serve with
#   plain   - no speculation,
#   ngram   - n-gram prompt lookup ({"method": "ngram", ...}),
#   self    - the same model as its own draft (acceptance 100%: the
#             machinery's overhead with nothing to gain),
# and llama-server on the same GGUF with
#   plain, --spec-type ngram-simple, and -md (the same file as draft).
# Every round runs every setting once, in turn, so noise hits all alike.
# Decode tokens/s = (completion tokens - 1) / (last streamed chunk - first).
# kiln runs with KILN_STEP_PROFILE=1: its logs end with per-phase step
# timings (propose, schedule, forward, choose; the draft's input, forward,
# argmax), printed after the table.
#
#   scripts/bench/speculative.sh            # ROUNDS=3 K=4 MAX_TOKENS=160
#
# Env: KILN (binary; default the release build), ROUNDS, K (tokens guessed
# per step), MAX_TOKENS, THREADS (default 2), OUT (raw-output folder),
# LLAMA=0 to leave llama-server out (its spinning thread pool collapses to
# under 1 token/s when other processes hold the cores).
set -euo pipefail
NAME=speculative.sh
source "$(dirname "$0")/common.sh"
ROUNDS="${ROUNDS:-3}"
K="${K:-4}"
MAX_TOKENS="${MAX_TOKENS:-160}"
find_kiln
out_dir kiln-spec
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$MODEL" ] || die "no default model at $MODEL; run scripts/fetch-assets.sh"
LLAMA="${LLAMA:-1}"
[ "$LLAMA" = 0 ] || [ -x "$BIN/llama-server" ] || die "no $BIN/llama-server; run scripts/bench/peers.sh"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# kiln_up NAME SPEC_JSON: a kiln serve with the model as NAME.
declare -A URL
kiln_up() {
  local name=$1 spec=$2 p
  p=$(port)
  local args=(serve --models "$name=$MODEL" --port "$p" --kv-cache-mib 256)
  [ -z "$spec" ] || args+=(--speculative-config "$spec")
  KILN_STEP_PROFILE=1 KILN_THREADS=$THREADS "$KILN" "${args[@]}" >"$OUT/kiln-$name.log" 2>&1 &
  PIDS+=($!)
  URL[kiln-$name]="http://127.0.0.1:$p|$name"
}
llama_up() {
  local name=$1; shift
  local p; p=$(port)
  "$BIN/llama-server" -m "$MODEL" --port "$p" -t "$THREADS" -c 4096 -np 1 --no-webui "$@" \
    >"$OUT/llama-$name.log" 2>&1 &
  PIDS+=($!)
  URL[llama-$name]="http://127.0.0.1:$p|smollm2"
}

kiln_up plain ""
kiln_up ngram "{\"method\": \"ngram\", \"num_speculative_tokens\": $K, \"prompt_lookup_min\": 1, \"prompt_lookup_max\": 3}"
kiln_up self "{\"model\": \"$MODEL\", \"num_speculative_tokens\": $K}"
if [ "$LLAMA" != 0 ]; then
  llama_up plain
  llama_up ngram --spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m "$K"
  llama_up self -md "$MODEL" --spec-draft-n-max "$K" --spec-draft-n-min 0 -td "$THREADS"
fi

{
  header "Speculative decoding: decode tokens/s on a copying task and a free-form one (default model, one request)"
  echo "- K (tokens guessed per step) = $K, max_tokens = $MAX_TOKENS, greedy"
  echo
} | tee "$OUT/report.md"

ORDER="kiln-plain kiln-ngram kiln-self"
[ "$LLAMA" = 0 ] || ORDER+=" llama-plain llama-ngram llama-self"
SPECS=""
for k in $ORDER; do SPECS+="$k=${URL[$k]} "; done
python3 - "$ROUNDS" "$MAX_TOKENS" "$OUT" $SPECS <<'PY' | tee -a "$OUT/report.md"
import json, sys, time, urllib.error, urllib.request, statistics
rounds, max_tokens, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
targets = [a.split("=", 1) for a in sys.argv[4:]]
targets = [(k, v.split("|")) for k, v in targets]
# A continuation that does not copy its prompt; ignore_eos so that it runs
# to max_tokens like the copying task.
STORY = ("Write a short story about a lighthouse keeper who finds a message in a bottle.\n\n"
         "Story: On the night of the storm, the old keeper")
TEXT = ("Copy the following list of items exactly, one per line, in the same order.\n\n"
        + "\n".join(f"{i}. {w}" for i, w in enumerate(
            "apples pears plums cherries grapes lemons limes melons peaches figs dates "
            "kiwis mangoes papayas guavas apricots quinces lychees olives raisins".split(), 1))
        + "\n\nCopy:\n1. apples\n2.")

def wait_ready(base):
    for _ in range(600):
        for path in ("/ping", "/health"):
            try:
                with urllib.request.urlopen(base + path, timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                pass
        time.sleep(0.5)
    sys.exit(f"{base} never became ready")

def run(base, model, prompt=None):
    body = {"model": model, "prompt": prompt or TEXT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if prompt is not None and prompt != TEXT:
        body["ignore_eos"] = True
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = []
    text = []
    n = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            ev = json.loads(line[5:])
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
            for c in ev.get("choices", []):
                if c.get("text"):
                    t.append(time.perf_counter())
                    text.append(c["text"])
    return n, t, "".join(text)

for k, (base, _) in targets:
    wait_ready(base)
# Warm-up (first request pays page faults and caches); a server still
# loading (or waiting for another to prepare the model) answers 503.
for k, (base, model) in targets:
    for attempt in range(600):
        try:
            run(base, model)
            break
        except urllib.error.HTTPError as e:
            if e.code != 503:
                raise
            time.sleep(1)
# The free-form task: kiln plain and n-gram only.
free = [(k, v) for k, v in targets if k in ("kiln-plain", "kiln-ngram")]
jobs = [("copy", k, v, TEXT) for k, v in targets] + [("story", k, v, STORY) for k, v in free]
res = {(task, k): [] for task, k, _, _ in jobs}
texts = {}
for r in range(rounds):
    for task, k, (base, model), prompt in jobs:
        n, t, text = run(base, model, prompt)
        texts[(task, k)] = text
        if n and len(t) > 1:
            res[(task, k)].append((n - 1) / (t[-1] - t[0]))
        with open(f"{out}/{task}-{k}.txt", "w") as f:
            f.write(text)
print("| task | server | setting | decode tokens/s (median) | x plain | runs |")
print("| --- | --- | --- | --- | --- | --- |")
for task, k, _, _ in jobs:
    srv, setting = k.split("-", 1)
    v = res[(task, k)]
    base = res.get((task, f"{srv}-plain")) or []
    med = statistics.median(v) if v else None
    ratio = f"{med / statistics.median(base):.2f}" if med and base else "n/a"
    print(f"| {task} | {srv} | {setting} | {f'{med:.1f}' if med else 'n/a'} | {ratio} "
          f"| {', '.join(f'{x:.1f}' for x in v)} |")
print()
texts = {k: v for (task, k), v in texts.items() if task == "copy"} | {
    "story-" + k: v for (task, k), v in texts.items() if task == "story"}
print(f"- kiln's story outputs identical (plain, ngram): "
      f"{texts.get('story-kiln-plain') == texts.get('story-kiln-ngram')}")
same = texts.get("kiln-plain") == texts.get("kiln-ngram") == texts.get("kiln-self")
print(f"- kiln's three outputs identical: {same}")
if "llama-plain" in texts:
    same_l = texts.get("llama-plain") == texts.get("llama-ngram") == texts.get("llama-self")
    print(f"- llama-server's three outputs identical: {same_l}")
PY
for name in plain ngram self; do
  base="${URL[kiln-$name]%%|*}"
  echo "- kiln $name spec metrics: $(curl -s "$base/metrics" | grep -E '^(vllm:spec_decode_num_(draft|accepted)_tokens_total|kiln_spec_decode_acceptance_rate)' | sed 's/{[^}]*}//' | tr '\n' ' ')" | tee -a "$OUT/report.md"
done
{
  echo
  echo "Per-phase step timings of kiln's last timed request of each setting (KILN_STEP_PROFILE=1):"
  echo
  for name in plain ngram self; do
    grep -h "profile:" "$OUT/kiln-$name.log" | sed 's/.*\(engine\|draft\) profile: /\1: /' | tail -n 2 |
      sed "s/^/- $name /"
  done
} | tee -a "$OUT/report.md"
