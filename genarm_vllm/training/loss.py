"""The GenARM objective and the summed response log-probs it is built on.

An ARM is an ordinary causal LM pi_r whose reward of a response y to a prompt x is the summed
log-probability r(x, y) = sum_t log pi_r(y_t | x, y_<t) over the response tokens. GenARM
(Xu et al., ICLR 2025, arXiv 2410.08193; github.com/Yuancheng-Xu/GenARM) trains it on pairs
(y_w preferred to y_l) with

    L = -log sigmoid(beta_r * (r(x, y_w) - r(x, y_l)) - gamma)

summed over tokens (not averaged), with no reference model.
"""

from __future__ import annotations

from genarm_vllm.training.data import IGNORE, Pair, collate


def arm_preference_loss(chosen_logps, rejected_logps, beta_r: float, gamma: float = 0.0):
    """GenARM loss per pair: -log sigmoid(beta_r * (r_chosen - r_rejected) - gamma).

    chosen_logps / rejected_logps: [N] summed response log-probs (see response_logps).
    Returns [N] losses; the batch loss is their mean.
    """
    import torch.nn.functional as F

    return -F.logsigmoid(beta_r * (chosen_logps - rejected_logps) - gamma)


def response_logps(logits, labels):
    """Per-sequence summed log-prob of the scored tokens: r = sum_t log pi(y_t | prefix).

    logits: [B, T, V]; labels: [B, T] token ids, IGNORE (-100) at positions not scored
    (prompt, padding). logits[:, t] predicts the token at t + 1. Returns [B], float32.
    """
    import torch.nn.functional as F

    # cross_entropy gives -log pi per position and exactly 0 where the label is ignored.
    token_nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
        reduction="none",
    )
    return -token_nll.sum(-1)


def batch_logps(model, batch: dict, vocab_size: int):
    """(chosen, rejected) summed response log-probs of a `collate` batch, one forward pass."""
    labels = batch["labels"]
    # Logits only from the position before the first scored token on: the earlier ones
    # predict prompt tokens, and the vocabulary projection is a large share of a small
    # model's cost.
    first = int((labels != IGNORE).any(0).int().argmax())
    keep = labels.shape[1] - max(first - 1, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False, logits_to_keep=keep).logits
    # Normalise over the tokenizer's vocabulary only, as GenARM decoding does: padded
    # vocabulary columns are dropped before the softmax.
    logps = response_logps(logits[..., :vocab_size], labels[:, -keep:])
    half = labels.shape[0] // 2
    return logps[:half], logps[half:]


def pair_logps(model, pairs: list[Pair], pad_id: int, vocab_size: int):
    """(chosen, rejected) summed response log-probs of `pairs`, one forward pass for both."""
    return batch_logps(model, collate(pairs, pad_id), vocab_size)


def margin_metrics(beta_r: float, gamma: float):
    """compute_metrics for ARMTrainer: held-out accuracy (share of pairs with r(chosen) >
    r(rejected)), mean margin, and the GenARM loss over the held-out pairs."""
    import numpy as np

    def compute(eval_prediction) -> dict:
        margins = np.asarray(eval_prediction.predictions, dtype=np.float64).reshape(-1)
        return {"accuracy": float((margins > 0).mean()), "mean_margin": float(margins.mean()),
                "pair_loss": float(np.logaddexp(0.0, -(beta_r * margins - gamma)).mean())}

    return compute
