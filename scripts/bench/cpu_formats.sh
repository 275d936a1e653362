#!/usr/bin/env bash
# Compares kiln with llama.cpp on the CPU, per weight format of SmolLM2-135M-Instruct:
# prompt processing (pp512) and decode (tg128) tokens/s, and each process's peak RSS.
#
#   scripts/bench/peers.sh                        once: builds llama.cpp, makes the models
#   scripts/bench/cpu_formats.sh                  Q4_1 Q8_0 Q4_K_M F16 BF16 Q6_K, 3 rounds
#   ROUNDS=1 scripts/bench/cpu_formats.sh Q4_1    one format, one round
#
# Environment: ROUNDS (default 3), THREADS (default 2; llama-bench -t and kiln's
# RAYON_NUM_THREADS), KILN (the kiln binary; default `kiln` on PATH, else
# target/release/kiln), KILN_CACHE (as in scripts/fetch-assets.sh), OUT (a folder
# for the raw outputs; default a fresh temporary one).
#
# Run it on an otherwise idle machine (it warns when it is not).
#
# Each round runs, per format, llama-bench and `kiln bench` one after the other
# (which goes first alternates by round), each under /usr/bin/time for its peak
# RSS. The table shows medians over rounds; each tool itself reports the
# mean (llama-bench) or median (kiln) of its 3 repetitions.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
PEERS="$CACHE/peers"
BIN="$PEERS/llama.cpp/build/bin"
MODELS="$PEERS/models"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-2}"
FORMATS=("$@")
[ "${#FORMATS[@]}" -gt 0 ] || FORMATS=(Q4_1 Q8_0 Q4_K_M F16 BF16 Q6_K)

die() { echo "cpu_formats: $*" >&2; exit 1; }

[ -x "$BIN/llama-bench" ] || die "no llama-bench at $BIN; run scripts/bench/peers.sh first"
for f in "${FORMATS[@]}"; do
  [ -f "$MODELS/smollm2-$f.gguf" ] ||
    die "no $MODELS/smollm2-$f.gguf; run scripts/bench/peers.sh first (formats it makes: $(cd "$MODELS" 2>/dev/null && ls smollm2-*.gguf 2>/dev/null | sed 's/smollm2-//; s/\.gguf//' | tr '\n' ' '))"
done
if [ -z "${KILN:-}" ]; then
  if command -v kiln >/dev/null; then
    KILN=kiln
  else
    KILN="${CARGO_TARGET_DIR:-$ROOT/target}/release/kiln"
  fi
fi
command -v "$KILN" >/dev/null || die "no kiln binary at '$KILN'; build it (cargo build --release) or set KILN"
[ -x /usr/bin/time ] || die "/usr/bin/time is missing (apt-get install time)"
command -v python3 >/dev/null || die "python3 is needed to parse the JSON"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"

OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/kiln-cpu-formats.XXXXXX")}"
mkdir -p "$OUT"
RESULTS="$OUT/results.tsv"
: >"$RESULTS"

llama_cmd() { echo "$BIN/llama-bench -m $MODELS/smollm2-$1.gguf -t $THREADS -p 512 -n 128 -r 3 -o json"; }
kiln_cmd() { echo "$KILN bench --model $MODELS/smollm2-$1.gguf --repeats 3 --concurrency 0 --json"; }

# run ENGINE FORMAT ROUND: runs one benchmark and appends "format engine round pp tg rss_kib".
run() {
  local engine="$1" f="$2" r="$3" base="$OUT/$2.$1.$3" cmd
  if [ "$engine" = llama.cpp ]; then cmd="$(llama_cmd "$f")"; else cmd="$(kiln_cmd "$f")"; fi
  # shellcheck disable=SC2086 # the command is word-split on purpose (paths have no spaces)
  if ! RAYON_NUM_THREADS="$THREADS" /usr/bin/time -f %M -o "$base.rss" $cmd >"$base.json" 2>"$base.err"; then
    echo "cpu_formats: $engine on $f (round $r) failed; see $base.err:" >&2
    tail -5 "$base.err" >&2
    return 0
  fi
  python3 - "$engine" "$f" "$r" "$base.json" "$base.rss" >>"$RESULTS" <<'PY' ||
import json, sys
engine, fmt, rnd, js, rss = sys.argv[1:]
data = json.load(open(js))
if engine == "llama.cpp":
    pp = next(t["avg_ts"] for t in data if t["n_prompt"] == 512 and t["n_gen"] == 0)
    tg = next(t["avg_ts"] for t in data if t["n_prompt"] == 0 and t["n_gen"] == 128)
else:
    pp, tg = data["prompt_tok_s"], data["decode_tok_s"]
kib = int(open(rss).read().split()[-1])
print(f"{fmt}\t{engine}\t{rnd}\t{pp}\t{tg}\t{kib}")
PY
    echo "cpu_formats: cannot parse $engine's output for $f (round $r); see $base.json" >&2
}

echo "# kiln vs llama.cpp on the CPU, SmolLM2-135M-Instruct"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "- cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores available, $THREADS threads"
echo "- kiln: $KILN ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && git diff --quiet HEAD 2>/dev/null || echo ', dirty'))"
echo "- llama.cpp: $BIN (vendored in llama_cpp_python 0.3.36)"
echo "- rounds: $ROUNDS (medians over rounds); raw outputs in $OUT"
# llama.cpp's spinning thread pool collapses (tg down to ~1 token/s) when another
# process takes a core, so a busy machine makes the comparison meaningless.
others="$(ps -eo pid=,pcpu=,comm= | awk -v me=$$ '$1 != me && $2 > 20 {print $3 "(" $2 "%)"}' | tr '\n' ' ')"
[ -z "$others" ] || echo "cpu_formats: warning: other processes are using the CPU: $others" >&2
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)${others:+; busy: $others}"
echo "- commands (FORMAT = each format; under \`/usr/bin/time -f %M\`, RAYON_NUM_THREADS=$THREADS):"
echo "  - \`$(llama_cmd FORMAT)\`"
echo "  - \`$(kiln_cmd FORMAT)\`"
echo

for ((r = 1; r <= ROUNDS; r++)); do
  for f in "${FORMATS[@]}"; do
    echo "cpu_formats: round $r/$ROUNDS, $f" >&2
    if ((r % 2)); then
      run llama.cpp "$f" "$r"
      run kiln "$f" "$r"
    else
      run kiln "$f" "$r"
      run llama.cpp "$f" "$r"
    fi
  done
done

python3 - "$RESULTS" "${FORMATS[@]}" <<'PY'
import statistics, sys
from collections import defaultdict
path, formats = sys.argv[1], sys.argv[2:]
vals = defaultdict(list)
for line in open(path):
    fmt, eng, _, pp, tg, kib = line.rstrip("\n").split("\t")
    vals[fmt, eng].append((float(pp), float(tg), int(kib) / 1024))
def med(fmt, eng, i):
    v = [x[i] for x in vals.get((fmt, eng), [])]
    return statistics.median(v) if v else None
def num(x, d=1):
    return "–" if x is None else f"{x:.{d}f}"
def ratio(a, b):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"
print("| format | kiln pp512 | llama.cpp pp512 | ratio | kiln tg128 | llama.cpp tg128 | ratio | kiln peak RSS MB | llama.cpp peak RSS MB |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for f in formats:
    kp, lp = med(f, "kiln", 0), med(f, "llama.cpp", 0)
    kt, lt = med(f, "kiln", 1), med(f, "llama.cpp", 1)
    kr, lr = med(f, "kiln", 2), med(f, "llama.cpp", 2)
    print(f"| {f} | {num(kp)} | {num(lp)} | {ratio(kp, lp)} | {num(kt)} | {num(lt)} | {ratio(kt, lt)} | {num(kr, 0)} | {num(lr, 0)} |")
print()
print("Tokens/s; ratio = kiln / llama.cpp (above 1: kiln faster). RSS = peak resident set of the whole process.")
PY
