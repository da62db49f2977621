"""Paths, engine settings and prompt encoding shared by the demo's steps.

The environment (one OpenMP thread, in-process engines, no hub) is genarm_vllm.runtime's
LOCAL_ENV: each step calls runtime.use_local_env() before importing vLLM.
"""

from __future__ import annotations

from pathlib import Path

from genarm_vllm.tokenization import prompt_ids, user_message

ASSETS = Path(__file__).parent / "assets"  # committed: LoRA adapters, their data and metrics
ARTIFACTS = Path("artifacts")  # not committed (gitignored): converted base, merged ARMs, outputs
BASE_DIR = ARTIFACTS / "smollm2-135m-instruct"
ARM_ROOT = ARTIFACTS / "arms"
OUT_DIR = ARTIFACTS / "quickstart"

# vLLM on a small CPU machine: float32 (bf16 is slow without AVX-512), no torch.compile
# start-up cost, short contexts (chat prompt ~40 tokens + a short completion).
DEMO_ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=256, seed=0)


def chat_prompts(tokenizer, prompts: list[str]) -> list[dict]:
    """Each prompt as one user message in the chat template, as token ids for vLLM: the
    encoding `genarm-vllm train-arm --chat-template` trains the ARMs on (tokenization.py)."""
    return [
        {"prompt_token_ids": prompt_ids(tokenizer, messages=user_message(prompt))}
        for prompt in prompts
    ]
