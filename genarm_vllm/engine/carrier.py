"""The frontend half of per-model prompts: a request's "carrier" prompt (issue 26).

Every model's own prompt is tokenized (or rendered with its chat template) here, in the
frontend, so the engine core never needs a reward model's tokenizer. A request whose
models read prompts of their own is submitted as the carrier prompt (the base's prompt
ids padded to the longest model prompt: genarm_vllm/prompts.py build_carrier) with
`extra_args["genarm_carrier"]`; the worker gives every model its own view of it
(engine/prompt_views.py). Its cache_salt is a digest of every model's prompt (the user's
salt, if any, kept inside it): a repeat of the same prompts hits the prefix cache, and
requests whose models read other prompts never share blocks, whatever the base's prompt.
"""

from __future__ import annotations

import hashlib
import json

from genarm_vllm.prompts import (
    CARRIER_KEY,
    build_carrier,
    encode_prompts,
    has_own_prompts,
    same_as_base,
)


def carrier_salt(info: dict, user_salt: str | None = None) -> str:
    """vLLM hashes the carrier's ids (the base's prompt), its salt the rest: the own prompts."""
    digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
    return f"genarm-carrier-{digest}" + (f":{user_salt}" if user_salt else "")


def base_prompt_ids(prompt, tokenizer, name: str = "prompt") -> tuple[str | None, list[int], str | None]:
    """(text or None, token ids, the user's cache_salt) of a base prompt as vllm.LLM takes it."""
    if isinstance(prompt, str):
        return prompt, list(tokenizer.encode(prompt)), None
    if isinstance(prompt, dict):
        extra = set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"}
        if extra:
            raise ValueError(f"{name}: per-model prompts take text or token prompts only, "
                             f"not {sorted(extra)}")
        salt = prompt.get("cache_salt")
        if prompt.get("prompt_token_ids") is not None:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]], salt
        if isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], list(tokenizer.encode(prompt["prompt"])), salt
    raise ValueError(f"{name}: per-model prompts take a text prompt, or a dict with 'prompt' or "
                     f"'prompt_token_ids', got {type(prompt).__name__}")


def carrier_prompt(base_ids: list[int], encoded: list, params, max_model_len: int | None,
                   block_size: int, user_salt: str | None = None, name: str = "prompt"):
    """(TokensPrompt dict, SamplingParams) of one request with own prompts `encoded`, for an
    engine of KV block size `block_size`."""
    ids, info = build_carrier(base_ids, encoded, block_size)
    if max_model_len is not None and len(ids) >= max_model_len:
        raise ValueError(
            f"{name}: the longest of the models' prompts has {len(ids)} tokens (the base's: "
            f"{len(base_ids)}; own: {', '.join(str(len(e)) for e in encoded if e is not None)}), "
            f"which leaves no room for a response within max_model_len={max_model_len}; "
            "shorten the prompts or raise max_model_len"
        )
    params = params.clone()
    params.extra_args = {**(params.extra_args or {}), CARRIER_KEY: info}
    return {"prompt_token_ids": ids, "cache_salt": carrier_salt(info, user_salt)}, params


def carrier_requests(llm, prompts: list, params: list, own: list):
    """GuidedLLM's prompts and params with carrier requests where `own` (per prompt: the
    per-model prompt entries or None) asks for them; and {index: (prompt text, base ids)}
    to report the base's prompt in the outputs."""
    tokenizer = llm.llm.get_tokenizer()
    tokenizers = llm.reward_tokenizers()
    limits = llm.reward_embedding_rows()
    max_model_len = llm.llm.llm_engine.model_config.max_model_len
    block_size = llm.llm.llm_engine.vllm_config.cache_config.block_size
    prompts, params, restore = list(prompts), list(params), {}
    for i, entries in enumerate(own):
        if entries is None:
            continue
        name = f"guidance[{i}]['prompts']"
        encoded = encode_prompts(entries, tokenizers, limits, name)
        if not has_own_prompts(encoded):
            continue
        text, base_ids, salt = base_prompt_ids(prompts[i], tokenizer, f"prompts[{i}]")
        encoded = same_as_base(encoded, base_ids)
        if not has_own_prompts(encoded):
            continue
        prompts[i], params[i] = carrier_prompt(base_ids, encoded, params[i], max_model_len,
                                               block_size, salt, f"prompts[{i}]")
        restore[i] = (text, base_ids)
    return prompts, params, restore


# ----------------------------------------------------------------------------- servers


_TOKENIZERS: dict = {}


def _reward_tokenizers(model_config) -> tuple[list, list[int]]:
    """Each reward model's tokenizer and embedding rows in this (frontend) process."""
    key = (model_config.tokenizer, model_config.model,
           tuple(getattr(model_config.hf_config, "genarm_reward_models", None) or ()))
    cached = _TOKENIZERS.get(key)
    if cached is None:
        from transformers import AutoTokenizer

        from genarm_vllm.engine.validation import embedding_rows, on_base_weights
        from genarm_vllm.guidance import GuidanceConfig

        base = model_config.tokenizer
        base_tokenizer = AutoTokenizer.from_pretrained(base)
        models = GuidanceConfig.from_hf_config(model_config.hf_config).reward_models
        cached = (
            [base_tokenizer if on_base_weights(m) else AutoTokenizer.from_pretrained(m)
             for m in models],
            [embedding_rows(model_config.model if on_base_weights(m) else m) for m in models],
        )
        _TOKENIZERS[key] = cached
    return cached


def carrier_engine_request(model_config, request, block_size: int) -> None:
    """Turns an EngineCoreRequest whose extra_args carry `genarm_prompts` (vllm_xargs; see
    prompts.parse_xargs_prompts) into its carrier request, in place. ValueError on bad
    prompts. Runs in vLLM's frontend, after its own checks of the base's prompt
    (plugin.py wraps InputProcessor.process_inputs)."""
    from genarm_vllm.prompts import PROMPTS_KEY, parse_xargs_prompts

    params = request.sampling_params
    extra = dict((params.extra_args or {}) if params is not None else {})
    if PROMPTS_KEY not in extra:
        return
    tokenizers, limits = _reward_tokenizers(model_config)
    entries = parse_xargs_prompts(extra.pop(PROMPTS_KEY), len(tokenizers))
    encoded = encode_prompts(entries, tokenizers, limits, PROMPTS_KEY)
    params.extra_args = extra
    base_ids = list(request.prompt_token_ids)
    encoded = same_as_base(encoded, base_ids)
    if not has_own_prompts(encoded):
        return
    max_model_len = model_config.max_model_len
    prompt, params = carrier_prompt(base_ids, encoded, params, max_model_len, block_size,
                                    request.cache_salt, "the request")
    # The server sized max_tokens for the base's prompt alone: leave room for the carrier.
    room = max_model_len - len(prompt["prompt_token_ids"])
    if params.max_tokens is None or params.max_tokens > room:
        params.max_tokens = room
    request.prompt_token_ids = prompt["prompt_token_ids"]
    request.cache_salt = prompt["cache_salt"]
    request.sampling_params = params
