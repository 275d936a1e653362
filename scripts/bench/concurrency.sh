#!/usr/bin/env bash
# Compares kiln's continuous batching with llama.cpp's batched decoding on the CPU,
# per weight format of SmolLM2-135M-Instruct: 1 and 16 concurrent requests of a
# 128-token prompt and 128 output tokens each.
#
#   scripts/bench/peers.sh                          once: builds llama.cpp, makes the models
#   scripts/bench/concurrency.sh                    Q4_1 Q4_K_M Q8_0 F16, 2 rounds
#   ROUNDS=1 scripts/bench/concurrency.sh Q4_1      one format, one round
#
# Environment: ROUNDS (default 2), THREADS (default 2), KILN (the kiln binary;
# default `kiln` on PATH, else target/release/kiln), KILN_CACHE, OUT (a folder for
# the raw outputs; default a fresh temporary one). Run it on an idle machine.
#
# The peer is `llama-batched-bench -npp 128 -ntg 128 -npl 1,16`: all sequences'
# prompts in one batch, then one decode step per token for all of them. It reports
# two rates: `speed_tg`, output tokens over the decode phase alone, and `speed`,
# prompt plus output tokens over the whole run. kiln's figure (`kiln bench
# --concurrency 1,16`, all requests submitted at once through the engine) is output
# tokens over the wall time from the first submission to the last token, prompts
# included, so the table sets it beside both: llama.cpp's output tokens over its
# whole run (the same measure), and its decode-phase rate (a figure that leaves the
# prompts' time out, and so flatters it).
set -euo pipefail

NAME=concurrency
# shellcheck source=scripts/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROUNDS="${ROUNDS:-2}"
FORMATS=("$@")
[ "${#FORMATS[@]}" -gt 0 ] || FORMATS=(Q4_1 Q4_K_M Q8_0 F16)

[ -x "$BIN/llama-batched-bench" ] || die "no llama-batched-bench at $BIN; run scripts/bench/peers.sh first"
need_models "${FORMATS[@]}"
find_kiln
out_dir kiln-concurrency

# 16 sequences of 256 tokens fit in 4096 cells; llama-batched-bench needs them all.
llama_cmd() { echo "$BIN/llama-batched-bench -m $MODELS/smollm2-$1.gguf -t $THREADS -c 4608 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 1,16 --output-format jsonl"; }
# (A short pp/tg measurement comes first in every `kiln bench`; it is not used here.)
kiln_cmd() { echo "$KILN bench --model $MODELS/smollm2-$1.gguf --prompt-tokens 32 --gen-tokens 4 --repeats 1 --concurrency 1,16 --batch-prompt-tokens 128 --batch-gen-tokens 128 --json"; }

# run ENGINE FORMAT ROUND: appends "format engine round requests output_tok_s decode_phase_tok_s".
run() {
  local engine="$1" f="$2" r="$3" base="$OUT/$2.$1.$3" cmd
  if [ "$engine" = llama.cpp ]; then cmd="$(llama_cmd "$f")"; else cmd="$(kiln_cmd "$f")"; fi
  # shellcheck disable=SC2086 # word-split on purpose (paths have no spaces)
  if ! RAYON_NUM_THREADS="$THREADS" $cmd >"$base.out" 2>"$base.err"; then
    echo "concurrency: $engine on $f (round $r) failed; see $base.err:" >&2
    tail -5 "$base.err" >&2
    return 0
  fi
  python3 - "$engine" "$f" "$r" "$base.out" >>"$RESULTS" <<'PY' ||
import json, sys
engine, fmt, rnd, path = sys.argv[1:]
if engine == "llama.cpp":
    for line in open(path):
        line = line.strip()
        if not line.startswith("{") or '"pl"' not in line:
            continue
        d = json.loads(line)
        out = d["pl"] * d["tg"]
        print(f"{fmt}\t{engine}\t{rnd}\t{d['pl']}\t{out / d['t']}\t{d['speed_tg']}")
else:
    d = json.load(open(path))
    for c in d["concurrency"]:
        print(f"{fmt}\t{engine}\t{rnd}\t{c['concurrency']}\t{c['output_tok_s']}\t")
PY
    echo "concurrency: cannot parse $engine's output for $f (round $r); see $base.out" >&2
}

header "kiln vs llama.cpp, concurrent requests on the CPU, SmolLM2-135M-Instruct"
echo "- commands (RAYON_NUM_THREADS=$THREADS):"
echo "  - \`$(llama_cmd FORMAT)\`"
echo "  - \`$(kiln_cmd FORMAT)\`"
echo

for ((r = 1; r <= ROUNDS; r++)); do
  for f in "${FORMATS[@]}"; do
    echo "concurrency: round $r/$ROUNDS, $f" >&2
    if ((r % 2)); then
      run llama.cpp "$f" "$r"; run kiln "$f" "$r"
    else
      run kiln "$f" "$r"; run llama.cpp "$f" "$r"
    fi
  done
done

python3 - "$RESULTS" "${FORMATS[@]}" <<'PY'
import statistics, sys
from collections import defaultdict
path, formats = sys.argv[1], sys.argv[2:]
out, phase = defaultdict(list), defaultdict(list)
for line in open(path):
    fmt, eng, _, n, o, p = line.rstrip("\n").split("\t")
    out[fmt, eng, int(n)].append(float(o))
    if p:
        phase[fmt, eng, int(n)].append(float(p))
def med(d, *key):
    v = d.get(key)
    return statistics.median(v) if v else None
def num(x):
    return "–" if x is None else f"{x:.1f}"
def ratio(a, b):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"
print("| format | kiln 1 | kiln 16 | kiln 16 / 1 | llama.cpp 16 (output / whole run) | ratio | llama.cpp 16 (decode phase) | ratio |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for f in formats:
    k1, k16 = med(out, f, "kiln", 1), med(out, f, "kiln", 16)
    l16, p16 = med(out, f, "llama.cpp", 16), med(phase, f, "llama.cpp", 16)
    print(f"| {f} | {num(k1)} | {num(k16)} | {ratio(k16, k1)} | {num(l16)} | {ratio(k16, l16)} | {num(p16)} | {ratio(k16, p16)} |")
print()
print("Output tokens/s, 128-token prompts and 128 output tokens per request; ratio = kiln / llama.cpp.")
PY
