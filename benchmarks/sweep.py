"""`genarm-vllm sweep` against one `genarm-vllm generate` run per setting (as the official code
must run a grid: one process, one model load and one pass over the prompts per setting).

A 3 x 3 grid (betas x weights of two ARMs) over --num-prompts prompts on the tiny models
(genarm_vllm.testing), greedy, every completion --max-tokens long (ignore_eos: equal work
for every system). Prompts are long enough (--prompt-words, one token per word) to fill
full KV blocks (128 tokens on CPU): only full blocks are prefix-cached. Three systems,
each timed end to end as a user runs it (a `genarm-vllm` process from start to exit):

  separate   nine `generate` runs, one per setting (--beta / --weights flags);
  sweep      one `sweep` run over the grid (rows prompt-major);
  sweep_npc  the same sweep with vLLM's prefix cache off (--no-enable-prefix-caching):
             what sharing the prompts' prefill through the cache is worth.

Where time goes, from each run's own summary line (its job seconds): start-up = process
wall time - job seconds (Python and vLLM imports, the engine start, checks); job = feeding
the engine (prefill and decode). Prefix-cache hits are read from the sweep's summary
(RequestOutput.num_cached_tokens of every row). The sweep's rows are checked equal, token
for token, to the separate runs' rows.

    python benchmarks/sweep.py --json artifacts/bench_sweep/sweep.json   # 200 prompts
    python benchmarks/sweep.py --num-prompts 20 --max-tokens 8          # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from genarm_vllm import runtime

runtime.use_local_env(VLLM_CPU_KVCACHE_SPACE="2")

BETAS = "1,0.5,0.25"
WEIGHTS = "1,0;0.5,0.5;0,1"
ARMS = ("arm_small", "arm_qwen2")




def make_prompts(count: int, words: tuple[int, int], seed: int = 0) -> list[dict]:
    from genarm_vllm.testing import WORDS

    rng = random.Random(seed)
    return [{"id": i, "prompt": " ".join(rng.choices(WORDS, k=rng.randint(*words)))}
            for i in range(count)]


def run_cli(args: list[str]) -> dict:
    """One `genarm-vllm` process: wall seconds, the job seconds of its summary, its output."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "genarm_vllm.cli", *map(str, args)],
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"genarm-vllm {args[0]} failed:\n{result.stderr[-3000:]}")
    job = re.search(r"tokens generated in ([0-9.]+) s", result.stdout)
    cache = re.search(r"prefix cache: (\d+) of (\d+) prompt tokens", result.stdout)
    figures = {"wall_s": wall, "job_s": float(job.group(1)) if job else float("nan")}
    figures["startup_s"] = wall - figures["job_s"]
    if cache:
        figures["cached_prompt_tokens"] = int(cache.group(1))
        figures["prompt_tokens"] = int(cache.group(2))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", default="150,250", help="min,max prompt length")
    parser.add_argument("--work", default=None, help="folder for models and outputs (a temp dir)")
    parser.add_argument("--json", default=None, help="write the figures here (and a .md)")
    parser.add_argument("--skip-no-cache", action="store_true", help="skip sweep_npc")
    args = parser.parse_args()

    from genarm_vllm.jobs.sweep import grid, parse_betas, parse_weight_grid
    from genarm_vllm.testing import build_tiny_family

    work = Path(args.work or tempfile.mkdtemp(prefix="genarm-bench-sweep-"))
    tiny = build_tiny_family(work / "tiny")
    words = tuple(int(w) for w in args.prompt_words.split(","))
    rows = make_prompts(args.num_prompts, words)
    infile = work / "prompts.jsonl"
    infile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    models = ["--base", tiny["base"]]
    for arm in ARMS:
        models += ["--reward-model", tiny[arm]]
    common = ["--input", infile, "--temperature", "0", "--max-tokens", args.max_tokens,
              "--ignore-eos", "--max-model-len", "512", "--enforce-eager", "--dtype", "float32",
              "--overwrite"]
    settings = grid(parse_betas(BETAS), parse_weight_grid(WEIGHTS))

    results = {}
    separate = []
    for k, s in enumerate(settings):
        out = work / f"separate-{k}.jsonl"
        separate.append(run_cli(["generate", *models, "--beta", s.beta, "--weights",
                                 ",".join(f"{w:g}" for w in s.weights), "--output", out,
                                 *common]))
        print(f"separate {k + 1}/{len(settings)} ({s.name}): {separate[-1]['wall_s']:.1f} s",
              flush=True)
    results["separate"] = {
        "wall_s": sum(r["wall_s"] for r in separate), "job_s": sum(r["job_s"] for r in separate),
        "startup_s": sum(r["startup_s"] for r in separate), "runs": separate}
    sweep_args = ["sweep", *models, "--betas", BETAS, "--weights", WEIGHTS, *common]
    results["sweep"] = run_cli([*sweep_args, "--output", work / "sweep.jsonl"])
    print(f"sweep: {results['sweep']['wall_s']:.1f} s", flush=True)
    if not args.skip_no_cache:
        results["sweep_npc"] = run_cli([*sweep_args, "--output", work / "sweep-npc.jsonl",
                                        "--no-enable-prefix-caching"])
        print(f"sweep without prefix cache: {results['sweep_npc']['wall_s']:.1f} s", flush=True)

    # The same rows, token for token.
    swept = [json.loads(line) for line in (work / "sweep.jsonl").read_text().splitlines()]
    outputs = [[json.loads(line) for line in (work / f"separate-{k}.jsonl").read_text().splitlines()]
               for k in range(len(settings))]
    want = [outputs[k][i]["generated_token_ids"] for i in range(len(rows))
            for k in range(len(settings))]
    identical = [r["generated_token_ids"] for r in swept] == want

    tokens = len(rows) * len(settings) * args.max_tokens
    speedup = results["separate"]["wall_s"] / results["sweep"]["wall_s"]
    report = {
        "machine": {"cpu_flags": runtime.cpu_flags(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                    "in_process_engine": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"},
        "settings": {"prompts": len(rows), "grid": [s.fields() for s in settings],
                     "max_tokens": args.max_tokens, "prompt_words": list(words),
                     "generated_tokens": tokens},
        "results": results, "speedup_end_to_end": speedup,
        "speedup_job_only": results["separate"]["job_s"] / results["sweep"]["job_s"],
        "identical_tokens": identical,
    }
    md = ["| system | end to end s | start-up s | job s | prompt tokens from the prefix cache |",
          "|---|---|---|---|---|"]
    for name, r in results.items():
        cached = (f"{r['cached_prompt_tokens']} of {r['prompt_tokens']}"
                  if "prompt_tokens" in r else "-")
        md.append(f"| {name} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['job_s']:.1f} | {cached} |")
    md.append(f"\nsweep vs separate: {speedup:.2f}x end to end, "
              f"{report['speedup_job_only']:.2f}x on the jobs alone; identical tokens: {identical}; "
              f"{len(rows)} prompts x {len(settings)} settings x {args.max_tokens} tokens; "
              f"CPU flags {','.join(report['machine']['cpu_flags'])}")
    text = "\n".join(md) + "\n"
    print(text)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        path.with_suffix(".md").write_text(text)
    if not identical:
        raise SystemExit("the sweep's tokens differ from the separate runs'")


if __name__ == "__main__":
    main()
