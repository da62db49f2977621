"""Training autoregressive reward models (ARMs) from preference pairs: `genarm-vllm train-arm`.

An ARM is an ordinary causal LM pi_r whose reward of a response y to a prompt x is the summed
log-probability r(x, y) = sum_t log pi_r(y_t | x, y_<t) over the response tokens. GenARM
(Xu et al., ICLR 2025; ../shared/GENARM.md) trains it on pairs (y_w preferred to y_l) with

    L = -log sigmoid(beta_r * (r(x, y_w) - r(x, y_l)) - gamma)

summed over tokens (not averaged), with no reference model.

Tokenization (one choice, used for training and matching how the engine decodes):
    prompt ids   the raw prompt tokenized with the tokenizer's own special tokens (e.g. BOS),
                 as vLLM's generate() does; or, with chat_template=True, the tokenizer's chat
                 template rendered for one user message with add_generation_prompt=True and
                 tokenized without adding special tokens, as vLLM's chat path does;
    response ids the response tokenized on its own, without special tokens, then the EOS token
                 (so the ARM also scores where responses end).
Only response tokens (EOS included) are scored; prompt and padding positions are masked. A
response that does not fit in max_length after its prompt is cut (its EOS is then dropped).
The response is tokenized separately from the prompt, as the base generates it: put any
separating space or newline at the end of the prompt or the start of the response.

Module-level imports stay light (stdlib only): cli.py imports this module for every command,
and torch / transformers take seconds to import.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from pathlib import Path

FIELDS = ("prompt", "chosen", "rejected")
MODES = ("full", "lora", "top-layers")
# LoRA: the official HH-RLHF recipe. Full / top layers: a small step for small models (the
# official 7B full fine-tune uses 5e-7).
DEFAULT_LR = {"full": 1e-5, "top-layers": 1e-5, "lora": 5e-4}
METRICS_FILE = "genarm_train_metrics.json"
ADAPTER_DIR = "lora_adapter"
MAX_REPORTED_ROWS = 10
IGNORE = -100  # label of positions that are not scored (prompt, padding)


@dataclasses.dataclass
class TrainOptions:
    """Everything train_arm takes besides init / data / out (the CLI flags, same names)."""

    base: str | None = None  # the base model the ARM will guide: tokenizers must match
    beta_r: float = 0.1
    gamma: float = 0.0
    epochs: int = 1
    lr: float | None = None  # None: DEFAULT_LR[mode]
    batch_size: int = 4  # pairs per forward pass (2 x batch_size sequences)
    grad_accum: int = 1  # forward passes per optimizer step
    max_length: int = 512  # tokens per sequence (prompt + response)
    eval_fraction: float = 0.1
    seed: int = 0
    warmup_ratio: float = 0.1  # linear warmup share of the cosine schedule
    mode: str = "full"
    top_layers: int = 2
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    save_adapter: bool | str = False  # True: ARM_DIR/lora_adapter; a path: there
    chat_template: bool = False

    def check(self) -> None:
        """ValueError naming the first invalid option."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("beta_r", "lr", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not math.isfinite(self.gamma):
            raise ValueError(f"gamma must be finite, got {self.gamma!r}")
        for name in ("epochs", "batch_size", "grad_accum", "top_layers", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.save_adapter and self.mode != "lora":
            raise ValueError("save_adapter needs mode lora")


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


def pair_logps(model, pairs: list[Pair], pad_id: int, vocab_size: int):
    """(chosen, rejected) summed response log-probs of `pairs`, one forward pass for both."""
    batch = collate(pairs, pad_id)
    # Logits only from the last position of the shortest prompt on: the earlier ones predict
    # prompt tokens, and the vocabulary projection is a large share of a small model's cost.
    keep = batch["input_ids"].shape[1] - min(len(p.prompt_ids) for p in pairs) + 1
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
        logits_to_keep=keep,
    ).logits
    # Normalise over the tokenizer's vocabulary only, as GenARM decoding does: padded
    # vocabulary columns are dropped before the softmax.
    logps = response_logps(logits[..., :vocab_size], batch["labels"][:, -keep:])
    return logps[: len(pairs)], logps[len(pairs):]


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
    """Rows of a Hugging Face `datasets` folder (save_to_disk); a DatasetDict's train split."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{path} is not a datasets folder (save_to_disk) or a JSONL file: {e}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset and len(dataset) != 1:
            raise ValueError(f"{path} holds splits {list(dataset)}; expected 'train' or one split")
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    missing = [name for name in FIELDS if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset {path} lacks column(s) {', '.join(missing)} (has {dataset.column_names})"
        )
    return [(f"row {i}", row) for i, row in enumerate(dataset.select_columns(list(FIELDS)), start=1)]


def encode_prompt(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    if chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        # The rendered template carries its own special tokens (vLLM's chat path agrees).
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def encode_response(tokenizer, response: str) -> list[int]:
    return tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def encode_pair(row: object, tokenizer, max_length: int, chat_template: bool) -> Pair:
    """A checked, tokenized Pair from one data row; ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with fields {', '.join(FIELDS)}, got {type(row).__name__}")
    missing = [name for name in FIELDS if row.get(name) is None]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    for name in FIELDS:
        if not isinstance(row[name], str):
            raise ValueError(f"{name!r} must be a string, got {type(row[name]).__name__}")
    for name in ("chosen", "rejected"):
        if not row[name].strip():
            raise ValueError(f"{name!r} response is empty")
    prompt_ids = encode_prompt(tokenizer, row["prompt"], chat_template)
    if not prompt_ids:
        raise ValueError("the prompt gives no tokens (and the tokenizer adds no BOS token), so "
                         "the first response token has no context")
    if len(prompt_ids) >= max_length:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens: max_length {max_length} "
                         "leaves no room for a response")
    room = max_length - len(prompt_ids)
    chosen = encode_response(tokenizer, row["chosen"])
    rejected = encode_response(tokenizer, row["rejected"])
    return Pair(prompt_ids, chosen[:room], rejected[:room],
                truncated=max(len(chosen), len(rejected)) > room)


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
            f"{len(errors)} bad row(s) in {data} (rows need string fields prompt, chosen, "
            f"rejected with non-empty responses):\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
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


def load_model(init: str, options: TrainOptions):
    """The model to train, float32, with only the parameters of `options.mode` trainable."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
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


def save_arm(model, tokenizer, out: Path, options: TrainOptions) -> Path | None:
    """Save a plain model folder (LoRA merged) with the tokenizer; returns the adapter dir if saved."""
    adapter_dir = None
    if options.mode == "lora":
        if options.save_adapter:
            adapter_dir = out / ADAPTER_DIR if options.save_adapter is True else Path(options.save_adapter)
            model.save_pretrained(str(adapter_dir))  # before merging: the adapter weights alone
        model = model.merge_and_unload()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return adapter_dir


def merge_adapter(init_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Rebuild a merged ARM folder from its init model and a saved LoRA adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(init_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(init_dir)).save_pretrained(str(out_dir))
    return Path(out_dir)


# ----------------------------------------------------------------------------- training


def evaluate(model, pairs: list[Pair], batch_size: int, pad_id: int, vocab_size: int,
             options: TrainOptions) -> dict | None:
    """Held-out pairwise accuracy (share with r(chosen) > r(rejected)), mean margin, loss."""
    import torch

    if not pairs:
        return None
    model.eval()
    margins, losses = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chosen, rejected = pair_logps(model, pairs[start:start + batch_size], pad_id, vocab_size)
            margins.append(chosen - rejected)
            losses.append(arm_preference_loss(chosen, rejected, options.beta_r, options.gamma))
    margins = torch.cat(margins)
    return {
        "accuracy": (margins > 0).sum().item() / len(margins),
        "mean_margin": margins.mean().item(),
        "loss": torch.cat(losses).mean().item(),
    }


def train_step(model, optimizer, scheduler, step_pairs: list[Pair], options: TrainOptions,
               pad_id: int, vocab_size: int) -> float:
    """One optimizer step over `step_pairs` (grad_accum forward passes); returns the mean loss."""
    import torch

    total = 0.0
    for start in range(0, len(step_pairs), options.batch_size):
        chosen, rejected = pair_logps(
            model, step_pairs[start:start + options.batch_size], pad_id, vocab_size
        )
        losses = arm_preference_loss(chosen, rejected, options.beta_r, options.gamma)
        # Each forward pass adds its share, so the step's gradient is that of the mean loss.
        (losses.sum() / len(step_pairs)).backward()
        total += losses.sum().item()
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(step_pairs)


def fit(model, train_pairs: list[Pair], eval_pairs: list[Pair], options: TrainOptions,
        pad_id: int, vocab_size: int, progress: bool) -> dict:
    """The training loop: AdamW, warmup + cosine schedule, held-out metrics per epoch."""
    import torch
    from tqdm import tqdm
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=0.0)
    pairs_per_step = options.batch_size * options.grad_accum
    total_steps = math.ceil(len(train_pairs) / pairs_per_step) * options.epochs
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=round(options.warmup_ratio * total_steps),
                              num_training_steps=total_steps)

    history, epoch_losses, step_losses = [], [], []
    bar = tqdm(total=total_steps, desc="train-arm", unit="step", disable=not progress)

    def held_out(epoch: int) -> None:
        result = evaluate(model, eval_pairs, options.batch_size, pad_id, vocab_size, options)
        if result is not None:
            history.append({"epoch": epoch, **result})
            if progress:
                bar.write(f"epoch {epoch}: held-out accuracy {result['accuracy']:.3f}, mean "
                          f"margin {result['mean_margin']:.3f}, loss {result['loss']:.4f}")

    rng = random.Random(options.seed)
    held_out(0)  # before training: where the init model stands
    for epoch in range(1, options.epochs + 1):
        order = list(train_pairs)
        rng.shuffle(order)
        model.train()
        losses = []
        for start in range(0, len(order), pairs_per_step):
            losses.append(train_step(model, optimizer, scheduler, order[start:start + pairs_per_step],
                                     options, pad_id, vocab_size))
            bar.set_postfix(epoch=epoch, loss=f"{sum(losses) / len(losses):.4f}")
            bar.update()
        step_losses += losses
        epoch_losses.append(sum(losses) / len(losses))
        held_out(epoch)
    bar.close()
    return {"eval": history, "train_loss": epoch_losses, "step_loss": step_losses}


def train_arm(init: str | Path, data: str | Path, out: str | Path, *, progress: bool = True,
              **options) -> dict:
    """Train an ARM from `init` on preference pairs in `data`; save it to `out`.

    data: a JSONL file of {"prompt", "chosen", "rejected"} rows, or a local `datasets` folder
    with those columns. options: the TrainOptions fields (beta_r, gamma, epochs, lr, mode, ...).
    Returns the metrics also written to out/genarm_train_metrics.json: held-out accuracy,
    mean margin and loss before training (epoch 0) and after each epoch, training losses.
    """
    opts = TrainOptions(**options)
    if isinstance(opts.lora_targets, str):  # "q_proj,v_proj", as on the command line
        opts.lora_targets = opts.lora_targets.split(",")
    opts.lora_targets = tuple(t.strip() for t in opts.lora_targets if t.strip())
    opts.check()
    if opts.lr is None:
        opts.lr = DEFAULT_LR[opts.mode]
    init, out = str(init), Path(out)

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from genarm_vllm.validation import check_same_tokenizer

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
    pairs = load_pairs(data, tokenizer, opts.max_length, opts.chat_template)
    train_pairs, eval_pairs = split_pairs(pairs, opts.eval_fraction, opts.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    torch.manual_seed(opts.seed)  # LoRA init, dropout
    model = load_model(init, opts)
    started = time.perf_counter()
    history = fit(model, train_pairs, eval_pairs, opts, pad_id, len(tokenizer), progress)
    metrics = {
        "args": {"init": init, "data": str(data), "out": str(out), **dataclasses.asdict(opts),
                 "lora_targets": list(opts.lora_targets)},  # as the JSON file has it
        "num_train_pairs": len(train_pairs),
        "num_eval_pairs": len(eval_pairs),
        "truncated_pairs": sum(p.truncated for p in pairs),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": round(time.perf_counter() - started, 2),
        **history,
    }
    out.mkdir(parents=True, exist_ok=True)
    adapter_dir = save_arm(model, tokenizer, out, opts)
    metrics["adapter_dir"] = str(adapter_dir) if adapter_dir else None
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# ----------------------------------------------------------------------------- CLI


def comma_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names")
    return names


def cmd_train_arm(args: argparse.Namespace) -> int:
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)}
    metrics = train_arm(args.init, args.data, args.out, **options)
    summary = ""
    if metrics["eval"]:
        first, last = metrics["eval"][0], metrics["eval"][-1]
        summary = (f"; held-out accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f}, "
                   f"mean margin {first['mean_margin']:.3f} -> {last['mean_margin']:.3f}")
    print(f"wrote ARM {args.out}{summary} (metrics: {Path(args.out) / METRICS_FILE})")
    if metrics["truncated_pairs"]:
        print(f"note: {metrics['truncated_pairs']} pair(s) had a response cut at --max-length "
              f"{args.max_length}")
    if metrics["adapter_dir"]:
        print(f"wrote LoRA adapter {metrics['adapter_dir']}")
    return 0


def add_cli(subparsers) -> None:
    """Register the train-arm sub-command."""
    d = TrainOptions()
    p = subparsers.add_parser(
        "train-arm", help="train an autoregressive reward model (ARM) from preference pairs",
        description="Train a GenARM autoregressive reward model: loss -log sigmoid(beta_r * "
        "(sum_t log pi(chosen_t) - sum_t log pi(rejected_t)) - gamma) over response tokens "
        "(summed, prompt masked, no reference model). Data rows: {\"prompt\", \"chosen\", "
        "\"rejected\"}. Each sequence is the prompt's ids (with the tokenizer's special tokens, "
        "or the chat template), the response's ids, then EOS. The ARM folder (LoRA merged) "
        f"carries the tokenizer and {METRICS_FILE}.",
    )
    p.add_argument("--init", required=True,
                   help="causal LM folder the ARM starts from (the base itself, or a smaller "
                   "competent LM with the same tokenizer)")
    p.add_argument("--data", required=True,
                   help="JSONL file of {prompt, chosen, rejected} rows, or a local Hugging Face "
                   "datasets folder (save_to_disk) with those columns")
    p.add_argument("--out", required=True, help="ARM folder to write")
    p.add_argument("--base", default=None,
                   help="base model folder the ARM will guide: checks the tokenizers are equal")
    p.add_argument("--beta-r", type=float, default=d.beta_r, help="loss scale beta_r (%(default)s)")
    p.add_argument("--gamma", type=float, default=d.gamma, help="loss margin gamma (%(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(%(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: " +
                   ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="pairs per forward pass (%(default)s)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="forward passes per optimizer step (%(default)s)")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens per prompt + response; longer responses are cut (%(default)s)")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="share of pairs held out for accuracy / margin (%(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(%(default)s)")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help="share of steps warming up before the cosine decay (%(default)s)")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help="what to train: all weights, LoRA adapters (saved merged), or the top "
                   "--top-layers decoder layers + final norm (%(default)s)")
    p.add_argument("--top-layers", type=int, default=d.top_layers, metavar="K",
                   help="decoder layers trained in top-layers mode (%(default)s)")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="(%(default)s)")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="(%(default)s)")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="(%(default)s)")
    p.add_argument("--lora-targets", type=comma_list, default=d.lora_targets,
                   help="modules LoRA adapts, comma separated (q_proj,k_proj,v_proj)")
    p.add_argument("--save-adapter", nargs="?", const=True, default=False, metavar="DIR",
                   help=f"lora mode: also save the adapter alone (default DIR: ARM_DIR/{ADAPTER_DIR}); "
                   "rebuild the ARM with genarm_vllm.train.merge_adapter")
    p.add_argument("--chat-template", action="store_true",
                   help="render each prompt with the tokenizer's chat template (one user message)")
    p.set_defaults(func=cmd_train_arm)
