"""Loading the model to train (full, LoRA / QLoRA, or the top layers) and merging a LoRA adapter."""

from __future__ import annotations

from pathlib import Path

from genarm_vllm.training.options import TrainOptions


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
