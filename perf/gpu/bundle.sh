#!/usr/bin/env bash
# Pack what the benchmarks need on a GPU host without network access into .gpu-bundle/
# (ignored by git, ~36 MB), to copy there with the checkout. Run here after `make setup`.
#
# The host is expected to bring its own Python with torch on CUDA, numpy, aiohttp, uvloop,
# msgpack, xxhash, prometheus-client and scikit-learn (a typical CUDA PyTorch image). The bundle
# adds what such an image lacks:
#   server.tar.xz          the Triton server as triton/fetch.sh lays it out, with only the
#                          Python backend stub for the host's Python (PY_XY, default 3.12)
#   perf_analyzer.tar.xz   triton/perf_analyzer/ (the binary and its two libraries)
#   wheels/                the gateway's other dependencies, built for that Python
#   weights.tar            the trained default models (model_repository/*/*/model.pt)
#   redis.tar.xz           .cache/redis/ (scripts/fetch_redis.sh), for cache_bench.py --redis
# On the host, perf/gpu/setup.sh unpacks it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY_XY="${PY_XY:-3.12}"
BUNDLE="$ROOT/.gpu-bundle"
PYTRITON_VERSION=0.7.0

for need in triton/perf_analyzer/perf_analyzer .venv/bin/python .cache/redis/bin/redis-server; do
    [[ -e "$need" ]] || { echo "bundle.sh: $need missing; run make setup first" >&2; exit 1; }
done
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The server, laid out as triton/fetch.sh leaves it, for Python $PY_XY.
wheel="$(ls .cache/wheels/nvidia_pytriton-$PYTRITON_VERSION-*.whl)"
unzip -q "$wheel" 'pytriton/tritonserver/*' 'nvidia_pytriton.libs/*' -d "$tmp/server"
(
    cd "$tmp/server"
    stubs=pytriton/tritonserver/python_backend_stubs
    find "$stubs" -mindepth 1 -maxdepth 1 ! -name "$PY_XY" -exec rm -rf {} +
    # The libpython of another stub (3.13) is the largest file in the wheel and unused here.
    find nvidia_pytriton.libs -name 'libpython3-*' ! -name "*.${PY_XY#3.}.so*" -delete
    chmod +x pytriton/tritonserver/bin/tritonserver "$stubs/$PY_XY/triton_python_backend_stub"
    mkdir -p backends/python
    cp pytriton/tritonserver/backends/python/libtriton_python.so \
       pytriton/tritonserver/backends/python/triton_python_backend_utils.py \
       "$stubs/$PY_XY/triton_python_backend_stub" backends/python/
    touch ".fetched-pytriton-$PYTRITON_VERSION-py$PY_XY"
)
tar -C "$tmp/server" -cf - . | xz -T0 -6 > "$BUNDLE/server.tar.xz"
tar -C triton -cf - perf_analyzer | xz -T0 -6 > "$BUNDLE/perf_analyzer.tar.xz"
tar -cf "$BUNDLE/weights.tar" model_repository/*/*/model.pt
tar -C .cache -cf - redis | xz -T0 -6 > "$BUNDLE/redis.tar.xz"

# The same versions as the local virtualenv, for the host's Python.
pins=()
# tritonclient.http (the integration tests use it) needs gevent and geventhttpclient.
for name in starlette uvicorn httptools orjson redis hiredis tritonclient python-rapidjson pytest-asyncio \
        gevent geventhttpclient greenlet zope.event zope.interface brotli; do
    version="$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")"
    pins+=("$name==$version")
done
.venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PY_XY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$BUNDLE/wheels" "${pins[@]}"
du -sh "$BUNDLE"
