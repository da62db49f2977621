"""The GenARM decoding rule, in one place.

    z = log_softmax(base) + sum_i (w_i / beta) * log_softmax(arm_i)

i.e. pi_dec proportional to pi_base * prod_i pi_arm_i^(w_i / beta) (GenARM, ICLR 2025,
and the official code's model-arithmetic formula). Temperature, top-k and top-p are the
sampler's job and act on z afterwards, exactly as the official code does.

log_softmax(x) is x minus one constant per row, so the rule is computed on raw logits:
z differs from the formula above by a per-row constant, which the sampler's softmax,
top-k / top-p and vLLM's log-prob normalisation all ignore. That saves a log-softmax per
model per step (the decoding distribution and returned logprobs are unchanged).

The rule itself is `combine_scores`, on each model's float32 scores of the tokenizer's ids
(`tokenizer_scores`) and one coefficient w_i / beta per reward model and row
(`guidance_coefficients`). `mix_logits` applies it to raw logits in one call (the Hugging
Face reference decoder, benchmarks, tests). The vLLM engine keeps each step's
`tokenizer_scores` (engine/step_logits.py) and calls `combine_scores` itself: once with the
engine's default guidance, and again, in place, for requests that carry their own.
What users may ask for (beta, weights) is checked in guidance.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def mix_logits(
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
        >= V, and ids that some reward model does not have, are -inf.
    """
    return combine_scores(
        tokenizer_scores(base_logits, vocab_size),
        [tokenizer_scores(logits, vocab_size) for logits in reward_logits],
        guidance_coefficients(beta, weights),
        width=base_logits.shape[-1],
    )


def tokenizer_scores(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A float32 copy of a model's logits of the ids below the tokenizer length:
    [N, min(V, Vi)], its log-probs up to a per-row constant (see the module doc)."""
    return logits[:, :vocab_size].float()


def guidance_coefficients(beta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each reward model's coefficient w_i / beta per row: [N, K] from beta [N], weights [N, K]."""
    return weights.float() / beta.float().unsqueeze(-1)


def combine_scores(
    base_scores: torch.Tensor,
    reward_scores: Sequence[torch.Tensor],
    coefficients: torch.Tensor,
    width: int,
    *,
    in_place: bool = False,
) -> torch.Tensor:
    """The GenARM rule: base + sum_i c_i * arm_i, with c_i = w_i / beta (guidance_coefficients).

    Inputs are log-probs up to a per-row constant each (tokenizer_scores), the output too.

    Returns [N, width]; ids the base lacks, and ids any reward model lacks, are -inf,
    whatever the weights: every model reads the sampled token at the next step, so an id
    one of them cannot embed must never be sampled. Otherwise a zero weight leaves the row
    exactly as the base has it.
    With in_place=True the reward terms are added to `base_scores` itself, which must
    already be [N, width] (the engine re-mixing vLLM's logits without a copy).
    """
    if len(reward_scores) != coefficients.shape[-1]:
        raise ValueError(
            f"got {len(reward_scores)} reward models but {coefficients.shape[-1]} weights per row"
        )
    num_rows, base_width = base_scores.shape
    if in_place:
        if base_width != width:
            raise ValueError(f"in-place mixing needs [N, {width}] scores, got {base_width} columns")
        mixed = base_scores
    else:
        mixed = base_scores.new_full((num_rows, width), -math.inf)
        mixed[:, :base_width] = base_scores
    for i, scores in enumerate(reward_scores):
        coefficient = coefficients[:, i : i + 1]
        shared = min(base_width, scores.shape[-1])
        # Logits of a model's own ids are finite, so a zero weight adds exactly 0.
        mixed[:, :shared].addcmul_(scores[:, :shared], coefficient)
        mixed[:, shared:base_width] = -math.inf  # ids this reward model lacks: never sampled
    return mixed
