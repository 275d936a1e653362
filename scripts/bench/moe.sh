#!/usr/bin/env bash
# Compares kiln with llama.cpp on the CPU on random-weight mixture-of-experts GGUFs
# of real per-layer shapes (issue 23, point 5): prompt processing (pp) and decode
# (tg) tokens/s, each process's peak RSS, and decode against its memory floor.
#
#   scripts/bench/moe_fixtures.sh                    once: writes the model files
#   scripts/bench/moe.sh                             every file there, pp512 tg128, 3 rounds
#   PP=64 TG=16 ROUNDS=1 REPS=1 scripts/bench/moe.sh FILE.gguf    a short run of one file
#
# Environment: PP (prompt tokens, default 512), TG (generated tokens, default 128),
# ROUNDS (default 3), REPS (repetitions inside each tool per round, default 3),
# THREADS (default 2; llama-bench -t and kiln's RAYON_NUM_THREADS), KILN (the kiln
# binary; default `kiln` on PATH, else target/release/kiln; `none` measures
# llama.cpp alone), BANDWIDTH (GB/s; skips
# the measurement), OUT (a folder for the raw outputs; default a fresh temporary
# one), KILN_CACHE (as in scripts/fetch-assets.sh). Arguments: GGUF files (default:
# every <model>-<N>L-<FORMAT>.gguf that moe_fixtures.sh wrote).
#
# Each round runs, per file, llama-bench and `kiln bench` one after the other, the
# order turning by round so each goes first as often, each under /usr/bin/time for
# its peak RSS; tables show medians over rounds (each tool reports the mean,
# llama-bench, or median, kiln, of its REPS repetitions). When kiln cannot load a
# model (kiln without mixture-of-experts support answers "unsupported
# architecture"), the run says so with kiln's own message and goes on with
# llama.cpp.
#
# The memory floor of decode: one token must read every weight it uses once, that
# is the non-expert matrices, one embedding row, and expert_used_count of
# expert_count experts of each layer (moe_gguf.py `active` counts those bytes from
# the file), so tg can be at most read bandwidth / active bytes. The bandwidth is
# measured here by `kiln bench --bandwidth`: a sum of 64-bit integers over 512
# MiB on THREADS threads, plain, with each line prefetched 4 KiB ahead, and
# with each line asked for 16 KiB ahead into L2 and 4 KiB ahead into L1 (as the
# kernels read), the best of 5 passes of each. With fewer layers than the real model the output matrix is a larger
# share of the active bytes, and any part of them that stays in the last-level
# cache between tokens can be read faster than the floor assumes.
#
# Run it on an otherwise idle machine (it warns when it is not).
set -euo pipefail

NAME=moe
# shellcheck source=scripts/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=scripts/bench/moe_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/moe_common.sh"
ROUNDS="${ROUNDS:-3}"
PP="${PP:-512}"
TG="${TG:-128}"
REPS="${REPS:-3}"
for v in PP TG REPS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
[ "$TG" -ge 2 ] || die "TG must be at least 2 (kiln bench times decode from the first token to the last)"

FILES=("$@")
if [ "${#FILES[@]}" -eq 0 ]; then
  shopt -s nullglob
  FILES=("$MOE_DIR"/*L-*.gguf)
  shopt -u nullglob
  [ "${#FILES[@]}" -gt 0 ] || die "no model files in $MOE_DIR; run scripts/bench/moe_fixtures.sh first"
fi
for f in "${FILES[@]}"; do [ -f "$f" ] || die "no such file: $f"; done
[ -x "$BIN/llama-bench" ] || die "no llama-bench at $BIN; run scripts/bench/peers.sh first"
if [ "${KILN:-}" = none ]; then
  [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
  command -v python3 >/dev/null || die "python3 is needed to parse the JSON"
  ENGINES=(llama.cpp)
else
  find_kiln
  ENGINES=(llama.cpp kiln)
fi
[ -x /usr/bin/time ] || die "/usr/bin/time is missing (apt-get install time)"
python_with_gguf
out_dir kiln-moe
FAILED="$OUT/failed.tsv"
: >"$FAILED"

# bandwidth: prints the read bandwidth in GB/s: kiln's probe on THREADS threads
# (the one scale.sh uses; see `kiln bench --bandwidth`).
bandwidth() {
  local js
  [ "$KILN" != none ] || die "KILN=none: the bandwidth probe is kiln's; set BANDWIDTH (GB/s)"
  js="$("$KILN" bench --bandwidth --threads "$THREADS" --json)" || die "kiln bench --bandwidth failed"
  python3 -c 'import json,sys; print(round(json.loads(sys.argv[1])["bandwidth_gb_s"], 2))' "$js"
}

llama_cmd() { echo "$BIN/llama-bench -m $1 -t $THREADS -p $PP -n $TG -r $REPS -o json"; }
kiln_cmd() { echo "$KILN bench --model $1 --prompt-tokens $PP --gen-tokens $TG --repeats $REPS --concurrency 0 --json"; }

# run ENGINE FILE ROUND: runs one benchmark and appends "file engine round pp tg rss_kib".
run() {
  local engine="$1" f="$2" r="$3" base cmd
  base="$OUT/$(basename "$f" .gguf).$engine.$r"
  case "$engine" in
    llama.cpp) cmd="$(llama_cmd "$f")" ;;
    *) cmd="$(kiln_cmd "$f")" ;;
  esac
  # shellcheck disable=SC2086 # the command is word-split on purpose (paths have no spaces)
  if ! RAYON_NUM_THREADS="$THREADS" /usr/bin/time -f %M -o "$base.rss" $cmd >"$base.json" 2>"$base.err"; then
    local why
    why="$(grep -v '^Command exited' "$base.err" | grep -i -m1 -E 'error|unsupported|cannot|failed' || tail -1 "$base.err")"
    if [ "$engine" = kiln ]; then
      echo "moe: kiln failed to load or run $(basename "$f") (round $r): ${why:-no message}; see $base.err" >&2
    else
      echo "moe: $engine failed on $(basename "$f") (round $r): ${why:-no message}; see $base.err" >&2
    fi
    printf '%s\t%s\t%s\n' "$f" "$engine" "${why:-no message}" >>"$FAILED"
    return 0
  fi
  python3 - "$engine" "$f" "$r" "$base.json" "$base.rss" "$PP" "$TG" >>"$RESULTS" <<'PY' ||
import json, sys
engine, f, rnd, js, rss, pp_n, tg_n = sys.argv[1:]
data = json.load(open(js))
if engine == "llama.cpp":
    pp = next(t["avg_ts"] for t in data if t["n_prompt"] == int(pp_n) and t["n_gen"] == 0)
    tg = next(t["avg_ts"] for t in data if t["n_prompt"] == 0 and t["n_gen"] == int(tg_n))
else:
    pp, tg = data["prompt_tok_s"], data["decode_tok_s"]
kib = int(open(rss).read().split()[-1])
print(f"{f}\t{engine}\t{rnd}\t{pp}\t{tg}\t{kib}")
PY
    echo "moe: cannot parse $engine's output for $(basename "$f") (round $r); see $base.json" >&2
}

header "kiln vs llama.cpp on the CPU, random-weight mixture-of-experts models"
echo "- commands (FILE = each model; under \`/usr/bin/time -f %M\`, RAYON_NUM_THREADS=$THREADS):"
echo "  - \`$(llama_cmd FILE)\`"
[ "${KILN:-}" = none ] || echo "  - \`$(kiln_cmd FILE)\`"
if [ -n "${BANDWIDTH:-}" ]; then
  BW="$BANDWIDTH"
  echo "- read bandwidth: $BW GB/s (given in BANDWIDTH)"
else
  BW="$(bandwidth)"
  echo "- read bandwidth: $BW GB/s (kiln bench --bandwidth: sum of 64-bit integers over 512 MiB, $THREADS threads, plain and two ways prefetched, best of 5 passes each)"
fi
echo

ACTIVE="$OUT/active.tsv"
: >"$ACTIVE"
for f in "${FILES[@]}"; do
  counts="$("$PY" "$ROOT/scripts/bench/moe_gguf.py" active "$f")" ||
    die "cannot read the expert counts of $f (is it a mixture-of-experts GGUF?)"
  printf '%s\t%s\n' "$f" "$counts" >>"$ACTIVE"
done

for ((r = 1; r <= ROUNDS; r++)); do
  for f in "${FILES[@]}"; do
    echo "moe: round $r/$ROUNDS, $(basename "$f")" >&2
    # Round r starts with engine r - 1 (mod their number) and goes round.
    n=${#ENGINES[@]}
    for ((e = 0; e < n; e++)); do
      run "${ENGINES[(r - 1 + e) % n]}" "$f" "$r"
    done
  done
done

python3 - "$RESULTS" "$ACTIVE" "$FAILED" "$BW" "$PP" "$TG" "${FILES[@]}" <<'PY'
import json, os, statistics, sys
from collections import defaultdict
results, active_path, failed_path, bw, pp_n, tg_n = sys.argv[1:7]
files = sys.argv[7:]
bw = float(bw)
vals = defaultdict(list)
for line in open(results):
    f, eng, _, pp, tg, kib = line.rstrip("\n").split("\t")
    vals[f, eng].append((float(pp), float(tg), int(kib) / 1024))
active = {}
for line in open(active_path):
    f, js = line.rstrip("\n").split("\t", 1)
    active[f] = json.loads(js)
failed = defaultdict(list)
for line in open(failed_path):
    f, eng, why = line.rstrip("\n").split("\t", 2)
    failed[f, eng].append(why)
def med(f, eng, i):
    v = [x[i] for x in vals.get((f, eng), [])]
    return statistics.median(v) if v else None
def num(x, d=1):
    return "–" if x is None else f"{x:.{d}f}"
def ratio(a, b):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"
name = lambda f: os.path.basename(f).removesuffix(".gguf")
print(f"| model | kiln pp{pp_n} | llama.cpp pp{pp_n} | ratio | kiln tg{tg_n} | llama.cpp tg{tg_n} | ratio | kiln peak RSS MB | llama.cpp peak RSS MB | RSS ratio |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for f in files:
    kp, lp = med(f, "kiln", 0), med(f, "llama.cpp", 0)
    kt, lt = med(f, "kiln", 1), med(f, "llama.cpp", 1)
    kr, lr = med(f, "kiln", 2), med(f, "llama.cpp", 2)
    print(f"| {name(f)} | {num(kp)} | {num(lp)} | {ratio(kp, lp)} | {num(kt)} | {num(lt)} | {ratio(kt, lt)} | {num(kr, 0)} | {num(lr, 0)} | {ratio(kr, lr)} |")
print()
print("Tokens/s; ratio = kiln / llama.cpp (above 1: kiln faster; for RSS, below 1: kiln smaller). RSS = peak resident set of the whole process.")
print()
print(f"Memory floor of decode at {bw:.1f} GB/s (tg at most bandwidth / bytes read per token):")
print()
print("| model | parameters | active per token | file MB | read per token MB | floor tg tokens/s | kiln tg / floor | llama.cpp tg / floor |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for f in files:
    a = active[f]
    floor = bw * 1e9 / a["active_bytes"]
    kt, lt = med(f, "kiln", 1), med(f, "llama.cpp", 1)
    print(f"| {name(f)} | {a['total_params'] / 1e9:.2f} B | {a['active_params'] / 1e9:.3f} B "
          f"({a['experts_used']} of {a['experts']} experts) | {a['total_bytes'] / 1e6:.0f} | "
          f"{a['active_bytes'] / 1e6:.0f} | {floor:.1f} | {ratio(kt, floor)} | {ratio(lt, floor)} |")
fails = [(f, eng, whys) for (f, eng), whys in failed.items()]
if fails:
    print()
    for f, eng, whys in fails:
        what = "kiln failed to load or run" if eng == "kiln" else f"{eng} failed on"
        print(f"- {what} {name(f)} in {len(whys)} of its rounds: {whys[0]}")
PY
