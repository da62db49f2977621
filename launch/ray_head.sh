#!/usr/bin/env bash
# Start the head node of a Ray cluster for `genarm-vllm generate --ray`.
#
#   bash launch/ray_head.sh [more `ray start` flags, e.g. --num-gpus 8]
#
# Every node (head and workers) needs the same setup:
#   - this repo at the same path, installed with launch/setup.sh (it includes the `ray` extra).
#     genarm-vllm must be *installed* on every node: its vLLM plugin (an entry point) is
#     what registers the GenARM model in each engine process;
#   - the base and reward model folders at the same paths on every node (a shared file
#     system, or the same copy on each);
#   - the head's ports reachable from the workers: 6379 (GCS) and Ray's worker ports.
# Then, on each worker machine:  bash launch/ray_worker.sh HEAD_IP:6379
# and, on the head, the job:      bash launch/ray_generate.sh --base ... --input ... --output ...
# Stop a node with `.venv/bin/ray stop` (it stops every Ray process of the machine), or start
# it with --block and stop it with SIGTERM.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
RAY="$ROOT/.venv/bin/ray"

# Recent Ray versions protect a cluster with a token (~/.ray/auth_token on the head):
# create it here; workers and remote drivers pass it as RAY_AUTH_TOKEN (see ray_worker.sh).
if "$RAY" get-auth-token --help >/dev/null 2>&1 && [ "${RAY_AUTH_MODE:-token}" = token ]; then
  export RAY_AUTH_MODE=token
  "$RAY" get-auth-token --generate >/dev/null
  echo "[ray_head] cluster token: ~/.ray/auth_token (workers: RAY_AUTH_TOKEN=<its content>)" >&2
fi

# Ray detects the node's CPUs and GPUs; pass --num-gpus / --num-cpus to override.
# The dashboard (port 8265) also serves `ray job submit` when Ray's dashboard packages
# are installed (pip install 'ray[default]').
exec "$RAY" start --head --port "${RAY_PORT:-6379}" "$@"
