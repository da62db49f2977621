"""Quantized models in GenARM (tiny models, CPU): a GPTQ int4 base with full-weight ARMs, a
LoRA ARM running stacked through the base's quantized layers, and quantized ARMs with their
own quantization config (AWQ, and GPTQ of another group size) next to the GPTQ base.

The checkpoints are written here in the real on-disk formats (genarm_vllm/quantize_testing.py),
with dequantized float32 copies of exactly the same weights for the reference decoder.

Precision: vLLM runs GPTQ/AWQ only in bfloat16 or float16 (`get_supported_act_dtypes`; the CPU
kernel `cpu_gemm_wna16` has no float32 path), so the engine is bfloat16 while the reference
is float32 on the same weights. Token-for-token equality then holds only where the
reference's choice is clear: the check is teacher-forced along the engine's own output, and
every token the engine picked must be the reference's argmax or within BF16_TOLERANCE of it
(see `assert_greedy_matches`).
"""

import json

import pytest
import torch
from vllm import SamplingParams

from genarm_vllm.mixing import mix_logits
from genarm_vllm.quantize_testing import quantize_checkpoint
from genarm_vllm.reference import ReferenceDecoder
from genarm_vllm.testing import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
ENGINE_ARGS = dict(dtype="bfloat16", beta=0.5)

# Measured here (Sapphire Rapids, AMX; 6 prompts x 16 tokens, teacher-forced on the engine's
# output against the float32 reference on the same weights), max deficit per guidance
# setting: 1.31 / 1.44 / 0.82 / 0.41 / 1.03 / 1.34, 91.7-96.9 % of steps at the argmax. All of
# it is bf16 model error, none the mix's (issue 27): the mix runs in float32 on the models'
# bf16 logits (mixing.tokenizer_scores), the engine's pick was the argmax of a float64
# log-softmax mix of its own published logits in 576 of 576 steps, and the worst case (1.44)
# is the base ALONE (weights 0): plain vLLM on the GPTQ base, restricted to the tokenizer's
# ids as the mix is, decodes the same tokens with the same 1.44
# (test_unguided_engine_is_plain_vllm_on_tokenizer_ids). The base's bf16 log-probs are up to
# 1.33 nats off the float32 ones already at the first step. (An earlier note's 0.27 for plain
# vLLM let it pick the padded ids 75-83, which no tokenizer has: another trajectory.)
# bf16 kernels differ between CPUs (AVX2 vs AMX): the tolerance keeps a 2x margin.
BF16_TOLERANCE = 3.0
MIN_EXACT_STEPS = 0.8  # and at least this share of steps must be the reference's argmax


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    """GPTQ (group 32) base, AWQ (group 64) ARM of the base's shape, GPTQ (group 64) Qwen2
    ARM, a LoRA adapter trained on the (dequantized) base, and their reference copies."""
    from test_lora_arm import build_adapter

    from genarm_vllm.training import merge_adapter

    root = tmp_path_factory.mktemp("quantized")
    made = {}
    for name, src, method, group in (("base", tiny["base"], "gptq", 32),
                                     ("arm_awq", tiny["arm_same"], "awq", 64),
                                     ("arm_gptq64", tiny["arm_qwen2"], "gptq", 64)):
        made[name], made[f"{name}_deq"] = quantize_checkpoint(
            src, root / name, root / f"{name}_deq", method=method, group_size=group)
    made["lora"] = build_adapter(made["base_deq"], root / "lora", seed=1)
    # trained on the dequantized weights, i.e. on the quantized base (same weights)
    config_file = made["lora"] / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(made["base"])}))
    made["lora_merged"] = merge_adapter(made["base_deq"], made["lora"], root / "lora_merged")
    return made


ARMS = ["arm_small", "lora", "arm_awq", "arm_gptq64"]  # full float, LoRA, AWQ, GPTQ-64


def arm_paths(tiny, quantized, reference=False):
    def path(name):
        if name in tiny:
            return tiny[name]
        return quantized[f"{name}_merged" if name == "lora" else f"{name}_deq"] if reference \
            else quantized[name]
    return [path(a) for a in ARMS]


@pytest.fixture(scope="module")
def llm(tiny, quantized, engine):
    return engine("quantized gptq base", base=quantized["base"],
                  reward_paths=arm_paths(tiny, quantized), **ENGINE_ARGS)


@pytest.fixture(scope="module")
def ref(tiny, quantized):
    return ReferenceDecoder(quantized["base_deq"], arm_paths(tiny, quantized, reference=True),
                            beta=ENGINE_ARGS["beta"])


@torch.inference_mode()
def teacher_forced_deficits(ref, prompts, outputs, weights):
    """Per prompt, per step: the reference's best mixed score minus the score of the token the
    engine picked (0 where the engine picked the reference's argmax), and the top-2 gap."""
    result = []
    for prompt, out in zip(prompts, outputs):
        ids = ref.tokenizer(prompt).input_ids
        full = torch.tensor([ids + out])
        rows = slice(len(ids) - 1, len(ids) - 1 + len(out))
        logits = [m(input_ids=full).logits[0, rows].float() for m in [ref.base, *ref.reward_models]]
        n = len(out)
        scores = mix_logits(logits[0], logits[1:], torch.full((n,), ref.beta),
                            torch.tensor([weights] * n), ref.vocab_size)
        top2 = scores.topk(2).values
        chosen = scores[torch.arange(n), torch.tensor(out)]
        result.append(((top2[:, 0] - chosen).tolist(), (top2[:, 0] - top2[:, 1]).tolist()))
    return result


@pytest.fixture(scope="module")
def ref_bf16(tiny, quantized):
    """The same reference in bfloat16: how far bf16 alone moves greedy decoding."""
    return ReferenceDecoder(quantized["base_deq"], arm_paths(tiny, quantized, reference=True),
                            beta=ENGINE_ARGS["beta"], dtype=torch.bfloat16)


def assert_greedy_matches(llm, ref, weights, ref_bf16=None, prompts=PROMPTS):
    got = token_ids(llm.generate(prompts, GREEDY, guidance={"weights": weights}))
    want = ref.generate(prompts, 16, guidance={"weights": weights}, ignore_eos=True)
    measured = teacher_forced_deficits(ref, prompts, got, weights)
    deficits = [d for ds, _ in measured for d in ds]
    exact = sum(d == 0 for d in deficits) / len(deficits)
    line = (f"weights {weights}: rows equal {sum(g == w for g, w in zip(got, want))}/{len(got)}, "
            f"steps at the reference's argmax {exact:.2%}, max deficit {max(deficits):.4f}, "
            f"smallest top-2 gap {min(g for _, gs in measured for g in gs):.4f}")
    if ref_bf16 is not None:
        bf = ref_bf16.generate(prompts, 16, guidance={"weights": weights}, ignore_eos=True)
        bf_def = [d for ds, _ in teacher_forced_deficits(ref, prompts, bf, weights) for d in ds]
        line += (f"; bf16 transformers: rows equal {sum(b == w for b, w in zip(bf, want))}, "
                 f"argmax {sum(d == 0 for d in bf_def) / len(bf_def):.2%}, "
                 f"max deficit {max(bf_def):.4f}")
    print(line)  # shown when the test fails
    assert max(deficits) <= BF16_TOLERANCE, (got, want, measured)
    assert exact >= MIN_EXACT_STEPS, (got, want, measured)
    return got


def test_gptq_base_with_full_weight_arm(llm, ref, ref_bf16):
    got = assert_greedy_matches(llm, ref, [1.0, 0.0, 0.0, 0.0], ref_bf16)
    # the ARM steers (the unguided base decodes otherwise)
    assert got != token_ids(llm.generate(PROMPTS, GREEDY, guidance={"weights": [0.0] * 4}))


def test_gptq_base_unguided(llm, ref, ref_bf16):
    assert_greedy_matches(llm, ref, [0.0, 0.0, 0.0, 0.0], ref_bf16)


def test_lora_arm_on_gptq_base(llm, ref, ref_bf16):
    assert_greedy_matches(llm, ref, [0.0, 1.0, 0.0, 0.0], ref_bf16)


def test_awq_arm_on_gptq_base(llm, ref, ref_bf16):
    assert_greedy_matches(llm, ref, [0.0, 0.0, 1.0, 0.0], ref_bf16)


def test_gptq_arm_of_other_group_size(llm, ref, ref_bf16):
    assert_greedy_matches(llm, ref, [0.0, 0.0, 0.0, 1.0], ref_bf16)


def test_all_arms_together(llm, ref, ref_bf16):
    assert_greedy_matches(llm, ref, [1.0, 0.5, -0.5, 0.8], ref_bf16)


def test_unguided_engine_is_plain_vllm_on_tokenizer_ids(llm, quantized, engine):
    """Zero weights: the bf16 GenARM engine decodes exactly as plain vLLM on the same GPTQ
    base, greedy over the tokenizer's ids (the base's padded ids are -inf in the mix), with
    the base run stacked with the LoRA ARM. So its bf16 deficits above are the base's own."""
    from genarm_vllm.engine.validation import tokenizer_length

    plain = engine("plain gptq base", plain=True, base=quantized["base"], dtype="bfloat16")
    ids = list(range(tokenizer_length(str(quantized["base"]))))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, allowed_token_ids=ids)
    assert token_ids(llm.generate(PROMPTS, GREEDY, guidance={"weights": [0.0] * len(ARMS)})) \
        == token_ids(plain.generate(PROMPTS, params))


def test_arm_quantization_is_its_own(llm):
    """Each sub-model's linear layers follow its own checkpoint: GPTQ in the base, none in
    the float ARM, AWQ and GPTQ-64 in the quantized ARMs; the LoRA ARM's A/B are float."""
    model = llm.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model

    def method(module):
        qm = module.quant_method
        return type(qm).__name__, getattr(getattr(qm, "quant_config", None), "group_size", None)

    assert method(model.base.model.layers[0].self_attn.qkv_proj) == ("AutoGPTQLinearMethod", 32)
    assert method(model.arm_a.model.layers[0].self_attn.qkv_proj)[0] == "UnquantizedLinearMethod"
    assert method(model.arm_c.model.layers[0].mlp.down_proj) == ("AutoAWQMarlinLinearMethod", 64)
    assert method(model.arm_d.model.layers[0].mlp.gate_up_proj) == ("AutoGPTQLinearMethod", 64)
    assert method(model.base.lm_head)[0] == "UnquantizedEmbeddingMethod"
    assert model.arm_b.layers[0].lora["qkv_proj"].lora_a.dtype == torch.float32


def test_quantized_arm_in_float32_engine_is_refused(quantized):
    """float32 cannot run GPTQ/AWQ in vLLM: the error names the reward model."""
    from transformers import AutoConfig
    from vllm.config import ModelConfig

    from genarm_vllm.engine.model import reward_model_quant_config

    class Fake:  # the two attributes reward_model_quant_config reads
        def __init__(self, dtype):
            self.model_config = ModelConfig(model=str(quantized["base_deq"]), dtype=dtype,
                                            max_model_len=64)
            self.model_config.hf_config = AutoConfig.from_pretrained(quantized["arm_awq"])
            self.model_config.model_arch_config = self.model_config.get_model_arch_config()
            from vllm.config import LoadConfig

            self.load_config = LoadConfig()

    config = reward_model_quant_config(Fake("bfloat16"), quantized["arm_awq"])
    assert type(config).__name__ == "AutoAWQConfig" and config.group_size == 64
    with pytest.raises(ValueError, match=f"reward model {quantized['arm_awq']} is quantized "
                                         r"\(awq\).*float32 is not supported"):
        reward_model_quant_config(Fake("float32"), quantized["arm_awq"])
