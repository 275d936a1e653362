# Shared setup of the scripts that compare kiln with llama.cpp (sourced, not run):
# where the peers live, which kiln binary to measure, the raw-output folder, and
# the run header. The sourcing script sets NAME (its name in messages) first.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
BIN="$CACHE/peers/llama.cpp/build/bin"
MODELS="$CACHE/peers/models"
THREADS="${THREADS:-2}"

die() { echo "$NAME: $*" >&2; exit 1; }

# need_models FORMAT...: every format's model file exists.
need_models() {
  local f
  for f in "$@"; do
    [ -f "$MODELS/smollm2-$f.gguf" ] ||
      die "no $MODELS/smollm2-$f.gguf; run scripts/bench/peers.sh first (formats it makes: $(cd "$MODELS" 2>/dev/null && ls smollm2-*.gguf 2>/dev/null | sed 's/smollm2-//; s/\.gguf//' | tr '\n' ' '))"
  done
}

# find_kiln: sets KILN to the binary to measure (KILN, else `kiln` on PATH, else
# the release build) and checks the tools the scripts parse with.
find_kiln() {
  if [ -z "${KILN:-}" ]; then
    if command -v kiln >/dev/null; then KILN=kiln; else KILN="${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln"; fi
  fi
  command -v "$KILN" >/dev/null || die "no kiln binary at '$KILN'; build it (cargo build --release) or set KILN"
  command -v python3 >/dev/null || die "python3 is needed to parse the JSON"
  [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
}

# out_dir PREFIX: sets OUT (default a fresh temporary folder) and RESULTS, emptied.
out_dir() {
  OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")}"
  mkdir -p "$OUT"
  RESULTS="$OUT/results.tsv"
  : >"$RESULTS"
}

# header TITLE: the run's Markdown header (date, CPU, binary, rounds, load), with a
# warning on stderr when other processes are using the CPU: llama.cpp's spinning
# thread pool collapses (tg down to ~1 token/s) when another process takes a core,
# so a busy machine makes the comparison meaningless.
header() {
  echo "# $1"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores available, $THREADS threads"
  echo "- kiln: $KILN ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && git diff --quiet HEAD 2>/dev/null || echo ', dirty'))"
  echo "- llama.cpp: $BIN (vendored in llama_cpp_python 0.3.36)"
  echo "- rounds: $ROUNDS (medians over rounds); raw outputs in $OUT"
  local others
  others="$(ps -eo pid=,pcpu=,comm= | awk -v me=$$ '$1 != me && $2 > 20 {print $3 "(" $2 "%)"}' | tr '\n' ' ')"
  [ -z "$others" ] || echo "$NAME: warning: other processes are using the CPU: $others" >&2
  echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)${others:+; busy: $others}"
}
