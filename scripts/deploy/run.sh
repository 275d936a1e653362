#!/usr/bin/env bash
# Checks the Kubernetes manifests in deploy/: creates (or reuses) the
# virtual environment ${KILN_CACHE:-$HOME/.cache/kiln}/venv-deploy from
# requirements.txt (PyPI only), then runs check.py on deploy/ and its
# self-test (broken copies of the manifests must each be refused).
#
#   scripts/deploy/run.sh [DIR]     (default: deploy)
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR="${1:-deploy}"
if ! command -v python3 >/dev/null 2>&1; then
  echo "!!! scripts/deploy/run.sh: python3 is not installed: SKIPPING the manifest check !!!" >&2
  exit 0
fi
VENV="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}/venv-deploy"
REQ=scripts/deploy/requirements.txt
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "kiln: creating $VENV for the manifest check" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
  echo "$want" >"$VENV/.requirements.sha256"
fi
"$VENV/bin/python" scripts/deploy/check.py "$DIR"
"$VENV/bin/python" scripts/deploy/check.py --self-test "$DIR"
