#!/usr/bin/env bash
# The project's test command (what .ci/run and the README call): fetches the
# test data into the cache, checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh --tests >/dev/null
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The CUDA backend's code, built as `--features cuda` builds it (no CUDA
# toolkit needed: cudarc loads the libraries at run time).
cargo clippy --workspace --all-targets --locked --features cuda -- -D warnings
# The tests that exist only with `--features cuda` and need no GPU: the
# probe names the missing driver, the launcher and the CLI refuse
# `--device cuda` before reading a model. (Before the workspace tests, so
# that target/debug/kiln is the default build again for the scripts below.)
cargo test --locked --features cuda -p kiln-backend --lib cuda::
cargo test --locked --features cuda -p kiln-engine --lib launch::
cargo test --locked --features cuda -p kiln --test device
cargo test --workspace --locked
# Every CUDA kernel compiled to PTX and machine code for sm_80 and sm_90 by
# NVRTC 13.0 from PyPI, failing on any error or warning (no GPU needed).
scripts/cuda/ptx_check.sh
# The Kubernetes manifests in deploy/: schemas, agreement with kiln's
# probes and drain, and a self-test that broken copies are refused.
scripts/deploy/run.sh
# The OpenAI Python client against the binary cargo test just built
# (skipped, loudly, where python3 is missing).
scripts/e2e/run.sh "${CARGO_TARGET_DIR:-target}/debug/kiln"
# Faults against the same binary, strict and short (about a minute on two
# cores): load with hostile sockets, clients leaving streams (the server must
# release them), SIGTERM mid-stream. `scripts/load/faults.py` without
# `--quick` runs every case, the hardening findings of issue 21 among them.
if command -v python3 >/dev/null 2>&1; then
  python3 scripts/load/faults.py "${CARGO_TARGET_DIR:-target}/debug/kiln" --quick >/dev/null
else
  echo "!!! scripts/test.sh: python3 is not installed: SKIPPING scripts/load/faults.py !!!" >&2
fi
