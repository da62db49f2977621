"""train_arm: the ARM trainer, a `transformers.Trainer` subclass (ARMTrainer) whose
compute_loss is the GenARM loss (loss.py), and saving the ARM folder.

Why Trainer and not TRL's DPOTrainer (which the official code subclasses):
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
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from genarm_vllm.training.data import collate, load_pairs, split_pairs
from genarm_vllm.training.loss import arm_preference_loss, batch_logps, margin_metrics
from genarm_vllm.training.models import load_model, merge_adapter, resolve_hardware
from genarm_vllm.training.options import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    METRICS_FILE,
    TrainOptions,
    resolve_options,
)

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
    """Save the ARM folder with the tokenizer on the main process: in lora mode the PEFT
    adapter (adapter_config.json + adapter_model.safetensors, no config.json: the engine serves
    it on the base's weights as a LoRA ARM), or with merge a full model with the adapter merged
    in (and the adapter alone too if asked); the full model in the other modes. Returns the
    folder holding the adapter, if any."""
    # Every process takes part (DeepSpeed ZeRO-3 gathers the shards); the main one writes.
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter_dir = None
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        if opts.mode == "lora" and not opts.merge:
            model.save_pretrained(str(out), state_dict=state_dict)
            tokenizer.save_pretrained(str(out))
            adapter_dir = out
        elif opts.mode == "lora":
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

    data: a JSONL file or a local `datasets` folder, rows in any layout of
    genarm_vllm.training.data. recipe: a RECIPES preset; options (the TrainOptions fields:
    beta_r, gamma, epochs, lr, mode, ...) override it. callbacks: extra transformers
    TrainerCallbacks. `out` is a full model folder, or in lora mode (without merge) a PEFT
    adapter folder: the ARM on `init`'s weights, which the engine serves on the base's.
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
    adapter_out = opts.mode == "lora" and not opts.merge
    # A folder holding both a model's config.json and an adapter_config.json loads as neither.
    other = out / ("config.json" if adapter_out else "adapter_config.json")
    if other.is_file():
        raise ValueError(f"out {out} already holds {other.name} of another kind of ARM (the "
                         f"{'LoRA adapter' if adapter_out else 'full model'} would be written "
                         "next to it); give an empty or new folder")
    if (adapter_out and progress and opts.base is not None
            and Path(opts.base).resolve() != Path(init).resolve()):
        print(f"train-arm: note: {out} will be a LoRA adapter trained on {init}; the engine runs "
              f"it on the base's weights ({opts.base}), which is the ARM trained only if both "
              "hold the same weights (else pass --merge for a full ARM folder)", flush=True)
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
