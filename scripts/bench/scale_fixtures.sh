#!/usr/bin/env bash
# Writes the full-size random-weight checkpoints that scripts/bench/scale.sh
# measures (issue 25, point 1): Llama-shaped GGUFs of Llama-3.2-1B, Llama-3.2-3B
# and Llama-3.1-8B (real layer shapes and vocabulary size, the default model's
# tokenizer padded to 128256 ids; an F16 file from scale_gguf.py, then each
# format by llama.cpp's llama-quantize), and the OPT-13B-shaped fp16 safetensors
# checkpoint of the reference deployment (three shards, the Hub's tensor names
# and config.json, GPT-2's tokenizer; 25.7 GB). Every writer streams: memory stays
# at tens of MB whatever the size.
#
#   scripts/bench/peers.sh                          once: llama.cpp and its tools
#   scripts/bench/scale_fixtures.sh                 1B: Q4_0, Q4_K_M, Q8_0 (2.9 GB; F16 2.5 GB meanwhile)
#   scripts/bench/scale_fixtures.sh 1b 3b 8b        every Llama size (8B: 13.6 GB of files, 16 GB of F16 meanwhile)
#   SOURCE=q8_0 scripts/bench/scale_fixtures.sh 8b  the same files with no F16 source (18 GB of disk in all)
#   scripts/bench/scale_fixtures.sh opt13b          the OPT-13B checkpoint (25.7 GB)
#
# Arguments: the sizes to write, any of 1b 3b 8b opt13b (default 1b).
# Environment: FORMATS (llama-quantize types, default "Q4_0 Q4_K_M Q8_0"),
# KEEP_F16 (1 keeps the F16 source GGUF), SOURCE (f16, the default, or q8_0:
# the Q8_0 file is written directly and the other formats requantized from it
# with `llama-quantize --allow-requantize`, so the 8B files need 18 GB of disk
# rather than 16 GB more for the F16 source; the files have the same tensor
# types and sizes either way), OPT_LAYERS (fewer OPT layers, for
# checking the writer on a small disk: the folder is then opt-13b-<N>L), SEED,
# JOBS (llama-quantize threads, default THREADS), KILN_CACHE. Files go to
# $KILN_CACHE/bench-scale/: llama3-<size>-<FORMAT>.gguf (the names are
# `kiln bench --dummy-weights --arch`'s) and opt-13b/. Existing files are kept
# (delete one to remake it). Before writing anything it checks the disk: a size
# whose files (and F16 source) would leave less than 2 GiB free is refused,
# with the numbers.
set -euo pipefail

NAME=scale_fixtures
# shellcheck source=scripts/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=scripts/bench/moe_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/moe_common.sh"

DIR="$CACHE/bench-scale"
TOKENIZER="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
read -r -a FORMATS <<<"${FORMATS:-Q4_0 Q4_K_M Q8_0}"
KEEP_F16="${KEEP_F16:-0}"
SEED="${SEED:-25}"
SOURCE="${SOURCE:-f16}"
case "$SOURCE" in f16 | q8_0) ;; *) die "SOURCE must be f16 or q8_0, not '$SOURCE'" ;; esac
JOBS="${JOBS:-$THREADS}"
OPT_LAYERS="${OPT_LAYERS:-40}"
SIZES=("$@")
[ "${#SIZES[@]}" -gt 0 ] || SIZES=(1b)
RESERVE=$((2 << 30))

for s in "${SIZES[@]}"; do
  case "$s" in 1b | 3b | 8b | opt13b) ;; *) die "unknown size '$s'; use any of 1b 3b 8b opt13b" ;; esac
done
[[ "$OPT_LAYERS" =~ ^[0-9]+$ ]] && [ "$OPT_LAYERS" -ge 1 ] && [ "$OPT_LAYERS" -le 40 ] ||
  die "OPT_LAYERS must be 1 to 40"
[ -f "$TOKENIZER" ] || die "no default model at $TOKENIZER (its tokenizer is copied); run scripts/fetch-assets.sh"
mkdir -p "$DIR"
python_with_gguf
HELPER="$ROOT/scripts/bench/scale_gguf.py"

# Parameters of each shape (the published counts, as kiln_model::dummy::SHAPES).
params() {
  case "$1" in
    1b) echo 1235814400 ;; 3b) echo 3212749824 ;; 8b) echo 8030261248 ;; opt13b) echo 12853473280 ;;
  esac
}

# bytes FORMAT PARAMS: a generous estimate of a file's size.
bytes() {
  local per
  case "$1" in
    F16 | BF16) per=2.0 ;; Q8_0) per=1.07 ;; Q6_K) per=0.83 ;; Q5_K_M | Q5_0 | Q5_1) per=0.72 ;;
    Q4_K_M | Q4_K_S | Q4_0 | Q4_1) per=0.66 ;; *) per=1.1 ;;
  esac
  awk -v p="$2" -v b="$per" 'BEGIN { printf "%.0f", p * b }'
}

# check_space WHAT BYTES: refuses (exits) when writing BYTES more would leave less
# than RESERVE free on DIR's disk.
check_space() {
  local free
  free=$(($(df --output=avail -B1 "$DIR" | tail -1)))
  if [ "$free" -lt $(($2 + RESERVE)) ]; then
    die "$1 needs $(($2 >> 20)) MiB and the disk holding $DIR has $((free >> 20)) MiB free (2 GiB must stay free); free some space or choose fewer sizes/FORMATS"
  fi
  log "$1: needs $(($2 >> 20)) MiB, $((free >> 20)) MiB free"
}

make_llama() {
  local size="$1" stem="$DIR/llama3-$1" f missing=() need=0 p src src_fmt requant=()
  p=$(params "$size")
  for f in "${FORMATS[@]}"; do
    [ -s "$stem-$f.gguf" ] || missing+=("$f")
  done
  if [ "$SOURCE" = q8_0 ]; then
    src_fmt=Q8_0
    requant=(--allow-requantize)
  else
    src_fmt=F16
  fi
  src="$stem-$src_fmt.gguf"
  if [ "${#missing[@]}" -eq 0 ] && { [ "$SOURCE" = q8_0 ] || [ "$KEEP_F16" != 1 ] || [ -s "$src" ]; }; then
    log "llama3-$size exists in ${FORMATS[*]}"
    return
  fi
  [ "${#missing[@]}" -eq 0 ] || [ -x "$BIN/llama-quantize" ] ||
    die "no llama-quantize at $BIN; run scripts/bench/peers.sh first"
  [ -s "$src" ] || need=$(bytes "$src_fmt" "$p")
  for f in "${missing[@]}"; do
    [ "$f" = "$src_fmt" ] || need=$((need + $(bytes "$f" "$p")))
  done
  check_space "llama3-$size ($src_fmt source + ${missing[*]})" "$need"
  if [ ! -s "$src" ]; then
    log "writing $src"
    local t0=$SECONDS
    "$PY" "$HELPER" llama --size "$size" --tokenizer-from "$TOKENIZER" --seed "$SEED" \
      --type "${src_fmt,,}" --out "$src" >&2
    log "$src_fmt written in $((SECONDS - t0)) s"
  fi
  for f in "${missing[@]}"; do
    [ "$f" != "$src_fmt" ] || continue
    log "llama-quantize $f"
    "$BIN/llama-quantize" "${requant[@]}" "$src" "$stem-$f.gguf.part" "$f" "$JOBS" >"$stem-$f.quantize.log" 2>&1 ||
      die "llama-quantize $f failed; see $stem-$f.quantize.log"
    mv "$stem-$f.gguf.part" "$stem-$f.gguf"
  done
  if [ "$SOURCE" = q8_0 ]; then
    case " ${FORMATS[*]} " in
      *" Q8_0 "*) ;;
      *) rm -f "$src" && log "removed the Q8_0 source (not in FORMATS)" ;;
    esac
  elif [ "$KEEP_F16" != 1 ]; then
    rm -f "$src"
    log "removed the F16 source (KEEP_F16=1 keeps it)"
  fi
  for f in "${FORMATS[@]}"; do
    log "$(basename "$stem-$f.gguf"): $(( $(stat -c %s "$stem-$f.gguf") >> 20 )) MiB"
  done
}

make_opt() {
  local out="$DIR/opt-13b" p need
  [ "$OPT_LAYERS" = 40 ] || out="$DIR/opt-13b-${OPT_LAYERS}L"
  if [ -s "$out/model.safetensors.index.json" ] && [ -s "$out/tokenizer.json" ]; then
    log "$out exists"
    return
  fi
  # Per-layer parameters and the embeddings + final norm, as opt_plan counts them.
  p=$((314639360 * OPT_LAYERS + 267898880))
  need=$(bytes F16 "$p")
  check_space "$(basename "$out") (fp16 safetensors)" "$need"
  local t0=$SECONDS
  "$PY" "$HELPER" opt13b --out "$out" --layers "$OPT_LAYERS" --seed "$SEED" >&2
  log "$out written in $((SECONDS - t0)) s ($(du -sh "$out" | cut -f1))"
}

for s in "${SIZES[@]}"; do
  case "$s" in
    opt13b) make_opt ;;
    *) make_llama "$s" ;;
  esac
done
