"""Bundle folders: a base model plus reward models that plain vLLM loads as one model.

A bundle is the base model's folder with its config.json rewritten to name the
GenARMForCausalLM architecture and the GenARM fields; every other file is a symlink to
the base's, and reward models are referenced by absolute path, so nothing is copied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from genarm_vllm.config import ARCHITECTURE, GuidanceConfig
from genarm_vllm.mixing import check_guidance


def guidance_overrides(
    base: str | os.PathLike,
    reward_models: Sequence[str | os.PathLike],
    beta: float = 1.0,
    weights: Sequence[float] | None = None,
) -> dict:
    """The hf_config fields that turn `base` into a GenARM composite model."""
    base_config = json.loads((Path(base) / "config.json").read_text())
    if ARCHITECTURE in (base_config.get("architectures") or []):
        raise ValueError(f"{base} is already a GenARM bundle; pass its own base model instead")
    reward_models = [str(Path(p).resolve()) for p in reward_models]
    if weights is None:
        weights = [1.0] * len(reward_models)
    beta, weights = check_guidance(beta, weights, len(reward_models))
    return {
        "architectures": [ARCHITECTURE],
        "genarm_base_architectures": base_config.get("architectures") or [],
        "genarm_reward_models": reward_models,
        "genarm_beta": beta,
        "genarm_weights": weights,
    }


def genarm_fields(
    model: str | os.PathLike,
    reward_models: Sequence[str | os.PathLike] | None = None,
    beta: float | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[dict, GuidanceConfig]:
    """The validated GenARM config fields for `model`, and what they say.

    `model` is a bundle (its own fields are the defaults; beta / weights override them)
    or a base model folder, which then needs reward models.
    """
    bundle = read_bundle(model)
    if bundle is None:
        if not reward_models:
            raise ValueError(f"{model} is not a GenARM bundle: give at least one reward model")
        fields = guidance_overrides(model, reward_models, 1.0 if beta is None else beta, weights)
    else:
        fields = dict(bundle)
        given = [str(Path(p).resolve()) for p in reward_models or []]
        if given and given != fields["genarm_reward_models"]:
            raise ValueError(
                f"{model} is a bundle of {fields['genarm_reward_models']}; pass its base model "
                "to use other reward models"
            )
        if beta is not None:
            fields["genarm_beta"] = beta
        if weights is not None:
            fields["genarm_weights"] = weights
    guidance = GuidanceConfig.from_fields(fields)
    fields.update(genarm_beta=guidance.beta, genarm_weights=guidance.weights)
    return fields, guidance


def read_bundle(path: str | os.PathLike) -> dict | None:
    """The GenARM fields of a bundle's config.json, or None if `path` is not a bundle."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if ARCHITECTURE not in (config.get("architectures") or []):
        return None
    return {k: v for k, v in config.items() if k.startswith("genarm_")}


def pack(
    base: str | os.PathLike,
    reward_models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    beta: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Path:
    """Write a bundle folder at `out` (see module doc) and return its path."""
    from genarm_vllm.validation import check_reward_models

    base, out = Path(base).resolve(), Path(out)
    if not (base / "config.json").is_file():
        raise ValueError(f"base model folder {base} has no config.json")
    for path in reward_models:
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"reward model folder {path} has no config.json")
    overrides = guidance_overrides(base, reward_models, beta, weights)
    check_reward_models(str(base), overrides["genarm_reward_models"])
    if out.exists() and any(out.iterdir()) and read_bundle(out) is None:
        raise ValueError(f"{out} exists and is not a GenARM bundle; refusing to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    for entry in base.iterdir():
        if entry.name == "config.json":
            continue
        link = out / entry.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(entry)
    config = json.loads((base / "config.json").read_text())
    config.update(overrides)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
