"""The demo's two autoregressive reward models (ARMs), trained from SmolLM2 itself.

    sentiment   prefers the more positive of two completions (VADER compound gap > 0.3)
    impersonal  prefers a completion without first-person pronouns (I, my, we, ...) to one
                with some: "avoid a word class"

Both are LoRA adapters on the base model (the ARM starts from the base: a competent LM of
the same tokenizer, as GenARM recommends). The adapters, their preference pairs and their
training metrics are committed under genarm_vllm/demo/assets/<name>/ (a few MB). The
engine serves the adapters as they are, as LoRA ARMs on the base's own weights
(genarm_vllm/engine/lora_arm.py: one weight copy). Merged full ARM folders (~540 MB each) are only
built on request (for comparison, e.g. benchmarks/throughput.py --lora):

    python -m genarm_vllm.demo.arms --merged    # build merged ARM folders into artifacts/arms/
    python -m genarm_vllm.demo.arms --retrain   # sample, label, train, and overwrite the assets

Retraining: the base samples 4 completions for each of the 96 training prompts (vLLM, in a
subprocess), the pairs are labelled, and each ARM is trained by `genarm-vllm train-arm`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from genarm_vllm.demo.common import ARM_ROOT, ARTIFACTS, ASSETS, BASE_DIR

NAMES = ("sentiment", "impersonal")
ADAPTER = "adapter"  # assets/<name>/adapter: the LoRA adapter (peft format)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what is committed of it
PAIRS = "pairs.jsonl"
METRICS = "train_metrics.json"
BUILT_MARKER = ".genarm-built.json"  # in a rebuilt ARM folder: which adapter it came from

# Sampling the training data: diverse completions straight from the base distribution.
SAMPLING = dict(n=4, temperature=1.0, top_p=0.95, max_tokens=64)
MIN_VADER_GAP = 0.3

# `genarm-vllm train-arm` options (LoRA on every linear layer, the official LoRA lr).
TRAIN_OPTIONS = {
    "mode": "lora",
    "lora-r": 8,
    "lora-alpha": 16,
    "lora-targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "lr": 5e-4,
    "beta-r": 0.5,
    "epochs": 2,
    "batch-size": 8,
    "max-length": 128,
    "eval-fraction": 0.1,
    "seed": 0,
}


# ----------------------------------------------------------------------------- data


def sample(base: Path, out: Path, num_prompts: int | None = None) -> Path:
    """SAMPLING["n"] completions per training prompt from the base, as JSONL rows
    {"prompt", "samples": [{"text", "num_tokens", "finish_reason"}]}. Builds a vLLM engine:
    run it in its own process (see `retrain`)."""
    from genarm_vllm import runtime
    from genarm_vllm.demo.common import DEMO_ENGINE_ARGS, chat_prompts

    runtime.use_local_env()
    from vllm import LLM, SamplingParams

    from genarm_vllm.demo.prompts import train_prompts

    prompts = train_prompts()[:num_prompts]
    llm = LLM(str(base), **DEMO_ENGINE_ARGS)
    results = llm.generate(chat_prompts(llm.get_tokenizer(), prompts), SamplingParams(**SAMPLING))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for prompt, result in zip(prompts, results):
            samples = [
                {"text": c.text, "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason}
                for c in result.outputs
            ]
            f.write(json.dumps({"prompt": prompt, "samples": samples}, ensure_ascii=False) + "\n")
    return out


def sentiment_pairs(rows: list[dict]) -> list[dict]:
    """Every pair of a prompt's completions whose VADER scores differ by > MIN_VADER_GAP."""
    from genarm_vllm.demo.scoring import vader

    pairs = []
    for row in rows:
        scored = [(vader(s["text"]), s["text"]) for s in row["samples"] if s["text"].strip()]
        for (score_a, a), (score_b, b) in itertools.combinations(scored, 2):
            if abs(score_a - score_b) > MIN_VADER_GAP:
                chosen, rejected = (a, b) if score_a > score_b else (b, a)
                pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs


def impersonal_pairs(rows: list[dict]) -> list[dict]:
    """Pairs (a completion without first-person pronouns, one of the same prompt with some).

    Not brevity: a summed-log-prob ARM already ranks a shorter completion above a longer one
    (fewer tokens, fewer negative terms), so length pairs give a zero loss and teach nothing.
    """
    from genarm_vllm.demo.scoring import first_person_count

    pairs = []
    for row in rows:
        samples = [s["text"] for s in row["samples"] if s["text"].strip()]
        for a, b in itertools.permutations(samples, 2):
            if first_person_count(a) == 0 and first_person_count(b) > 0:
                pairs.append({"prompt": row["prompt"], "chosen": a, "rejected": b})
    return pairs


LABELLERS = {"sentiment": sentiment_pairs, "impersonal": impersonal_pairs}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- training


def train(name: str, base: Path, arm_dir: Path, assets_root: Path = ASSETS,
          options: dict | None = None) -> dict:
    """Train ARM `name` on <assets>/<name>/pairs.jsonl with `genarm-vllm train-arm`: the LoRA
    adapter ARM (with the tokenizer and metrics) at `arm_dir`; the adapter alone (float16) and
    the metrics stored in <assets>/<name>/."""
    assets = assets_root / name
    command = [
        sys.executable, "-m", "genarm_vllm.cli", "train-arm",
        "--init", str(base), "--base", str(base), "--data", str(assets / PAIRS),
        "--out", str(arm_dir), "--chat-template",
    ]
    for flag, value in {**TRAIN_OPTIONS, **(options or {})}.items():
        command += [f"--{flag}", str(value)]
    print("[arms] " + " ".join(command), flush=True)
    shutil.rmtree(assets / ADAPTER, ignore_errors=True)
    shutil.rmtree(arm_dir, ignore_errors=True)
    # Training is plain PyTorch: let it use every core (vLLM wants OMP_NUM_THREADS=1).
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    subprocess.run(command, check=True, env=env)
    (assets / ADAPTER).mkdir(parents=True)
    for file in ADAPTER_FILES:
        shutil.copy2(arm_dir / file, assets / ADAPTER / file)
    shrink_adapter(assets / ADAPTER)
    metrics = json.loads((arm_dir / "genarm_train_metrics.json").read_text())
    (assets / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def shrink_adapter(adapter: Path) -> None:
    """Store the adapter's weights as float16 (half the bytes to commit; merging casts them
    back to float32) and drop peft's boilerplate model card."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(str(path)).items()}, str(path))
    (adapter / "README.md").unlink(missing_ok=True)


def retrain(base: Path, arm_root: Path, assets_root: Path = ASSETS, num_prompts: int | None = None,
            options: dict | None = None) -> dict[str, Path]:
    """Sample, label and train both ARMs from scratch (overwrites the committed assets);
    the trained adapter ARM folders under `arm_root`.

    num_prompts / options (train-arm flags) shrink the recipe for a quick smoke run."""
    samples = ARTIFACTS / "arm-data" / "samples.jsonl"
    start = time.time()
    print(f"[arms] sampling training completions from {base} -> {samples}", flush=True)
    command = [sys.executable, "-m", "genarm_vllm.demo.arms", "--sample-only",
               "--base", str(base), "--samples", str(samples)]
    if num_prompts:
        command += ["--num-prompts", str(num_prompts)]
    subprocess.run(command, check=True)
    rows = read_jsonl(samples)
    arms = {}
    for name in NAMES:
        pairs = LABELLERS[name](rows)
        write_jsonl(assets_root / name / PAIRS, pairs)
        print(f"[arms] {name}: {len(pairs)} preference pairs", flush=True)
        train(name, base, arm_root / name, assets_root, options)
        arms[name] = arm_root / name
    print(f"[arms] retrained {', '.join(NAMES)} in {time.time() - start:.0f} s", flush=True)
    return arms


# ----------------------------------------------------------------------------- rebuilding


def adapter_digest(name: str, assets_root: Path = ASSETS) -> str:
    """A hash of the committed adapter's files: a rebuilt ARM is stale when it changes."""
    digest = hashlib.sha256()
    adapter = assets_root / name / ADAPTER
    for path in sorted(adapter.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(adapter).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def mark_built(name: str, arm_dir: Path, assets_root: Path = ASSETS) -> None:
    digest = adapter_digest(name, assets_root)
    (arm_dir / BUILT_MARKER).write_text(json.dumps({"adapter": digest}) + "\n")


def is_built(name: str, arm_dir: Path, assets_root: Path = ASSETS) -> bool:
    marker = arm_dir / BUILT_MARKER
    return (marker.is_file()
            and json.loads(marker.read_text()).get("adapter") == adapter_digest(name, assets_root))


def build(name: str, base: Path, arm_dir: Path, assets_root: Path = ASSETS) -> Path:
    """The merged ARM folder for `name` at `arm_dir`, rebuilt from its committed adapter."""
    if is_built(name, arm_dir, assets_root):
        return arm_dir
    adapter = assets_root / name / ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no committed adapter at {adapter}; run with --retrain")
    from genarm_vllm.training import merge_adapter

    print(f"[arms] rebuilding the {name} ARM from {adapter} -> {arm_dir}", flush=True)
    tmp = arm_dir.with_name(arm_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merge_adapter(base, adapter, tmp)
    shutil.rmtree(arm_dir, ignore_errors=True)
    tmp.rename(arm_dir)
    mark_built(name, arm_dir, assets_root)
    return arm_dir


def adapter_dirs(assets_root: Path = ASSETS) -> dict[str, Path]:
    """The committed adapter folders: reward models as they are (LoRA ARMs)."""
    dirs = {name: assets_root / name / ADAPTER for name in NAMES}
    for adapter in dirs.values():
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no committed adapter at {adapter}; run with --retrain")
    return dirs


def prepare_arms(base: Path = BASE_DIR, arm_root: Path = ARM_ROOT, retrain_: bool = False,
                 assets_root: Path = ASSETS, merged: bool = False) -> dict[str, Path]:
    """Both ARMs: the adapter folders (served on the base's weights), retrained from scratch
    first with retrain_; merged=True gives merged full ARM folders instead (two weight copies)."""
    if retrain_:
        retrain(base, arm_root, assets_root)
    if merged:  # from the committed (float16) adapters, also right after retraining
        return {name: build(name, base, arm_root / name, assets_root) for name in NAMES}
    return adapter_dirs(assets_root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=BASE_DIR, help="base model folder")
    parser.add_argument("--arm-root", type=Path, default=ARM_ROOT, help="where ARM folders go")
    parser.add_argument("--retrain", action="store_true",
                        help="sample, label and train from scratch (overwrites the committed assets)")
    parser.add_argument("--assets", type=Path, default=ASSETS,
                        help="folder of the adapters, pairs and metrics (the committed assets)")
    parser.add_argument("--merged", action="store_true",
                        help="build merged full ARM folders under --arm-root (not needed to serve)")
    parser.add_argument("--sample-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--num-prompts", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sample_only:
        sample(args.base, args.samples, args.num_prompts)
        return 0
    for name, path in prepare_arms(args.base, args.arm_root, args.retrain, args.assets,
                                   merged=args.merged).items():
        print(f"[arms] {name}: {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
