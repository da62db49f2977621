"""Paths, engine settings and prompt encoding shared by the demo's steps."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"  # committed: LoRA adapters, their data and metrics
ARTIFACTS = Path("artifacts")  # not committed (gitignored): converted base, merged ARMs, outputs
BASE_DIR = ARTIFACTS / "smollm2-135m-instruct"
ARM_ROOT = ARTIFACTS / "arms"
OUT_DIR = ARTIFACTS / "quickstart"

# vLLM on a small CPU machine: float32 (bf16 is slow without AVX-512), no torch.compile
# start-up cost, short contexts (chat prompt ~40 tokens + a short completion).
ENGINE_KWARGS = dict(dtype="float32", enforce_eager=True, max_model_len=256, seed=0)


def cpu_env() -> None:
    """Environment defaults for vLLM on CPU; call before importing vllm."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # two threads on 2 cores: 20x slower
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Each engine lives alone in its own short process: in-process start-up is much faster.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def chat_prompts(tokenizer, prompts: list[str]) -> list[dict]:
    """Each prompt as one user message in the chat template, as token ids for vLLM.

    The same encoding `genarm-vllm train-arm --chat-template` trains the ARMs on: the
    rendered template carries its own special tokens, so none are added.
    """
    encoded = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        encoded.append({"prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids})
    return encoded
