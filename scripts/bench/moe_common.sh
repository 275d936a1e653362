# What moe_fixtures.sh and moe.sh share (sourced after common.sh, not run): where
# the random-weight MoE files live, and a Python that has the `gguf` package.

MOE_DIR="$CACHE/bench-moe"

log() { echo "$NAME: $*" >&2; }

# python_with_gguf: sets PY to a python that imports gguf and numpy: the golden
# scripts' venv when it is ready (its .ready file exists), else a small venv with
# only those two packages at $CACHE/venv-bench, made on first use.
python_with_gguf() {
  local golden="$CACHE/venv-golden" bench="$CACHE/venv-bench"
  if [ -f "$golden/.ready" ] && "$golden/bin/python" -c 'import gguf, numpy' 2>/dev/null; then
    PY="$golden/bin/python"
    return
  fi
  if ! "$bench/bin/python" -c 'import gguf, numpy' 2>/dev/null; then
    log "making $bench (gguf, numpy)"
    python3 -m venv "$bench"
    "$bench/bin/pip" install --quiet gguf numpy
  fi
  PY="$bench/bin/python"
}
