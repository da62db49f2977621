"""LoRA reward models, the light half: reading a PEFT adapter folder and checking it fits a base.

No vLLM or torch import at module level: the CLI, bundles and load-time validation use it.
The modules that run an adapter inside the engine are in lora_arm.py; the forward that runs
base and ARMs together on the base's weights is in stacked_llama.py.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from genarm_vllm.engine.configs import head_size, text_config

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# Base architectures whose vLLM decoder layers have the Llama layout stacked_forward reads
# (input_layernorm, self_attn.{qkv_proj, rotary_emb, attn, o_proj}, post_attention_layernorm,
# mlp.{gate_up_proj, act_fn, down_proj}).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# PEFT module name -> (vLLM fused layer, position of its output slice in that layer).
TARGETS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# ...model.layers.3.self_attn.q_proj.lora_A.weight (PEFT; ".default" in some versions)
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


def is_lora_adapter(path) -> bool:
    """A PEFT adapter folder (adapter_config.json, no config.json of a full model)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def base_architecture(config) -> str:
    """The base's own architecture (a GenARM bundle's config names it in genarm_base_architectures)."""
    archs = getattr(config, "genarm_base_architectures", None) or getattr(config, "architectures", None) or []
    return archs[0] if archs else ""


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-targetable module of a base config."""
    c = text_config(config)
    head_dim = head_size(c)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    q, kv, h, i = c.num_attention_heads * head_dim, kv_heads * head_dim, c.hidden_size, c.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass
class LoRAAdapter:
    """A PEFT LoRA adapter read from its folder: config and tensor shapes (or tensors)."""

    path: str
    r: int
    lora_alpha: float
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    target_modules: list[str]
    base_model_name_or_path: str | None
    # (layer, PEFT module name) -> (A shape [r, in], B shape [out, r])
    shapes: dict[tuple[int, str], tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    weights_file: str = ""

    @property
    def modules(self) -> list[str]:
        """The PEFT module names the adapter carries tensors for, in TARGETS order."""
        present = {m for _, m in self.shapes}
        return [m for m in TARGETS if m in present]

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(a) + math.prod(b) for a, b in self.shapes.values())

    def load_tensors(self) -> dict[tuple[int, str], tuple[object, object]]:
        """(layer, module) -> (A, B) torch tensors, as stored."""
        raw = _read_tensors(Path(self.weights_file))
        out: dict = {}
        for key, tensor in raw.items():
            layer, _, module, ab = _parse_key(self.path, key)
            out.setdefault((layer, module), [None, None])[ab == "B"] = tensor
        return {k: (a, b) for k, (a, b) in out.items()}


def _refuse(path, problem: str):
    raise ValueError(f"LoRA reward model {path}: {problem}")


def _parse_key(path, key: str) -> tuple[int, str, str, str]:
    m = _KEY.search(key)
    if m is None or m.group(3) not in TARGETS or _BLOCK[m.group(3)] != m.group(2):
        _refuse(path, f"unsupported adapter tensor {key!r}: only LoRA A/B matrices of the "
                      f"decoder layers' {', '.join(TARGETS)} are supported (no embedding, "
                      "LM head, bias or modules_to_save tensors)")
    return int(m.group(1)), m.group(2), m.group(3), m.group(4)


def _weights_file(path: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (path / name).is_file():
            return path / name
    _refuse(path, f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}) in the folder")


def _read_tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in _read_tensors(path).items()}


def read_adapter(path) -> LoRAAdapter:
    """Read and check a PEFT LoRA adapter folder on its own (not yet against a base)."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        _refuse(path, f"no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        _refuse(path, f"peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = {
        "use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
        "lora_bias": "LoRA biases", "modules_to_save": "modules_to_save",
        "alpha_pattern": "per-module alpha (alpha_pattern)", "rank_pattern": "per-module rank (rank_pattern)",
        "trainable_token_indices": "trainable tokens", "target_parameters": "target_parameters",
        "layer_replication": "layer_replication", "use_qalora": "QA-LoRA",
    }
    for key, what in unsupported.items():
        if config.get(key):
            _refuse(path, f"{what} is not supported (adapter_config.json {key}={config[key]!r})")
    if config.get("bias", "none") != "none":
        _refuse(path, f"bias={config['bias']!r} is not supported (only bias='none')")
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regex or "all-linear": the tensors below decide
        targets = [targets]
    weights = _weights_file(path)
    shapes: dict = {}
    for key, shape in _read_shapes(weights).items():
        layer, _, module, ab = _parse_key(path, key)
        shapes.setdefault((layer, module), [None, None])[ab == "B"] = shape
    if not shapes:
        _refuse(path, "the adapter holds no LoRA tensors")
    for (layer, module), (a, b) in shapes.items():
        if a is None or b is None:
            _refuse(path, f"layers.{layer}.{module} has lora_{'A' if a is None else 'B'} missing")
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
            _refuse(path, f"layers.{layer}.{module}: lora_A {list(a)} / lora_B {list(b)} do not "
                          f"have rank r={r} of adapter_config.json")
    return LoRAAdapter(
        path=str(path), r=r, lora_alpha=alpha, scaling=scaling,
        target_modules=[str(t) for t in targets],
        base_model_name_or_path=config.get("base_model_name_or_path"),
        shapes={k: (tuple(a), tuple(b)) for k, (a, b) in shapes.items()},
        weights_file=str(weights),
    )


def check_adapter(base: str, path) -> LoRAAdapter:
    """Read the adapter at `path` and check it fits the base model folder `base`."""
    from transformers import AutoConfig

    adapter = read_adapter(path)
    config = AutoConfig.from_pretrained(str(base))
    return check_adapter_fits(adapter, config, str(base))


def check_adapter_fits(adapter: LoRAAdapter, config, base_name: str) -> LoRAAdapter:
    """ValueError naming the problem unless `adapter` fits the base whose hf_config is `config`."""
    path = adapter.path
    arch = base_architecture(config)
    if arch not in SUPPORTED_ARCHITECTURES:
        _refuse(path, f"base model {base_name} is {arch or 'of unknown architecture'}; LoRA "
                      f"reward models on the base's weights support {', '.join(SUPPORTED_ARCHITECTURES)} "
                      "(merge the adapter into a full model folder for other bases)")
    c = text_config(config)
    names = [t for t in adapter.target_modules
             if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t) and t != "all-linear"]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        _refuse(path, f"unknown target module(s) {', '.join(unknown)} for base model "
                      f"{base_name} ({arch}): LoRA reward models support {', '.join(TARGETS)}")
    shapes = module_shapes(config)
    layers = c.num_hidden_layers
    for (layer, module), (a, b) in sorted(adapter.shapes.items()):
        if layer >= layers:
            _refuse(path, f"it adapts layers.{layer}, but base model {base_name} has "
                          f"{layers} layers: the adapter was trained on another base")
        fan_in, fan_out = shapes[module]
        if a[1] != fan_in or b[0] != fan_out:
            _refuse(path, f"layers.{layer}.{_BLOCK[module]}.{module}: lora_A {list(a)} and lora_B "
                          f"{list(b)} need [{adapter.r}, {fan_in}] and [{fan_out}, {adapter.r}] on "
                          f"base model {base_name} (hidden_size {c.hidden_size}, intermediate_size "
                          f"{c.intermediate_size}): the adapter was trained on another base")
    _warn_if_other_base(adapter, base_name)
    return adapter


def _weights_of(folder: Path):
    """The resolved weight files of a local model folder (a bundle's are symlinks to its base's)."""
    return sorted(p.resolve() for p in folder.glob("*.safetensors")) or sorted(
        p.resolve() for p in folder.glob("pytorch_model*.bin"))


def _warn_if_other_base(adapter: LoRAAdapter, base_name: str) -> None:
    """A LoRA ARM is only the ARM on the model it was trained on; shapes alone cannot tell.
    When the adapter names a local folder other than the base (other weight files), say so."""
    named = adapter.base_model_name_or_path
    if not named or not Path(named).is_dir() or not Path(base_name).is_dir():
        return  # a hub name, or not here: nothing to compare
    theirs, ours = _weights_of(Path(named)), _weights_of(Path(base_name))
    if theirs and ours and theirs != ours:
        logger.warning(
            "LoRA reward model %s was trained on %s, not on the base %s (other weight files): "
            "on the base's weights it is another reward model than the one trained, unless "
            "both folders hold the same weights", adapter.path, named, base_name)


def check_lora_tensor_parallel(path, tensor_parallel_size: int) -> None:
    if tensor_parallel_size and tensor_parallel_size > 1:
        _refuse(path, f"tensor_parallel_size={tensor_parallel_size} is not supported for LoRA "
                      "reward models yet (their A/B matrices are not sharded like the base's "
                      "layers); run with tensor_parallel_size=1, or merge the adapter into a full "
                      "model folder (genarm_vllm.training.merge_adapter) and pass that instead")
