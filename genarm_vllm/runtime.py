"""Where GenARM runs: the process environment of tests, benchmarks and the demo, and the device.

- `LOCAL_ENV` / `use_local_env()`: the environment of tests, benchmarks and the demo on
  CPU machines (set before vLLM or torch is imported).
- `has_gpu()`: whether this process sees a CUDA device.

The vLLM engine settings GenARM engines default to are in genarm_vllm/engine/defaults.py.
"""

from __future__ import annotations

import os

# Tests, benchmarks and the demo: one OpenMP thread per engine, for figures comparable
# between runs (two threads on 2 cores were 1.66x faster, not slower: BENCHMARKS.md);
# 1 GiB of KV cache per engine (a test session holds many engines); in-process engines
# (start in ~6 s instead of ~30 s); no model hub.
LOCAL_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def use_local_env(**overrides: str) -> None:
    """Apply LOCAL_ENV (and `overrides`) wherever the environment does not already say."""
    for name, value in {**LOCAL_ENV, **overrides}.items():
        os.environ.setdefault(name, value)


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
