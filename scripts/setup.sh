#!/usr/bin/env bash
# Everything `make serve` and `make test` need on a fresh machine, idempotent and quick when done:
# the virtualenv with the project's dependencies, the Triton server, perf_analyzer, redis-server
# (for the optional shared cache tier and its tests), and the default models' weights.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON_FOR_VENV:-python3}"

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
# Reinstall only when the dependency list changed.
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [[ ! -f "$stamp" ]]; then
    echo "setup: installing dependencies into .venv (torch==2.13.0 CPU build)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
PYTHON=.venv/bin/python bash triton/fetch.sh
PYTHON=.venv/bin/python bash triton/fetch_perf_analyzer.sh
bash scripts/fetch_redis.sh
.venv/bin/python -m training.default_models --repository model_repository
