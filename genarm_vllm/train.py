"""Training autoregressive reward models (ARMs) from preference pairs: `genarm-vllm train-arm`.

An ARM is an ordinary causal LM pi_r whose reward of a response y to a prompt x is the summed
log-probability r(x, y) = sum_t log pi_r(y_t | x, y_<t) over the response tokens. GenARM
(Xu et al., ICLR 2025, arXiv 2410.08193; github.com/Yuancheng-Xu/GenARM) trains it on pairs (y_w preferred to y_l) with

    L = -log sigmoid(beta_r * (r(x, y_w) - r(x, y_l)) - gamma)

summed over tokens (not averaged), with no reference model.

The trainer: a `transformers.Trainer` subclass (ARMTrainer) whose compute_loss is the loss
above. Why Trainer and not TRL's DPOTrainer (which the official code subclasses):
  - everything the issue asks of "the Hugging Face stack" lives in Trainer itself, and TRL's
    trainers inherit it from there: device placement, bf16/fp16 autocast, gradient
    checkpointing, peft models, `accelerate launch` multi-GPU, DeepSpeed ZeRO (a config file),
    periodic checkpoints and resume, evaluation every N steps, report_to tensorboard / wandb;
    every TrainingArguments field stays reachable (`--trainer-arg KEY=VALUE`);
  - DPOTrainer tokenizes rows by its own rules (and changes them between releases); an ARM
    must be trained on exactly the ids the decoders feed it (genarm_vllm.tokenization, shared
    with the batch job and the demo), so we would have to bypass its data pipeline anyway;
  - DPOTrainer's loss is built around a reference model; GenARM has none, and its margin gamma
    needs a subclass: the loss is ten lines in compute_loss, with no extra dependency.

Tokenization (genarm_vllm.tokenization, the contract shared with the decoders):
    prompt ids   a plain prompt: tokenized with the tokenizer's special tokens (as vLLM's
                 generate() does); with chat_template=True, or for rows that are chat
                 conversations, the chat template for the prompt turns (generation prompt
                 added), as vLLM's chat path does;
    response ids the response tokenized on its own, then EOS.
Only response tokens (EOS included) are scored; prompt and padding positions are masked. A
response that does not fit in max_length after its prompt is cut (its EOS is then dropped).

Rows (JSONL lines or a `datasets` folder), in the common public layouts:
    {"prompt": str, "chosen": str, "rejected": str}
    {"chosen": [messages], "rejected": [messages]} (UltraFeedback binarized; "prompt", a string
        or a list of messages, optional): the turns before the last assistant message must be
        the same in both and are the prompt; the last assistant contents are the responses;
    {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": ...} (HH-RLHF): the text up
        to the last "\\n\\nAssistant:" is the shared prompt, the rest the responses.

Module-level imports stay light (stdlib only): cli.py reads the defaults and recipes from here
for every command, and torch / transformers take seconds to import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
import time
from pathlib import Path

FIELDS = ("prompt", "chosen", "rejected")
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
MAX_REPORTED_ROWS = 10
IGNORE = -100  # label of positions that are not scored (prompt, padding)
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
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
    save_adapter: bool | str = False  # True: ARM_DIR/lora_adapter; a path: there
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


@dataclasses.dataclass
class Pair:
    """One tokenized preference pair (responses end with EOS unless cut by max_length)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False


# ----------------------------------------------------------------------------- objective


def arm_preference_loss(chosen_logps, rejected_logps, beta_r: float, gamma: float = 0.0):
    """GenARM loss per pair: -log sigmoid(beta_r * (r_chosen - r_rejected) - gamma).

    chosen_logps / rejected_logps: [N] summed response log-probs (see response_logps).
    Returns [N] losses; the batch loss is their mean.
    """
    import torch.nn.functional as F

    return -F.logsigmoid(beta_r * (chosen_logps - rejected_logps) - gamma)


def response_logps(logits, labels):
    """Per-sequence summed log-prob of the scored tokens: r = sum_t log pi(y_t | prefix).

    logits: [B, T, V]; labels: [B, T] token ids, IGNORE (-100) at positions not scored
    (prompt, padding). logits[:, t] predicts the token at t + 1. Returns [B], float32.
    """
    import torch.nn.functional as F

    # cross_entropy gives -log pi per position and exactly 0 where the label is ignored.
    token_nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
        reduction="none",
    )
    return -token_nll.sum(-1)


def collate(pairs: list[Pair], pad_id: int) -> dict:
    """Chosen then rejected sequences of `pairs` as one right-padded batch with labels."""
    import torch

    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    sequences += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for i, (prompt, response) in enumerate(sequences):
        end = len(prompt) + len(response)
        input_ids[i, :end] = torch.tensor(prompt + response)
        attention_mask[i, :end] = 1
        labels[i, len(prompt):end] = torch.tensor(response)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_logps(model, batch: dict, vocab_size: int):
    """(chosen, rejected) summed response log-probs of a `collate` batch, one forward pass."""
    labels = batch["labels"]
    # Logits only from the position before the first scored token on: the earlier ones
    # predict prompt tokens, and the vocabulary projection is a large share of a small
    # model's cost.
    first = int((labels != IGNORE).any(0).int().argmax())
    keep = labels.shape[1] - max(first - 1, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False, logits_to_keep=keep).logits
    # Normalise over the tokenizer's vocabulary only, as GenARM decoding does: padded
    # vocabulary columns are dropped before the softmax.
    logps = response_logps(logits[..., :vocab_size], labels[:, -keep:])
    half = labels.shape[0] // 2
    return logps[:half], logps[half:]


def pair_logps(model, pairs: list[Pair], pad_id: int, vocab_size: int):
    """(chosen, rejected) summed response log-probs of `pairs`, one forward pass for both."""
    return batch_logps(model, collate(pairs, pad_id), vocab_size)


# ----------------------------------------------------------------------------- data


def read_rows(data: str | Path) -> tuple[list[tuple[str, object]], list[str]]:
    """([(where, row)], [errors]) from a JSONL file or a local `datasets` folder.

    `where` names the row in messages: "line N" (1-based JSONL line) or "row N" (1-based).
    """
    path = Path(data)
    if not path.exists():
        raise ValueError(f"data {data} does not exist")
    if path.is_dir():
        return read_dataset_folder(path), []
    rows, errors = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                errors.append(f"line {number}: not valid JSON ({e.msg})")
    return rows, errors


def read_dataset_folder(path: Path) -> list[tuple[str, object]]:
    """Rows of a Hugging Face `datasets` folder (save_to_disk); of a DatasetDict, the split
    train (or train_prefs, as UltraFeedback binarized names it), or its only split."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{path} is not a datasets folder (save_to_disk) or a JSONL file: {e}") from None
    if isinstance(dataset, datasets.DatasetDict):
        split = next((s for s in ("train", "train_prefs") if s in dataset), None)
        if split is None and len(dataset) != 1:
            raise ValueError(f"{path} holds splits {list(dataset)}; expected 'train', "
                             "'train_prefs' or one split")
        dataset = dataset[split] if split else next(iter(dataset.values()))
    missing = [name for name in ("chosen", "rejected") if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset {path} lacks column(s) {', '.join(missing)} (has {dataset.column_names})"
        )
    columns = [name for name in FIELDS if name in dataset.column_names]
    return [(f"row {i}", row) for i, row in enumerate(dataset.select_columns(columns), start=1)]


ROW_LAYOUTS = ('rows must be {"prompt", "chosen", "rejected"} strings; or "chosen" / "rejected" '
               'chat message lists ending in an assistant turn after the same prompt turns '
               '(UltraFeedback style); or "chosen" / "rejected" HH-RLHF conversations '
               '("\\n\\nHuman: ... \\n\\nAssistant: ...") sharing all but the last answer')


def hh_split(text: str) -> tuple[str, str] | None:
    """(prompt up to and including the last "\\n\\nAssistant:", the answer) of an HH-RLHF
    conversation; None if `text` is not one."""
    end = text.rfind(HH_ASSISTANT)
    if end < 0 or HH_HUMAN not in text[:end + 1]:
        return None
    end += len(HH_ASSISTANT)
    return text[:end], text[end:]


def hh_messages(prompt: str) -> list[dict]:
    """The turns of an HH-RLHF prompt (without its final, empty "Assistant:") as chat messages."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant",
                         "content": content.strip()})
    return messages[:-1]  # the last is the generation prompt: "\n\nAssistant:" with no text


def is_chat(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)


def parse_row(row: object, chat_template: bool) -> tuple[dict, str, str]:
    """(prompt_ids kwargs {prompt=...} or {messages=...}, chosen, rejected) of one data row, in
    any of the layouts the module docstring lists; ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}; {ROW_LAYOUTS}")
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    missing = [name for name in ("chosen", "rejected") if row.get(name) is None]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    if isinstance(chosen, list) or isinstance(rejected, list):  # chat conversations
        for name, value in [("chosen", chosen), ("rejected", rejected)]:
            if not is_chat(value) or not value or value[-1]["role"] != "assistant":
                raise ValueError(f"{name!r} is not a list of chat messages ({{role, content}} "
                                 f"strings) ending in an assistant turn; {ROW_LAYOUTS}")
        if chosen[:-1] != rejected[:-1]:
            raise ValueError("'chosen' and 'rejected' conversations differ before their last "
                             "assistant turn (they must share the prompt turns)")
        context = chosen[:-1]
        if is_chat(prompt) and prompt:
            context = list(prompt) + context  # TRL's layout: prompt turns apart
        elif not context:
            if not isinstance(prompt, str):
                raise ValueError("the conversations hold only the answer and there is no "
                                 "'prompt' string or message list")
            context = [{"role": "user", "content": prompt}]
        messages = [{"role": m["role"], "content": m["content"]} for m in context]
        return {"messages": messages}, chosen[-1]["content"], rejected[-1]["content"]
    for name, value in [("chosen", chosen), ("rejected", rejected)]:
        if not isinstance(value, str):
            raise ValueError(f"{name!r} must be a string, got {type(value).__name__}")
    if prompt is None:  # HH-RLHF: the prompt is inside both conversations
        split_c, split_r = hh_split(chosen), hh_split(rejected)
        if split_c is None or split_r is None:
            raise ValueError(f"missing field(s) prompt; {ROW_LAYOUTS}")
        if split_c[0] != split_r[0]:
            raise ValueError("'chosen' and 'rejected' HH-RLHF conversations differ before the "
                             "last \"\\n\\nAssistant:\" (they must share the prompt)")
        prompt, chosen, rejected = split_c[0], split_c[1], split_r[1]
        if chat_template:
            return {"messages": hh_messages(prompt)}, chosen.lstrip(), rejected.lstrip()
        return {"prompt": prompt}, chosen, rejected
    if is_chat(prompt) and prompt:
        return {"messages": list(prompt)}, chosen, rejected
    if not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string or chat messages, got {type(prompt).__name__}")
    from genarm_vllm.tokenization import user_message

    return ({"messages": user_message(prompt)} if chat_template else {"prompt": prompt}), chosen, rejected


def encode_pair(row: object, tokenizer, max_length: int, chat_template: bool) -> Pair:
    """A checked, tokenized Pair from one data row; ValueError says what is wrong with it."""
    from genarm_vllm.tokenization import prompt_ids, response_ids

    prompt, chosen, rejected = parse_row(row, chat_template)
    for name, text in [("chosen", chosen), ("rejected", rejected)]:
        if not text.strip():
            raise ValueError(f"{name!r} response is empty")
    ids = prompt_ids(tokenizer, **prompt)
    if not ids:
        raise ValueError("the prompt gives no tokens (and the tokenizer adds no BOS token), so "
                         "the first response token has no context")
    if len(ids) >= max_length:
        raise ValueError(f"the prompt is {len(ids)} tokens: max_length {max_length} "
                         "leaves no room for a response")
    room = max_length - len(ids)
    chosen_ids, rejected_ids = response_ids(tokenizer, chosen), response_ids(tokenizer, rejected)
    return Pair(ids, chosen_ids[:room], rejected_ids[:room],
                truncated=max(len(chosen_ids), len(rejected_ids)) > room)


def load_pairs(data: str | Path, tokenizer, max_length: int, chat_template: bool) -> list[Pair]:
    """Every row of `data` as a Pair; one ValueError listing the bad rows (up to 10) otherwise."""
    rows, errors = read_rows(data)
    pairs = []
    for where, row in rows:
        try:
            pairs.append(encode_pair(row, tokenizer, max_length, chat_template))
        except ValueError as e:
            errors.append(f"{where}: {e}")
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ROWS])
        more = len(errors) - MAX_REPORTED_ROWS
        raise ValueError(
            f"{len(errors)} bad row(s) in {data} (rows need a prompt and non-empty chosen and "
            f"rejected responses):\n  {shown}" + (f"\n  ... and {more} more" if more > 0 else "")
        )
    if not pairs:
        raise ValueError(f"{data} holds no preference pairs")
    return pairs


def split_pairs(pairs: list[Pair], eval_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) after a seeded shuffle; at least one held-out pair if eval_fraction > 0."""
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    num_eval = round(len(pairs) * eval_fraction)
    if eval_fraction > 0:
        num_eval = max(num_eval, 1)
    if len(pairs) - num_eval < 1:
        raise ValueError(f"{len(pairs)} pair(s) leave no training pair after eval_fraction "
                         f"{eval_fraction}; give more data or a smaller eval_fraction")
    return pairs[num_eval:], pairs[:num_eval]


# ----------------------------------------------------------------------------- model


def resolve_hardware(opts: TrainOptions) -> None:
    """Check device / precision / QLoRA against this machine; resolve load_in_4bit "auto"."""
    import importlib.util

    import torch

    cuda = torch.cuda.is_available() and opts.device != "cpu"
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if opts.precision == "fp16" and not cuda:
        raise ValueError("precision fp16 needs a CUDA GPU; on CPU use bf16 (fast on CPUs with "
                         "AMX) or fp32")
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if opts.load_in_4bit == "auto":
        opts.load_in_4bit = bool(cuda and have_bnb and opts.mode == "lora")
    elif opts.load_in_4bit and not (cuda and have_bnb):
        lacking = " and ".join(x for x, ok in [("a CUDA GPU", cuda), ("bitsandbytes", have_bnb)] if not ok)
        raise ValueError(f"load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes (pip install "
                         f"bitsandbytes); {lacking} missing here. Train plain LoRA with "
                         "--no-load-in-4bit")


def load_model(init: str, options: TrainOptions):
    """The model to train, float32 (4-bit with load_in_4bit), with only the parameters of
    `options.mode` trainable."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if options.load_in_4bit:
        import os

        from transformers import BitsAndBytesConfig

        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.precision, torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(init, **kwargs)
    if options.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=options.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if options.mode == "top-layers":
        train_only_top_layers(model, options.top_layers)
    elif options.mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
            target_modules=list(options.lora_targets), task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as e:  # e.g. target modules not found
            raise ValueError(f"LoRA targets {','.join(options.lora_targets)}: {e}") from None
    return model


def train_only_top_layers(model, k: int) -> None:
    """Freeze all but the top k decoder layers and the final norm (embeddings, lm_head too)."""
    decoder = model.get_decoder()
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if layers is None or norm is None:
        raise ValueError(f"mode top-layers: no decoder .layers / .norm in {type(model).__name__}; "
                         "use mode lora or full")
    if k > len(layers):
        raise ValueError(f"top_layers {k} exceeds the model's {len(layers)} decoder layers")
    model.requires_grad_(False)
    for module in [*layers[-k:], norm]:
        module.requires_grad_(True)


def merge_adapter(init_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Rebuild a merged ARM folder (float32) from its init model and a saved LoRA adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(init_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(init_dir)).save_pretrained(str(out_dir))
    return Path(out_dir)


# ----------------------------------------------------------------------------- the trainer

_TRAINER_CLASS = None


def arm_trainer_class():
    """ARMTrainer: transformers.Trainer with the GenARM loss (built on first use, so that this
    module imports without torch)."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    import torch
    from transformers import Trainer

    class ARMTrainer(Trainer):
        """Trainer whose loss is GenARM's; batches come from `collate` (chosen rows, then
        rejected rows); evaluation predicts the margins r(chosen) - r(rejected)."""

        def __init__(self, *args, beta_r: float, gamma: float, vocab_size: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.beta_r, self.gamma, self.vocab_size = beta_r, gamma, vocab_size
            # compute_loss returns the mean over the batch's pairs: Trainer divides it by the
            # accumulation steps (no token-count normalisation: the loss is per pair).
            self.model_accepts_loss_kwargs = False
            self.loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            chosen, rejected = batch_logps(model, inputs, self.vocab_size)
            loss = arm_preference_loss(chosen, rejected, self.beta_r, self.gamma).mean()
            if return_outputs:
                return loss, {"chosen_logps": chosen, "rejected_logps": rejected}
            return loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                chosen, rejected = batch_logps(model, inputs, self.vocab_size)
            margins = (chosen - rejected).float()
            loss = arm_preference_loss(margins, 0.0, self.beta_r, self.gamma).mean()
            if prediction_loss_only:
                return loss, None, None
            return loss, margins, torch.zeros_like(margins)

    _TRAINER_CLASS = ARMTrainer
    return ARMTrainer


def no_final_checkpoint_callback(save_steps: int):
    """A TrainerCallback that skips Trainer's checkpoint at the last step (the ARM folder is
    saved right after, and the checkpoints are then deleted) unless save_steps falls on it."""
    from transformers import TrainerCallback

    class NoFinalCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            last = state.max_steps and state.global_step >= state.max_steps
            if last and not (save_steps and state.global_step % save_steps == 0):
                control.should_save = False
            return control

    return NoFinalCheckpoint()


def margin_metrics(beta_r: float, gamma: float):
    """compute_metrics for ARMTrainer: held-out accuracy (share of pairs with r(chosen) >
    r(rejected)), mean margin, and the GenARM loss over the held-out pairs."""
    import numpy as np

    def compute(eval_prediction) -> dict:
        margins = np.asarray(eval_prediction.predictions, dtype=np.float64).reshape(-1)
        return {"accuracy": float((margins > 0).mean()), "mean_margin": float(margins.mean()),
                "pair_loss": float(np.logaddexp(0.0, -(beta_r * margins - gamma)).mean())}

    return compute


def training_arguments(opts: TrainOptions, checkpoint_dir: Path, has_eval: bool, resuming: bool,
                       progress: bool):
    """TrainingArguments for `opts` (opts.trainer_args last: any field, passed through)."""
    import dataclasses as dc

    import torch
    from transformers import TrainingArguments

    fields = {f.name for f in dc.fields(TrainingArguments)}
    unknown = sorted(set(opts.trainer_args) - fields)
    if unknown:
        raise ValueError(f"trainer_args: {', '.join(unknown)} not TrainingArguments field(s)")
    eval_strategy = ("steps" if opts.eval_steps else "epoch") if has_eval else "no"
    kwargs = dict(
        output_dir=str(checkpoint_dir), seed=opts.seed, data_seed=opts.seed,
        per_device_train_batch_size=opts.batch_size, per_device_eval_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, num_train_epochs=opts.epochs,
        learning_rate=opts.lr, lr_scheduler_type=opts.lr_scheduler, weight_decay=opts.weight_decay,
        max_grad_norm=opts.max_grad_norm, optim="adamw_torch",
        bf16=opts.precision == "bf16", fp16=opts.precision == "fp16", use_cpu=opts.device == "cpu",
        gradient_checkpointing=opts.gradient_checkpointing and not opts.load_in_4bit,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy=eval_strategy, eval_steps=opts.eval_steps or None,
        eval_on_start=has_eval and not resuming,
        save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500,
        save_total_limit=opts.save_total_limit,
        logging_strategy="steps", logging_steps=opts.logging_steps, logging_first_step=True,
        report_to=[] if opts.report_to == "none" else [opts.report_to],
        disable_tqdm=not progress, remove_unused_columns=False, label_names=["labels"],
        dataloader_pin_memory=torch.cuda.is_available() and opts.device != "cpu",
        deepspeed=opts.deepspeed,
    )
    if opts.warmup_steps:
        kwargs["warmup_steps"] = opts.warmup_steps
    elif "warmup_ratio" in fields:  # transformers 4.x
        kwargs["warmup_ratio"] = opts.warmup_ratio
    else:  # transformers 5: a float warmup_steps < 1 is a ratio
        kwargs["warmup_steps"] = opts.warmup_ratio
    kwargs = {k: v for k, v in kwargs.items() if k in fields}
    return TrainingArguments(**{**kwargs, **opts.trainer_args})


def save_arm(trainer, tokenizer, init: str, out: Path, opts: TrainOptions) -> Path | None:
    """Save the plain ARM folder (LoRA merged) with the tokenizer on the main process; the
    adapter alone too if asked. Returns the adapter folder if kept."""
    # Every process takes part (DeepSpeed ZeRO-3 gathers the shards); the main one writes.
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter_dir = None
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        if opts.mode == "lora":
            adapter_dir = (out / ADAPTER_DIR if opts.save_adapter is True
                           else Path(opts.save_adapter) if opts.save_adapter else out / ".adapter-tmp")
            model.save_pretrained(str(adapter_dir), state_dict=state_dict)
            # Merged in float32 from the saved adapter (also right after 4-bit QLoRA training):
            # exactly what merge_adapter rebuilds.
            merge_adapter(init, adapter_dir, out)
            if not opts.save_adapter:
                shutil.rmtree(adapter_dir)
                adapter_dir = None
        else:
            model.save_pretrained(str(out), state_dict=state_dict)
            tokenizer.save_pretrained(str(out))
    trainer.accelerator.wait_for_everyone()
    return adapter_dir


def history(log_history: list[dict]) -> dict:
    """The held-out metrics and training losses from Trainer's log history."""

    def epoch(value):
        value = round(float(value or 0.0), 4)
        return int(value) if value.is_integer() else value

    evals = [{"epoch": epoch(e.get("epoch")), "step": e["step"], "accuracy": e["eval_accuracy"],
              "mean_margin": e["eval_mean_margin"], "loss": e["eval_pair_loss"]}
             for e in log_history if "eval_accuracy" in e]
    losses = [{"epoch": epoch(e.get("epoch")), "step": e["step"], "loss": e["loss"],
               "learning_rate": e.get("learning_rate")}
              for e in log_history if "loss" in e and "eval_accuracy" not in e]
    return {"eval": evals, "train_log": losses}


def train_arm(init: str | Path, data: str | Path, out: str | Path, *, progress: bool = True,
              recipe: str | None = None, callbacks: list | None = None, **options) -> dict:
    """Train an ARM from `init` on preference pairs in `data`; save it to `out`.

    data: a JSONL file or a local `datasets` folder, rows in any layout of the module
    docstring. recipe: a RECIPES preset; options (the TrainOptions fields: beta_r, gamma,
    epochs, lr, mode, ...) override it. callbacks: extra transformers TrainerCallbacks.
    Returns the metrics also written to out/genarm_train_metrics.json: held-out accuracy,
    mean margin and loss before training (step 0) and at each evaluation, training losses.
    """
    opts = resolve_options(recipe, **options)
    init, out = str(init), Path(out)

    from transformers import AutoConfig, AutoTokenizer

    from genarm_vllm.engine.validation import check_same_tokenizer

    # Cheap checks first: bad options, tokenizers or rows fail before the model loads.
    try:
        config, tokenizer = AutoConfig.from_pretrained(init), AutoTokenizer.from_pretrained(init)
    except (OSError, ValueError) as e:  # no such folder, or not a model with a tokenizer
        raise ValueError(f"cannot load model {init}: {e}") from None
    if opts.base is not None:
        if not Path(opts.base).is_dir():
            raise ValueError(f"base {opts.base} is not a model folder")
        check_same_tokenizer(str(opts.base), init)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and opts.max_length > positions:
        raise ValueError(f"max_length {opts.max_length} exceeds {init}'s max_position_embeddings "
                         f"{positions}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {init} has no EOS token to end responses with")
    if opts.chat_template and not tokenizer.chat_template:
        raise ValueError(f"chat_template: the tokenizer of {init} has no chat template")
    asked_4bit = opts.load_in_4bit
    resolve_hardware(opts)
    if asked_4bit == "auto" and not opts.load_in_4bit and progress:
        print("train-arm: load_in_4bit auto -> off (QLoRA needs a CUDA GPU and bitsandbytes): "
              "plain LoRA", flush=True)
    pairs = load_pairs(data, tokenizer, opts.max_length, opts.chat_template)
    train_pairs, eval_pairs = split_pairs(pairs, opts.eval_fraction, opts.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    checkpoint_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else out / CHECKPOINT_DIR
    resume_from = None
    if opts.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume_from = (str(opts.resume) if opts.resume is not True
                       else checkpoint_dir.is_dir() and get_last_checkpoint(str(checkpoint_dir)))
        if not resume_from or not Path(resume_from).is_dir():
            raise ValueError(f"resume: no checkpoint-* folder in {checkpoint_dir}"
                             if opts.resume is True else f"resume: {opts.resume} is not a checkpoint folder")

    import functools

    import torch

    # Before the model: under DeepSpeed ZeRO-3 TrainingArguments must exist when it loads.
    args = training_arguments(opts, checkpoint_dir, bool(eval_pairs), bool(resume_from), progress)
    torch.manual_seed(opts.seed)  # LoRA init
    model = load_model(init, opts)
    trainer = arm_trainer_class()(
        model=model, args=args, train_dataset=train_pairs, eval_dataset=eval_pairs or None,
        data_collator=functools.partial(collate, pad_id=pad_id),
        compute_metrics=margin_metrics(opts.beta_r, opts.gamma), callbacks=callbacks,
        beta_r=opts.beta_r, gamma=opts.gamma, vocab_size=len(tokenizer),
    )
    if not progress:  # no log lines either (Trainer prints them when tqdm is off)
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if not opts.keep_checkpoints:
        trainer.add_callback(no_final_checkpoint_callback(opts.save_steps))
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    adapter_dir = save_arm(trainer, tokenizer, init, out, opts)
    args_record = {"init": init, "data": str(data), "out": str(out), "recipe": recipe,
                   **dataclasses.asdict(opts), "lora_targets": list(opts.lora_targets)}
    metrics = {
        "args": args_record,
        "num_train_pairs": len(train_pairs),
        "num_eval_pairs": len(eval_pairs),
        "truncated_pairs": sum(p.truncated for p in pairs),
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()
                                    if p.requires_grad),
        "optimizer_steps": trainer.state.global_step,
        "train_seconds": round(seconds, 2),
        "train_pairs_per_second": round(result.metrics.get("train_samples_per_second", 0.0), 3),
        "train_loss": result.training_loss,
        **history(trainer.state.log_history),
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
    }
    if trainer.is_world_process_zero():
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        if not opts.keep_checkpoints and checkpoint_dir.is_dir():
            for checkpoint in checkpoint_dir.glob("checkpoint-*"):
                shutil.rmtree(checkpoint)
            if not any(checkpoint_dir.iterdir()):  # else TensorBoard logs (runs/) stay
                checkpoint_dir.rmdir()
    return metrics


# ----------------------------------------------------------------------------- CLI helpers


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
