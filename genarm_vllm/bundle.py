"""Bundle folders: a base model plus reward models that plain vLLM loads as one model.

A bundle is the base model's folder with its config.json rewritten to name the
GenARMForCausalLM architecture and the GenARM fields; every other file is a symlink to
the base's, and reward models are referenced by absolute path, so nothing is copied.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from genarm_vllm.guidance import composite_fields, read_bundle


def pack(
    base: str | os.PathLike,
    reward_models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    beta: float = 1.0,
    weights: Sequence[float] | None = None,
    own_chat_templates: bool = False,
) -> Path:
    """Write a bundle folder at `out` (see module doc) and return its path.

    own_chat_templates: stored in the bundle (genarm_own_chat_templates): in chat requests
    each reward model renders the messages with its own tokenizer's chat template."""
    from genarm_vllm.engine.validation import check_reward_models

    base, out = Path(base).resolve(), Path(out)
    if not (base / "config.json").is_file():
        raise ValueError(f"base model folder {base} has no config.json")
    for path in reward_models:
        # A full model folder, or a PEFT LoRA adapter folder trained on the base
        # (genarm_vllm/engine/lora_arm.py: it runs on the base's own weights).
        if not ((Path(path) / "config.json").is_file()
                or (Path(path) / "adapter_config.json").is_file()):
            raise ValueError(f"reward model folder {path} has no config.json "
                             "(a model) or adapter_config.json (a LoRA adapter)")
    overrides = composite_fields(base, reward_models, beta, weights, own_chat_templates)
    check_reward_models(str(base), overrides["genarm_reward_models"],
                        own_chat_templates=own_chat_templates)
    if out.exists() and any(out.iterdir()) and read_bundle(out) is None:
        raise ValueError(f"{out} exists and is not a GenARM bundle; refusing to overwrite it")
    # Re-packing a bundle starts afresh: no entry of a previous base (e.g. an old weight
    # shard) may stay behind.
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for entry in base.iterdir():
        if entry.name != "config.json":
            (out / entry.name).symlink_to(entry)
    config = json.loads((base / "config.json").read_text())
    config.update(overrides)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
