import math

import pytest
import torch

from genarm_vllm.mixing import combine_scores, guidance_coefficients, mix_logits, tokenizer_scores


def normalised(scores):
    """The decoding distribution's log-probs: what mixed scores mean up to a per-row constant."""
    return torch.log_softmax(scores.double(), dim=-1)


def float64_mix(base, arms, beta, weights, vocab):
    """The GenARM rule written out by hand, row by row, in float64."""
    rows, width = base.shape
    out = torch.full((rows, width), -math.inf, dtype=torch.float64)
    for r in range(rows):
        b = base[r, :vocab].double()
        total = b - torch.logsumexp(b, 0)
        for i, arm in enumerate(arms):
            a = arm[r, :vocab].double()
            lp = a - torch.logsumexp(a, 0)
            coef = weights[r, i].item() / beta[r].item()
            for j in range(total.shape[0]):
                # an id the reward model lacks is impossible, whatever its weight
                total[j] = total[j] + coef * lp[j] if j < lp.shape[0] else -math.inf
        out[r, : total.shape[0]] = total
    return out


@pytest.mark.parametrize("num_arms", [1, 2])
def test_matches_float64_by_hand(num_arms):
    g = torch.Generator().manual_seed(num_arms)
    rows, vocab = 6, 50
    base = torch.randn(rows, 56, generator=g) * 3  # padded beyond the tokenizer length
    arm_widths = [64, 50][:num_arms]
    arms = [torch.randn(rows, w, generator=g) * 3 for w in arm_widths]
    beta = torch.rand(rows, generator=g) + 0.1
    weights = torch.randn(rows, num_arms, generator=g)
    got = mix_logits(base, arms, beta, weights, vocab)
    want = float64_mix(base, arms, beta, weights, vocab)
    assert got.dtype == torch.float32 and got.shape == base.shape
    assert torch.isinf(got[:, vocab:]).all() and (got[:, vocab:] < 0).all()
    torch.testing.assert_close(normalised(got[:, :vocab]), normalised(want[:, :vocab]), rtol=1e-5, atol=1e-4)


def test_reward_model_with_smaller_vocab_masks_missing_ids():
    g = torch.Generator().manual_seed(0)
    base, arm = torch.randn(3, 40, generator=g), torch.randn(3, 30, generator=g)
    beta, weights = torch.ones(3), torch.tensor([[1.0], [-0.5], [0.0]])  # negative: not +inf
    got = mix_logits(base, [arm], beta, weights, vocab_size=40)
    # Every model reads the sampled token next: ids the ARM lacks are never sampled, even
    # at weight 0 (and no 0 * -inf = NaN); the ids it has keep the base's exact logits.
    assert torch.isneginf(got[:, 30:]).all() and not torch.isnan(got).any()
    assert torch.equal(got[2, :30], base[2, :30])
    want = float64_mix(base, [arm], beta, weights, 40)
    torch.testing.assert_close(normalised(got), normalised(want), rtol=1e-5, atol=1e-4)


def test_in_place_mix_equals_the_new_tensor_mix():
    g = torch.Generator().manual_seed(2)
    base = tokenizer_scores(torch.randn(4, 48, generator=g), 48)
    arms = [tokenizer_scores(torch.randn(4, w, generator=g), 48) for w in (48, 40)]
    beta, weights = torch.rand(4, generator=g) + 0.1, torch.randn(4, 2, generator=g)
    want = combine_scores(base, arms, guidance_coefficients(beta, weights), width=48)
    scores = base.clone()
    assert combine_scores(scores, arms, guidance_coefficients(beta, weights), width=48, in_place=True) is scores
    assert torch.equal(scores, want)
    with pytest.raises(ValueError, match="in-place mixing needs"):
        combine_scores(base, arms, guidance_coefficients(beta, weights), width=56, in_place=True)


def test_zero_weights_give_exactly_the_base_logits():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 32, generator=g)
    arms = [torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)]
    got = mix_logits(base, arms, torch.full((4,), 0.3), torch.zeros(4, 2), 32)
    assert torch.equal(got, base)
    assert not torch.isnan(got).any()


def test_beta_scales_the_reward_term():
    g = torch.Generator().manual_seed(2)
    base, arm = torch.randn(2, 20, generator=g), torch.randn(2, 20, generator=g)
    w = torch.ones(2, 1)
    at_1 = mix_logits(base, [arm], torch.ones(2), w, 20) - base
    at_half = mix_logits(base, [arm], torch.full((2,), 0.5), w, 20) - base
    torch.testing.assert_close(at_half, 2 * at_1)
    # weight alpha and beta only act through alpha / beta
    torch.testing.assert_close(
        mix_logits(base, [arm], torch.full((2,), 2.0), 3 * w, 20),
        mix_logits(base, [arm], torch.ones(2), 1.5 * w, 20),
    )


def test_per_row_guidance_is_independent():
    g = torch.Generator().manual_seed(3)
    base, arm = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g)
    beta, w = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([[1.0], [0.2], [-1.0]])
    batch = mix_logits(base, [arm], beta, w, 20)
    for r in range(3):
        alone = mix_logits(base[r : r + 1], [arm[r : r + 1]], beta[r : r + 1], w[r : r + 1], 20)
        torch.testing.assert_close(batch[r : r + 1], alone)
