"""Per-model prompts (issue 26): what they cost, side by side in one run.

Three measurements on SmolLM2-135M-Instruct (the base) with a base-sized ARM (the base cut
to all its layers: a separate weight copy, as a trained ARM is) or the base itself as "self":

  plain   the engine with per-model prompts built in, on plain prompts, against the engine
          of --before (a git revision without the feature): the same GenARM engine and
          requests, each version in its own process, run alternately (--repeats); and,
          in one engine, the feature's two per-step hooks (the processor's carrier
          bookkeeping, the forward's carrier check) on and off, alternately
          (--hook-repeats): the noise of separate processes is larger than the effect;
  own     64 requests whose ARM reads its own prompt of the base's length, against the
          same requests with the ARM reading the base's prompt; the tokens each sub-model
          computes are counted (engine/prompt_views.py `_model_view`) and compared with
          its own prompt plus the response;
  cfg     CFG: GuidedLLM(base, ["self"], weights=[-0.5]) with a negative prompt of the
          base's length, against the sum-of-parts bound of running the base twice
          (plain vLLM, tok/s / 2), at batch 1 and 64.

    python benchmarks/prompts.py --dtype bfloat16 --json artifacts/bench/prompts.json

Engines run in this process (one at a time), eager, prefix caching off (every run repeats
the same prompts), greedy with ignore_eos, so every system does the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from genarm_vllm import runtime

runtime.use_local_env(VLLM_CPU_KVCACHE_SPACE="2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from throughput import (  # noqa: E402  (after the environment is set)
    _default_base,
    _model_of,
    random_prompts,
    truncated_copy,
    vllm_tokens_per_s,
)

ENGINE_ARGS = dict(enforce_eager=True, max_model_len=512, seed=0, enable_prefix_caching=False)


def guidance_with_prompts(own: list[list[int]] | None, count: int):
    """Per-request guidance: the ARM reads `own[i]` (None: the base's prompt)."""
    if own is None:
        return None
    return [{"prompts": [p]} for p in own[:count]]


def count_view_tokens():
    """Patches prompt_views._model_view to count the tokens each sub-model computes."""
    from genarm_vllm.engine import prompt_views

    counts: dict[int, int] = {}
    original = prompt_views._model_view

    def counting(m, *args, **kwargs):
        view = original(m, *args, **kwargs)
        counts[m] = counts.get(m, 0) + int(view.rows.numel())
        return view

    prompt_views._model_view = counting
    return counts, lambda: setattr(prompt_views, "_model_view", original)


# ----------------------------------------------------------------------------- plain


def plain_worker(args) -> None:
    """One engine version's plain-prompt tok/s (run in a subprocess by `plain`)."""
    from genarm_vllm import GuidedLLM

    llm = GuidedLLM(args.base, [args.arm], beta=1.0, dtype=args.dtype, **ENGINE_ARGS)
    vocab = llm.get_tokenizer().vocab_size
    result = {}
    for batch in args.batch_sizes:
        prompts = random_prompts(vocab, batch, args.prompt_len, seed=batch)
        vllm_tokens_per_s(llm, prompts[:2], 4)  # warm-up
        result[str(batch)] = vllm_tokens_per_s(llm, prompts, args.output_len,
                                                min_seconds=args.min_seconds)
    print("RESULT " + json.dumps(result))


def source_of(revision: str) -> Path:
    """The package as it was at `revision`, unpacked in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="genarm-before-"))
    archive = folder / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), revision, "genarm_vllm"],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def plain(args, arm: Path) -> dict:
    before = source_of(args.before)
    runs: dict[str, list[dict]] = {"now": [], "before": []}
    versions = [("now", ROOT), ("before", before)]
    for repeat in range(args.repeats):  # the order alternates: the second run of a pair ran faster
        for name, path in versions[::-1] if repeat % 2 else versions:
            env = {**os.environ, "PYTHONPATH": str(path)}
            cmd = [sys.executable, __file__, "--worker", "--base", str(args.base), "--arm", str(arm),
                   "--dtype", args.dtype, "--prompt-len", str(args.prompt_len),
                   "--output-len", str(args.output_len), "--min-seconds", str(args.min_seconds),
                   "--batch-sizes", ",".join(map(str, args.batch_sizes))]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"plain worker ({name}) failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(line[0][len("RESULT "):]))
            print(f"plain {name}: {runs[name][-1]}", flush=True)
    best = {k: {b: max(r[b] for r in v) for b in v[0]} for k, v in runs.items()}
    return {"runs": runs, "best": best,
            "now_over_before": {b: best["now"][b] / best["before"][b] for b in best["now"]}}


def hooks(args, arm: Path) -> dict:
    """Plain prompts at batch 64 in one engine, the feature's per-step hooks on and off."""
    from genarm_vllm import GuidedLLM
    from genarm_vllm.engine import logits_processor

    llm = GuidedLLM(args.base, [str(arm)], beta=1.0, dtype=args.dtype, **ENGINE_ARGS)
    views = _model_of(llm).prompt_views
    prompts = random_prompts(llm.get_tokenizer().vocab_size, 64, args.prompt_len, seed=64)
    vllm_tokens_per_s(llm, prompts[:2], 4)
    on_views, on_requests = views.active_requests, logits_processor.request_prompts
    runs = {"on": [], "off": []}
    for _ in range(args.hook_repeats):
        for name in ("on", "off"):
            off = name == "off"
            views.active_requests = (lambda: {}) if off else on_views
            logits_processor.request_prompts = (lambda *a: None) if off else on_requests
            runs[name].append(vllm_tokens_per_s(llm, prompts, args.output_len,
                                                min_seconds=args.min_seconds))
    views.active_requests, logits_processor.request_prompts = on_views, on_requests
    ratios = sorted(a / b for a, b in zip(runs["on"], runs["off"]))
    return {"runs": runs, "on_over_off_best": max(runs["on"]) / max(runs["off"]),
            "on_over_off_median_of_pairs": ratios[len(ratios) // 2]}


# ----------------------------------------------------------------------------- own / cfg


def own(args, arm: Path) -> dict:
    from genarm_vllm import GuidedLLM

    llm = GuidedLLM(args.base, [str(arm)], beta=1.0, dtype=args.dtype, **ENGINE_ARGS)
    vocab = llm.get_tokenizer().vocab_size
    batch = 64
    prompts = random_prompts(vocab, batch, args.prompt_len, seed=1)
    arm_prompts = random_prompts(vocab, batch, args.prompt_len, seed=2)
    vllm_tokens_per_s(llm, prompts[:2], 4, guidance=guidance_with_prompts(arm_prompts, 2))
    result = {"batch": batch}
    for repeat in range(args.repeats):  # interleaved; the best of each is kept
        for name, guidance in (("shared", None), ("own", guidance_with_prompts(arm_prompts, batch))):
            tps = vllm_tokens_per_s(llm, prompts, args.output_len, guidance=guidance,
                                    min_seconds=args.min_seconds)
            result[name] = max(result.get(name, 0.0), tps)
    counts, restore = count_view_tokens()
    try:
        vllm_tokens_per_s(llm, prompts, args.output_len, guidance=guidance_with_prompts(arm_prompts, batch))
    finally:
        restore()
    # Each model: its own prompt (args.prompt_len) and the response tokens fed back (T - 1).
    expected = batch * (args.prompt_len + args.output_len - 1)
    result["tokens_computed"] = {"base": counts.get(0, 0), "arm": counts.get(1, 0)}
    result["tokens_expected_each"] = expected
    result["own_over_shared"] = result["own"] / result["shared"]
    del llm
    return result


def cfg(args) -> dict:
    from vllm import LLM

    from genarm_vllm import GuidedLLM
    from genarm_vllm.engine import defaults

    plain_llm = LLM(model=str(args.base),
                    **{**defaults.engine_defaults(), **ENGINE_ARGS, "dtype": args.dtype})
    guided = GuidedLLM(args.base, ["self"], beta=1.0, weights=[-0.5], dtype=args.dtype, **ENGINE_ARGS)
    vocab = guided.get_tokenizer().vocab_size
    rows = []
    for batch in (1, 64):
        prompts = random_prompts(vocab, batch, args.prompt_len, seed=10 + batch)
        negative = guidance_with_prompts(random_prompts(vocab, batch, args.prompt_len, seed=20 + batch),
                                         batch)
        vllm_tokens_per_s(plain_llm, prompts[:1], 4)
        vllm_tokens_per_s(guided, prompts[:1], 4, guidance=negative[:1])
        row = {"batch": batch, "base": 0.0, "cfg": 0.0}
        for _ in range(args.repeats):
            row["base"] = max(row["base"], vllm_tokens_per_s(plain_llm, prompts, args.output_len,
                                                             min_seconds=args.min_seconds))
            row["cfg"] = max(row["cfg"], vllm_tokens_per_s(guided, prompts, args.output_len,
                                                           guidance=negative,
                                                           min_seconds=args.min_seconds))
        row["cfg_over_bound"] = row["cfg"] / (row["base"] / 2)
        rows.append(row)
        print(f"cfg batch {batch}: {row}", flush=True)
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every system")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 64], help="batch sizes of the `plain` measurement")
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats (best kept)")
    parser.add_argument("--hook-repeats", type=int, default=6,
                        help="`plain`: interleaved rounds of the hooks on and off")
    parser.add_argument("--before", default="6ab2685",
                        help="the revision without per-model prompts (`plain`)")
    parser.add_argument("--only", choices=["plain", "own", "cfg"], action="append",
                        help="run only these measurements (default: all)")
    parser.add_argument("--work", default="artifacts/bench")
    parser.add_argument("--json", help="write results as JSON here")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.worker:
        plain_worker(args)
        return
    args.base = Path(args.base) if args.base else _default_base()
    arm = truncated_copy(args.base, 30, Path(args.work) / "smollm2_arm_30_layers")
    only = set(args.only or ["plain", "own", "cfg"])
    results = {"machine": {"cpu": platform.processor() or platform.machine(),
                           "extensions": runtime.cpu_flags()},
               "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "arm")}}
    results["settings"]["base"] = str(args.base)
    start = time.time()
    if "plain" in only:
        results["plain"] = plain(args, arm)
        print("plain:", json.dumps(results["plain"]["now_over_before"]), flush=True)
        results["plain_hooks"] = hooks(args, arm)
        print("plain hooks:", json.dumps(results["plain_hooks"]), flush=True)
    if "own" in only:
        results["own"] = own(args, arm)
        print("own:", json.dumps(results["own"]), flush=True)
    if "cfg" in only:
        results["cfg"] = cfg(args)
    results["seconds"] = round(time.time() - start, 1)
    print(json.dumps(results, indent=2, default=str))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
