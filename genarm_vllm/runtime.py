"""Where GenARM runs: the process environment of tests, benchmarks and the demo, and the device.

- `LOCAL_ENV` / `use_local_env()`: the environment of tests, benchmarks and the demo on
  CPU machines (set before vLLM or torch is imported).
- `has_gpu()`: whether this process sees a CUDA device.
- `cpu_flags()`: the CPU extensions that decide CPU GEMM speed, recorded with every benchmark.

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


# AVX-512 and AMX decide CPU matmul speed (bfloat16 is ~2.8x faster with AMX, slower on AVX2).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS this machine has (Linux /proc/cpuinfo; [] elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in CPU_FLAGS if f in flags]
