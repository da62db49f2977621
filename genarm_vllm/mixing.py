"""The GenARM decoding rule, in one place.

    z = log_softmax(base) + sum_i (w_i / beta) * log_softmax(arm_i)

i.e. pi_dec proportional to pi_base * prod_i pi_arm_i^(w_i / beta) (GenARM, ICLR 2025,
and the official code's model-arithmetic formula). Temperature, top-k and top-p are the
sampler's job and act on z afterwards, exactly as the official code does.

log_softmax(x) is x minus one constant per row, so the rule is computed on raw logits:
z differs from the formula above by a per-row constant, which the sampler's softmax,
top-k / top-p and vLLM's log-prob normalisation all ignore. That saves a log-softmax per
model per step (the decoding distribution and returned logprobs are unchanged).

The rule itself is `combine_logprobs`; `mix_logprobs` applies it to raw logits and is
what everything that decodes with GenARM calls (the vLLM engine, the Hugging Face
reference decoder, benchmarks, tests). The engine keeps the logits of a step
(`vocab_logits`) so that per-request guidance only re-runs `combine_logprobs`.
`check_guidance` is the one validation of user-given beta / weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def mix_logprobs(
    base_logits: torch.Tensor,
    reward_logits: Sequence[torch.Tensor],
    beta: torch.Tensor,
    weights: torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:
    """GenARM mixed next-token scores from raw logits, in float32.

    Args:
        base_logits: [N, Vb] base-model logits.
        reward_logits: K tensors [N, Vi], one per autoregressive reward model (ARM).
        beta: [N] per-row beta (> 0).
        weights: [N, K] per-row weight alpha_i of each reward model.
        vocab_size: the tokenizer length V; padded vocabulary columns beyond it are
            dropped before the softmax, as the official code does.

    Returns:
        [N, Vb] scores: the mixed log-probabilities up to a per-row constant. Token ids
        >= V, and ids that a reward model with a non-zero weight does not have, are -inf.
    """
    return combine_logprobs(
        vocab_logits(base_logits, vocab_size),
        [vocab_logits(logits, vocab_size) for logits in reward_logits],
        beta,
        weights,
        width=base_logits.shape[-1],
    )


def vocab_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A model's float32 logits of the ids below the tokenizer length: [N, min(V, Vi)].

    Its log-probs up to a per-row constant (see the module doc).
    """
    return logits[:, :vocab_size].float()


def combine_logprobs(
    base_logprobs: torch.Tensor,
    reward_logprobs: Sequence[torch.Tensor],
    beta: torch.Tensor,
    weights: torch.Tensor,
    width: int,
    *,
    in_place: bool = False,
) -> torch.Tensor:
    """The GenARM rule: base + sum_i (w_i / beta) * arm_i.

    Inputs are log-probs up to a per-row constant each (vocab_logits), the output too.

    Returns [N, width]; ids the base lacks, and ids a reward model with a non-zero weight
    lacks, are -inf. A zero weight leaves the row exactly as the base has it.
    With in_place=True the reward terms are added to `base_logprobs` itself, which must
    already be [N, width] (the engine re-mixing vLLM's logits without a copy).
    """
    if len(reward_logprobs) != weights.shape[-1]:
        raise ValueError(
            f"got {len(reward_logprobs)} reward models but {weights.shape[-1]} weights per row"
        )
    num_rows, base_width = base_logprobs.shape
    if in_place:
        if base_width != width:
            raise ValueError(f"in-place mixing needs [N, {width}] scores, got {base_width} columns")
        mixed = base_logprobs
    else:
        mixed = base_logprobs.new_full((num_rows, width), -math.inf)
        mixed[:, :base_width] = base_logprobs
    coefficients = weights.float() / beta.float().unsqueeze(-1)  # [N, K]
    for i, logprobs in enumerate(reward_logprobs):
        coefficient = coefficients[:, i : i + 1]
        shared = min(base_width, logprobs.shape[-1])
        # Logits of a model's own ids are finite, so a zero weight adds exactly 0.
        mixed[:, :shared].addcmul_(logprobs[:, :shared], coefficient)
        if shared < base_width:  # ids this reward model lacks: impossible unless weight 0
            mixed[:, shared:base_width].masked_fill_(coefficient != 0, -math.inf)
    return mixed


def check_beta(beta: object, name: str = "beta") -> float:
    """A valid beta as float; ValueError naming `name` and the allowed range otherwise."""
    if (
        isinstance(beta, bool)
        or not isinstance(beta, (int, float))
        or not math.isfinite(beta)
        or beta <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {beta!r}")
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
    return [float(w) for w in weights]


def check_guidance(beta: object, weights: object, num_reward_models: int) -> tuple[float, list[float]]:
    """Validate user-given guidance and return it as (float beta, list of float weights)."""
    return check_beta(beta), check_weights(weights, num_reward_models)


def resolve_guidance(
    guidance: object,
    num_prompts: int,
    default_beta: float,
    default_weights: Sequence[float],
) -> list[tuple[float, list[float]] | None]:
    """Per-prompt (beta, weights) from the `guidance` argument of the generate calls.

    `guidance` is None (engine defaults for all), one dict {"beta": ..., "weights": [...]}
    for every prompt, or a list with one dict (or None) per prompt. A dict may leave out
    either key; the default fills it in. None entries mean "engine defaults".
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
        if not isinstance(item, dict) or set(item) - {"beta", "weights"}:
            raise ValueError(
                f"guidance[{i}] must be a dict with keys 'beta' and/or 'weights', got {item!r}"
            )
        try:
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
