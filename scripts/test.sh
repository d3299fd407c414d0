#!/usr/bin/env bash
# The test suite: unit tests, then integration tests against real Triton servers.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
.venv/bin/python -m pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
    echo "test: pytest collected no tests; that is a failure here" >&2
    exit 1
fi
exit $rc
