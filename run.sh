#!/usr/bin/env bash
# MuseTalk Studio: one entry point that sets everything up itself, then acts.
#   ./run.sh demo           generate outputs/demo.mp4 from the shipped samples (the main job)
#   ./run.sh test           run the whole test suite (unit, goldens, notebooks, end to end)
#   ./run.sh lab            JupyterLab on notebooks/
#   ./run.sh <musetalk args> anything the `musetalk` CLI takes, e.g. ./run.sh doctor
# The environment is a virtualenv in .venv (override with MUSETALK_VENV), created and (re)installed
# whenever it is missing or pyproject.toml changed. Conda users: see environment.yml.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${MUSETALK_VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.musetalk-installed"

ensure_env() {
  local want
  want="$(cat pyproject.toml | sha256sum 2>/dev/null || shasum -a 256 pyproject.toml)"
  want="${want%% *}"
  if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    return
  fi
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "error: Python 3.10 or newer is needed (found: $("$PY" --version 2>&1)); set PYTHON=/path/to/python3" >&2
    exit 2
  fi
  echo ">> setting up $VENV (first run or pyproject.toml changed) ..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  # Pin torch first: a bare `torch` would pull a multi-GB CUDA build on Linux. Set TORCH_SPEC to change it
  # (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
  "$VENV/bin/python" -m pip install -q -e ".[dev,notebooks,server]"
  echo "$want" > "$STAMP"
}

cmd="${1:-demo}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    ensure_env
    exec "$VENV/bin/python" -m musetalk demo "$@"
    ;;
  test)
    ensure_env
    # the browser test drives Debian's Chromium; on a Debian/Ubuntu machine where we are root, install it
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo ">> installing chromium for the browser test ..." >&2
      { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null 2>&1 \
        || echo ">> chromium could not be installed: the browser test will skip" >&2
    fi
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  lab)
    ensure_env
    exec "$VENV/bin/jupyter" lab notebooks/ "$@"
    ;;
  *)
    ensure_env
    exec "$VENV/bin/python" -m musetalk "$cmd" "$@"
    ;;
esac
