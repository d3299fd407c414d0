#!/usr/bin/env bash
# Fetch perf_analyzer (Triton's load generator) without installing anything system-wide.
#
# Newer perf_analyzer wheels need glibc 2.38; the binary inside the tritonclient==2.48.0 wheel
# runs on older systems. Only that one file is extracted: installing the old client would
# downgrade the project's tritonclient. Its two missing shared libraries come from:
#   libcudart.so.12  the PyPI package nvidia-cuda-runtime-cu12 (only the .so is unzipped)
#   libb64.so.0d     the copy bundled in nvidia-pytriton (fetched by triton/fetch.sh), or,
#                    failing that, Debian's libb64-0d unpacked with dpkg -x (not installed)
#
# Result (ignored by git): triton/perf_analyzer/perf_analyzer.sh, a wrapper that sets
# LD_LIBRARY_PATH and execs the binary with the given arguments.
# Idempotent: a stamp file makes a second run return at once.
set -euo pipefail

TRITONCLIENT_VERSION=2.48.0
CUDART_VERSION=12.9.79
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
WHEELS="$ROOT/.cache/wheels"
DEST="$ROOT/triton/perf_analyzer"
STAMP="$DEST/.fetched-tritonclient-$TRITONCLIENT_VERSION"
if [[ -f "$STAMP" ]]; then
    exit 0
fi

# pip download PACKAGE==VERSION GLOB: print the path of the cached wheel, downloading it once.
cached_wheel() {
    local spec="$1" glob="$2"
    shopt -s nullglob
    local found=("$WHEELS"/$glob)
    if (( ${#found[@]} == 0 )); then
        echo "fetch_perf_analyzer.sh: downloading $spec" >&2
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
            --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 \
            "$spec" -d "$WHEELS" >&2
        found=("$WHEELS"/$glob)
    fi
    (( ${#found[@]} > 0 )) || { echo "fetch_perf_analyzer.sh: $spec not found" >&2; exit 1; }
    echo "${found[0]}"
}

mkdir -p "$WHEELS"
tc_wheel="$(cached_wheel "tritonclient==$TRITONCLIENT_VERSION" "tritonclient-$TRITONCLIENT_VERSION-*.whl")"
cudart_wheel="$(cached_wheel "nvidia-cuda-runtime-cu12==$CUDART_VERSION" "nvidia_cuda_runtime_cu12-$CUDART_VERSION-*.whl")"

tmp="$DEST.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$tmp/lib"
unzip -q -j "$tc_wheel" "tritonclient-$TRITONCLIENT_VERSION.data/data/bin/perf_analyzer" -d "$tmp"
chmod +x "$tmp/perf_analyzer"
unzip -q -j "$cudart_wheel" "nvidia/cuda_runtime/lib/libcudart.so.12" -d "$tmp/lib"

# libb64: nvidia-pytriton bundles it under a hashed file name; the loader only needs a file
# called libb64.so.0d, so a copy under that name works and avoids apt entirely.
"$ROOT/triton/fetch.sh"
shopt -s nullglob
b64=("$ROOT"/triton/server/nvidia_pytriton.libs/libb64-*.so.0d)
if (( ${#b64[@]} > 0 )); then
    cp "${b64[0]}" "$tmp/lib/libb64.so.0d"
else
    # Fallback: Debian's package, downloaded and unpacked locally (never installed).
    ( cd "$tmp" && { apt-get download libb64-0d 2>/dev/null || { apt-get update -qq && apt-get download libb64-0d; }; } )
    dpkg -x "$tmp"/libb64-0d_*.deb "$tmp/deb"
    cp -L "$tmp"/deb/usr/lib/x86_64-linux-gnu/libb64.so.0d "$tmp/lib/"
    rm -rf "$tmp/deb" "$tmp"/libb64-0d_*.deb
fi

cat > "$tmp/perf_analyzer.sh" <<'WRAPPER'
#!/usr/bin/env bash
# Run perf_analyzer with its bundled shared libraries.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$here/perf_analyzer" "$@"
WRAPPER
chmod +x "$tmp/perf_analyzer.sh"

# Check that the binary actually loads before declaring success (it prints usage and exits 0
# or 1 depending on the flag, so look for the usage text instead of the exit status).
usage="$("$tmp/perf_analyzer.sh" --help 2>&1 || true)"
if [[ "$usage" != *"Usage:"* ]]; then
    echo "fetch_perf_analyzer.sh: perf_analyzer does not start: $usage" >&2
    exit 1
fi

rm -rf "$DEST"
mv "$tmp" "$DEST"
touch "$STAMP"
echo "fetch_perf_analyzer.sh: perf_analyzer ready: $DEST/perf_analyzer.sh" >&2
