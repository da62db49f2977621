"""GenARM guidance: what a user asks for (beta and one weight per reward model), checked.

Guidance reaches the engine in three shapes, all defined here:

- the composite model's config fields (a bundle's config.json, or `hf_overrides`):
      architectures               ["GenARMForCausalLM"]
      genarm_base_architectures   the base model's own architectures, e.g. ["LlamaForCausalLM"]
      genarm_reward_models        [path, ...] reward model folders, in weight order
      genarm_beta                 default beta (1.0)
      genarm_weights              default weight per reward model (1.0 each)
      genarm_own_chat_templates   true: each reward model renders chat requests with its
                                  own tokenizer's chat template (default false; written only
                                  when true)
- per request, `SamplingParams.extra_args` (over HTTP the `vllm_xargs` body field):
      {"genarm_beta": 0.5, "genarm_weights": [1.0, 0.3]}
  and "genarm_prompts" (per-model prompts, genarm_vllm/prompts.py)
- per prompt in the Python API ({"beta": ..., "weights": [...], "prompts": [...]}) and per
  row of a batch job (the row's "beta" / "weights" / "prompts" fields).
- a reward model may be the word "self" (SELF_MODEL): the base as its own guide.

Every user-given beta and weight list goes through `check_beta` / `check_weights`.
This module is light (no vLLM or torch import): the API server process and the CLI use it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from genarm_vllm.prompts import check_prompts

ARCHITECTURE = "GenARMForCausalLM"

# A reward model given as this word is the base model itself as a guiding model: it runs
# on the base's weights with its own attention layers and KV cache (engine/lora_arm.py),
# useful with its own per-request prompt (genarm_vllm/prompts.py): CFG with a negative
# prompt and a negative weight, or context-aware decoding.
SELF_MODEL = "self"


def model_path(path) -> str:
    """A reward model as stored in configs: "self" as is, a folder as its absolute path."""
    path = str(path)
    return path if path == SELF_MODEL else str(Path(path).resolve())

# Request keys of SamplingParams.extra_args / vllm_xargs.
BETA_KEY = "genarm_beta"
WEIGHTS_KEY = "genarm_weights"

# Config field: under it a chat request (messages) gives every reward model not on the
# base's weights those messages as its own prompt (genarm_vllm/prompts.py chat_prompts).
OWN_CHAT_TEMPLATES_FIELD = "genarm_own_chat_templates"


def check_own_chat_templates(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{OWN_CHAT_TEMPLATES_FIELD} must be true or false, got {value!r}")
    return value


# Each value has its own range, so that every coefficient w_i / beta has magnitude <= 1e30
# whatever the other values are (a request may give beta alone, its weights being the
# engine's): finite in float32 (max 3.4e38) even times logits of magnitude up to 3e8.
MIN_BETA = 1e-15
MAX_ABS_WEIGHT = 1e15


def check_beta(beta: object, name: str = "beta") -> float:
    """A valid beta as float; ValueError naming `name` and the allowed range otherwise."""
    if (
        isinstance(beta, bool)
        or not isinstance(beta, (int, float))
        or not math.isfinite(beta)
        or beta <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {beta!r}")
    if beta < MIN_BETA:
        raise ValueError(
            f"{name} must be >= {MIN_BETA:g} (smaller values make the coefficients "
            f"weight / beta overflow float32), got {beta!r}"
        )
    return float(beta)


def check_weights(weights: object, num_reward_models: int, name: str = "weights") -> list[float]:
    """Valid weights (one finite number per reward model) as floats; ValueError otherwise."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(
            f"{name} must be a list of {num_reward_models} finite numbers "
            f"(one per reward model), got {weights!r}"
        )
    if len(weights) != num_reward_models:
        raise ValueError(
            f"{name} must have one entry per reward model ({num_reward_models}), "
            f"got {len(weights)}: {list(weights)!r}"
        )
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"{name} must be finite numbers, got {list(weights)!r}")
        if abs(w) > MAX_ABS_WEIGHT:
            raise ValueError(
                f"{name} must lie in [-{MAX_ABS_WEIGHT:g}, {MAX_ABS_WEIGHT:g}] (larger values "
                f"make the coefficients weight / beta overflow float32), got {list(weights)!r}"
            )
    return [float(w) for w in weights]


def check_guidance(beta: object, weights: object, num_reward_models: int) -> tuple[float, list[float]]:
    """Validate user-given guidance and return it as (float beta, list of float weights)."""
    return check_beta(beta), check_weights(weights, num_reward_models)


# ----------------------------------------------------------------------------- config fields


@dataclass
class GuidanceConfig:
    """The GenARM fields of a composite model's hf_config, validated."""

    base_architectures: list[str]
    reward_models: list[str]
    beta: float
    weights: list[float]
    own_chat_templates: bool = False

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> GuidanceConfig:
        """From the genarm_* fields (a bundle's config.json or hf_overrides)."""
        reward_models = [str(p) for p in fields.get("genarm_reward_models") or []]
        if not reward_models:
            raise ValueError(
                f"{ARCHITECTURE} needs genarm_reward_models (a list of reward model folders) "
                "in its config"
            )
        weights = fields.get("genarm_weights")
        own_chat_templates = check_own_chat_templates(fields.get(OWN_CHAT_TEMPLATES_FIELD, False))
        return cls(
            base_architectures=list(fields.get("genarm_base_architectures") or []),
            reward_models=reward_models,
            beta=check_beta(fields.get("genarm_beta", 1.0), "genarm_beta"),
            weights=check_weights(
                [1.0] * len(reward_models) if weights is None else weights,
                len(reward_models),
                "genarm_weights",
            ),
            own_chat_templates=own_chat_templates,
        )

    @classmethod
    def from_hf_config(cls, hf_config) -> GuidanceConfig:
        return cls.from_fields(
            {k: v for k, v in vars(hf_config).items() if k.startswith("genarm_")}
        )


def read_bundle(path: str | os.PathLike) -> dict | None:
    """The GenARM fields of a bundle's config.json, or None if `path` is not a bundle."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if ARCHITECTURE not in (config.get("architectures") or []):
        return None
    return {k: v for k, v in config.items() if k.startswith("genarm_")}


def composite_fields(
    base: str | os.PathLike,
    reward_models: Sequence[str | os.PathLike],
    beta: float = 1.0,
    weights: Sequence[float] | None = None,
    own_chat_templates: bool = False,
) -> dict:
    """The hf_config fields that turn the model folder `base` into a GenARM composite."""
    base_config = json.loads((Path(base) / "config.json").read_text())
    if ARCHITECTURE in (base_config.get("architectures") or []):
        raise ValueError(f"{base} is already a GenARM bundle; pass its own base model instead")
    reward_models = [model_path(p) for p in reward_models]
    if weights is None:
        weights = [1.0] * len(reward_models)
    beta, weights = check_guidance(beta, weights, len(reward_models))
    check_own_chat_templates(own_chat_templates)
    fields = {
        "architectures": [ARCHITECTURE],
        "genarm_base_architectures": base_config.get("architectures") or [],
        "genarm_reward_models": reward_models,
        "genarm_beta": beta,
        "genarm_weights": weights,
    }
    if own_chat_templates:  # absent means false: configs without the option stay as they were
        fields[OWN_CHAT_TEMPLATES_FIELD] = True
    return fields


def genarm_fields(
    model: str | os.PathLike,
    reward_models: Sequence[str | os.PathLike] | None = None,
    beta: float | None = None,
    weights: Sequence[float] | None = None,
    own_chat_templates: bool | None = None,
) -> tuple[dict, GuidanceConfig]:
    """The validated GenARM config fields for `model`, and what they say.

    `model` is a bundle (its own fields are the defaults; beta / weights /
    own_chat_templates override them) or a base model folder, which then needs reward models.
    """
    bundle = read_bundle(model)
    if bundle is None:
        if not reward_models:
            raise ValueError(f"{model} is not a GenARM bundle: give at least one reward model")
        fields = composite_fields(model, reward_models, 1.0 if beta is None else beta, weights,
                                  own_chat_templates or False)
    else:
        fields = dict(bundle)
        given = [model_path(p) for p in reward_models or []]
        if given and given != fields["genarm_reward_models"]:
            raise ValueError(
                f"{model} is a bundle of {fields['genarm_reward_models']}; pass its base model "
                "to use other reward models"
            )
        if beta is not None:
            fields["genarm_beta"] = beta
        if weights is not None:
            fields["genarm_weights"] = weights
        if own_chat_templates is not None:
            fields[OWN_CHAT_TEMPLATES_FIELD] = own_chat_templates
    guidance = GuidanceConfig.from_fields(fields)
    fields.update(genarm_beta=guidance.beta, genarm_weights=guidance.weights)
    return fields, guidance


# ----------------------------------------------------------------------------- per request


def request_guidance(
    params, num_reward_models: int | None
) -> tuple[float | None, list[float] | None] | None:
    """The (beta, weights) a request's SamplingParams override (either may be None), or
    None if neither. With num_reward_models=None the weights count is not checked."""
    extra = params.extra_args or {}
    if BETA_KEY not in extra and WEIGHTS_KEY not in extra:
        return None
    beta = check_beta(extra[BETA_KEY], BETA_KEY) if BETA_KEY in extra else None
    weights = None
    if WEIGHTS_KEY in extra:
        given = extra[WEIGHTS_KEY]
        if num_reward_models is None:
            num_reward_models = len(given) if isinstance(given, (list, tuple)) else 1
        weights = check_weights(given, num_reward_models, WEIGHTS_KEY)
    return beta, weights


def with_guidance(params, beta: float, weights: list[float]):
    """A copy of SamplingParams `params` carrying this guidance in its extra_args."""
    params = params.clone()
    params.extra_args = {**(params.extra_args or {}), BETA_KEY: beta, WEIGHTS_KEY: weights}
    return params


def resolve_guidance(
    guidance: object,
    num_prompts: int,
    default_beta: float,
    default_weights: Sequence[float],
) -> list[tuple[float, list[float]] | None]:
    """Per-prompt (beta, weights) from the `guidance` argument of the generate calls.

    `guidance` is None (engine defaults for all), one dict {"beta": ..., "weights": [...]}
    for every prompt, or a list with one dict (or None) per prompt. A dict may leave out
    either key; the default fills it in. None entries mean "engine defaults". A dict may
    also carry "prompts" (per-model prompts, genarm_vllm/prompts.py), checked here and
    read by `resolve_prompts`.
    """
    if guidance is None or isinstance(guidance, dict):
        guidance = [guidance] * num_prompts
    if not isinstance(guidance, Sequence) or len(guidance) != num_prompts:
        raise ValueError(
            f"guidance must be None, one dict, or a list of {num_prompts} dicts/None "
            f"(one per prompt), got {type(guidance).__name__}"
            + (f" of length {len(guidance)}" if isinstance(guidance, Sequence) else "")
        )
    resolved = []
    for i, item in enumerate(guidance):
        if item is None:
            resolved.append(None)
            continue
        if not isinstance(item, dict) or set(item) - {"beta", "weights", "prompts"}:
            raise ValueError(
                f"guidance[{i}] must be a dict with keys 'beta' and/or 'weights' (and "
                f"optionally 'prompts'), got {item!r}"
            )
        try:
            if item.get("prompts") is not None:
                check_prompts(item["prompts"], len(default_weights))
            resolved.append(
                check_guidance(
                    item.get("beta", default_beta),
                    item.get("weights", default_weights),
                    len(default_weights),
                )
            )
        except ValueError as e:
            raise ValueError(f"guidance[{i}]: {e}") from None
    return resolved


def resolve_prompts(guidance: object, num_prompts: int, num_reward_models: int) -> list:
    """Per prompt: its per-model prompt entries (checked), or None (no own prompts)."""
    if guidance is None or isinstance(guidance, dict):
        guidance = [guidance] * num_prompts
    result = []
    for i, item in enumerate(guidance):
        entries = item.get("prompts") if isinstance(item, dict) else None
        if entries is not None:
            entries = check_prompts(entries, num_reward_models, f"guidance[{i}]['prompts']")
        result.append(entries)
    return result


def row_guidance(row: Mapping, num_reward_models: int) -> dict | None:
    """A batch-job row's own guidance ({"beta"?, "weights"?, "prompts"?}, checked), or None."""
    guidance = {}
    if "beta" in row:
        guidance["beta"] = check_beta(row["beta"])
    if "weights" in row:
        guidance["weights"] = check_weights(row["weights"], num_reward_models)
    if row.get("prompts") is not None:
        guidance["prompts"] = check_prompts(row["prompts"], num_reward_models)
    return guidance or None
