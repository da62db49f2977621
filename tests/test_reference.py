
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genarm_vllm.mixing import mix_logits
from genarm_vllm.reference import ReferenceDecoder, top_k_top_p_filter
from genarm_vllm.testing import build_model, build_tokenizer

PROMPTS = ["the cat sat on", "a dog", "happy sun is very warm and bright", "we"]


def no_cache_greedy(base, arms, prompt_ids, steps, beta, weights, vocab):
    """Recompute every model on the full sequence at every step: no KV cache, no padding."""
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
              for p in [base, *arms]]
    ids, out = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(steps):
            x = torch.tensor([ids])
            logits = [m(x).logits[:, -1] for m in models]
            nxt = int(mix_logits(logits[0], logits[1:], torch.tensor([beta]),
                                   torch.tensor([weights]), vocab).argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


@pytest.mark.parametrize("arm_names, beta, weights", [
    (["arm_same"], 1.0, [1.0]),
    (["arm_small", "arm_qwen2"], 0.5, [1.0, -0.7]),
])
def test_greedy_equals_no_cache_loop(tiny, arm_names, beta, weights):
    arms = [tiny[a] for a in arm_names]
    decoder = ReferenceDecoder(tiny["base"], arms, beta=beta, weights=weights)
    got = decoder.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    for prompt, tokens in zip(PROMPTS, got):
        want = no_cache_greedy(tiny["base"], arms, tok(prompt).input_ids, 8, beta, weights,
                               len(tok))
        assert tokens == want, prompt


def test_batched_equals_batch_size_one(tiny):
    decoder = ReferenceDecoder(tiny["base"], [tiny["arm_small"]], beta=0.8)
    assert decoder.generate(PROMPTS, 10) == decoder.generate(PROMPTS, 10, batch_size=1)


def test_guidance_moves_output_and_zero_weight_is_base(tiny):
    base_only = ReferenceDecoder(tiny["base"])
    guided = ReferenceDecoder(tiny["base"], [tiny["arm_same"]], beta=0.2)
    plain = base_only.generate(PROMPTS, 8, ignore_eos=True)
    assert guided.generate(PROMPTS, 8, ignore_eos=True, guidance={"weights": [0.0]}) == plain
    assert guided.generate(PROMPTS, 8, ignore_eos=True) != plain


def test_stops_at_eos_and_keeps_it(tiny):
    decoder = ReferenceDecoder(tiny["base"], [tiny["arm_same"]])
    eos = decoder.eos_token_id
    for tokens in decoder.generate(PROMPTS, 40):
        assert eos not in tokens[:-1]
        assert len(tokens) == 40 or tokens[-1] == eos


def test_seeded_sampling_is_reproducible(tiny):
    decoder = ReferenceDecoder(tiny["base"], [tiny["arm_small"]])
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, ignore_eos=True)
    a = decoder.generate(PROMPTS, seed=7, **kwargs)
    assert a == decoder.generate(PROMPTS, seed=7, **kwargs)
    assert a != decoder.generate(PROMPTS, seed=8, **kwargs)


def test_top_k_top_p_filter():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_k_top_p_filter(scores, 2, 1.0)).tolist() == [[False, False, True, True]]
    # 0.5 + 0.3 reaches 0.8: the third token is dropped at top_p=0.8
    assert torch.isinf(top_k_top_p_filter(scores, 0, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_k_top_p_filter(scores, 0, 0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(top_k_top_p_filter(scores, 0, 0.1)).tolist() == [[False, True, True, True]]


def test_bad_inputs_raise_clear_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        ReferenceDecoder(tiny["base"], [tiny["arm_same"]], beta=0)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        ReferenceDecoder(tiny["base"], [tiny["arm_same"]], beta=float("inf"))
    with pytest.raises(ValueError, match="one entry per reward model"):
        ReferenceDecoder(tiny["base"], [tiny["arm_same"]], weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="finite numbers"):
        ReferenceDecoder(tiny["base"], [tiny["arm_same"]], weights=[float("nan")])
    other_tok = build_tokenizer(tmp_path / "tok", corpus_seed=1)  # other ids for the same words
    other = build_model(tmp_path / "other_arm", other_tok)
    with pytest.raises(ValueError, match=r"different tokenizer than base model .*token id \d+"):
        ReferenceDecoder(tiny["base"], [other])
