#!/usr/bin/env bash
# On a GPU host without network access: unpack .gpu-bundle/ (made by perf/gpu/bundle.sh) into
# this checkout so perf/compare.py, perf/cache_bench.py and the integration tests run as they do
# after `make setup`.
# PYTHON (default python3) is the host's interpreter with torch on CUDA; the gateway's missing
# dependencies are installed into its environment, and .venv points at that environment, which
# is where Triton's Python backend runs the models too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
BUNDLE="$ROOT/.gpu-bundle"

"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
    "$BUNDLE"/wheels/*.whl
if [[ ! -e .venv ]]; then
    ln -s "$("$PYTHON" -c 'import sys; print(sys.prefix)')" .venv
fi
[[ -x .venv/bin/python ]] || { echo "setup.sh: .venv/bin/python missing" >&2; exit 1; }
rm -rf triton/server triton/perf_analyzer
mkdir -p triton/server
xz -dc "$BUNDLE/server.tar.xz" | tar -C triton/server -xf -
xz -dc "$BUNDLE/perf_analyzer.tar.xz" | tar -C triton -xf -
tar -xf "$BUNDLE/weights.tar"
mkdir -p .cache
rm -rf .cache/redis
xz -dc "$BUNDLE/redis.tar.xz" | tar -C .cache -xf -
.venv/bin/python - <<'PY'
import numpy, torch
print(f"python torch {torch.__version__} cuda {torch.cuda.is_available()} numpy {numpy.__version__}")
if torch.cuda.is_available():
    print(f"gpu {torch.cuda.get_device_name(0)}")
PY
