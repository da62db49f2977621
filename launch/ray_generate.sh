#!/usr/bin/env bash
# Run the JSONL batch job on the Ray cluster (run it on the head node).
#
#   bash launch/ray_generate.sh --base BASE --reward-model ARM [--reward-model ARM2] \
#       --input 'in/*.jsonl' --output out.jsonl [genarm-vllm generate / vLLM engine flags]
#
# Any `genarm-vllm generate` flag works; this adds --ray and the cluster address. Defaults
# (override with the same flag or the environment):
#   REPLICAS  engines running at once (--replicas), e.g. one per GPU for a base that fits
#             on one GPU, or GPUs / tensor_parallel_size;
#   RAY_ADDRESS  the cluster (auto: the one this node belongs to).
# Large bases: add --tensor-parallel-size N --distributed-executor-backend ray; each replica
# then reserves N GPUs as a placement group (they may span nodes) and vLLM's Ray executor
# runs one worker per GPU; the reward models are sharded with the base.
# The output is written in input order as batches finish; if the job stops, run the same
# command again: it continues after the last complete row, without duplicates.
#
# Instead of this script, the job can be submitted from any machine with `ray job submit`
# (needs Ray's dashboard: pip install 'ray[default]' on the head):
#   ray job submit --address http://HEAD_IP:8265 -- \
#     /path/to/repo/.venv/bin/genarm-vllm generate --ray --replicas 8 --base ... --output ...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
# The cluster's token (see ray_head.sh): RAY_AUTH_TOKEN, or ~/.ray/auth_token on the head.
if [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f "$HOME/.ray/auth_token" ]; then
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
fi

# GPU clusters: an example for an 8-GPU node and a base that fits on one GPU:
#   REPLICAS=8 bash launch/ray_generate.sh ... --max-model-len 4096 --gpu-memory-utilization 0.9
exec "$ROOT/.venv/bin/genarm-vllm" generate --ray \
  --address "${RAY_ADDRESS:-auto}" --replicas "${REPLICAS:-1}" "$@"
