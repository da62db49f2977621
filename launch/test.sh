#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
# vLLM on CPU: one OpenMP thread per engine is much faster on small machines.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1
set +e
"$ROOT/.venv/bin/python" -m pytest tests -ra --timeout=1200 "$@"
status=$?
set -e
# pytest exits 5 when it collected no tests: that must fail, not pass silently.
if [ "$status" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$status"
