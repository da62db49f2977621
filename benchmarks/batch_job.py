"""The batch job against the no-drain ceiling: does `genarm-vllm generate` keep the engine full?

One set of rows, three ways, measured side by side, each run in a process of its own on a
fresh GuidedLLM engine (as `genarm-vllm generate` runs; only the generation is timed):
  (ceiling)  one GuidedLLM.generate call over all rows at once: the engine never drains
             until the very end (no output written);
  (job)      batch_job.run_job, the loop `genarm-vllm generate` runs (after its engine start):
             rows fed one by one into vLLM's engine loop, output written in input order
             through the reorder buffer, the settings fingerprint, progress accounting;
  (baseline) the job as it was before: GuidedLLM.generate over chunks of 512 rows, each
             chunk's output lines written when the chunk ends (the batch drains behind each
             chunk's longest generation).
Output lengths spread widely: rows stop at EOS (temperature 1, one seed, so every system
generates the same tokens), at least --min-tokens and at most --max-tokens. Reports
generated tokens/s of each and job / ceiling, baseline / ceiling, the length spread and
the CPU's vector extensions, as JSON and Markdown. Each system's time is also split into
time inside vLLM's engine step (the model, or waiting for it when the engine core runs in
its own process, the scheduler, detokenizing) and time outside it (reading, checking and
submitting rows, writing output): the batch job's own cost.

Why a process per run: runs that share one engine are not independent. The state a run
leaves in the engine (likely the order of vLLM's free KV-cache blocks, or the allocators)
changes the speed of the next. In one process (2026-12-02, 5 rounds), every run right after
the chunked baseline took 17.0-20.0 s and every run after the ceiling or the job 21.0-22.5 s,
whichever system it was; on fresh engines the same runs took 13.8-17.3 s.

    python benchmarks/batch_job.py --json artifacts/bench_batch/batch_job.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from genarm_vllm import runtime

# vLLM's default engine, as `genarm-vllm generate` runs it: the engine core in a process of
# its own, so the job's reading and writing overlap the model. VLLM_ENABLE_V1_MULTIPROCESSING=0
# in the environment measures in-process engines instead (as the tests run them): there the
# job's own work runs between engine steps, its worst case.
runtime.use_local_env(VLLM_CPU_KVCACHE_SPACE="2", VLLM_ENABLE_V1_MULTIPROCESSING="1")

ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                   enable_prefix_caching=False)  # every system must do all the work
SYSTEMS = ("ceiling", "job", "baseline")


class StepTimer:
    """Seconds spent inside `engine.step` (LLM.generate and the job's feeder both call it)."""

    def __init__(self, engine):
        self.seconds = 0.0
        step = engine.step

        def timed_step(*args, **kwargs):
            start = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        engine.step = timed_step

    def measure(self, run) -> dict:
        before = self.seconds
        figures = run()
        figures["engine_seconds"] = self.seconds - before
        figures["outside_engine_seconds"] = figures["seconds"] - figures["engine_seconds"]
        return figures




def make_rows(count: int, seed: int = 0) -> list[dict]:
    from genarm_vllm.testing import WORDS

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        row = {"id": i, "prompt": " ".join(rng.choices(WORDS, k=rng.randint(4, 24)))}
        if i % 4 == 1:
            row["beta"] = rng.choice([0.5, 2.0])  # some rows carry their own guidance
        rows.append(row)
    return rows


def tokens_of(outputs) -> list[int]:
    return [len(o.outputs[0].token_ids) for o in outputs]


def ceiling(llm, rows, params) -> dict:
    from genarm_vllm.tokenization import prompt_ids

    tokenizer = llm.get_tokenizer()
    start = time.perf_counter()
    prompts = [{"prompt_token_ids": prompt_ids(tokenizer, r["prompt"])} for r in rows]
    guidance = [{"beta": r["beta"]} if "beta" in r else None for r in rows]
    lengths = tokens_of(llm.generate(prompts, params, guidance=guidance, use_tqdm=False))
    return {"seconds": time.perf_counter() - start, "lengths": lengths}


def baseline(llm, rows, params, out: Path, chunk_size: int = 512) -> dict:
    """The job before continuous feeding: one generate call per chunk, lines written after it."""
    from genarm_vllm.jobs.batch import output_line
    from genarm_vllm.tokenization import prompt_ids

    tokenizer = llm.get_tokenizer()
    lengths = []
    start = time.perf_counter()
    with open(out, "w") as f:
        for at in range(0, len(rows), chunk_size):
            chunk = rows[at:at + chunk_size]
            prompts = [{"prompt_token_ids": prompt_ids(tokenizer, r["prompt"])} for r in chunk]
            guidance = [{"beta": r["beta"]} if "beta" in r else None for r in chunk]
            results = llm.generate(prompts, params, guidance=guidance, use_tqdm=False)
            f.writelines(output_line(r, o)[0] for r, o in zip(chunk, results))
            f.flush()
            lengths += tokens_of(results)
    return {"seconds": time.perf_counter() - start, "lengths": lengths}


def job(llm, infile: Path, params, out: Path) -> dict:
    from genarm_vllm.jobs.batch import run_job

    start = time.perf_counter()
    summary = run_job(llm, infile, out, params, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    lengths = [len(json.loads(line)["generated_token_ids"]) for line in open(out)]
    assert summary.rows_done == len(lengths) and summary.rows_failed == 0
    return {"seconds": seconds, "lengths": lengths}


def measure_one(args) -> dict:
    """One system, one run, on a fresh engine in this process (the --system mode)."""
    from vllm import SamplingParams

    from genarm_vllm import GuidedLLM

    work = Path(args.work)
    rows = [json.loads(line) for line in open(work / "in.jsonl")]
    params = SamplingParams(temperature=1.0, seed=0, min_tokens=args.min_tokens,
                            max_tokens=args.max_tokens)
    llm = GuidedLLM(args.base, [args.reward_model], beta=1.0, **ENGINE_ARGS)
    ceiling(llm, rows[:64], params)  # warm-up
    timer = StepTimer(llm.llm.llm_engine)
    run = {"ceiling": lambda: ceiling(llm, rows, params),
           "job": lambda: job(llm, work / "in.jsonl", params, work / "job_out.jsonl"),
           "baseline": lambda: baseline(llm, rows, params, work / "baseline_out.jsonl")}
    figures = timer.measure(run[args.system])
    figures["max_num_seqs"] = llm.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    return figures


def run_in_own_process(args, system: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--system", system, "--figures", out.name,
                        "--work", args.work, "--base", str(args.base), "--reward-model",
                        str(args.reward_model), "--min-tokens", str(args.min_tokens),
                        "--max-tokens", str(args.max_tokens)], check=True)
        return json.load(open(out.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--base", default=None, help="base model folder (default: a tiny "
                        "random base built in --work, with its small ARM)")
    parser.add_argument("--reward-model", default=None, help="ARM folder (with --base)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three systems")
    parser.add_argument("--work", default="artifacts/bench_batch")
    parser.add_argument("--json", default=None)
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)  # one run (internal)
    parser.add_argument("--figures", help=argparse.SUPPRESS)  # where that run writes its figures
    args = parser.parse_args()
    if args.system:
        Path(args.figures).write_text(json.dumps(measure_one(args)))
        return

    import vllm.envs as vllm_envs  # vLLM's own reading of its switches

    from genarm_vllm.testing import build_tiny_family

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.base is None:
        tiny = build_tiny_family(work / "tiny")
        args.base, args.reward_model = tiny["base"], tiny["arm_small"]
    rows = make_rows(args.rows)
    (work / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    runs = []
    for round_ in range(args.repeats):
        order = list(SYSTEMS)[round_ % 3:] + list(SYSTEMS)[:round_ % 3]  # no system always first
        figures = {name: run_in_own_process(args, name) for name in order}
        for name in order:
            f = figures[name]
            f["tokens"] = sum(f["lengths"])
            f["tokens_per_s"] = f["tokens"] / f["seconds"]
            print(f"round {round_ + 1} {name:9s} {f['tokens']} tokens in {f['seconds']:.1f} s "
                  f"({f['outside_engine_seconds']:.2f} s outside the engine step): "
                  f"{f['tokens_per_s']:.1f} tokens/s", flush=True)
        figures["order"] = order
        runs.append(figures)
    lengths = runs[0]["ceiling"]["lengths"]
    same_tokens = all(r[name]["lengths"] == lengths for r in runs for name in SYSTEMS)

    def rate(name):
        return max(r[name]["tokens_per_s"] for r in runs)  # best round of each

    def paired(name):  # per round, against the ceiling of the same round
        return [r[name]["tokens_per_s"] / r["ceiling"]["tokens_per_s"] for r in runs]

    def outside_share(name):  # the median share of a run's time spent outside the engine step
        return statistics.median(r[name]["outside_engine_seconds"] / r[name]["seconds"]
                                 for r in runs)

    report = {
        "settings": {"rows": args.rows, "min_tokens": args.min_tokens,
                     "max_tokens": args.max_tokens, "base": str(args.base),
                     "reward_model": str(args.reward_model),
                     "engine": ENGINE_ARGS, "repeats": args.repeats,
                     "a_process_and_fresh_engine_per_run": True,
                     "engine_core_in_own_process": vllm_envs.VLLM_ENABLE_V1_MULTIPROCESSING,
                     "threads": runtime.LOCAL_ENV["OMP_NUM_THREADS"]},
        "machine": {"cpu_flags": runtime.cpu_flags(), "processor": platform.processor(),
                    "max_num_seqs": runs[0]["ceiling"]["max_num_seqs"]},
        "lengths": {"min": min(lengths), "median": statistics.median(lengths),
                    "max": max(lengths), "mean": statistics.mean(lengths),
                    "same_tokens_in_every_system": same_tokens},
        "tokens_per_s": {name: rate(name) for name in SYSTEMS},
        "job_over_ceiling": rate("job") / rate("ceiling"),
        "baseline_over_ceiling": rate("baseline") / rate("ceiling"),
        "median_paired": {name: statistics.median(paired(name)) for name in ("job", "baseline")},
        "outside_engine_share": {name: outside_share(name) for name in SYSTEMS},
        "rounds": [{"order": r["order"], **{name: {k: v for k, v in r[name].items()
                                                   if k not in ("lengths", "max_num_seqs")}
                                            for name in SYSTEMS}}
                   for r in runs],
    }
    table = ("| system | best generated tokens/s | best / best ceiling | median of paired "
             "rounds / ceiling | share of time outside the engine step |\n|---|---|---|---|---|\n"
             + "".join(
                 f"| {name} | {report['tokens_per_s'][name]:.1f} | "
                 f"{report['tokens_per_s'][name] / report['tokens_per_s']['ceiling']:.3f} | "
                 f"{statistics.median(paired(name)):.3f} | "
                 f"{100 * report['outside_engine_share'][name]:.1f} % |\n" for name in SYSTEMS))
    (work / "batch_job.md").write_text(table)
    print(table)
    print(json.dumps({k: report[k] for k in ("machine", "lengths", "job_over_ceiling",
                                             "baseline_over_ceiling", "median_paired",
                                             "outside_engine_share")}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
