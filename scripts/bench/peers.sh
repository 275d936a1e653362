#!/usr/bin/env bash
# Builds llama.cpp as a CPU benchmark peer for kiln, outside the repository, and
# quantizes the default model (SmolLM2-135M-Instruct) into the formats it is
# compared in. Everything is cached under $KILN_CACHE/peers (KILN_CACHE defaults
# to ~/.cache/kiln, as in scripts/fetch-assets.sh); rerunning skips what exists.
#
#   scripts/bench/peers.sh                  build llama.cpp and make the models
#   JOBS=4 scripts/bench/peers.sh           build with another -j (default 2)
#   LLAMA_AMX=1 scripts/bench/peers.sh      keep Intel AMX (see below)
#
# llama.cpp comes from the vendored copy in the PyPI source package
# llama_cpp_python-0.3.36 (pinned by sha256; shared with fetch-assets.sh's
# download). It is built CPU-only, Release, with -march=native (GGML_NATIVE=ON),
# and only these targets: llama-bench llama-batched-bench llama-server
# llama-quantize llama-perplexity.
#
# AMX is compiled out by default (-mno-amx-*, which GCC honours even alongside
# -march=native): on AMX CPUs this llama.cpp's AMX matmul (used for Q4_0, Q4_1,
# Q8_0 and some K-quants) dies with SIGILL on its first tile instruction (the
# tile config is loaded from a stack buffer the compiler may drop; upstream PR
# ggml-org/llama.cpp#26954). Everything else -march=native offers (AVX-512,
# VNNI, BF16) stays. Changing LLAMA_AMX reconfigures and rebuilds.
#
# Result:
#   $KILN_CACHE/peers/llama.cpp/build/bin/llama-*      the binaries
#   $KILN_CACHE/peers/models/smollm2-<FORMAT>.gguf     F16 BF16 Q8_0 Q6_K Q5_K_M Q5_1
#                                                       Q5_0 Q4_K_M Q4_1 Q4_0 Q3_K_M Q2_K
# scripts/bench/cpu_formats.sh compares kiln with llama.cpp on these files.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
PEERS="$CACHE/peers"
SRC="$PEERS/llama.cpp"
BUILD="$SRC/build"
BIN="$BUILD/bin"
MODELS="$PEERS/models"
JOBS="${JOBS:-2}"
TARGETS=(llama-bench llama-batched-bench llama-server llama-quantize llama-perplexity)
FORMATS=(F16 BF16 Q8_0 Q6_K Q5_K_M Q5_1 Q5_0 Q4_K_M Q4_0 Q3_K_M Q2_K)

LCP_SDIST=llama_cpp_python-0.3.36.tar.gz
LCP_URL="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/$LCP_SDIST"
LCP_SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

log() { echo "peers: $*" >&2; }

mkdir -p "$CACHE/downloads" "$PEERS" "$MODELS"

# Build tools.
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${need[@]}"
fi

# Source: the sdist (reused from fetch-assets.sh's download when intact).
sdist="$CACHE/downloads/$LCP_SDIST"
if ! { [ -f "$sdist" ] && echo "$LCP_SHA  $sdist" | sha256sum -c --status; }; then
  log "downloading $LCP_SDIST"
  curl -fL --retry 3 --progress-bar -o "$sdist.part" "$LCP_URL"
  if ! echo "$LCP_SHA  $sdist.part" | sha256sum -c --status; then
    log "$LCP_SDIST does not match its pinned sha256 $LCP_SHA; refusing it"
    rm -f "$sdist.part"
    exit 1
  fi
  mv "$sdist.part" "$sdist"
fi
if [ ! -f "$SRC/.complete" ]; then
  log "extracting vendor/llama.cpp into $SRC"
  rm -rf "$SRC" "$SRC.part" && mkdir -p "$SRC.part"
  tar -xzf "$sdist" -C "$SRC.part" --strip-components=3 --exclude='*/.git' \
    'llama_cpp_python-0.3.36/vendor/llama.cpp'
  mv "$SRC.part" "$SRC"
  touch "$SRC/.complete"
fi

# Build (cmake and make skip what is up to date; a changed configuration reconfigures).
NOAMX=""
[ "${LLAMA_AMX:-0}" = 1 ] || NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CONFIG=(-DCMAKE_BUILD_TYPE=Release
  -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  -DBUILD_SHARED_LIBS=OFF
  "-DCMAKE_C_FLAGS=$NOAMX" "-DCMAKE_CXX_FLAGS=$NOAMX")
stamp="$BUILD/.kiln-config"
up_to_date=1
for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || up_to_date=0; done
[ -f "$stamp" ] && [ "$(cat "$stamp")" = "${CONFIG[*]}" ] || up_to_date=0
if [ "$up_to_date" = 0 ]; then
  log "configuring llama.cpp (CPU only, Release, native${NOAMX:+, no AMX})"
  rm -f "$stamp"
  cmake -S "$SRC" -B "$BUILD" "${CONFIG[@]}"
  log "building ${TARGETS[*]} with -j$JOBS"
  cmake --build "$BUILD" --config Release -j"$JOBS" --target "${TARGETS[@]}"
  echo "${CONFIG[*]}" >"$stamp"
fi
for t in "${TARGETS[@]}"; do
  [ -x "$BIN/$t" ] || { log "build did not produce $BIN/$t"; exit 1; }
done

# Models.
SRC_MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$SRC_MODEL" ]; then
  log "default model missing; running scripts/fetch-assets.sh"
  KILN_CACHE="$CACHE" "$ROOT/scripts/fetch-assets.sh" >/dev/null
fi
ln -sfn "$SRC_MODEL" "$MODELS/smollm2-Q4_1.gguf"
for f in "${FORMATS[@]}"; do
  out="$MODELS/smollm2-$f.gguf"
  [ -s "$out" ] && continue
  log "quantizing $f"
  "$BIN/llama-quantize" --allow-requantize "$SRC_MODEL" "$out.part" "$f" "$JOBS" \
    >"$MODELS/.quantize-$f.log" 2>&1 || {
    log "llama-quantize $f failed; see $MODELS/.quantize-$f.log"
    rm -f "$out.part"
    exit 1
  }
  mv "$out.part" "$out"
done

echo "llama.cpp source: $SRC"
echo "binaries:         $BIN ($(printf '%s ' "${TARGETS[@]}"))"
echo "models:           $MODELS"
for m in "$MODELS"/smollm2-*.gguf; do
  size=$(stat -L -c %s "$m")
  link=""
  [ -L "$m" ] && link=" -> $(readlink "$m")"
  printf '  %6.1f MB  %s%s\n' "$(echo "$size" | awk '{print $1 / 1048576}')" "$m" "$link"
done
