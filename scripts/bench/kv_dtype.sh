#!/usr/bin/env bash
# The CPU KV cache's storage type against speed: `kiln bench` with
# --kv-cache-dtype f32, f16 (the default) and q8_0, prompt processing of
# CONTEXT tokens and decode after a prompt of CONTEXT tokens (so every
# decode step reads CONTEXT tokens' keys and values), for each model and
# context, the three types alternating within each round so that noise on a
# shared machine hits all of them.
#
# Usage: scripts/bench/kv_dtype.sh [MODEL.gguf ...]   (default: the default model)
# Environment: KILN (the binary; default `kiln` on PATH, else the release
# build), CONTEXTS (default "512 2048"), GEN (decode tokens, default 32),
# ROUNDS (default 1), REPEATS (kiln bench --repeats, default 2), THREADS
# (default 2), OUT (raw outputs; default a temporary folder).
# Prints a Markdown table: model, context, type, pp and tg tokens/s
# (medians over rounds).
set -euo pipefail
NAME=kv_dtype.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ROUNDS="${ROUNDS:-1}"
REPEATS="${REPEATS:-2}"
GEN="${GEN:-32}"
CONTEXTS="${CONTEXTS:-512 2048}"
TYPES="f32 f16 q8_0"
find_kiln
out_dir kiln-kv-dtype
MODELS_ARGS=("$@")
[ ${#MODELS_ARGS[@]} -gt 0 ] || MODELS_ARGS=("")

header "KV cache dtype on the CPU"
echo
for round in $(seq 1 "$ROUNDS"); do
  for model in "${MODELS_ARGS[@]}"; do
    label="${model:-default model}"
    for ctx in $CONTEXTS; do
      for ty in $TYPES; do
        raw="$OUT/r$round-$(basename "${model:-default}")-$ctx-$ty.json"
        RAYON_NUM_THREADS="$THREADS" "$KILN" bench ${model:+--model "$model"} --json \
          --prompt-tokens "$ctx" --gen-context "$ctx" --gen-tokens "$GEN" \
          --repeats "$REPEATS" --concurrency 0 --kv-cache-dtype "$ty" >"$raw" 2>"$raw.log" ||
          die "kiln bench failed on $label, context $ctx, $ty: see $raw.log"
        python3 - "$raw" "$label" "$ctx" "$ty" >>"$RESULTS" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
print("\t".join([sys.argv[2], sys.argv[3], sys.argv[4], f"{j['prompt_tok_s']:.2f}", f"{j['decode_tok_s']:.2f}"]))
EOF
      done
    done
  done
done

python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    m, c, t, pp, tg = line.rstrip("\n").split("\t")
    rows.setdefault((m, int(c), t), []).append((float(pp), float(tg)))
print("| model | context | KV type | pp tokens/s | tg tokens/s | tg vs f32 |")
print("| --- | --- | --- | --- | --- | --- |")
for (m, c, t), v in rows.items():
    pp = statistics.median(x[0] for x in v)
    tg = statistics.median(x[1] for x in v)
    base = statistics.median(x[1] for x in rows[(m, c, "f32")]) if (m, c, "f32") in rows else tg
    print(f"| {m} | {c} | {t} | {pp:.1f} | {tg:.2f} | {tg / base:.2f}x |")
EOF
