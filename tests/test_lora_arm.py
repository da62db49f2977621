"""LoRA reward models on the base's own weights (genarm_vllm/engine/lora_arm.py), tiny models, CPU,
float32: the engine against the reference decoder with the MERGED adapters."""

import json
import math
import shutil

import pytest
import torch
from vllm import SamplingParams

from genarm_vllm.engine.lora_adapter import TARGETS, check_adapter, read_adapter
from genarm_vllm.reference import ReferenceDecoder
from genarm_vllm.testing import PROMPTS, build_model, build_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
ALL = list(TARGETS)


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def build_adapter(base, path, *, seed, targets=ALL, r=8, alpha=16, rslora=False, std=0.15):
    """A PEFT LoRA adapter on `base` with random A and B (PEFT's B=0 init would make the ARM
    the base itself), saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    """Adapters on the tiny base and their merged full-model folders."""
    from genarm_vllm.training import merge_adapter

    root = tmp_path_factory.mktemp("lora")
    made = {
        "all": build_adapter(tiny["base"], root / "all", seed=1),
        # attention only, another rank, rsLoRA scaling (alpha / sqrt(r))
        "qkv": build_adapter(tiny["base"], root / "qkv", seed=2, targets=["q_proj", "v_proj"],
                             r=4, alpha=8, rslora=True, std=0.3),
    }
    for name in list(made):
        made[f"{name}_merged"] = merge_adapter(tiny["base"], made[name], root / f"{name}_merged")
    return made


def test_greedy_equals_reference_with_merged_arm(tiny, engine, lora):
    llm = engine("lora all", reward_paths=[lora["all"]], beta=0.5)
    want = ReferenceDecoder(tiny["base"], [lora["all_merged"]], beta=0.5).generate(
        PROMPTS, 16, ignore_eos=True)
    got = token_ids(llm.generate(PROMPTS, GREEDY))
    assert got == want
    # The ARM steers: with weight 0 the output is the base's own, and it differs.
    plain = ReferenceDecoder(tiny["base"]).generate(PROMPTS, 16, ignore_eos=True)
    assert got != plain
    assert token_ids(llm.generate(PROMPTS, GREEDY, guidance={"weights": [0.0]})) == plain


MIXED = ["all", "arm_small", "qkv"]  # two LoRA ARMs around a full-weight ARM of another shape
GUIDANCE = [
    None,
    {"beta": 0.3},
    {"weights": [0.0, 1.0, 0.0]},
    {"beta": 2.0, "weights": [1.0, 1.0, 1.0]},
    {"beta": 0.5, "weights": [-1.0, 0.5, 1.0]},
    {"weights": [0.0, 0.0, 1.0]},
]


def mixed(tiny, lora, engine=None):
    paths = [lora[m] if m in lora else tiny[m] for m in MIXED]
    merged = [lora[f"{m}_merged"] if m in lora else tiny[m] for m in MIXED]
    kwargs = dict(beta=0.7, weights=[1.0, -0.5, 0.8])
    llm = engine("lora mixed", reward_paths=paths, **kwargs) if engine else None
    return llm, ReferenceDecoder(tiny["base"], merged, **kwargs)


def test_two_lora_arms_next_to_a_full_weight_arm(tiny, engine, lora):
    llm, ref = mixed(tiny, lora, engine)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == ref.generate(PROMPTS, 16, ignore_eos=True)
    # per-request guidance in one batch, each row its own mix of the three ARMs
    want = ref.generate(PROMPTS, 16, guidance=GUIDANCE, ignore_eos=True)
    assert token_ids(llm.generate(PROMPTS, GREEDY, guidance=GUIDANCE)) == want


def test_weight_memory_is_the_base_plus_the_adapters(tiny, engine, lora):
    from safetensors import safe_open

    llm, _ = mixed(tiny, lora, engine)
    model = llm.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model

    def file_bytes(folder, name):  # float32 engine: 4 bytes per stored element
        with safe_open(str(folder / name), "pt") as f:
            return sum(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys())

    def padding_bytes(folder):  # vLLM pads embedding and LM head rows to a multiple of 64
        from transformers import AutoConfig
        from vllm.model_executor.layers.vocab_parallel_embedding import pad_vocab_size

        c = AutoConfig.from_pretrained(str(folder))
        matrices = 1 if c.tie_word_embeddings else 2
        return 4 * matrices * (pad_vocab_size(c.vocab_size) - c.vocab_size) * c.hidden_size

    base = file_bytes(tiny["base"], "model.safetensors") + padding_bytes(tiny["base"])
    small = file_bytes(tiny["arm_small"], "model.safetensors") + padding_bytes(tiny["arm_small"])
    adapters = sum(file_bytes(lora[a], "adapter_model.safetensors") for a in ("all", "qkv"))
    assert model.loaded_parameter_bytes == base + small + adapters
    assert adapters < base / 4  # and a merged copy would have cost `base` per LoRA ARM
    assert read_adapter(lora["all"]).num_parameters * 4 == file_bytes(
        lora["all"], "adapter_model.safetensors")


def test_preemption_and_prefix_caching_leave_output_unchanged(tiny, engine, lora):
    long = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    paths = [lora["all"], lora["qkv"]]
    normal = engine("lora two", reward_paths=paths, beta=1.0)
    prefix = " ".join([PROMPTS[2]] * 12)  # longer than one KV block: cached
    block_size = normal.llm.llm_engine.vllm_config.cache_config.block_size
    prompts = [prefix + " " + p for p in PROMPTS] * 2
    want = token_ids(normal.generate(prompts, long))
    again = normal.generate(prompts, long)
    assert token_ids(again) == want
    assert all(out.num_cached_tokens >= block_size for out in again)
    tight = engine("lora two tight", reward_paths=paths, beta=1.0, num_gpu_blocks_override=16,
                   block_size=32, max_num_seqs=12, disable_log_stats=False)
    assert token_ids(tight.generate(prompts, long)) == want
    assert sum(m.value for m in tight.llm.get_metrics() if m.name == "vllm:num_preemptions") > 0
    ref = ReferenceDecoder(tiny["base"], [lora["all_merged"], lora["qkv_merged"]])
    assert want[:2] == ref.generate(prompts[:2], 96, ignore_eos=True)


def test_bad_adapters_are_refused_with_the_reason(tiny, lora, tmp_path):
    from genarm_vllm import GuidedLLM

    # trained on another base: other hidden size
    tokenizer = build_tokenizer(tmp_path / "tok")
    other = build_model(tmp_path / "other", tokenizer, seed=5, hidden_size=64,
                        intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    wrong = build_adapter(other, tmp_path / "wrong", seed=3)
    with pytest.raises(ValueError, match=r"down_proj: lora_A \[8, 128\] and lora_B \[64, 8\] need \[8, 256\] and \[128, 8\].*another base"):
        GuidedLLM(tiny["base"], [wrong])
    # more layers than the base
    deep = build_model(tmp_path / "deep", tokenizer, seed=6, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"adapts layers\.2, but base model .* has 2 layers"):
        check_adapter(str(tiny["base"]), build_adapter(deep, tmp_path / "deep_lora", seed=4))
    # a target module the shared-weight forward does not know
    odd = tmp_path / "odd"
    shutil.copytree(lora["qkv"], odd)
    config = json.loads((odd / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj", "lm_head"]
    (odd / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown target module\(s\) lm_head"):
        GuidedLLM(tiny["base"], [odd])
    # DoRA is refused, not silently run as LoRA
    config["target_modules"], config["use_dora"] = ["q_proj", "v_proj"], True
    (odd / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="DoRA is not supported"):
        check_adapter(str(tiny["base"]), odd)
    # tensor parallelism is refused until the adapters are sharded
    with pytest.raises(ValueError, match="tensor_parallel_size=2 is not supported for LoRA"):
        GuidedLLM(tiny["base"], [lora["all"]], tensor_parallel_size=2)


def test_pack_bundle_with_an_adapter_loads_in_plain_vllm(tiny, engine, lora, tmp_path):
    from genarm_vllm.cli import main

    bundle = tmp_path / "bundle"
    assert main(["pack", "--base", str(tiny["base"]), "--reward-model", str(lora["all"]),
                 "--beta", "0.5", "--out", str(bundle)]) == 0
    config = json.loads((bundle / "config.json").read_text())
    assert config["genarm_reward_models"] == [str(lora["all"].resolve())]
    plain = engine("lora bundle", plain=True, model=str(bundle))  # no GenARM code named
    want = ReferenceDecoder(tiny["base"], [lora["all_merged"]], beta=0.5).generate(
        PROMPTS, 16, ignore_eos=True)
    assert token_ids(plain.generate(PROMPTS, GREEDY)) == want


@pytest.mark.slow
def test_train_arm_lora_adapter_is_a_reward_model_as_saved(tiny, engine, tmp_path_factory):
    """`train-arm --mode lora --merge --save-adapter` on the base (GenARM's recipe): the saved
    adapter folder steers like the merged ARM folder train-arm writes next to it."""
    from genarm_vllm.cli import main
    from genarm_vllm.testing import random_corpus

    root = tmp_path_factory.mktemp("lora_train")
    lines = random_corpus(120, seed=7)
    rows = [{"prompt": a, "chosen": " happy good", "rejected": " sad bad"} for a in lines]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "arm"
    assert main(["train-arm", "--init", str(tiny["base"]), "--data", str(root / "prefs.jsonl"),
                 "--out", str(out), "--mode", "lora", "--lora-targets", "q_proj,v_proj,down_proj",
                 "--merge", "--save-adapter", "--epochs", "1", "--lr", "3e-3", "--batch-size", "8",
                 "--seed", "1"]) == 0
    adapter = out / "lora_adapter"
    llm = engine("lora trained", reward_paths=[adapter], beta=0.5)
    want = ReferenceDecoder(tiny["base"], [out], beta=0.5).generate(PROMPTS, 16, ignore_eos=True)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == want
    assert want != ReferenceDecoder(tiny["base"]).generate(PROMPTS, 16, ignore_eos=True)
