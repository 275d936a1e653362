#!/usr/bin/env bash
# The GPU check of kiln's CUDA backend, for a machine with an NVIDIA GPU and
# binaries built on the CPU build machine (never run yet: no GPU so far).
#
# Build there (no CUDA toolkit needed), then carry both files:
#   cargo build --release --features cuda -p kiln
#   cargo test --release --features cuda -p kiln-backend --test cuda_vs_cpu --no-run
#     (prints the test binary's path: target/release/deps/cuda_vs_cpu-HASH)
# Run here, from the repository root:
#   scripts/gpu/check.sh target/release/kiln target/release/deps/cuda_vs_cpu-HASH [SUMMARY]
#
# Checks, each recorded as PASS or FAIL in SUMMARY (default
# gpu-check-summary.txt), whatever the others do (a test step passes only
# when its binary ran, and passed, at least as many tests as its source
# holds: a binary built without the feature runs none and exits 0):
#   1. every op of the CUDA backend against the CPU backend on random inputs
#      (bf16 tolerances; NaN never passes), paged attention with split decode;
#   2. greedy output over 64 tokens on the CPU and on the GPU for the tiny
#      llama- and gpt2-shaped checkpoints in testdata/tiny, and the default
#      model when it is in kiln's cache;
#   3. `kiln bench --device cuda` on the tiny llama checkpoint.
# The GPU runs use KILN_CUDA_UNVERIFIED=1: kiln refuses its unverified CUDA
# backend otherwise.
set -uo pipefail
cd "$(dirname "$0")/../.."
KILN="${1:?usage: scripts/gpu/check.sh KILN_BINARY CUDA_VS_CPU_TEST_BINARY [SUMMARY]}"
OPS="${2:?usage: scripts/gpu/check.sh KILN_BINARY CUDA_VS_CPU_TEST_BINARY [SUMMARY]}"
SUMMARY="${3:-gpu-check-summary.txt}"
# Logs go beside the summary.
LOGS="$(dirname "$SUMMARY")"
mkdir -p "$LOGS"
CUDA_ROOT="${CUDA_HOME:-/usr/local/cuda-13.0}"
export KILN_CUDA_INCLUDE="${KILN_CUDA_INCLUDE:-$CUDA_ROOT/include}"
export LD_LIBRARY_PATH="$CUDA_ROOT/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KILN_CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
: >"$SUMMARY"
failed=0
record() { # record NAME STATUS DETAIL
  printf '%s %s %s\n' "$2" "$1" "$3" | tee -a "$SUMMARY"
  [ "$2" = PASS ] || failed=1
}
# Tests a libtest log says passed (the sum of its `test result: ok. N passed`
# lines; 0 when there is none, or when a result line is not ok).
passed_in() { # passed_in LOG
  awk '/^test result: / { if ($3 != "ok.") bad = 1; n += $4 } END { print (bad ? 0 : n + 0) }' "$1"
}
# The GPU tests a test source holds (each is #[ignore]d with this reason).
gpu_tests_in() { # gpu_tests_in FILE
  grep -c '#\[ignore = "needs a GPU' "$1"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } | sed 's/^/# gpu: /' | tee -a "$SUMMARY"

# 1. Ops against the CPU backend.
t0=$(date +%s)
expected=$(gpu_tests_in crates/kiln-backend/tests/cuda_vs_cpu.rs)
if timeout 180 "$OPS" --ignored --nocapture --test-threads=1 >"$LOGS/ops.log" 2>&1; then
  ran=$(passed_in "$LOGS/ops.log")
  if [ "$expected" -gt 0 ] && [ "$ran" -ge "$expected" ]; then
    record ops PASS "$ran of $expected tests, $(( $(date +%s) - t0 )) s"
  else
    record ops FAIL "exit 0 but $ran of $expected tests passed (built without --features cuda?)"
  fi
else
  record ops FAIL "see ops.log: $(grep -m1 -E 'panicked|GPU .* vs CPU|error' "$LOGS/ops.log")"
fi
grep -E 'worst abs error|^GPU: ' "$LOGS/ops.log" | sed 's/^/#   /' >>"$SUMMARY"

# 2. Greedy output, CPU against GPU.
greedy() { # greedy DEVICE MODEL
  KILN_CUDA_UNVERIFIED=1 timeout 120 "$KILN" generate --device "$1" --model "$2" \
    --greedy --max-new-tokens 64 "The cat sat on the" 2>>"$LOGS/greedy.log"
}
models=(testdata/tiny/llama testdata/tiny/gpt2)
default_model="$KILN_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$default_model" ] && models+=("$default_model")
for m in "${models[@]}"; do
  cpu="$(greedy cpu "$m")" || { record "greedy $m" FAIL "the CPU run failed"; continue; }
  gpu="$(greedy cuda "$m")" || { record "greedy $m" FAIL "the GPU run failed (greedy.log)"; continue; }
  if [ "$cpu" = "$gpu" ]; then
    record "greedy $m" PASS "64 tokens identical"
  else
    same=$(python3 -c 'import sys; a, b = sys.argv[1], sys.argv[2]; print(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))' "$cpu" "$gpu" 2>/dev/null || echo "?")
    record "greedy $m" FAIL "outputs differ after $same characters"
    printf '#   cpu: %q\n#   gpu: %q\n' "$cpu" "$gpu" >>"$SUMMARY"
  fi
done

# 3. Speed (a tiny model: launch overheads, not bandwidth).
if KILN_CUDA_UNVERIFIED=1 timeout 120 "$KILN" bench --device cuda --model testdata/tiny/llama \
  --prompt-tokens 128 --gen-tokens 64 --repeats 1 --concurrency 1,16 --batch-prompt-tokens 64 \
  --batch-gen-tokens 32 >"$LOGS/bench.log" 2>&1; then
  record bench PASS "$(grep -E '^\| tg' "$LOGS/bench.log" | tr -s ' ')"
  sed 's/^/#   /' "$LOGS/bench.log" >>"$SUMMARY"
else
  record bench FAIL "see bench.log: $(tail -n1 "$LOGS/bench.log")"
fi
echo "summary: $SUMMARY"
exit "$failed"
