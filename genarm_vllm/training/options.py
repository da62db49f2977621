"""train-arm options: TrainOptions (the CLI flags, same names), the paper's recipes, and the
glue from parsed flags to train_arm's keyword arguments.

Stdlib only at module level: cli.py reads the defaults and recipes from here for every
command, and torch / transformers take seconds to import.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

MODES = ("full", "lora", "top-layers")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
REPORT_TO = ("none", "tensorboard", "wandb")
SCHEDULERS = ("cosine", "linear", "constant_with_warmup", "constant")
# LoRA: the official HH-RLHF recipe. Full / top layers: a small step for small models (the
# official 7B full fine-tune uses 5e-7).
DEFAULT_LR = {"full": 1e-5, "top-layers": 1e-5, "lora": 5e-4}
METRICS_FILE = "genarm_train_metrics.json"
ADAPTER_DIR = "lora_adapter"
CHECKPOINT_DIR = "checkpoints"  # default place of periodic checkpoints, under the ARM folder
QKV = ("q_proj", "k_proj", "v_proj")

# The paper's recipes (its official code, github.com/Yuancheng-Xu/GenARM). 32 pairs per optimizer step are
# batch_size x grad_accum on one process; under `accelerate launch` over N processes a step
# holds N times as many (divide --grad-accum by N to keep 32).
_LORA_8_16 = dict(mode="lora", lora_r=8, lora_alpha=16.0, lora_dropout=0.05, lora_targets=QKV)
RECIPES = {
    # HH-RLHF: LoRA on LLaMA-7B SFT, 4-bit (QLoRA) when bitsandbytes and a GPU are present.
    "hh": dict(**_LORA_8_16, beta_r=0.05, lr=5e-4, epochs=1, batch_size=4, grad_accum=8,
               lr_scheduler="cosine", warmup_steps=100, load_in_4bit="auto"),
    # Weak-to-strong: full fine-tune of tulu-2-7b on ultrafeedback_binarized train_prefs.
    "ultrafeedback": dict(mode="full", beta_r=0.1, lr=5e-7, epochs=3, batch_size=4, grad_accum=8),
    # Multi-objective: LoRA on alpaca-7b-reproduced, PKU-SafeRLHF-10K, one ARM per objective.
    "pku-help": dict(**_LORA_8_16, beta_r=0.5, lr=5e-4, epochs=1, batch_size=4, grad_accum=8),
    "pku-harm": dict(**_LORA_8_16, beta_r=0.01, lr=5e-4, epochs=1, batch_size=4, grad_accum=8),
}


@dataclasses.dataclass
class TrainOptions:
    """Everything train_arm takes besides init / data / out (the CLI flags, same names)."""

    base: str | None = None  # the base model the ARM will guide: tokenizers must match
    beta_r: float = 0.1
    gamma: float = 0.0
    epochs: int = 1
    lr: float | None = None  # None: DEFAULT_LR[mode]
    batch_size: int = 4  # pairs per forward pass and process (2 x batch_size sequences)
    grad_accum: int = 1  # forward passes per optimizer step
    max_length: int = 512  # tokens per sequence (prompt + response)
    eval_fraction: float = 0.1
    seed: int = 0
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1  # linear warmup share of the schedule (unless warmup_steps)
    warmup_steps: int = 0  # > 0: this many warmup steps instead of warmup_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mode: str = "full"
    top_layers: int = 2
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = QKV
    load_in_4bit: bool | str = False  # QLoRA: True, False or "auto" (True when GPU + bnb)
    merge: bool = False  # lora: the ARM folder is a full model (adapter merged), not the adapter
    save_adapter: bool | str = False  # with merge, keep the adapter: True: ARM_DIR/lora_adapter
    chat_template: bool = False
    # Hardware and the trainer stack.
    device: str = "auto"  # auto: a GPU when present
    precision: str = "fp32"  # mixed precision: bf16 / fp16 autocast, float32 master weights
    gradient_checkpointing: bool = False
    deepspeed: str | None = None  # a DeepSpeed config file (launch/ds_zero3.json)
    eval_steps: int = 0  # 0: held-out metrics after each epoch (and before training)
    save_steps: int = 500  # a checkpoint every N optimizer steps (0: none)
    save_total_limit: int = 2
    checkpoint_dir: str | None = None  # None: ARM_DIR/checkpoints
    keep_checkpoints: bool = False  # keep them after a finished run
    resume: bool | str = False  # True: the latest checkpoint in checkpoint_dir; a path: that one
    logging_steps: int = 10
    report_to: str = "none"
    trainer_args: dict = dataclasses.field(default_factory=dict)  # more TrainingArguments

    def check(self) -> None:
        """ValueError naming the first invalid option."""
        for name, allowed in [("mode", MODES), ("precision", PRECISIONS), ("device", DEVICES),
                              ("report_to", REPORT_TO), ("lr_scheduler", SCHEDULERS)]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("beta_r", "lr", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not math.isfinite(self.gamma):
            raise ValueError(f"gamma must be finite, got {self.gamma!r}")
        for name in ("epochs", "batch_size", "grad_accum", "top_layers", "lora_r", "logging_steps",
                     "save_total_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("eval_steps", "save_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not (self.weight_decay >= 0 and self.max_grad_norm >= 0):
            raise ValueError("weight_decay and max_grad_norm must be >= 0")
        if self.save_adapter and self.mode != "lora":
            raise ValueError("save_adapter needs mode lora")
        if self.merge and self.mode != "lora":
            raise ValueError("merge needs mode lora")
        if self.save_adapter and not self.merge:
            raise ValueError("save_adapter needs merge: without it the ARM folder is the LoRA "
                             "adapter already")
        if self.load_in_4bit not in (True, False, "auto"):
            raise ValueError(f"load_in_4bit must be True, False or 'auto', got {self.load_in_4bit!r}")
        if self.load_in_4bit is True and self.mode != "lora":
            raise ValueError("load_in_4bit (QLoRA) needs mode lora")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise ValueError(f"deepspeed config {self.deepspeed} is not a file")


def resolve_options(recipe: str | None = None, **explicit) -> TrainOptions:
    """TrainOptions: the defaults, then the recipe's values, then every explicit option."""
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(explicit) - names)
    if unknown:
        raise ValueError(f"unknown training option(s) {', '.join(unknown)}")
    opts = TrainOptions(**{**RECIPES.get(recipe, {}), **explicit})
    if isinstance(opts.lora_targets, str):  # "q_proj,v_proj", as on the command line
        opts.lora_targets = opts.lora_targets.split(",")
    opts.lora_targets = tuple(t.strip() for t in opts.lora_targets if t.strip())
    if not opts.lora_targets:
        raise ValueError("lora_targets: give at least one module name")
    opts.check()
    if opts.lr is None:
        opts.lr = DEFAULT_LR[opts.mode]
    return opts


def parse_trainer_arg(text: str) -> tuple[str, object]:
    """"KEY=VALUE" (VALUE as JSON when it parses: numbers, true/false, lists) -> (KEY, VALUE)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--trainer-arg expects KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def options_from_args(args) -> dict:
    """train_arm keyword arguments from a parsed train-arm namespace: only the flags given
    (the parser's defaults are unset), so a recipe's values stay unless a flag overrides them."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)
             if getattr(args, f.name, None) is not None}
    if "trainer_args" in given:
        given["trainer_args"] = dict(parse_trainer_arg(t) for t in given["trainer_args"])
    return given
