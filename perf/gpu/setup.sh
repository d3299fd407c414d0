#!/usr/bin/env bash
# On a GPU host without network access: unpack .gpu-bundle/ (made by perf/gpu/bundle.sh) into
# this checkout so that perf/compare.py, perf/cache_bench.py and the integration tests run as
# they do after `make setup`. Run them directly there (`make` targets would run set-up, which
# needs the network).
#
# PYTHON (default python3) is the host's virtualenv interpreter with torch on CUDA: the bundled
# wheels are installed into that environment, and .venv becomes a link to it, which is where
# Triton's Python backend runs the models too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
BUNDLE="$ROOT/.gpu-bundle"
fail() { echo "setup.sh: $*" >&2; exit 1; }

[[ -d "$BUNDLE" ]] || fail "$BUNDLE missing: make it with perf/gpu/bundle.sh and copy it here"
read -r prefix py_xy in_venv < <("$PYTHON" -c 'import sys; print(sys.prefix, f"{sys.version_info[0]}.{sys.version_info[1]}", int(sys.prefix != sys.base_prefix))')
[[ "$py_xy" == "$(cat "$BUNDLE/python-version")" ]] \
    || fail "the bundle is for Python $(cat "$BUNDLE/python-version"), $PYTHON is $py_xy (PY_XY=$py_xy perf/gpu/bundle.sh)"
[[ "$in_venv" == 1 ]] || fail "$PYTHON is not a virtualenv's interpreter (set PYTHON to one with torch on CUDA)"
if [[ -e .venv || -L .venv ]]; then
    [[ "$(readlink -f .venv)" == "$(readlink -f "$prefix")" ]] \
        || fail ".venv exists and is not $prefix (a copy from another machine?): remove it"
else
    ln -s "$prefix" .venv
fi

"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
    "$BUNDLE"/wheels/*.whl
rm -rf triton/server triton/perf_analyzer .cache/redis
mkdir -p triton/server .cache
xz -dc "$BUNDLE/server.tar.xz" | tar -C triton/server -xf -
xz -dc "$BUNDLE/perf_analyzer.tar.xz" | tar -C triton -xf -
xz -dc "$BUNDLE/redis.tar.xz" | tar -C .cache -xf -
tar -xf "$BUNDLE/weights.tar"

.cache/redis/bin/redis-server --version >/dev/null || fail "the bundled redis-server does not run here"
.venv/bin/python - <<'PY'
import gateway.app, httpx, pytest, tritonclient.grpc, tritonclient.http  # noqa: F401  (all import)
import numpy, torch
print(f"python torch {torch.__version__} cuda {torch.cuda.is_available()} numpy {numpy.__version__}")
if torch.cuda.is_available():
    print(f"gpu {torch.cuda.get_device_name(0)}")
PY
