"""Load-time checks that a base model and its reward models can decode together.

Every check raises ValueError with a message that names the models involved, so a
user sees the problem before an engine starts (and again inside the engine, for
bundles loaded by plain vLLM).
"""

from __future__ import annotations

import functools

from transformers import AutoConfig, AutoTokenizer


@functools.lru_cache(maxsize=32)
def _vocab(path: str) -> tuple[dict[str, int], int]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer.get_vocab(), len(tokenizer)


def tokenizer_length(path: str) -> int:
    """The tokenizer length V: padded vocabulary columns at or beyond it are dropped."""
    return _vocab(str(path))[1]


def check_same_tokenizer(base: str, reward_model: str) -> None:
    """GenARM mixes distributions over the same token ids: the tokenizers must agree."""
    base_vocab, _ = _vocab(str(base))
    arm_vocab, _ = _vocab(str(reward_model))
    if base_vocab == arm_vocab:
        return
    base_by_id = {i: t for t, i in base_vocab.items()}
    arm_by_id = {i: t for t, i in arm_vocab.items()}
    for token_id in sorted(set(base_by_id) | set(arm_by_id)):
        base_token, arm_token = base_by_id.get(token_id), arm_by_id.get(token_id)
        if base_token != arm_token:
            raise ValueError(
                f"reward model {reward_model} has a different tokenizer than base model "
                f"{base}: first difference at token id {token_id}: base has {base_token!r}, "
                f"reward model has {arm_token!r}. GenARM needs reward models that share "
                "the base model's tokenizer."
            )


def check_max_model_len(reward_model: str, max_model_len: int) -> None:
    """An ARM must be able to see every position the base will decode."""
    max_positions = getattr(
        AutoConfig.from_pretrained(reward_model), "max_position_embeddings", None
    )
    if max_positions is not None and max_model_len > max_positions:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds reward model {reward_model}'s "
            f"max_position_embeddings={max_positions}; pass max_model_len <= {max_positions}"
        )


def check_tensor_parallel(
    model: str, tensor_parallel_size: int, role: str = "reward model"
) -> None:
    """Reward models are sharded like the base: their heads must divide by the TP size."""
    config = AutoConfig.from_pretrained(model)
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tp = tensor_parallel_size
    # vLLM replicates KV heads when there are fewer than TP ranks (tp % kv_heads == 0).
    if heads % tp or (kv_heads % tp if kv_heads >= tp else tp % kv_heads):
        raise ValueError(
            f"{role} {model} has {heads} attention heads and {kv_heads} KV "
            f"heads, which cannot be sharded over tensor_parallel_size={tp}: the head count "
            "must be divisible by it, and the KV-head count divisible by it or a divisor of it"
        )


def check_reward_models(
    base: str,
    reward_models: list[str],
    *,
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
) -> None:
    """All load-time checks for a base and its reward models."""
    if not reward_models:
        raise ValueError("GenARM needs at least one reward model")
    for reward_model in reward_models:
        check_same_tokenizer(base, reward_model)
        if max_model_len is not None:
            check_max_model_len(reward_model, max_model_len)
        check_tensor_parallel(reward_model, tensor_parallel_size)
