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

How it reaches the engine (the "carrier" request; engine/prompt_views.py runs it): the
request vLLM schedules has as prompt the base's prompt ids, padded with its last id to the
longest model prompt's length S, and carries `extra_args["genarm_carrier"]`
(`build_carrier`): the base's prompt length, each reward model's own prompt ids (None:
it reads the base's prompt) and the KV block size the layout was made for. Every model's
tokens then sit in rows of that one stream (`CarrierLayout`). This module is light (no
vLLM, no torch): the API server process, the CLI and the reference decoder use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PROMPTS_KEY = "genarm_prompts"  # vllm_xargs: one string per reward model (see parse_xargs_prompts)
CARRIER_KEY = "genarm_carrier"  # extra_args of a carrier request (scheduler and worker side)

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


def same_as_base(encoded: Sequence[Sequence[int] | None], base_ids: Sequence[int]) -> list:
    """`encoded` with every own prompt equal to the base's prompt ids read as None: that
    model reads the same tokens either way, and a request left without own prompts stays
    a plain one (no carrier, vLLM's fast path)."""
    base = [int(t) for t in base_ids]
    return [None if e is not None and [int(t) for t in e] == base else e for e in encoded]


def chat_prompts(messages: Sequence[Mapping], renders_own: Sequence[bool]) -> list | None:
    """The per-model prompt entries of a chat request under `genarm_own_chat_templates`
    (guidance.OWN_CHAT_TEMPLATES_FIELD): the messages for each model that renders chats
    with its own chat template (renders_own[i]), None (the base's rendering) for the
    others; None when no model does. A request that gives "prompts" itself keeps them."""
    if not any(renders_own):
        return None
    messages = list(messages)
    return [messages if own else None for own in renders_own]


def text_messages(messages: Sequence[Mapping], name: str = "messages") -> list[dict]:
    """OpenAI chat messages as {"role", "content": str}: a list of content parts becomes
    its text parts joined by newlines, as vLLM's "string" content format does
    (vllm/renderers/chat_utils.py); other parts (images, audio) are refused."""
    result = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if content is None:
            content = ""
        elif not isinstance(content, str):
            texts = []
            for part in content:
                part = dict(part) if isinstance(part, Mapping) else {"type": type(part).__name__}
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"{name}[{i}]: reward models rendering chats with their own chat "
                        f"template read text only, got a {part.get('type')!r} content part"
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        result.append({"role": str(m.get("role")), "content": content})
    return result


def build_carrier(base_ids: Sequence[int], own: Sequence[Sequence[int] | None],
                  block_size: int) -> tuple[list[int], dict]:
    """(carrier prompt ids, its extra_args[CARRIER_KEY]) of a request whose models read the
    own prompts `own` (None: the base's prompt), for an engine of KV block size `block_size`."""
    if not base_ids:
        raise ValueError("the base's prompt has no tokens")
    length = max([len(base_ids)] + [len(ids) for ids in own if ids is not None])
    ids = list(base_ids) + [int(base_ids[-1])] * (length - len(base_ids))
    info = {"base_length": len(base_ids), "block_size": int(block_size),
            "prompt_ids": [None if e is None else [int(t) for t in e] for e in own]}
    return ids, info


def has_own_prompts(encoded: Sequence | None) -> bool:
    return bool(encoded) and any(e is not None for e in encoded)


def _is_ids(value: object) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value))


def check_carrier(info: object, num_reward_models: int | None, carrier_length: int | None = None,
                  name: str = CARRIER_KEY) -> dict:
    """A valid genarm_carrier value (see build_carrier); ValueError naming the problem."""
    if not isinstance(info, Mapping) or set(info) != {"base_length", "block_size", "prompt_ids"}:
        raise ValueError(f"{name} must be a dict with 'base_length', 'block_size' and "
                         f"'prompt_ids' (made by genarm_vllm.prompts.build_carrier), got {info!r}")
    base_length, block_size, own = info["base_length"], info["block_size"], info["prompt_ids"]
    for key, value in (("base_length", base_length), ("block_size", block_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}['{key}'] must be an int >= 1, got {value!r}")
    if not isinstance(own, (list, tuple)) or not all(e is None or _is_ids(e) for e in own):
        raise ValueError(f"{name}['prompt_ids'] must be a list with, per reward model, None or "
                         f"a non-empty list of token ids; got {own!r}")
    if num_reward_models is not None and len(own) != num_reward_models:
        raise ValueError(f"{name}['prompt_ids'] must have one entry per reward model "
                         f"({num_reward_models}), got {len(own)}")
    longest = max([base_length] + [len(e) for e in own if e is not None])
    if carrier_length is not None and carrier_length != longest:
        raise ValueError(f"{name} does not fit a prompt of {carrier_length} tokens (its longest "
                         f"model prompt has {longest})")
    return dict(info)


class CarrierLayout:
    """Where each model's tokens sit in a carrier request of S prompt rows (block size B).

    Model m (the base, then each reward model) with a prompt of L tokens starts at row
    s = ((S - L) // B) * B, a block boundary: its token j < L - 1 is computed at row s + j
    and stored in KV slot s + j of its own layers (row = slot: a prefix-cache hit of H
    rows holds exactly the tokens of rows < H); its last prompt token at row S - 1 (the
    row vLLM samples the first response token from), slot s + L - 1; response token t at
    row S + t, slot s + L + t. Its attention reads the request's block table from block
    s // B on, with its own positions 0, 1, ... Models reading the base's prompt share the
    base's place. Every slot a model writes after its regular prompt tokens lies at or
    beyond `cacheable_tokens`, the prefix vLLM may hash and share (plugin.py caps it).
    """

    def __init__(self, carrier_length: int, info: Mapping):
        self.length = carrier_length
        self.block_size = info["block_size"]
        base = info["base_length"]
        self.lengths = [base] + [base if e is None else len(e) for e in info["prompt_ids"]]
        b = self.block_size
        self.starts = [((carrier_length - n) // b) * b for n in self.lengths]

    def cacheable_tokens(self) -> int:
        """Rows below which every model holds only regular prompt tokens (slot = row)."""
        return min(s + n - 1 for s, n in zip(self.starts, self.lengths))


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
