#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
# The tests' environment (one OpenMP thread, in-process engines, no model hub) is set by
# tests/conftest.py from genarm_vllm.runtime.LOCAL_ENV.
PYTEST=("$ROOT/.venv/bin/python" -m pytest -ra --timeout=1200)
set +e
for arg in "$@"; do
  # An argument naming a path (tests, tests/test_x.py, tests/test_x.py::name, an absolute
  # path): the user named what to run, so one pytest over it, as asked.
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
    "${PYTEST[@]}" "$@"; status=$?
    # pytest exits 5 when it collected no tests: that must fail, not pass silently.
    if [ "$status" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
    exit "$status"
  fi
done
# One pytest process per test file: in-process vLLM engines cannot be freed (see
# tests/conftest.py), and all of them in one process (~20 GB) left too little memory for
# the tests that start engines in other processes (the demo, servers, Ray workers).
status=0
ran=0
for file in tests/test_*.py; do
  "${PYTEST[@]}" "$file" "$@"
  case $? in
    0) ran=1 ;;
    5) ;;  # nothing selected in this file (e.g. -m "not slow")
    *) ran=1; status=1; failed+=("$file") ;;
  esac
done
if [ "$ran" -eq 0 ]; then echo "no tests were collected" >&2; exit 1; fi
if [ "$status" -ne 0 ]; then echo "failed: ${failed[*]}" >&2; fi
exit "$status"
