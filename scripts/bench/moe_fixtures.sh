#!/usr/bin/env bash
# Writes the random-weight mixture-of-experts GGUFs that scripts/bench/moe.sh
# measures (issue 23, point 5): the real per-layer shapes of Qwen3-30B-A3B
# (qwen3moe: hidden 2048, 32 query / 4 KV heads of 128, 128 experts, 8 per token,
# expert width 768) and of Mixtral-8x7B (llama with experts: hidden 4096, 32 / 8
# heads, 8 experts, 2 per token, expert width 14336), with fewer layers so they fit
# the disk, and the default model's tokenizer (SmolLM2's, 49152 tokens).
# scripts/bench/moe_gguf.py writes each with seeded random weights, as Q8_0
# quantized from F16 values (byte for byte what llama-quantize makes of the F16
# file: checked on 1-layer files, `moe_gguf.py write --type f16` and `--type
# q8_0`, llama-quantize of the first to Q8_0, `moe_gguf.py compare`: 15 of 15
# tensors the same) so the twice-as-large F16 never needs the disk;
# llama-quantize makes the other formats (Q4_K_M) from it. SOURCE=f16 writes the
# F16 instead and quantizes every format from it (deleted at the end unless
# KEEP_F16=1). Each file is then checked by running llama-bench on it once.
#
#   scripts/bench/peers.sh                       once: llama.cpp and the default model
#   scripts/bench/moe_fixtures.sh                Qwen3-MoE, 4 layers: Q8_0 2.9 GB, Q4_K_M 1.7 GB
#   LAYERS=8 MIXTRAL=1 scripts/bench/moe_fixtures.sh   8 layers (8.6 GB) and Mixtral, 1 layer (3 GB)
#   MIXTRAL=1 MIXTRAL_LAYERS=3 FORMATS=Q4_K_M scripts/bench/moe_fixtures.sh
#                                                Mixtral, 3 layers: Q8_0 5.1 GB (the source) and Q4_K_M 2.9 GB
#
# Environment: LAYERS (Qwen3-MoE depth, default 4; the real model has 48; each
# layer is 0.66 GB in Q8_0), MIXTRAL (1 adds the Mixtral shape), MIXTRAL_LAYERS
# (default 1; the real model has 32; 1.5 GB a layer in Q8_0), FORMATS (default
# "Q8_0 Q4_K_M"), SOURCE (q8_0 or f16, above), KEEP_F16, SEED (default 23), VERIFY
# (0 skips the llama-bench check), JOBS (llama-quantize threads), KILN_CACHE (as in
# scripts/fetch-assets.sh). Files go to
# $KILN_CACHE/bench-moe/<model>-<N>L-<FORMAT>.gguf (N: the layer count); existing
# files are kept (delete one to remake it). It refuses to start when the disk
# would keep less than 2 GiB free.
#
# Python: the `gguf` package from ~/.cache/kiln/venv-golden when it is ready
# (its .ready file exists), else a small venv with only gguf and numpy at
# $KILN_CACHE/venv-bench, made on first use.
set -euo pipefail

NAME=moe_fixtures
# shellcheck source=scripts/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=scripts/bench/moe_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/moe_common.sh"
LAYERS="${LAYERS:-4}"
MIXTRAL="${MIXTRAL:-0}"
MIXTRAL_LAYERS="${MIXTRAL_LAYERS:-1}"
SOURCE="${SOURCE:-q8_0}"
read -r -a FORMATS <<<"${FORMATS:-Q8_0 Q4_K_M}"
KEEP_F16="${KEEP_F16:-0}"
SEED="${SEED:-23}"
VERIFY="${VERIFY:-1}"
DIR="$MOE_DIR"
TOKENIZER="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
JOBS="${JOBS:-$THREADS}"

[[ "$LAYERS" =~ ^[1-9][0-9]*$ ]] || die "LAYERS must be a positive integer"
[[ "$MIXTRAL_LAYERS" =~ ^[1-9][0-9]*$ ]] || die "MIXTRAL_LAYERS must be a positive integer"
[ -x "$BIN/llama-quantize" ] || die "no llama-quantize at $BIN; run scripts/bench/peers.sh first"
[ -f "$TOKENIZER" ] || die "no default model at $TOKENIZER (its tokenizer is copied); run scripts/fetch-assets.sh"
mkdir -p "$DIR"

python_with_gguf

# Rough bytes per parameter of each file, to check the disk before writing.
bytes_per_param() {
  case "$1" in
    F16 | BF16) echo 2 ;; Q8_0) echo 1.07 ;; Q6_K) echo 0.83 ;; Q5_K_M) echo 0.72 ;;
    Q4_K_M) echo 0.62 ;; *) echo 1.07 ;;
  esac
}

# make_shape SHAPE LAYERS PARAMS_PER_LAYER FIXED_PARAMS: writes <label>-<N>L-<FORMAT>.gguf
# for FORMATS (and F16 with KEEP_F16=1).
make_shape() {
  local shape="$1" layers="$2" per_layer="$3" fixed="$4" stem f src missing=() made need params free
  stem="$DIR/$("$PY" -c "import sys; sys.path.insert(0, '$ROOT/scripts/bench'); import moe_gguf; print(moe_gguf.SHAPES['$shape'].label)")-${layers}L"
  for f in "${FORMATS[@]}"; do [ -s "$stem-$f.gguf" ] || missing+=("$f"); done
  [ "$KEEP_F16" = 1 ] && [ ! -s "$stem-F16.gguf" ] && missing+=(F16)
  if [ "${#missing[@]}" -eq 0 ]; then
    log "$(basename "$stem") exists in ${FORMATS[*]}"
    return
  fi
  # The source every other format is quantized from: F16 (deleted at the end unless
  # KEEP_F16=1) when asked for, else Q8_0 written directly (what llama-quantize makes
  # of the F16, bit for bit, without the F16 on disk).
  src=Q8_0
  if [ "$SOURCE" = f16 ] || [ "$KEEP_F16" = 1 ]; then src=F16; fi
  params=$((fixed + layers * per_layer))
  need=0
  made=("${missing[@]}")
  [[ " ${missing[*]} " == *" $src "* ]] || [ -s "$stem-$src.gguf" ] || made+=("$src")
  for f in "${made[@]}"; do
    need=$(awk -v n="$need" -v p="$params" -v b="$(bytes_per_param "$f")" 'BEGIN { printf "%.0f", n + p * b }')
  done
  free=$(df -B1 --output=avail "$DIR" | tail -1)
  if [ "$need" -gt $((free - (2 << 30))) ]; then
    die "$(basename "$stem") needs about $((need >> 30)) GiB at peak and $DIR has $((free >> 30)) GiB free (2 GiB kept spare); lower the layer count (LAYERS, MIXTRAL_LAYERS) or set FORMATS"
  fi
  if [ ! -s "$stem-$src.gguf" ]; then
    log "writing $stem-$src.gguf (about $(awk -v p="$params" -v b="$(bytes_per_param "$src")" 'BEGIN { printf "%.0f", p * b / 2^20 }') MiB)"
    "$PY" "$ROOT/scripts/bench/moe_gguf.py" write --shape "$shape" --layers "$layers" --seed "$SEED" \
      --type "$(echo "$src" | tr '[:upper:]' '[:lower:]')" --tokenizer-from "$TOKENIZER" \
      --out "$stem-$src.gguf" >/dev/null
  fi
  for f in "${missing[@]}"; do
    [ "$f" = "$src" ] && continue
    log "quantizing $(basename "$stem") from $src to $f"
    "$BIN/llama-quantize" --allow-requantize "$stem-$src.gguf" "$stem-$f.gguf.part" "$f" "$JOBS" \
      >"$stem-$f.quantize.log" 2>&1 || {
      rm -f "$stem-$f.gguf.part"
      die "llama-quantize $f failed; see $stem-$f.quantize.log"
    }
    mv "$stem-$f.gguf.part" "$stem-$f.gguf"
  done
  [ "$src" != F16 ] || [ "$KEEP_F16" = 1 ] || rm -f "$stem-F16.gguf"
}

# Parameters: per layer (attention + norms + router + experts) and outside layers
# (embedding + output + final norm), vocabulary 49152.
q_layer=$((2 * 2048 * 4096 + 2 * 2048 * 512 + 2 * 2048 + 2 * 128 + 128 * 2048 + 3 * 128 * 768 * 2048))
make_shape qwen3moe "$LAYERS" "$q_layer" $((2 * 49152 * 2048 + 2048))
if [ "$MIXTRAL" != 0 ]; then
  m_layer=$((2 * 4096 * 4096 + 2 * 4096 * 1024 + 2 * 4096 + 8 * 4096 + 3 * 8 * 14336 * 4096))
  make_shape mixtral "$MIXTRAL_LAYERS" "$m_layer" $((2 * 49152 * 4096 + 4096))
fi

if [ "$VERIFY" != 0 ]; then
  [ -x "$BIN/llama-bench" ] || die "no llama-bench at $BIN"
  for m in "$DIR"/*L-*.gguf; do
    log "checking that llama.cpp runs $(basename "$m")"
    "$BIN/llama-bench" -m "$m" -p 64 -n 16 -t "$THREADS" -r 1 >"${m%.gguf}.check.log" 2>&1 ||
      die "llama-bench failed on $m; see ${m%.gguf}.check.log"
  done
fi

echo "random-weight MoE models in $DIR:"
for m in "$DIR"/*L-*.gguf; do
  printf '  %7.2f GiB  %s  %s\n' "$(stat -c %s "$m" | awk '{print $1 / 2^30}')" "$(basename "$m")" \
    "$("$PY" "$ROOT/scripts/bench/moe_gguf.py" active --text "$m")"
done
