#!/usr/bin/env bash
# Pack what the benchmarks need on a GPU host without network access into .gpu-bundle/
# (ignored by git, ~40 MB), to copy there with the checkout. Run on a machine with network
# access, after `make setup`.
#
# The host brings a virtualenv whose Python (PY_XY, default 3.12) has torch on CUDA and, as a
# typical CUDA PyTorch image has them: numpy, aiohttp, uvloop, msgpack, prometheus-client,
# scikit-learn, grpcio, protobuf, anyio, click, h11, certifi, urllib3, httpx and pytest
# (perf/gpu/setup.sh checks that everything imports). The bundle adds the rest:
#   server.tar.xz          the Triton server as triton/fetch.sh lays it out, with only the
#                          Python backend stub for PY_XY
#   perf_analyzer.tar.xz   triton/perf_analyzer/ (the binary and its two libraries)
#   redis.tar.xz           .cache/redis/ (scripts/fetch_redis.sh), for cache_bench.py --redis
#   weights.tar            the trained default models (model_repository/*/*/model.pt)
#   wheels/                the gateway's other dependencies (and the integration tests'), for PY_XY
#   python-version         PY_XY, which setup.sh checks against the host's Python
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY_XY="${PY_XY:-3.12}"
BUNDLE="$ROOT/.gpu-bundle"
PYTRITON_VERSION=0.7.0

fail() { echo "bundle.sh: $*" >&2; exit 1; }
for need in triton/perf_analyzer/perf_analyzer .venv/bin/python .cache/redis/bin/redis-server; do
    [[ -e "$need" ]] || fail "$need missing; run make setup first"
done
# scripts/fetch_redis.sh links to this machine's own redis-server when it has one: not portable.
[[ -L .cache/redis/bin/redis-server ]] && fail ".cache/redis/bin/redis-server is a link to this machine's redis-server"
shopt -s nullglob
wheels=(.cache/wheels/nvidia_pytriton-"$PYTRITON_VERSION"-*.whl)
(( ${#wheels[@]} == 1 )) || fail "expected one nvidia_pytriton-$PYTRITON_VERSION wheel in .cache/wheels (run make setup)"
weights=(model_repository/*/*/model.pt)
(( ${#weights[@]} > 0 )) || fail "no trained weights in model_repository (run make setup)"

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The server, laid out as triton/fetch.sh leaves it, for Python $PY_XY.
unzip -q "${wheels[0]}" 'pytriton/tritonserver/*' 'nvidia_pytriton.libs/*' -d "$tmp/server"
(
    cd "$tmp/server"
    stubs=pytriton/tritonserver/python_backend_stubs
    [[ -f "$stubs/$PY_XY/triton_python_backend_stub" ]] \
        || fail "nvidia-pytriton $PYTRITON_VERSION has no Python backend stub for Python $PY_XY"
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
tar -C .cache -cf - redis | xz -T0 -6 > "$BUNDLE/redis.tar.xz"
tar -cf "$BUNDLE/weights.tar" "${weights[@]}"
echo "$PY_XY" > "$BUNDLE/python-version"

# The same versions as the local virtualenv, for the host's Python. tritonclient.http (the
# integration tests use it) needs gevent and geventhttpclient.
pins=()
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
