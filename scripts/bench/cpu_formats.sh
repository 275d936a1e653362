#!/usr/bin/env bash
# Compares kiln with llama.cpp on the CPU, per weight format of SmolLM2-135M-Instruct:
# prompt processing (pp512) and decode (tg128) tokens/s, and each process's peak RSS.
#
#   scripts/bench/peers.sh                        once: builds llama.cpp, makes the models
#   scripts/bench/cpu_formats.sh                  Q4_1 Q8_0 Q4_K_M F16 BF16 Q6_K, 3 rounds
#   ROUNDS=1 scripts/bench/cpu_formats.sh Q4_1    one format, one round
#   KILN_BASELINE=/old/kiln scripts/bench/cpu_formats.sh   also an older kiln, same run
#
# Environment: ROUNDS (default 3), THREADS (default 2; llama-bench -t and kiln's
# RAYON_NUM_THREADS), KILN (the kiln binary; default `kiln` on PATH, else
# target/release/kiln), KILN_CACHE (as in scripts/fetch-assets.sh), OUT (a folder
# for the raw outputs; default a fresh temporary one), KILN_BASELINE (a second,
# older kiln binary measured in the same rounds: extra columns and new/old
# ratios), LLAMA (0 leaves llama.cpp out, for a quick old-vs-new kiln rerun).
#
# Run it on an otherwise idle machine (it warns when it is not).
#
# Each round runs, per format, llama-bench and `kiln bench` (and the baseline
# kiln) one after the other (the order turns by round, so each goes first as
# often), each under /usr/bin/time for its peak RSS. The table shows medians over rounds; each tool itself reports the
# mean (llama-bench) or median (kiln) of its 3 repetitions.
set -euo pipefail

NAME=cpu_formats
# shellcheck source=scripts/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROUNDS="${ROUNDS:-3}"
FORMATS=("$@")
[ "${#FORMATS[@]}" -gt 0 ] || FORMATS=(Q4_1 Q8_0 Q4_K_M F16 BF16 Q6_K)

LLAMA="${LLAMA:-1}"
[ "$LLAMA" = 0 ] || [ -x "$BIN/llama-bench" ] || die "no llama-bench at $BIN; run scripts/bench/peers.sh first"
need_models "${FORMATS[@]}"
find_kiln
[ -x /usr/bin/time ] || die "/usr/bin/time is missing (apt-get install time)"
out_dir kiln-cpu-formats
ENGINES=()
[ "$LLAMA" = 0 ] || ENGINES+=(llama.cpp)
ENGINES+=(kiln)
if [ -n "${KILN_BASELINE:-}" ]; then
  command -v "$KILN_BASELINE" >/dev/null || die "no baseline kiln binary at '$KILN_BASELINE'"
  ENGINES+=(kiln-base)
fi

llama_cmd() { echo "$BIN/llama-bench -m $MODELS/smollm2-$1.gguf -t $THREADS -p 512 -n 128 -r 3 -o json"; }
kiln_cmd() { echo "${2:-$KILN} bench --model $MODELS/smollm2-$1.gguf --repeats 3 --concurrency 0 --json"; }

# run ENGINE FORMAT ROUND: runs one benchmark and appends "format engine round pp tg rss_kib".
run() {
  local engine="$1" f="$2" r="$3" base="$OUT/$2.$1.$3" cmd
  case "$engine" in
    llama.cpp) cmd="$(llama_cmd "$f")" ;;
    kiln-base) cmd="$(kiln_cmd "$f" "$KILN_BASELINE")" ;;
    *) cmd="$(kiln_cmd "$f")" ;;
  esac
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

header "kiln vs llama.cpp on the CPU, SmolLM2-135M-Instruct"
[ -z "${KILN_BASELINE:-}" ] || echo "- baseline kiln: $KILN_BASELINE"
echo "- commands (FORMAT = each format; under \`/usr/bin/time -f %M\`, RAYON_NUM_THREADS=$THREADS):"
[ "$LLAMA" = 0 ] || echo "  - \`$(llama_cmd FORMAT)\`"
echo "  - \`$(kiln_cmd FORMAT)\`"
[ -z "${KILN_BASELINE:-}" ] || echo "  - \`$(kiln_cmd FORMAT "$KILN_BASELINE")\`"
echo

for ((r = 1; r <= ROUNDS; r++)); do
  for f in "${FORMATS[@]}"; do
    echo "cpu_formats: round $r/$ROUNDS, $f" >&2
    # Round r starts with engine r - 1 (mod their number) and goes round.
    n=${#ENGINES[@]}
    for ((e = 0; e < n; e++)); do
      run "${ENGINES[(r - 1 + e) % n]}" "$f" "$r"
    done
  done
done

python3 - "$RESULTS" "$LLAMA" "${KILN_BASELINE:+1}" "${FORMATS[@]}" <<'PY'
import statistics, sys
from collections import defaultdict
path, llama, base, formats = sys.argv[1], sys.argv[2] != "0", sys.argv[3] == "1", sys.argv[4:]
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
def table(other, label, note):
    print(f"| format | kiln pp512 | {label} pp512 | ratio | kiln tg128 | {label} tg128 | ratio | kiln peak RSS MB | {label} peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for f in formats:
        kp, op = med(f, "kiln", 0), med(f, other, 0)
        kt, ot = med(f, "kiln", 1), med(f, other, 1)
        kr, orss = med(f, "kiln", 2), med(f, other, 2)
        print(f"| {f} | {num(kp)} | {num(op)} | {ratio(kp, op)} | {num(kt)} | {num(ot)} | {ratio(kt, ot)} | {num(kr, 0)} | {num(orss, 0)} |")
    print()
    print(note)
if llama:
    table("llama.cpp", "llama.cpp", "Tokens/s; ratio = kiln / llama.cpp (above 1: kiln faster). RSS = peak resident set of the whole process.")
if base:
    if llama:
        print()
    table("kiln-base", "baseline", "Tokens/s; ratio = new/old, kiln / the baseline kiln (above 1: the new binary faster).")
PY
