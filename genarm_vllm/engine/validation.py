"""Load-time checks that a base model and its reward models can decode together.

Every check raises ValueError with a message that names the models involved, so a
user sees the problem before an engine starts (and again inside the engine, for
bundles loaded by plain vLLM).
"""

from __future__ import annotations

import functools
import logging

from transformers import AutoConfig, AutoTokenizer

from genarm_vllm.engine.configs import text_config
from genarm_vllm.engine.lora_adapter import check_adapter, check_lora_tensor_parallel, is_lora_adapter

logger = logging.getLogger(__name__)

SELF_MODEL = "self"  # the base as its own guide (genarm_vllm.guidance.SELF_MODEL)


def on_base_weights(model) -> bool:
    """A reward model that runs on the base's weights: "self" or a LoRA adapter folder."""
    return str(model) == SELF_MODEL or is_lora_adapter(model)


@functools.lru_cache(maxsize=32)
def _vocab(path: str) -> tuple[dict[str, int], int]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer.get_vocab(), len(tokenizer)


def tokenizer_length(path: str) -> int:
    """The tokenizer length V: padded vocabulary columns at or beyond it are dropped."""
    return _vocab(str(path))[1]


@functools.lru_cache(maxsize=32)
def embedding_rows(path: str) -> int:
    """How many token ids the model folder `path` can embed (its config's vocab_size)."""
    return text_config(AutoConfig.from_pretrained(path)).vocab_size


def check_same_tokenizer(base: str, reward_model: str) -> None:
    """GenARM mixes distributions over the same token ids: the tokenizers must agree on
    every id both have. Extra ids at the end of either one (added special tokens, e.g. the
    `<pad>` at id 32000 of the Tulu2 ARM next to its base's 32,000 tokens) are allowed:
    decoding is over the base's ids, and ids a model cannot embed are never sampled."""
    if on_base_weights(reward_model):
        return  # a LoRA reward model on the base's weights reads with the base's tokenizer
    base_vocab, base_length = _vocab(str(base))
    arm_vocab, arm_length = _vocab(str(reward_model))
    if base_vocab == arm_vocab:
        return
    base_by_id = {i: t for t, i in base_vocab.items()}
    arm_by_id = {i: t for t, i in arm_vocab.items()}
    for token_id in range(min(base_length, arm_length)):
        base_token, arm_token = base_by_id.get(token_id), arm_by_id.get(token_id)
        if base_token != arm_token:
            raise ValueError(
                f"reward model {reward_model} has a different tokenizer than base model "
                f"{base}: first difference at token id {token_id}: base has {base_token!r}, "
                f"reward model has {arm_token!r}. GenARM needs reward models whose tokenizer "
                "equals the base model's on every id both have (extra ids only at the end)."
            )


def embedding_limits(reward_models: list[str]) -> dict[str, int]:
    """Each reward model's embedding row count: prompt ids at or above it are refused.
    (A LoRA reward model embeds with the base's own embedding: no limit of its own.)"""
    return {str(m): embedding_rows(str(m)) for m in reward_models if not on_base_weights(m)}


def unsampled_ids(base: str, reward_models: list[str]) -> dict[str, range]:
    """Ids of the base's tokenizer that a reward model cannot embed, per such model.

    Every model reads every token the base reads, so these ids are never sampled (the mix
    gives them -inf whatever the weights) and are refused in prompts.
    """
    length = tokenizer_length(base)
    limits = embedding_limits(reward_models)
    return {m: range(rows, length) for m, rows in limits.items() if rows < length}


def prompt_id_limits(base: str, reward_models: list[str], tokenizer: str | None = None) -> dict[str, int]:
    """The reward models that cannot embed every id vLLM accepts in a prompt for `base`
    (the larger of its tokenizer's length and its embedding rows), with their row counts.
    tokenizer: the engine's tokenizer folder when it is not the base's own."""
    accepted = max(tokenizer_length(str(tokenizer or base)), embedding_rows(str(base)))
    return {m: rows for m, rows in embedding_limits(reward_models).items() if rows < accepted}


def check_prompt_ids(prompt_ids, limits: dict[str, int]) -> None:
    """ValueError naming the first prompt id a reward model cannot embed, and the model."""
    top = max(prompt_ids, default=-1)
    for model, rows in limits.items():
        if top >= rows:
            bad = next(i for i in prompt_ids if i >= rows)
            raise ValueError(
                f"prompt token id {bad} is beyond reward model {model}'s {rows} embedding "
                "rows; every model reads every prompt token, so GenARM cannot take this prompt"
            )


@functools.lru_cache(maxsize=32)
def max_positions(model: str) -> int | None:
    """A model folder's maximum position count (max_position_embeddings), if it states one."""
    if on_base_weights(model):
        return None  # a LoRA reward model runs at the base's positions
    return getattr(text_config(AutoConfig.from_pretrained(model)), "max_position_embeddings", None)


def check_max_model_len(reward_model: str, max_model_len: int) -> None:
    """An ARM must be able to see every position the base will decode."""
    positions = max_positions(str(reward_model))
    if positions is not None and max_model_len > positions:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds reward model {reward_model}'s "
            f"max_position_embeddings={positions}; pass max_model_len <= {positions}"
        )


def check_tensor_parallel(
    model: str, tensor_parallel_size: int, role: str = "reward model"
) -> None:
    """Reward models are sharded like the base: their heads must divide by the TP size."""
    if str(model) == SELF_MODEL:
        return None
    if is_lora_adapter(model):
        return check_lora_tensor_parallel(model, tensor_parallel_size)
    config = text_config(AutoConfig.from_pretrained(model))
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
    tokenizer: str | None = None,
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    speculative_config=None,
    pipeline_parallel_size: int = 1,
    own_chat_templates: bool = False,
) -> None:
    """All load-time checks for a base, its reward models and the engine settings.
    tokenizer: the engine's tokenizer folder when it is not the base's own (vLLM's
    `tokenizer=`): the reward models' tokenizers are compared with it.
    own_chat_templates: the genarm_own_chat_templates option (check_chat_templates)."""
    if not reward_models:
        raise ValueError("GenARM needs at least one reward model")
    check_engine_features(speculative_config, pipeline_parallel_size)
    for reward_model in reward_models:
        if is_lora_adapter(reward_model):
            check_adapter(base, reward_model)
        check_same_tokenizer(tokenizer or base, reward_model)
        if max_model_len is not None:
            check_max_model_len(reward_model, max_model_len)
        check_tensor_parallel(reward_model, tensor_parallel_size)
    check_chat_templates(reward_models, own_chat_templates)
    for reward_model, ids in unsampled_ids(tokenizer or base, reward_models).items():
        logger.warning(
            "GenARM: reward model %s embeds %d token ids, the base's tokenizer has %d: ids "
            "%d..%d are never sampled, and prompts holding them are refused",
            reward_model, ids.start, ids.stop, ids.start, ids.stop - 1,
        )


def check_engine_features(speculative_config=None, pipeline_parallel_size: int = 1) -> None:
    """Refuse vLLM features the composite model cannot honour (yet), naming why."""
    if speculative_config:
        # vLLM 0.33's rejection samplers call logits processors on row slices of the target
        # logits (v1/worker/gpu/spec_decode/rejection_sampler.py, v1/sample/rejection_sampler.py)
        # and EAGLE/MTP drafters read the target's hidden states, which here are the
        # concatenation of every sub-model's.
        raise ValueError(
            "GenARM does not support speculative decoding (speculative_config): its "
            "per-request re-mix and the drafters' hidden states assume one logits row per "
            "request and one model; run without speculative_config"
        )
    if pipeline_parallel_size and pipeline_parallel_size > 1:
        raise ValueError(
            f"GenARM does not support pipeline parallelism (pipeline_parallel_size="
            f"{pipeline_parallel_size}): every sub-model runs whole on each rank; use "
            "tensor_parallel_size instead"
        )


def own_chat_template_models(reward_models: list[str], own_chat_templates: bool) -> list[bool]:
    """Per reward model: does it render chat requests with its own chat template? Under
    genarm_own_chat_templates every one not on the base's weights ("self" and LoRA reward
    models use the base's tokenizer, so they read the base's rendering)."""
    return [bool(own_chat_templates) and not on_base_weights(m) for m in reward_models]


def check_chat_templates(reward_models: list[str], own_chat_templates: bool) -> None:
    """Under genarm_own_chat_templates, every reward model that renders chats itself needs
    a chat template in its tokenizer; ValueError naming the ones without."""
    renders = own_chat_template_models(reward_models, own_chat_templates)
    missing = [m for m, own in zip(reward_models, renders)
               if own and not AutoTokenizer.from_pretrained(m).chat_template]
    if missing:
        raise ValueError(
            "genarm_own_chat_templates: each reward model renders chat requests with its own "
            f"tokenizer's chat template, and the tokenizer of reward model {', '.join(missing)} "
            "has none; add one (tokenizer_config.json 'chat_template' or chat_template.jinja) "
            "or turn the option off"
        )
