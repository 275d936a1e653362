#!/usr/bin/env bash
# Embedding throughput on the CPU: kiln's /v1/embeddings against
# sentence-transformers `encode` (torch.set_num_threads(THREADS)) and, where
# llama.cpp's converter takes the checkpoint, llama-server --embeddings on its
# f32 GGUF, all on the same random-weight BERT checkpoints at real shapes
# (all-MiniLM-L6-v2: 384 x 6 layers; bge-base / e5-base: 768 x 12 layers),
# written by scripts/bench/embeddings.py into OUT/models (no hub download).
# Batch 1 (32 requests of one input) and 32 (one request of 32 inputs), 16 and
# 256 tokens per input; the engines take turns in every round, medians over
# ROUNDS. Prints a Markdown table (inputs per second) with the run's header.
#
#   scripts/bench/embeddings.sh                 # THREADS=2 ROUNDS=3
#   KILN=target/release/kiln EMB_MODELS=minilm ROUNDS=5 scripts/bench/embeddings.sh
#
# Needs: a release kiln (KILN, else target/release/kiln), the golden venv with
# torch and sentence-transformers (PY, default ~/.cache/kiln/venv-golden), and
# for the llama.cpp column scripts/bench/peers.sh's build (skipped without it).
set -euo pipefail
NAME=embeddings
ROUNDS="${ROUNDS:-3}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
find_kiln
PY="${PY:-$CACHE/venv-golden/bin/python}"
[ -x "$PY" ] || die "no python at $PY (the golden venv: torch, transformers, sentence-transformers)"
out_dir kiln-embeddings
LLAMA_ARGS=()
if [ -x "$BIN/llama-server" ]; then
  LLAMA_ARGS=(--llama-bin "$BIN" --llama-src "$CACHE/peers/llama.cpp")
fi
header "Embeddings on the CPU: kiln vs sentence-transformers vs llama-server"
echo "- sentence-transformers: $("$PY" -c 'import sentence_transformers as s, torch as t; print(s.__version__, "on torch", t.__version__)' 2>/dev/null)"
echo
# torch's OpenMP threads wait passively, so that they do not spin on the
# cores the other engines run on between calls.
OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 "$PY" "$ROOT/scripts/bench/embeddings.py" --kiln "$KILN" --out "$OUT" \
  --threads "$THREADS" --rounds "$ROUNDS" --models "${EMB_MODELS:-minilm,base}" "${LLAMA_ARGS[@]}" |
  tee "$OUT/table.md"
