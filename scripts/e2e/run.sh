#!/usr/bin/env bash
# The client end-to-end tests: creates (or reuses) the virtual environment
# ${KILN_CACHE:-$HOME/.cache/kiln}/venv-e2e from requirements.txt (PyPI only),
# plus requirements-nodeps.txt (instructor, without its declared
# dependencies), then runs openai_e2e.py, responses_e2e.py, anthropic_e2e.py,
# embeddings_e2e.py and instructor_e2e.py against a kiln binary (each runs;
# the script fails if any failed).
#
#   scripts/e2e/run.sh [path/to/kiln]     (default: target/debug/kiln; build it first)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${1:-target/debug/kiln}"
if ! command -v python3 >/dev/null 2>&1; then
  echo "!!! scripts/e2e/run.sh: python3 is not installed: SKIPPING the OpenAI and Anthropic e2e tests !!!" >&2
  exit 0
fi
if [ ! -x "$BIN" ]; then
  echo "scripts/e2e/run.sh: no kiln binary at $BIN (cargo build -p kiln first)" >&2
  exit 1
fi
VENV="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}/venv-e2e"
REQ=scripts/e2e/requirements.txt
NODEPS=scripts/e2e/requirements-nodeps.txt
want="$(cat "$REQ" "$NODEPS" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "kiln: creating $VENV for the e2e tests" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$NODEPS"
  echo "$want" >"$VENV/.requirements.sha256"
fi
status=0
"$VENV/bin/python" scripts/e2e/openai_e2e.py "$BIN" || status=$?
"$VENV/bin/python" scripts/e2e/responses_e2e.py "$BIN" || status=$?
"$VENV/bin/python" scripts/e2e/anthropic_e2e.py "$BIN" || status=$?
"$VENV/bin/python" scripts/e2e/embeddings_e2e.py "$BIN" || status=$?
"$VENV/bin/python" scripts/e2e/instructor_e2e.py "$BIN" || status=$?
exit "$status"
