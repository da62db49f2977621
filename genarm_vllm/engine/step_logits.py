"""The hand-off of each step's logits from GenARMForCausalLM to GenARMLogitsProcessor.

Light (torch only): the processor module imports it, and vLLM imports the processor in
its API server process too, where no model code should load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genarm_vllm.guidance import ARCHITECTURE
from genarm_vllm.mixing import combine_scores, guidance_coefficients


@dataclass
class StepLogits:
    """Scores (mixing.tokenizer_scores) of the latest compute_logits call, one row per logits row."""

    base: torch.Tensor  # [N, min(V, Vb)]
    arms: list[torch.Tensor]  # K x [N, min(V, Vi)], one per reward model
    width: int  # the base's logits width Vb, which the sampler expects
    default_beta: torch.Tensor  # [1]
    default_weights: torch.Tensor  # [1, K]

    def mix(self, beta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The GenARM mix of every row with per-row beta [N] and weights [N, K]."""
        return combine_scores(self.base, self.arms, guidance_coefficients(beta, weights), self.width)

    def mix_defaults(self) -> torch.Tensor:
        num_rows = self.base.shape[0]
        return self.mix(self.default_beta.expand(num_rows), self.default_weights.expand(num_rows, -1))


# Logits processors see logits only, never the model. They run in the worker process,
# after the compute_logits call of the step they sample (vLLM 0.33 also calls compute_logits
# for prompt logprobs, after sampling; the next step publishes anew before its processors
# run). The model hands them each step's logits here, keyed by the engine: model and
# processor are built with the same VllmConfig object (vLLM's model runner passes its own
# to both), so two engines in one process never read each other's logits.
STEP_LOGITS: dict[int, StepLogits] = {}


def publish_step_logits(vllm_config, step: StepLogits) -> None:
    STEP_LOGITS[id(vllm_config)] = step


def take_step_logits(vllm_config) -> StepLogits:
    """The latest step's logits, removed from the hand-off: K+1 float32 [rows x vocab]
    tensors must not outlive their step (vLLM 0.33's dummy sampler run alone publishes
    max_num_reqs rows, ~1 GiB with 1024 sequences, a 128k vocabulary and one ARM)."""
    step = STEP_LOGITS.pop(id(vllm_config), None)
    if step is None:
        raise RuntimeError(
            "GenARM logits processor ran before GenARMForCausalLM computed any logits: "
            f"it only works with the {ARCHITECTURE} architecture"
        )
    return step


def release_step_logits(vllm_config) -> None:
    """Drop the latest step's logits unread (a step no request re-mixes)."""
    STEP_LOGITS.pop(id(vllm_config), None)
