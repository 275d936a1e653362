#!/usr/bin/env bash
# The no-GPU check of kiln's CUDA kernels: compiles every kernel source to
# PTX for sm_80 and sm_90 through kiln's own NVRTC path (the `cuda` feature
# of kiln-backend), failing on any compile error or warning, and checks that
# every entry point the host looks up is in the PTX.
#
# NVRTC and the CUDA headers come from the PyPI wheels pinned in
# requirements.txt, installed once into ${KILN_CACHE:-~/.cache/kiln}/venv-cuda13
# (reused while requirements.txt is unchanged). No GPU, driver or CUDA
# toolkit is needed.
#
#   scripts/cuda/ptx_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v python3 >/dev/null 2>&1; then
  echo "scripts/cuda/ptx_check.sh: python3 is needed to install NVRTC from PyPI" >&2
  exit 1
fi
VENV="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}/venv-cuda13"
REQ=scripts/cuda/requirements.txt
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "kiln: installing NVRTC 13.0 and the CUDA headers into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
  echo "$want" >"$VENV/.requirements.sha256"
fi
CU13="$("$VENV/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
if [ ! -f "$CU13/include/cuda_bf16.h" ] || [ ! -e "$CU13/lib/libnvrtc.so.13" ]; then
  echo "scripts/cuda/ptx_check.sh: the wheels did not install $CU13/{include/cuda_bf16.h,lib/libnvrtc.so.13}" >&2
  exit 1
fi
# NVRTC finds libnvrtc-builtins.so.13.0 only through the library path.
export LD_LIBRARY_PATH="$CU13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KILN_CUDA_INCLUDE="$CU13/include"
cargo test -p kiln-backend --features cuda --locked --test ptx_check -- --ignored --nocapture
