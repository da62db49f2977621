"""Which attention backend a GenARM engine on CUDA may use (its sub-models' head sizes differ).

Read from vLLM 0.33's sources (no GPU here to run it): see `choose_attention_backend`.
"""

from __future__ import annotations

from genarm_vllm.engine.configs import head_size


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def choose_attention_backend(
    base_head_size: int, arm_head_sizes: list[int], dtype: str, selected: str | None
) -> str | None:
    """The attention backend a GenARM engine on CUDA needs: None keeps vLLM's choice.

    vLLM 0.33's Triton backend (TRITON_ATTN) sizes its decode scratch buffer from the
    engine's (the base's) head size padded to a power of two
    (v1/attention/backends/triton_attn.py, TritonAttentionMetadataBuilder), while its kernel
    indexes with each layer's own (v1/attention/ops/triton_unified_attention.py): a reward
    model with a larger padded head size writes out of bounds. vLLM picks Triton for float32
    on CUDA, and for head sizes FlashAttention cannot take (platforms/cuda.py). FlashAttention
    and FlashInfer size their work per layer group (checked: v1/attention/backends/flash_attn.py,
    flashinfer.py), so they are safe; FLASH_ATTN takes fp16/bf16 and head sizes that are a
    multiple of 8 up to 256.
    """
    base_padded = next_power_of_2(base_head_size)
    larger = [h for h in arm_head_sizes if next_power_of_2(h) > base_padded]
    if not larger:
        return None  # every layer fits the base-sized scratch buffer: any backend is safe
    selected = (selected or "").upper() or None
    if selected not in (None, "AUTO", "TRITON_ATTN"):
        return None  # the user chose a backend that sizes per layer
    reason = (
        f"reward model head size {larger[0]} is larger than the base's {base_head_size} "
        "(padded to powers of two), which vLLM's TRITON_ATTN backend does not support "
        "(its decode buffer is sized from the base's head size)"
    )
    if selected == "TRITON_ATTN":
        raise ValueError(f"{reason}; choose attention_backend FLASH_ATTN or FLASHINFER")
    head_sizes = [base_head_size, *arm_head_sizes]
    if dtype in ("float16", "bfloat16") and all(h % 8 == 0 and h <= 256 for h in head_sizes):
        return "FLASH_ATTN"
    raise ValueError(
        f"{reason}, and FLASH_ATTN cannot run dtype {dtype} with head sizes {head_sizes}; "
        "run in bfloat16 or float16 (FLASH_ATTN), or use reward models whose head size is at "
        "most the base's"
    )


def use_safe_attention_backend(vllm_config, arm_configs: list) -> None:
    """On CUDA: pick an attention backend safe for every sub-model's head size (see
    choose_attention_backend), before any Attention layer is built.

    vLLM 0.33 selects a backend per Attention layer as the layer is constructed, from the
    current config's attention_config (v1/attention/selector.py get_attn_backend), and
    with_hf_config copies share that attention_config: setting it here reaches every
    sub-model. The block size is settled after the model loads, from the layers' backends
    (platforms/interface.py update_block_size_for_backend).
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention = vllm_config.attention_config
    selected = attention.backend.name if attention.backend is not None else None
    backend = choose_attention_backend(
        head_size(vllm_config.model_config.hf_config),
        [head_size(c) for c in arm_configs],
        str(vllm_config.model_config.dtype).removeprefix("torch."),
        selected,
    )
    if backend is not None:
        attention.backend = AttentionBackendEnum[backend]
