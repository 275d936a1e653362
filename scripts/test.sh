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
