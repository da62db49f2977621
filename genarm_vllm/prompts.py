"""Per-model prompts: every guiding model may read its own prompt (issue 26).

A request's guidance may carry `"prompts"`: one entry per reward model, in reward-model
order. Each entry is

- `None`: the model reads the base's prompt (as without `"prompts"`);
- a string: tokenized by that model's tokenizer as vLLM tokenizes a text prompt
  (`tokenizer.encode(text)`, special tokens included);
- a list of token ids;
- a list of chat messages (`{"role": ..., "content": ...}`): rendered with that model's
  own tokenizer chat template (generation prompt added), then tokenized without special
  tokens, as vLLM's chat renderer does.

Semantics: model i's log-probs at response step t are computed on ITS prompt followed by
the shared response tokens y_<t, with its own positions starting at 0; the mix is
unchanged. With every entry None the request is a plain one.

How it reaches the engine (the "carrier" request; engine/prompt_views.py runs it):
the request vLLM schedules has as prompt the base's prompt ids followed by the own prompt
ids of the models that have one, in reward-model order, and carries
`extra_args["genarm_prompt_lengths"]`: one int per reward model, the length of its own
prompt, or -1 when it reads the base's prompt. The base's prompt length is the carrier
length minus the own prompts' lengths. This module is light (no vLLM, no torch): the API
server process, the CLI and the reference decoder use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PROMPTS_KEY = "genarm_prompts"  # vllm_xargs: one string per reward model (see parse_xargs_prompts)
PROMPT_LENGTHS_KEY = "genarm_prompt_lengths"  # extra_args of a carrier request (worker side)

# vllm_xargs values may only be strings, numbers or lists of them: over HTTP each entry of
# `genarm_prompts` is a string; this one means "reads the base's prompt", any other string
# is a text prompt (the empty string: an empty text prompt), and a string starting with
# JSON_PREFIX is JSON (a list of token ids or of chat messages).
BASE_PROMPT_SENTINEL = "<base>"
JSON_PREFIX = "json:"


def is_chat(entry: object) -> bool:
    return (
        isinstance(entry, (list, tuple)) and len(entry) > 0
        and all(isinstance(m, Mapping) for m in entry)
    )


def check_prompt_entry(entry: object, name: str) -> None:
    """ValueError unless `entry` is None, a string, a list of ids or a list of chat messages."""
    if entry is None or isinstance(entry, str):
        return
    if isinstance(entry, (list, tuple)):
        if is_chat(entry):
            for m in entry:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError(
                        f"{name}: chat messages must be dicts with string 'role' and "
                        f"'content', got {m!r}"
                    )
            return
        if all(isinstance(t, int) and not isinstance(t, bool) for t in entry):
            if not entry:
                raise ValueError(f"{name}: a list of token ids must not be empty")
            if min(entry) < 0:
                raise ValueError(f"{name}: token ids must be >= 0, got {min(entry)}")
            return
    raise ValueError(
        f"{name} must be None (the base's prompt), a string, a list of token ids or a list "
        f"of chat messages, got {entry!r}"
    )


def check_prompts(prompts: object, num_reward_models: int, name: str = "prompts") -> list:
    """A valid per-model prompt list (one entry per reward model); ValueError otherwise."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(
            f"{name} must be a list with one entry per reward model ({num_reward_models}): "
            f"None, a string, token ids or chat messages; got {prompts!r}"
        )
    if len(prompts) != num_reward_models:
        raise ValueError(
            f"{name} must have one entry per reward model ({num_reward_models}), got "
            f"{len(prompts)}"
        )
    for i, entry in enumerate(prompts):
        check_prompt_entry(entry, f"{name}[{i}]")
    return list(prompts)


def encode_prompt(entry, tokenizer, name: str = "prompt") -> list[int]:
    """The token ids of one per-model prompt entry (not None) under `tokenizer`."""
    if isinstance(entry, str):
        return list(tokenizer.encode(entry))
    if is_chat(entry):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{name}: chat messages need a chat template, and the tokenizer of this "
                f"model ({getattr(tokenizer, 'name_or_path', '?')}) has none"
            )
        text = tokenizer.apply_chat_template(
            [dict(m) for m in entry], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    return [int(t) for t in entry]


def encode_prompts(prompts: Sequence, tokenizers: Sequence, limits: Sequence[int | None],
                   name: str = "prompts") -> list[list[int] | None]:
    """Per-model prompt ids (None: the base's prompt), each checked non-empty and within
    its model's embedding rows (`limits`, None: no limit)."""
    encoded = []
    for i, (entry, tokenizer, rows) in enumerate(zip(prompts, tokenizers, limits)):
        if entry is None:
            encoded.append(None)
            continue
        ids = encode_prompt(entry, tokenizer, f"{name}[{i}]")
        if not ids:
            raise ValueError(
                f"{name}[{i}] has no tokens (an empty text prompt tokenizes to nothing here): "
                "a model needs at least one prompt token to predict the first response token"
            )
        if rows is not None and max(ids) >= rows:
            raise ValueError(
                f"{name}[{i}]: token id {max(ids)} is beyond reward model {i}'s {rows} "
                "embedding rows"
            )
        encoded.append(ids)
    return encoded


def build_carrier(base_ids: Sequence[int], own: Sequence[Sequence[int] | None]
                  ) -> tuple[list[int], list[int]]:
    """(carrier prompt ids, genarm_prompt_lengths) of a request with per-model prompts."""
    ids = list(base_ids)
    lengths = []
    for entry in own:
        if entry is None:
            lengths.append(-1)
        else:
            ids += list(entry)
            lengths.append(len(entry))
    return ids, lengths


def has_own_prompts(encoded: Sequence | None) -> bool:
    return bool(encoded) and any(e is not None for e in encoded)


def check_prompt_lengths(value: object, num_reward_models: int | None,
                         name: str = PROMPT_LENGTHS_KEY) -> list[int]:
    """A valid genarm_prompt_lengths value (one int >= 1 or -1 per reward model)."""
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1) for v in value
    ):
        raise ValueError(
            f"{name} must be a list of ints, one per reward model: its own prompt's length "
            f"(>= 1), or -1 when it reads the base's prompt; got {value!r}"
        )
    if num_reward_models is not None and len(value) != num_reward_models:
        raise ValueError(
            f"{name} must have one entry per reward model ({num_reward_models}), got {len(value)}"
        )
    return list(value)


def segments(carrier_length: int, lengths: Sequence[int]) -> list[tuple[int, int]] | None:
    """(offset, length) in the carrier of the base's prompt, then of each reward model's
    prompt (the base's segment for -1); None if the lengths do not fit the carrier."""
    own = [n for n in lengths if n != -1]
    base_length = carrier_length - sum(own)
    if base_length < 1:
        return None
    result = [(0, base_length)]
    offset = base_length
    for n in lengths:
        if n == -1:
            result.append((0, base_length))
        else:
            result.append((offset, n))
            offset += n
    return result


def split_carrier(carrier: Sequence[int], lengths: Sequence[int]) -> tuple[list[int], list]:
    """(base prompt ids, per-model own prompt ids or None) of a carrier prompt."""
    segs = segments(len(carrier), lengths)
    if segs is None:
        raise ValueError(f"{PROMPT_LENGTHS_KEY} {list(lengths)} do not fit a prompt of "
                         f"{len(carrier)} tokens")
    base = list(carrier[: segs[0][1]])
    own = [None if n == -1 else list(carrier[o:o + n]) for n, (o, _) in zip(lengths, segs[1:])]
    return base, own


def parse_xargs_prompts(value: object, num_reward_models: int | None) -> list:
    """The per-model prompts of a `genarm_prompts` vllm_xargs value (a list of strings)."""
    import json

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f"{PROMPTS_KEY} must be a list of strings, one per reward model: "
            f"'{BASE_PROMPT_SENTINEL}' (reads the base's prompt), a text prompt, or "
            f"'{JSON_PREFIX}' followed by a JSON list of token ids or chat messages; got {value!r}"
        )
    prompts = []
    for i, v in enumerate(value):
        if v == BASE_PROMPT_SENTINEL:
            prompts.append(None)
        elif v.startswith(JSON_PREFIX):
            try:
                prompts.append(json.loads(v[len(JSON_PREFIX):]))
            except json.JSONDecodeError as e:
                raise ValueError(f"{PROMPTS_KEY}[{i}]: invalid JSON after '{JSON_PREFIX}': {e}") from None
        else:
            prompts.append(v)
    if num_reward_models is None:
        num_reward_models = len(prompts)
    return check_prompts(prompts, num_reward_models, PROMPTS_KEY)
