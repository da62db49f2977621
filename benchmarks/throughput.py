"""Offline throughput: how close guided decoding gets to the cost of running the models at all.

Same prompts, same fixed output lengths (ignore_eos) through:
  (a) plain vLLM, base model only        (b) plain vLLM, ARM only
  (c) the GenARM engine, base + ARM      (c_het) (c) with different guidance per request
  (d) the Hugging Face reference decoder, batched
  (e) the reference decoder at batch size 1 (how the official GenARM code runs)
for each batch size (= requests submitted at once) and each ARM size (same as the base; a
smaller ARM cut from the base's layers). Reports output tokens/s, (c) / the sum-of-parts
bound 1 / (1/a + 1/b), (c) / (d), (c) / (e) and (c_het) / (c).

    python benchmarks/throughput.py --quick --json artifacts/bench/quick.json
    python benchmarks/throughput.py --json artifacts/bench/full.json      # the full sweep
    python benchmarks/throughput.py --lora --dtype bfloat16 --json artifacts/bench/lora_bf16.json

--lora measures a LoRA ARM on the base's own weights (genarm_vllm/engine/lora_arm.py) instead: the
demo's sentiment adapter on SmolLM2-135M-Instruct, batch 1, 8, 64, in one run against
(a) plain vLLM base only, (b) plain vLLM with the merged ARM only, (c) the GenARM engine with
the merged ARM (two weight copies) and (L) the GenARM engine with the adapter (one copy);
reports (L) and (c) over the sum-of-parts bound and as a fraction of (a), the weight bytes
of both GenARM engines, and a time split of one generate call at each batch size.

Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set), eager mode. Every
system, vLLM and Hugging Face alike, runs in the same dtype (--dtype, float32 by default;
bfloat16 is much faster on CPUs with AMX) and the same number of threads (--threads, 1 by
default). The settings and the CPU's vector extensions are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

from genarm_vllm import runtime
from genarm_vllm.engine import defaults

# In-process engines, no hub; 2 GiB of KV cache (batch 128 of the SmolLM2 pair). The thread
# count is --threads, set in main() before torch is imported.
runtime.use_local_env(VLLM_CPU_KVCACHE_SPACE="2")

# Prefix caching off: every run repeats the same prompts, and every system must do the
# same work each time (the HF decoder caches nothing between calls).
BENCHMARK_ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                     enable_prefix_caching=False)


def vllm_engine_kwargs() -> dict:
    """What every vLLM system runs: GuidedLLM's defaults, then this benchmark's settings."""
    return {**defaults.engine_defaults(), **BENCHMARK_ENGINE_ARGS}


def truncated_copy(model_dir: Path, num_layers: int, out: Path) -> Path:
    """`model_dir` cut to its first `num_layers` layers: a smaller ARM of the same tokenizer.

    For cost measurements only (a real small ARM would be trained, see README).
    """
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def random_prompts(vocab_size: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    low = min(100, vocab_size // 2)  # skip the special tokens at the start of most vocabularies
    return [[rng.randrange(low, vocab_size) for _ in range(length)] for _ in range(count)]


def vllm_tokens_per_s(llm, prompts, output_len, guidance=None, min_seconds=0.0) -> float:
    """Output tokens/s, generating again until min_seconds have passed (short runs are noisy)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    kwargs = {} if guidance is None else {"guidance": guidance}
    tokens, elapsed = 0, 0.0
    while tokens == 0 or elapsed < min_seconds:
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False, **kwargs)
        elapsed += time.perf_counter() - start
        tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
    return tokens / elapsed


def reference_tokens_per_s(decoder, prompts, output_len, batch_size) -> float:
    start = time.perf_counter()
    outputs = decoder.generate(prompts, output_len, ignore_eos=True, batch_size=batch_size)
    return sum(len(o) for o in outputs) / (time.perf_counter() - start)


def heterogeneous_guidance(count: int, num_arms: int) -> list[dict]:
    """A different beta and weights for every request."""
    return [{"beta": 0.5 + 0.01 * i, "weights": [1.0 - 0.005 * i] * num_arms} for i in range(count)]


def run(args) -> list[dict]:
    import torch
    from vllm import LLM

    from genarm_vllm import GuidedLLM
    from genarm_vllm.engine.validation import tokenizer_length
    from genarm_vllm.reference import ReferenceDecoder

    base = Path(args.base) if args.base else _default_base()
    arms = {"same": base}
    if not args.quick:
        arms["small"] = truncated_copy(base, args.small_layers, Path(args.work) / "arm_small")
    vocab = tokenizer_length(str(base))
    results = []
    # Plain engines get GuidedLLM's defaults too: (a), (b) and (c) run the same settings.
    plain_kwargs = vllm_engine_kwargs()
    plain_base = LLM(model=str(base), **plain_kwargs)
    keep_alive = [plain_base]  # a collected in-process engine breaks the others
    for arm_name, arm in arms.items():
        plain_arm = LLM(model=str(arm), **plain_kwargs) if arm != base else plain_base
        guided = GuidedLLM(base, [arm], beta=1.0, **BENCHMARK_ENGINE_ARGS)
        keep_alive += [plain_arm, guided]
        reference = ReferenceDecoder(base, [arm], dtype=getattr(torch, BENCHMARK_ENGINE_ARGS["dtype"]))
        warm = random_prompts(vocab, 2, args.prompt_len, seed=99)
        for llm in {id(x): x for x in (plain_base, plain_arm, guided)}.values():
            vllm_tokens_per_s(llm, warm, 4)
        for batch in args.batch_sizes:
            prompts = random_prompts(vocab, batch, args.prompt_len, seed=batch)
            row = {"arm": arm_name, "arm_path": str(arm), "batch": batch}
            measure = dict(output_len=args.output_len, min_seconds=args.min_seconds)
            row["a_base_vllm"] = vllm_tokens_per_s(plain_base, prompts, **measure)
            row["b_arm_vllm"] = vllm_tokens_per_s(plain_arm, prompts, **measure)
            row["c_genarm"] = vllm_tokens_per_s(guided, prompts, **measure)
            row["c_genarm_heterogeneous"] = vllm_tokens_per_s(
                guided, prompts, guidance=heterogeneous_guidance(batch, 1), **measure
            )
            # The HF decoder is slow: measure it on a bounded number of prompts.
            row["d_reference_batched"] = reference_tokens_per_s(
                reference, prompts[: args.reference_max_batch], args.output_len,
                batch_size=args.reference_max_batch,
            )
            row["e_reference_batch1"] = reference_tokens_per_s(
                reference, prompts[: args.batch1_prompts], args.output_len, batch_size=1
            )
            _add_ratios(row)
            if args.profile and batch == max(args.batch_sizes):
                row["profile_uniform"] = profile_breakdown(guided, prompts, args.output_len)
                row["profile_heterogeneous"] = profile_breakdown(
                    guided, prompts, args.output_len, heterogeneous_guidance(batch, 1))
            results.append(row)
            print(_format_row(row), flush=True)
    return results


class _Timer:
    """Wraps a callable and adds up the seconds spent in it (CPU: calls are synchronous)."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def profile_breakdown(guided, prompts, output_len, guidance=None) -> dict:
    """Where a GenARM generate call spends its time: base forward, ARM forwards, logits
    (lm heads + log-softmax + default mix), the per-request re-mix, and the rest
    (sampling, scheduling, input preparation, detokenization). In-process engines only."""
    from vllm import SamplingParams

    from genarm_vllm.engine.logits_processor import GenARMLogitsProcessorV1 as GenARMLogitsProcessor

    model = guided.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    parts = {"base_forward": model.base}
    parts.update({f"{arm.name}_forward": arm.module for arm in model.arms})
    timers = {}
    for key, module in parts.items():
        timers[key] = module.forward = _Timer(module.forward)
    timers["compute_logits_and_mix"] = model.compute_logits = _Timer(model.compute_logits)
    original_apply = GenARMLogitsProcessor.apply
    timers["per_request_remix"] = remix = _Timer(original_apply)
    GenARMLogitsProcessor.apply = lambda self, *a: remix(self, *a)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    try:
        start = time.perf_counter()
        guided.generate([{"prompt_token_ids": p} for p in prompts], params, guidance=guidance,
                        use_tqdm=False)
        total = time.perf_counter() - start
    finally:
        GenARMLogitsProcessor.apply = original_apply
        for key, module in parts.items():
            module.forward = timers[key].fn
        model.compute_logits = timers["compute_logits_and_mix"].fn
    seconds = {k: t.seconds for k, t in timers.items()}
    seconds["sampling_scheduling_other"] = total - sum(seconds.values())
    return {"total_s": total, **{k: {"s": v, "share": v / total} for k, v in seconds.items()}}


def _model_of(llm):
    llm = getattr(llm, "llm", llm)  # GuidedLLM or vllm.LLM
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model


def step_split(llm, prompts, output_len) -> dict:
    """Seconds of one generate call in the model's forward, in compute_logits (LM heads and
    the mix) and elsewhere (sampling, scheduling, input preparation, detokenization)."""
    from vllm import SamplingParams

    model = _model_of(llm)
    timers = {"forward": _Timer(model.forward), "compute_logits": _Timer(model.compute_logits)}
    model.forward, model.compute_logits = timers["forward"], timers["compute_logits"]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    try:
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        total = time.perf_counter() - start
    finally:
        model.forward, model.compute_logits = timers["forward"].fn, timers["compute_logits"].fn
    split = {k: round(t.seconds, 4) for k, t in timers.items()}
    split["other"] = round(total - sum(split.values()), 4)
    return {"total_s": round(total, 4), **split}


def run_lora(args) -> list[dict]:
    """The LoRA ARM on the base's weights against the merged ARM (see module doc)."""
    from vllm import LLM

    from genarm_vllm import GuidedLLM
    from genarm_vllm.demo.arms import ADAPTER, ARM_ROOT, build
    from genarm_vllm.demo.common import ASSETS
    from genarm_vllm.engine.validation import tokenizer_length
    from genarm_vllm.testing import record_loaded_parameter_bytes

    record_loaded_parameter_bytes()
    base = Path(args.base) if args.base else _default_base()
    adapter = ASSETS / "sentiment" / ADAPTER
    merged = build("sentiment", base, ARM_ROOT / "sentiment")  # the demo's merged copy
    vocab = tokenizer_length(str(base))
    plain_kwargs = vllm_engine_kwargs()
    systems = {
        "a_base_vllm": LLM(model=str(base), **plain_kwargs),
        "b_merged_arm_vllm": LLM(model=str(merged), **plain_kwargs),
        "c_genarm_merged": GuidedLLM(base, [merged], beta=1.0, **BENCHMARK_ENGINE_ARGS),
        "l_genarm_lora": GuidedLLM(base, [adapter], beta=1.0, **BENCHMARK_ENGINE_ARGS),
    }
    weight_bytes = {k: _model_of(systems[k]).loaded_parameter_bytes
                    for k in ("c_genarm_merged", "l_genarm_lora")}
    warm = random_prompts(vocab, 2, args.prompt_len, seed=99)
    for llm in systems.values():
        vllm_tokens_per_s(llm, warm, 4)
    results = []
    for batch in args.batch_sizes:
        prompts = random_prompts(vocab, batch, args.prompt_len, seed=batch)
        row = {"arm": "sentiment LoRA", "batch": batch, "dtype": args.dtype,
               "adapter": str(adapter), "merged_arm": str(merged)}
        measure = dict(output_len=args.output_len, min_seconds=args.min_seconds)
        for _ in range(args.repeats):  # interleaved, best of: the machine is shared
            for key, llm in systems.items():
                row[key] = max(row.get(key, 0.0), vllm_tokens_per_s(llm, prompts, **measure))
        bound = 1 / (1 / row["a_base_vllm"] + 1 / row["b_merged_arm_vllm"])
        row["sum_of_parts_bound"] = bound
        row["l_over_bound"] = row["l_genarm_lora"] / bound
        row["c_over_bound"] = row["c_genarm_merged"] / bound
        row["l_over_base"] = row["l_genarm_lora"] / row["a_base_vllm"]
        row["c_over_base"] = row["c_genarm_merged"] / row["a_base_vllm"]
        row["l_over_c"] = row["l_genarm_lora"] / row["c_genarm_merged"]
        row["target_over_bound"] = {1: 1.5, 8: 1.2, 64: 1.0}.get(batch)
        row["weight_bytes_genarm_merged"] = weight_bytes["c_genarm_merged"]
        row["weight_bytes_genarm_lora"] = weight_bytes["l_genarm_lora"]
        if args.profile:
            row["split"] = {k: step_split(systems[k], prompts, args.output_len)
                            for k in ("a_base_vllm", "c_genarm_merged", "l_genarm_lora")}
        results.append(row)
        print(_format_row(row, LORA_COLUMNS), flush=True)
    return results


LORA_COLUMNS = [
    ("dtype", "dtype", "{}"), ("batch", "batch", "{}"),
    ("a_base_vllm", "(a) base tok/s", "{:.1f}"), ("b_merged_arm_vllm", "(b) merged ARM tok/s", "{:.1f}"),
    ("sum_of_parts_bound", "bound tok/s", "{:.1f}"),
    ("c_genarm_merged", "(c) GenARM merged tok/s", "{:.1f}"),
    ("l_genarm_lora", "(L) GenARM LoRA tok/s", "{:.1f}"),
    ("l_over_bound", "(L)/bound", "{:.2f}"), ("target_over_bound", "target", "{}"),
    ("c_over_bound", "(c)/bound", "{:.2f}"),
    ("l_over_base", "(L)/(a)", "{:.2f}"), ("c_over_base", "(c)/(a)", "{:.2f}"),
    ("weight_bytes_genarm_merged", "(c) weight MB", "{:.0f}"),
    ("weight_bytes_genarm_lora", "(L) weight MB", "{:.0f}"),
]


def _add_ratios(row: dict) -> None:
    bound = 1 / (1 / row["a_base_vllm"] + 1 / row["b_arm_vllm"])
    row["sum_of_parts_bound"] = bound
    row["c_over_bound"] = row["c_genarm"] / bound
    row["c_over_d"] = row["c_genarm"] / row["d_reference_batched"]
    row["c_over_e"] = row["c_genarm"] / row["e_reference_batch1"]
    row["heterogeneous_over_uniform"] = row["c_genarm_heterogeneous"] / row["c_genarm"]


COLUMNS = [
    ("arm", "ARM", "{}"), ("batch", "batch", "{}"),
    ("a_base_vllm", "(a) base tok/s", "{:.1f}"), ("b_arm_vllm", "(b) ARM tok/s", "{:.1f}"),
    ("c_genarm", "(c) GenARM tok/s", "{:.1f}"),
    ("c_over_bound", "(c)/bound", "{:.2f}"),
    ("heterogeneous_over_uniform", "het/uniform", "{:.3f}"),
    ("d_reference_batched", "(d) HF batched", "{:.1f}"),
    ("e_reference_batch1", "(e) HF batch 1", "{:.1f}"),
    ("c_over_d", "(c)/(d)", "{:.1f}"), ("c_over_e", "(c)/(e)", "{:.1f}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row[key]
    if key.startswith("weight_bytes"):
        value = value / 1e6
    return fmt.format(value)


def _format_row(row: dict, columns=COLUMNS) -> str:
    return "  ".join(f"{title}={_cell(row, key, fmt)}" for key, title, fmt in columns)


def markdown_table(results: list[dict], columns=COLUMNS) -> str:
    lines = ["| " + " | ".join(t for _, t, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in results:
        lines.append("| " + " | ".join(_cell(row, k, fmt) for k, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted({r["arm"] for r in results})
    fig, axes = plt.subplots(1, len(arms), figsize=(6 * len(arms), 4.5), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        rows = [r for r in results if r["arm"] == arm]
        batches = [r["batch"] for r in rows]
        for key, label in [("a_base_vllm", "(a) vLLM base only"), ("b_arm_vllm", "(b) vLLM ARM only"),
                           ("sum_of_parts_bound", "sum-of-parts bound"),
                           ("c_genarm", "(c) GenARM engine"),
                           ("c_genarm_heterogeneous", "(c) per-request guidance"),
                           ("d_reference_batched", "(d) HF reference, batched"),
                           ("e_reference_batch1", "(e) HF reference, batch 1")]:
            ax.plot(batches, [r[key] for r in rows], marker="o", label=label,
                    linestyle="--" if key == "sum_of_parts_bound" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("requests at once")
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"ARM: {arm}")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)




def _default_base() -> Path:
    from genarm_vllm.demo.smollm2 import DEFAULT_DEST, prepare_smollm2

    return prepare_smollm2(DEFAULT_DEST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--quick", action="store_true",
                        help="batch sizes 1, 8, 64, ARM = base only, 32 output tokens (< 5 min)")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8, 32, 64, 128])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--small-layers", type=int, default=10,
                        help="layers of the smaller ARM (cut from the base)")
    parser.add_argument("--reference-max-batch", type=int, default=64,
                        help="prompts (and batch size) of the batched HF reference")
    parser.add_argument("--batch1-prompts", type=int, default=4,
                        help="prompts run through the HF reference at batch size 1")
    parser.add_argument("--work", default="artifacts/bench", help="output folder")
    parser.add_argument("--json", help="write results as JSON here")
    parser.add_argument("--min-seconds", type=float, default=5.0,
                        help="repeat each vLLM measurement until this long (small batches are noisy)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of every system (bfloat16 uses AMX where the CPU has it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OpenMP threads of every system (sets OMP_NUM_THREADS)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the vLLM engines (enforce_eager=False); slower start-up")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the time breakdown of the GenARM engine at the largest batch")
    parser.add_argument("--lora", action="store_true",
                        help="the LoRA ARM on the base's weights vs the merged ARM (batch 1, 8, 64)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="--lora: interleaved repeats of every measurement (best is kept)")
    args = parser.parse_args()
    if args.lora:
        args.batch_sizes = [1, 8, 64] if args.batch_sizes == [1, 8, 32, 64, 128] else args.batch_sizes
        args.output_len = 32 if args.output_len == 64 else args.output_len
        args.min_seconds = min(args.min_seconds, 3.0)
    if args.quick:
        args.batch_sizes, args.output_len = [1, 8, 64], 32
        args.batch1_prompts, args.min_seconds = 2, min(args.min_seconds, 3.0)
    # Before torch is imported: vLLM and transformers read it once.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    BENCHMARK_ENGINE_ARGS["dtype"] = args.dtype
    if args.compile:
        BENCHMARK_ENGINE_ARGS["enforce_eager"] = False
        # One compile cache per sub-model (else every start recompiles them all).
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results = run_lora(args) if args.lora else run(args)
    report = {
        "settings": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "cpu_extensions": runtime.cpu_flags(),
            "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"],
            "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"],
            "engine": vllm_engine_kwargs(),
            "prompt_len": args.prompt_len, "min_seconds": args.min_seconds,
            "output_len": args.output_len, "quick": args.quick,
            "wall_s": round(time.time() - start, 1),
        },
        "results": results,
    }
    name = "throughput_lora" if args.lora else "throughput"
    table = markdown_table(results, LORA_COLUMNS if args.lora else COLUMNS)
    print(table)
    (work / f"{name}.md").write_text(table)
    if not args.lora:
        plot(results, work / "throughput.png")
    json_path = Path(args.json) if args.json else work / "throughput.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_path}, {work / (name + '.md')}")


if __name__ == "__main__":
    main()
