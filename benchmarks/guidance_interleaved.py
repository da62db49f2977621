"""Uniform vs per-request guidance, interleaved in one engine (bf16, SmolLM2-135M, ARM = base).

    python benchmarks/guidance_interleaved.py

Four alternating pairs at batch 8 and 64 (32 output tokens, >= 3 s each), so that drift of
a shared machine hits both sides alike; prints each pair's het/uniform.
"""
import sys; sys.path.insert(0, "benchmarks")
from genarm_vllm.runtime import use_local_env; use_local_env()
import throughput as t
from genarm_vllm import GuidedLLM
from genarm_vllm.engine.validation import tokenizer_length
t.BENCHMARK_ENGINE_ARGS["dtype"] = "bfloat16"
base = t._default_base()
llm = GuidedLLM(base, [base], beta=1.0, **t.BENCHMARK_ENGINE_ARGS)
for batch in (8, 64):
    prompts = t.random_prompts(tokenizer_length(str(base)), batch, 32, seed=batch)
    t.vllm_tokens_per_s(llm, prompts[:2], 4)
    ratios = []
    for _ in range(4):
        uniform = t.vllm_tokens_per_s(llm, prompts, 32, min_seconds=3.0)
        het = t.vllm_tokens_per_s(llm, prompts, 32, t.heterogeneous_guidance(batch, 1), min_seconds=3.0)
        ratios.append(het / uniform)
        print(f"batch {batch}: uniform {uniform:.1f} tok/s, het {het:.1f} tok/s, het/uniform {het/uniform:.3f}", flush=True)
