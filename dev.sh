#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (CPU torch first, then the pinned rest) and
#   ./dev.sh demo   merges the Nyxene-v2-11B pipeline on small synthetic models on a local Ray
#   ./dev.sh test   runs the whole test suite (starts its own Ray cluster and S3 server)
#   ./dev.sh lint   checks the code with ruff (lint and format), as CI does
#   ./dev.sh bench  runs the benchmark (see bench/README.md)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# Reinstall when the dependency files change (a stamp of their hash lives in the venv).
stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.nyxray-deps 2>/dev/null)" != "$stamp" ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # A CPU wheel; letting pip pick torch for the project could pull a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -c constraints.txt -e ".[test]"
  echo "$stamp" > .venv/.nyxray-deps
fi
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
cmd=${1:-test}; shift || true
case "$cmd" in
  demo)  exec .venv/bin/nyxray demo "$@" ;;
  test)  export RAY_AUTH_MODE=disabled; exec .venv/bin/python -m pytest -q "$@" ;;
  lint)  .venv/bin/ruff check . && exec .venv/bin/ruff format --check . ;;
  bench) .venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/pip install -q -c constraints.txt -e ".[bench]"; exec .venv/bin/python bench/bench.py "$@" ;;
  *) echo "usage: ./dev.sh demo|test|lint|bench [args]" >&2; exit 2 ;;
esac
