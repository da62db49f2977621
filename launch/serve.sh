#!/usr/bin/env bash
# Example deployment: GenARM behind vLLM's OpenAI-compatible server.
#
#   bash launch/serve.sh BASE_DIR ARM_DIR [ARM_DIR2 ...]
#
# Clients steer every request on its own with the standard `vllm_xargs` body field:
#   {"vllm_xargs": {"genarm_beta": 0.5, "genarm_weights": [1.0, 0.3]}}
# (weights in the order the reward models are given here). Stop with SIGTERM / Ctrl-C.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"

BASE="${1:?usage: launch/serve.sh BASE_DIR ARM_DIR [ARM_DIR2 ...]}"; shift
ARMS=()
for arm in "$@"; do ARMS+=(--reward-model "$arm"); done

# CPU builds: the KV cache takes a quarter of the memory available at start (set
# VLLM_CPU_KVCACHE_SPACE=<GiB> to choose); DTYPE=bfloat16 is ~2.8x faster on CPUs with AMX
# (the CPU default is float32).

# GPU deployments: add e.g. --tensor-parallel-size 2 --gpu-memory-utilization 0.9; the
# reward models are sharded like the base (their head counts must divide by the TP size).
exec "$ROOT/.venv/bin/genarm-vllm" serve --base "$BASE" "${ARMS[@]}" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" \
  --served-model-name "${SERVED_MODEL_NAME:-genarm}" \
  --beta "${BETA:-1.0}" \
  --max-model-len "${MAX_MODEL_LEN:-2048}" \
  --max-num-seqs "${MAX_NUM_SEQS:-128}" \
  ${DTYPE:+--dtype "$DTYPE"}
