#!/usr/bin/env bash
# Fetch a complete NVIDIA Triton Inference Server (2.51, CPU-capable, with the Python backend
# and the local response cache) from the nvidia-pytriton PyPI wheel, without installing it:
# extracting keeps pytriton's own pins and CLI out of the project's dependency tree.
#
# Result (ignored by git):
#   triton/server/pytriton/tritonserver/bin/tritonserver   the server binary
#   triton/server/nvidia_pytriton.libs/                    its shared libraries (LD_LIBRARY_PATH)
#   triton/server/backends/python/                         --backend-directory triton/server/backends
#   triton/server/pytriton/tritonserver/caches/            --cache-directory (response cache)
#
# Idempotent: a stamp file records what was built; a second run returns at once.
# Environment: PYTHON (default .venv/bin/python) runs pip and decides the stub's Python X.Y.
set -euo pipefail

PYTRITON_VERSION=0.7.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
WHEELS="$ROOT/.cache/wheels"
SERVER="$ROOT/triton/server"

PY_XY="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
STAMP="$SERVER/.fetched-pytriton-$PYTRITON_VERSION-py$PY_XY"
if [[ -f "$STAMP" ]]; then
    exit 0
fi

mkdir -p "$WHEELS"
shopt -s nullglob
wheels=("$WHEELS"/nvidia_pytriton-"$PYTRITON_VERSION"-*.whl)
if (( ${#wheels[@]} == 0 )); then
    echo "fetch.sh: downloading nvidia-pytriton==$PYTRITON_VERSION (~55 MB)" >&2
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_35_x86_64 --python-version "$PY_XY" \
        "nvidia-pytriton==$PYTRITON_VERSION" -d "$WHEELS"
    wheels=("$WHEELS"/nvidia_pytriton-"$PYTRITON_VERSION"-*.whl)
fi
wheel="${wheels[0]}"

# Unpack into a temporary sibling and swap it in, so an interrupted run never leaves a
# half-extracted server that looks complete.
tmp="$SERVER.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$tmp"
unzip -q "$wheel" 'pytriton/tritonserver/*' 'nvidia_pytriton.libs/*' -d "$tmp"

stub_dir="$tmp/pytriton/tritonserver/python_backend_stubs/$PY_XY"
if [[ ! -x "$stub_dir/triton_python_backend_stub" ]]; then
    echo "fetch.sh: nvidia-pytriton $PYTRITON_VERSION has no Python backend stub for Python $PY_XY" >&2
    exit 1
fi
chmod +x "$tmp/pytriton/tritonserver/bin/tritonserver" "$stub_dir/triton_python_backend_stub"

# The Python backend directory Triton expects: the backend library, its utils module and the
# stub process matching the interpreter that will import torch inside model.py.
backend="$tmp/backends/python"
mkdir -p "$backend"
cp "$tmp/pytriton/tritonserver/backends/python/libtriton_python.so" \
   "$tmp/pytriton/tritonserver/backends/python/triton_python_backend_utils.py" \
   "$stub_dir/triton_python_backend_stub" "$backend/"
# The stub finds the bundled libraries through an RPATH relative to its original location;
# from here it needs LD_LIBRARY_PATH (triton/fleet.py sets it), so nothing else to patch.

rm -rf "$SERVER"
mv "$tmp" "$SERVER"
touch "$STAMP"
echo "fetch.sh: Triton server ready in $SERVER (Python backend stub for $PY_XY)" >&2
