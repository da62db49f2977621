"""ARM training speed on CPU: pairs/s of `train-arm` before and after the move to
transformers.Trainer, side by side in one run, for the demo's SmolLM2-135M ARM.

    python benchmarks/train_speed.py                     # top-layers and LoRA, 32 pairs each
    python benchmarks/train_speed.py --pairs 64 --json artifacts/bench/train_speed.json

The old trainer (the hand-written loop) is genarm_vllm/train.py at --old-rev, copied from git
into a temporary folder and imported from there; the new one is genarm_vllm.training. Both
train the same pairs (the demo's sentiment pairs.jsonl, chat template) from the same init with
the demo's settings (batch 8, max length 128; LoRA r 8 on every linear layer, or the top 2
layers), one epoch, no held-out set, and report their own training-loop time (model loading
and saving excluded). Runs alternate old/new so that neither always runs first.
Needs artifacts/smollm2-135m-instruct (bash launch/quickstart.sh prepares it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from genarm_vllm import runtime

ROOT = Path(__file__).resolve().parents[1]
OLD_REV = "9a0a630"  # the last genarm_vllm/train.py with the hand-written loop
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
MODES = {
    "top-layers": dict(mode="top-layers", top_layers=2, lr=1e-5),
    "lora": dict(mode="lora", lora_r=8, lora_alpha=16.0, lora_targets=LORA_TARGETS, lr=5e-4),
}


def machine() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    return {"cpu": model.group(1).strip() if model else "unknown", "cores": os.cpu_count(),
            "flags": runtime.cpu_flags()}


def load_old_trainer(rev: str, tmp: Path):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:genarm_vllm/train.py"],
                            check=True, capture_output=True, text=True).stdout
    path = tmp / "old_train.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_train"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=ROOT / "artifacts" / "smollm2-135m-instruct")
    parser.add_argument("--data", type=Path,
                        default=ROOT / "genarm_vllm" / "demo" / "assets" / "sentiment" / "pairs.jsonl")
    parser.add_argument("--pairs", type=int, default=32, help="training pairs per run (32)")
    parser.add_argument("--modes", default="top-layers,lora")
    parser.add_argument("--repeats", type=int, default=1, help="runs per trainer and mode (1)")
    parser.add_argument("--old-rev", default=OLD_REV, help=f"git revision of the old trainer ({OLD_REV})")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"no model at {args.base}: run bash launch/quickstart.sh first")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # as the demo trains: every core
    from genarm_vllm import training as new_train

    results, machine_info = [], machine()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_train = load_old_trainer(args.old_rev, tmp)
        rows = [line for line in args.data.read_text().splitlines() if line.strip()][: args.pairs]
        data = tmp / "pairs.jsonl"
        data.write_text("\n".join(rows) + "\n")
        common = dict(base=str(args.base), beta_r=0.5, epochs=1, batch_size=8, max_length=128,
                      eval_fraction=0.0, seed=0, chat_template=True)
        for i, mode in enumerate(args.modes.split(",")):
            for r in range(args.repeats):
                order = [("old", old_train), ("new", new_train)]
                if (i + r) % 2:
                    order.reverse()
                for name, module in order:
                    options = {**common, **MODES[mode]}
                    if name == "new":
                        options["device"] = "cpu"
                        if mode == "lora":  # the old trainer's output: the merged full folder
                            options["merge"] = True
                    out = tmp / f"{name}-{mode}-{r}"
                    started = time.perf_counter()
                    metrics = module.train_arm(args.base, data, out, progress=False, **options)
                    wall = time.perf_counter() - started
                    seconds = metrics["train_seconds"]
                    row = {"trainer": name, "mode": mode, "repeat": r, "pairs": metrics["num_train_pairs"],
                           "train_seconds": seconds, "wall_seconds": round(wall, 2),
                           "pairs_per_second": round(metrics["num_train_pairs"] / seconds, 3)}
                    results.append(row)
                    print(json.dumps(row), flush=True)

    print(f"\n{machine_info['cpu']}, {machine_info['cores']} cores, flags: {' '.join(machine_info['flags'])}")
    print(f"torch {torch.__version__}, {args.pairs} pairs, batch 8, max length 128, 1 epoch\n")
    print("| mode | old pairs/s | new pairs/s | new / old |")
    print("|---|---|---|---|")
    summary = {}
    for mode in args.modes.split(","):
        best = {name: max(r["pairs_per_second"] for r in results
                          if r["mode"] == mode and r["trainer"] == name)
                for name in ("old", "new")}
        summary[mode] = {**best, "ratio": round(best["new"] / best["old"], 3)}
        print(f"| {mode} | {best['old']:.3f} | {best['new']:.3f} | {best['new'] / best['old']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info, "torch": torch.__version__,
                                         "settings": {**common, "pairs": args.pairs,
                                                      "old_rev": args.old_rev},
                                         "runs": results, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
