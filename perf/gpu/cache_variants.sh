#!/usr/bin/env bash
# perf/cache_bench.py once per gateway setting, one after the other, each report with its own
# direct-Triton anchor measured in the same run: which setting puts the gateway ahead on this
# host. Meant for a many-core host (the GPU host: after perf/gpu/setup.sh), where a run takes
# about 100 s; run a few variants per call where commands are time-limited.
#
#   bash perf/gpu/cache_variants.sh OUT_DIR [VARIANT ...]     (default: every variant, in order)
#   bash perf/gpu/cache_variants.sh --list
#
# Each report is OUT_DIR/<date>-cache-<variant>.md. EXTRA (optional) is added to every
# cache_bench command line, e.g. EXTRA="--instances 2" or EXTRA="--concurrency 32". A variant
# is measured in ROUNDS rounds (default 1: a screening, one pair per concurrency; judge the
# setting kept with cache_bench's own default of 3).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

# name | cache_bench arguments (the gateway workers: a quarter of the cores unless named)
VARIANTS=(
    "default|"
    "host-wide|--gateway-batching host_wide=true"
    "host-wide-workers8|--gateway-workers 8 --gateway-batching host_wide=true"
    "host-wide-inflight2-workers8|--gateway-workers 8 --gateway-batching host_wide=true --gateway-batching max_inflight_batches=2"
    "inflight2|--gateway-batching max_inflight_batches=2"
    "triton-batches-workers8|--gateway-workers 8 --gateway-batching enabled=false"
)

args_of() {
    local v
    for v in "${VARIANTS[@]}"; do
        [[ "${v%%|*}" == "$1" ]] && { echo "${v#*|}"; return 0; }
    done
    return 1
}

if [[ "${1:-}" == "--list" ]]; then
    for v in "${VARIANTS[@]}"; do printf '%-30s %s\n' "${v%%|*}" "${v#*|}"; done
    exit 0
fi
[[ $# -ge 1 ]] || { echo "usage: $0 OUT_DIR [VARIANT ...] | --list" >&2; exit 2; }
out="$1"
shift
names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
    for v in "${VARIANTS[@]}"; do names+=("${v%%|*}"); done
fi
for name in "${names[@]}"; do
    args_of "$name" >/dev/null || { echo "unknown variant: $name (see --list)" >&2; exit 2; }
done

mkdir -p "$out"
status=0
for name in "${names[@]}"; do
    report="$out/$(date -u +%F)-cache-$name.md"
    # shellcheck disable=SC2086  # the arguments are words on purpose
    .venv/bin/python perf/cache_bench.py --rounds "${ROUNDS:-1}" $(args_of "$name") ${EXTRA:-} --out "$report" > "$out/$name.log" 2>&1
    rc=$?
    echo "== $name (exit $rc): $report"
    grep -E "^- c=[0-9]+: gateway / direct" "$report" 2>/dev/null || tail -5 "$out/$name.log"
    # cache_bench exits 1 when the target fails: only a run that measured nothing is an error here.
    [[ -s "$report" ]] || status=1
done
exit $status
