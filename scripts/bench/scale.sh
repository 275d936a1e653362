#!/usr/bin/env bash
# kiln beside llama.cpp at real model sizes on the CPU (issue 25, points 1, 5
# and 6): prompt processing (pp) and decode (tg) tokens/s, each process's peak
# RSS, and decode against the memory floor kiln measures, on 1 and 2 threads.
#
#   scripts/bench/scale_fixtures.sh 1b                 once: writes the 1B files
#   scripts/bench/scale.sh                             every llama3-*.gguf there, pp512 tg128
#   scripts/bench/scale.sh FILE.gguf ...               the files given
#   DUMMY="llama3-8b:q8_0" PP=16 scripts/bench/scale.sh --dummy-only
#                                                      kiln alone on a shape with no file
#
# Arguments: GGUF files (default: every llama3-*-*.gguf that scale_fixtures.sh
# wrote, F16 sources left out), Hugging Face model directories (kiln alone:
# llama-bench reads only GGUF; give QUANTIZE, e.g. q8_0 for the OPT-13B
# checkpoint, with LAYOUT_CACHE=1 so the conversion is paid once), or
# --dummy-only to measure only DUMMY.
# Environment: PP (prompt tokens, default 512), TG (generated tokens, default
# 128), THREADS_LIST (default "1 2"), ROUNDS (default 1: each file is large),
# REPS (repetitions inside each tool per round, default 2), CTX (kiln's
# --max-model-len, default 4096: llama-bench sizes its context to the test, and
# Llama 3's 131072 positions would add a rotary table kiln never reads here),
# DUMMY (space-separated ARCH:FORMAT pairs measured by `kiln bench
# --dummy-weights`, kiln alone: there is no file for llama.cpp), LAYOUT_CACHE
# (default 0: kiln repacks at every start rather than writing a repacked copy of
# each file into its cache; 1 uses the cache), KILN, OUT, KILN_CACHE.
#
# Each round runs, per file and thread count, llama-bench and `kiln bench` one
# after the other, the order turning by round, each under /usr/bin/time for its
# peak RSS; the tables give medians over rounds.
#
# The floor: a decoded token reads every weight it uses once (kiln counts the
# bytes from the file's tensors: everything but the token embedding, which a
# model with tied embeddings reads whole as its output head; `kiln bench` prints
# it as decode_bytes_per_token), so tg is at most read bandwidth / those bytes.
# The bandwidth is `kiln bench --bandwidth --threads N`: a sum of 64-bit
# integers over 512 MiB on N threads (AVX2 where the CPU has it, each thread its
# own contiguous share), best of 5 passes each of three ways: the issue's "plain
# AVX2 sum of 512 MiB", the same sum asking for each line 4 KiB ahead, and
# asking 16 KiB ahead into L2 and 4 KiB ahead into L1 as the kernels do, over
# a buffer on 2 MiB pages where the kernel grants them, as kiln's weights are
# (on 4 KiB pages the same sums read 5-17% less on the Xeon). The
# floor is set by the best way (on the Xeon the prefetched sums read 20-25%
# faster than the plain one, which would set the floor too low and let a kernel
# appear above it); the last column divides by the plain sum alone, the issue's
# own measure, for comparison. Measured before and after the runs, and the
# higher taken.
#
# Run it on an otherwise idle machine (it warns when it is not).
set -euo pipefail

NAME=scale
# shellcheck source=scripts/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROUNDS="${ROUNDS:-1}"
PP="${PP:-512}"
TG="${TG:-128}"
REPS="${REPS:-2}"
CTX="${CTX:-4096}"
LAYOUT_CACHE="${LAYOUT_CACHE:-0}"
read -r -a THREADS_LIST <<<"${THREADS_LIST:-1 2}"
read -r -a DUMMIES <<<"${DUMMY:-}"
DIR="$CACHE/bench-scale"
for v in PP TG REPS CTX; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
[ "$TG" -ge 2 ] || die "TG must be at least 2 (kiln bench times decode from the first token to the last)"
for t in "${THREADS_LIST[@]}"; do [[ "$t" =~ ^[1-9][0-9]*$ ]] || die "THREADS_LIST must hold positive integers"; done

FILES=()
if [ "${1:-}" = --dummy-only ]; then
  [ "${#DUMMIES[@]}" -gt 0 ] || die "--dummy-only needs DUMMY (ARCH:FORMAT pairs)"
elif [ "$#" -gt 0 ]; then
  FILES=("$@")
else
  shopt -s nullglob
  for f in "$DIR"/llama3-*-*.gguf; do
    case "$f" in *-F16.gguf | *-BF16.gguf) ;; *) FILES+=("$f") ;; esac
  done
  shopt -u nullglob
  [ "${#FILES[@]}" -gt 0 ] || [ "${#DUMMIES[@]}" -gt 0 ] ||
    die "no model files in $DIR; run scripts/bench/scale_fixtures.sh first (or set DUMMY)"
fi
for f in "${FILES[@]}"; do [ -f "$f" ] || [ -d "$f" ] || die "no such file or model directory: $f"; done
for d in "${DUMMIES[@]}"; do [[ "$d" == *:* ]] || die "DUMMY entries are ARCH:FORMAT (llama3-8b:q8_0), not '$d'"; done
[ "${#FILES[@]}" -eq 0 ] || [ -x "$BIN/llama-bench" ] || die "no llama-bench at $BIN; run scripts/bench/peers.sh first"
find_kiln
[ -x /usr/bin/time ] || die "/usr/bin/time is missing (apt-get install time)"
out_dir kiln-scale
FAILED="$OUT/failed.tsv"
BWS="$OUT/bandwidth.tsv"
: >"$FAILED"
: >"$BWS"

llama_cmd() { echo "$BIN/llama-bench -m $1 -t $2 -p $PP -n $TG -r $REPS -o json"; }
kiln_args() { echo "--prompt-tokens $PP --gen-tokens $TG --repeats $REPS --concurrency 0 --max-model-len $CTX --json"; }
kiln_cmd() {
  case "$1" in
    dummy:*) local d="${1#dummy:}"; echo "$KILN bench --threads $2 --dummy-weights --arch ${d%%:*} --quantize ${d#*:} $(kiln_args)" ;;
    *) echo "$KILN bench --threads $2 --model $1 ${QUANTIZE:+--quantize $QUANTIZE }$(kiln_args)" ;;
  esac
}
label() {
  case "$1" in dummy:*) echo "${1#dummy:} (random, no file)" ;; *) basename "$1" .gguf ;; esac
}

# bandwidth THREADS: appends "threads GB/s plain-GB/s" from kiln's probe (its
# best way, and its plain sum alone).
bandwidth() {
  local js
  js="$("$KILN" bench --bandwidth --threads "$1" --json)" || die "kiln bench --bandwidth failed"
  python3 -c 'import json,sys; j = json.loads(sys.argv[2]); print(sys.argv[1], j["bandwidth_gb_s"], j["plain_gb_s"])' "$1" "$js" >>"$BWS"
}

# run ENGINE MODEL THREADS ROUND: one benchmark; appends
# "model engine threads round pp tg rss_kib bytes_per_token" to RESULTS.
run() {
  local engine="$1" m="$2" t="$3" r="$4" base cmd
  base="$OUT/$(label "$m" | tr -c 'A-Za-z0-9_.\n-' '_').$engine.t$t.$r"
  case "$engine" in
    llama.cpp) cmd="$(llama_cmd "$m" "$t")" ;;
    *) cmd="$(kiln_cmd "$m" "$t")" ;;
  esac
  # shellcheck disable=SC2086 # the command is word-split on purpose (paths have no spaces)
  if ! KILN_LAYOUT_CACHE="$LAYOUT_CACHE" /usr/bin/time -f %M -o "$base.rss" $cmd >"$base.json" 2>"$base.err"; then
    local why
    why="$(grep -v '^Command exited' "$base.err" | grep -i -m1 -E 'error|cannot|failed' || tail -1 "$base.err")"
    echo "scale: $engine failed on $(label "$m"), $t threads (round $r): ${why:-no message}; see $base.err" >&2
    printf '%s\t%s\t%s\t%s\n' "$m" "$engine" "$t" "${why:-no message}" >>"$FAILED"
    return 0
  fi
  python3 - "$engine" "$m" "$t" "$r" "$base.json" "$base.rss" "$PP" "$TG" >>"$RESULTS" <<'PY' ||
import json, sys
engine, m, t, rnd, js, rss, pp_n, tg_n = sys.argv[1:]
data = json.load(open(js))
if engine == "llama.cpp":
    pp = next(x["avg_ts"] for x in data if x["n_prompt"] == int(pp_n) and x["n_gen"] == 0)
    tg = next(x["avg_ts"] for x in data if x["n_prompt"] == 0 and x["n_gen"] == int(tg_n))
    per = ""
else:
    pp, tg, per = data["prompt_tok_s"], data["decode_tok_s"], data.get("decode_bytes_per_token") or ""
kib = int(open(rss).read().split()[-1])
print(f"{m}\t{engine}\t{t}\t{rnd}\t{pp}\t{tg}\t{kib}\t{per}")
PY
    echo "scale: cannot parse $engine's output for $(label "$m") (round $r); see $base.json" >&2
}

MODELS=("${FILES[@]}")
for d in "${DUMMIES[@]}"; do MODELS+=("dummy:$d"); done

header "kiln vs llama.cpp on the CPU at real model sizes (issue 25)"
echo "- commands (FILE = each model, N = each of ${THREADS_LIST[*]} threads; under \`/usr/bin/time -f %M\`, KILN_LAYOUT_CACHE=$LAYOUT_CACHE):"
[ "${#FILES[@]}" -eq 0 ] || echo "  - \`$(llama_cmd FILE N)\`"
echo "  - \`$(kiln_cmd FILE N)\`"
for d in "${DUMMIES[@]}"; do echo "  - \`$(kiln_cmd "dummy:$d" N)\`"; done
echo "  - floor: \`$KILN bench --bandwidth --threads N --json\` before and after"
echo

for t in "${THREADS_LIST[@]}"; do bandwidth "$t"; done
for ((r = 1; r <= ROUNDS; r++)); do
  for m in "${MODELS[@]}"; do
    for t in "${THREADS_LIST[@]}"; do
      echo "scale: round $r/$ROUNDS, $(label "$m"), $t threads" >&2
      if [[ "$m" == dummy:* ]] || [ -d "$m" ]; then
        run kiln "$m" "$t" "$r"
      elif [ $((r % 2)) = 1 ]; then
        run llama.cpp "$m" "$t" "$r"
        run kiln "$m" "$t" "$r"
      else
        run kiln "$m" "$t" "$r"
        run llama.cpp "$m" "$t" "$r"
      fi
    done
  done
done
for t in "${THREADS_LIST[@]}"; do bandwidth "$t"; done

python3 - "$RESULTS" "$FAILED" "$BWS" "$PP" "$TG" "${MODELS[@]}" <<'PY'
import os, statistics, sys
from collections import defaultdict
results, failed_path, bw_path, pp_n, tg_n = sys.argv[1:6]
models = sys.argv[6:]
bw = defaultdict(float)
bw_plain = defaultdict(float)
bw_all = defaultdict(list)
for line in open(bw_path):
    t, g, plain = line.split()
    bw[t] = max(bw[t], float(g))
    bw_plain[t] = max(bw_plain[t], float(plain))
    bw_all[t].append(float(g))
vals = defaultdict(list)
per_token = {}
threads = []
for line in open(results):
    m, eng, t, _, pp, tg, kib, per = line.rstrip("\n").split("\t")
    vals[m, eng, t].append((float(pp), float(tg), int(kib) / 1024))
    if per:
        per_token[m] = int(per)
    if t not in threads:
        threads.append(t)
def med(m, eng, t, i):
    v = [x[i] for x in vals.get((m, eng, t), [])]
    return statistics.median(v) if v else None
def num(x, d=1):
    return "–" if x is None else f"{x:.{d}f}"
def ratio(a, b):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"
def pct(a, b):
    return "–" if a is None or b is None or b == 0 else f"{100 * a / b:.0f}%"
def name(m):
    return f"{m[6:]} (random, no file)" if m.startswith("dummy:") else os.path.basename(m).removesuffix(".gguf")
print("Read bandwidth (GB/s, kiln's probe, before / after): " + "; ".join(
    f"{t} thread{'s' if t != '1' else ''}: " + " / ".join(f"{g:.1f}" for g in bw_all[t]) for t in sorted(bw_all, key=int)))
print()
print("Plain sum alone (the issue's way of measuring), highest: " + "; ".join(
    f"{t} thread{'s' if t != '1' else ''}: {bw_plain[t]:.1f}" for t in sorted(bw_plain, key=int)))
print()
print(f"| model | threads | pp{pp_n} kiln / llama.cpp | ratio | tg{tg_n} kiln / llama.cpp | ratio | peak RSS MB kiln / llama.cpp | read per token MB | floor tg | kiln tg / floor | llama.cpp tg / floor | kiln tg / plain-sum floor |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for m in models:
    for t in threads:
        kp, lp = med(m, "kiln", t, 0), med(m, "llama.cpp", t, 0)
        kt, lt = med(m, "kiln", t, 1), med(m, "llama.cpp", t, 1)
        kr, lr = med(m, "kiln", t, 2), med(m, "llama.cpp", t, 2)
        if kp is None and lp is None:
            continue
        per = per_token.get(m)
        floor = bw[t] * 1e9 / per if per and bw[t] else None
        plain_floor = bw_plain[t] * 1e9 / per if per and bw_plain[t] else None
        print(f"| {name(m)} | {t} | {num(kp)} / {num(lp)} | {ratio(kp, lp)} | {num(kt)} / {num(lt)} | {ratio(kt, lt)} "
              f"| {num(kr, 0)} / {num(lr, 0)} | {num(per / 1e6 if per else None, 0)} | {num(floor)} | {pct(kt, floor)} | {pct(lt, floor)} "
              f"| {pct(kt, plain_floor)} |")
print()
print("Tokens/s; ratio = kiln / llama.cpp (above 1: kiln faster). Peak RSS of the whole process. "
      "Floor = the higher bandwidth measured at that thread count (the probe's best way) / the bytes a token reads; "
      "the plain-sum floor divides the plain sum's bandwidth instead.")
failed = defaultdict(list)
for line in open(failed_path):
    m, eng, t, why = line.rstrip("\n").split("\t", 3)
    failed[m, eng, t].append(why)
for (m, eng, t), whys in failed.items():
    print(f"- {eng} failed on {name(m)} with {t} threads in {len(whys)} round(s): {whys[0]}")
PY
