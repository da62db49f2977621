#!/usr/bin/env bash
# Join a worker machine to the Ray cluster started by launch/ray_head.sh.
#
#   RAY_AUTH_TOKEN=<head's ~/.ray/auth_token> bash launch/ray_worker.sh HEAD_IP:6379 [ray start flags]
#
# Same setup as the head (see ray_head.sh): this repo at the same path, installed with
# launch/setup.sh, and the model folders at the same paths. Each GPU of this machine becomes
# a Ray "GPU" resource; every engine replica reserves --gpus-per-replica of them
# (tensor_parallel_size by default). Stop with `.venv/bin/ray stop` (all Ray processes
# of the machine).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HEAD="${1:?usage: launch/ray_worker.sh HEAD_IP:6379 [more ray start flags]}"; shift
bash "$ROOT/launch/setup.sh"

# A cluster started with a token (ray_head.sh does with recent Ray) admits token holders
# only: RAY_AUTH_TOKEN or ~/.ray/auth_token (set RAY_AUTH_MODE=disabled for a cluster without).
if [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f "$HOME/.ray/auth_token" ]; then
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
fi

exec "$ROOT/.venv/bin/ray" start --address "$HEAD" "$@"
