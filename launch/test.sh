#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
# The tests' environment (one OpenMP thread, in-process engines, no model hub) is set by
# tests/conftest.py from genarm_vllm.runtime.LOCAL_ENV.
set +e
"$ROOT/.venv/bin/python" -m pytest tests -ra --timeout=1200 "$@"
status=$?
set -e
# pytest exits 5 when it collected no tests: that must fail, not pass silently.
if [ "$status" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$status"
