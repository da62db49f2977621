"""LoRA reward models on the base's own weights: one weight copy for base and ARMs.

GenARM's own ARMs (the official HH-RLHF and PKU recipes) and this project's demo ARMs are
LoRA adapters trained on the base model itself. Merged, such an ARM is a second full copy
of the base: twice the weight memory, and twice the weight bytes read per decoding step.
Here a reward model may instead be a PEFT LoRA adapter folder (adapter_config.json +
adapter_model.safetensors or adapter_model.bin) trained on the base:

- `read_adapter` / `check_adapter` (light: no vLLM import) read the folder and check that
  it fits the loaded base (architecture, layer count, every A/B shape, target modules),
  with errors that name the adapter, the tensor and what the base needs.
- `LoRAARM` (one per adapter, a sub-module of GenARMForCausalLM named arm_a, arm_b, ...)
  holds the adapter's A/B matrices and its OWN vLLM Attention layers, so its own paged KV
  cache in the engine's one block table, as every full-weight ARM has.
- `stacked_forward` runs the base and K LoRA ARMs together: in every decoder layer the K+1
  row blocks (base rows, then each ARM's rows) go through the base's qkv / o / gate_up /
  down weights as ONE matmul each, the LoRA delta is added to each ARM's block only, norms,
  rotary embedding and activation run on all rows at once (they act row by row, and the
  ARM's norm weights are the base's), and attention runs per model on its own KV cache.
  The final norm and the LM head are shared the same way (GenARMForCausalLM.compute_logits).

Why plain matmuls and not vLLM's punica LoRA layers (vllm/lora): punica serves *requests*
that each pick an adapter, inside one forward with one KV cache per request; here every
request needs the base AND each ARM, each with its own KV cache, so the rows of an ARM are
one contiguous block known in advance, not a per-token adapter index. A rank-r delta on a
contiguous block is two small dense matmuls (x @ A^T @ B^T), which torch runs as well as
any kernel on CPU; punica would need vLLM's LoRA manager, a LoRA config on the engine
(which would then apply to the base too) and per-step index tensors, for no gain here.

Tensor parallelism: the adapters are not sharded; LoRA ARMs refuse tensor_parallel_size > 1
(check_lora_tensor_parallel) until A/B are sharded like the base's column/row layers.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

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


def _text_config(config):
    return getattr(config, "get_text_config", lambda: config)()


def base_architecture(config) -> str:
    """The base's own architecture (a GenARM bundle's config names it in genarm_base_architectures)."""
    archs = getattr(config, "genarm_base_architectures", None) or getattr(config, "architectures", None) or []
    return archs[0] if archs else ""


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-targetable module of a base config."""
    c = _text_config(config)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
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
    c = _text_config(config)
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
                      "model folder (genarm_vllm.train.merge_adapter) and pass that instead")


# ------------------------------------------------------------------ the vLLM side (torch)

import torch  # noqa: E402  (the checks above stay usable without it in light callers)
from torch import nn  # noqa: E402


def lora_dtype(model_dtype: torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """The dtype of the LoRA matrices and their matmuls: the model's, except bf16/fp16 on CPU,
    where they are float32. torch's CPU matmuls of these tiny bf16 shapes ([T, 576] x
    [576, 24]) cost 66-125 us per call (measured, torch.profiler, SmolLM2 at batch 1: 0.9 s
    of a 3.3 s generate call), float32 ones a few us (MKL sgemm); the adapters stay a few MB."""
    device = torch.device(device) if device is not None else torch.empty(0).device
    if device.type == "cpu" and model_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return model_dtype


class FusedLoRA(nn.Module):
    """The LoRA of one fused vLLM layer (e.g. qkv_proj) of one ARM: the A matrices of its
    targeted sub-modules stacked ([n*r, in]: x @ A^T is one matmul) and one B per
    sub-module ([out_i, r], the scaling folded in at load), added into its output slice."""

    def __init__(self, r: int, fan_in: int, parts: list[tuple[str, int, int]], dtype):
        super().__init__()
        # parts: (PEFT module, output offset, output size), in the fused layer's order
        self.r, self.parts = r, parts
        self.lora_a = nn.Parameter(torch.zeros(len(parts) * r, fan_in, dtype=dtype), requires_grad=False)
        self.lora_b = nn.ParameterList(
            nn.Parameter(torch.zeros(size, r, dtype=dtype), requires_grad=False) for _, _, size in parts
        )

    def add_delta(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += x @ (scaling * B A)^T, in place, on the ARM's rows."""
        r = self.r
        if self.lora_a.dtype == out.dtype:
            u = x @ self.lora_a.t()
            for i, ((_, offset, size), b) in enumerate(zip(self.parts, self.lora_b)):
                out[:, offset:offset + size].addmm_(u[:, i * r:(i + 1) * r], b.t())
            return
        u = x.to(self.lora_a.dtype) @ self.lora_a.t()  # float32 on CPU: see lora_dtype
        for i, ((_, offset, size), b) in enumerate(zip(self.parts, self.lora_b)):
            out[:, offset:offset + size] += (u[:, i * r:(i + 1) * r] @ b.t()).to(out.dtype)


class LoRAARMLayer(nn.Module):
    def __init__(self, attn: nn.Module, loras: dict[str, FusedLoRA]):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.attn = attn
        self.lora = nn.ModuleDict(loras)


class LoRAARM(nn.Module):
    """One LoRA reward model on the base's weights: its A/B matrices and its own
    Attention layers (named <prefix>.layers.N.self_attn.attn, hence its own KV cache)."""

    def __init__(self, adapter: LoRAAdapter, base_model: nn.Module, vllm_config, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.attention import Attention

        self.adapter, self.prefix = adapter, prefix
        config = vllm_config.model_config.hf_config
        dtype = lora_dtype(vllm_config.model_config.dtype)
        shapes = module_shapes(config)
        layers = []
        for i, base_layer in enumerate(base_model.layers):
            base_attn = base_layer.self_attn
            a = base_attn.attn
            attn = Attention(
                a.num_heads, a.head_size, base_attn.scaling, num_kv_heads=a.num_kv_heads,
                cache_config=vllm_config.cache_config, quant_config=None,
                per_layer_sliding_window=a.sliding_window,
                prefix=f"{prefix}.layers.{i}.self_attn.attn",
            )
            sizes = {"qkv_proj": [base_attn.q_size, base_attn.kv_size, base_attn.kv_size],
                     "o_proj": [shapes["o_proj"][1]], "gate_up_proj": [shapes["gate_proj"][1]] * 2,
                     "down_proj": [shapes["down_proj"][1]]}
            loras = {}
            for fused in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                parts = []
                for module, (target, position) in TARGETS.items():
                    if target == fused and (i, module) in adapter.shapes:
                        offset = sum(sizes[fused][:position])
                        parts.append((module, offset, sizes[fused][position]))
                if parts:
                    fan_in = shapes[parts[0][0]][0]
                    loras[fused] = FusedLoRA(adapter.r, fan_in, parts, dtype)
            layers.append(LoRAARMLayer(attn, loras))
        self.layers = nn.ModuleList(layers)

    def load_adapter(self) -> set[str]:
        """Copy the adapter's tensors in (B scaled); returns the parameter names set."""
        loaded = set()
        tensors = self.adapter.load_tensors()
        scaling = self.adapter.scaling
        for i, layer in enumerate(self.layers):
            for fused, lora in layer.lora.items():
                r = lora.r
                for j, (module, _, _) in enumerate(lora.parts):
                    a, b = tensors[(i, module)]
                    lora.lora_a.data[j * r:(j + 1) * r].copy_(a)
                    lora.lora_b[j].data.copy_(b.to(torch.float32) * scaling)
                loaded.add(f"{self.prefix}.layers.{i}.lora.{fused}.lora_a")
                loaded.update(f"{self.prefix}.layers.{i}.lora.{fused}.lora_b.{j}"
                              for j in range(len(lora.parts)))
        return loaded


def check_base_layout(base_model: nn.Module) -> None:
    """The base's vLLM decoder layers must have the layout stacked_forward reads."""
    for layer in base_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        needed = [(attn, ("qkv_proj", "rotary_emb", "attn", "o_proj", "q_size", "kv_size", "scaling")),
                  (mlp, ("gate_up_proj", "act_fn", "down_proj")),
                  (layer, ("input_layernorm", "post_attention_layernorm"))]
        missing = [n for obj, names in needed for n in names if not hasattr(obj, n)]
        extra = [n for n in ("q_norm", "k_norm") if getattr(attn, n, None) is not None]
        if missing or extra:
            raise ValueError(
                f"LoRA reward models: the base's decoder layer {type(layer).__name__} "
                f"{'lacks ' + ', '.join(missing) if missing else 'has ' + ', '.join(extra)}, "
                "which the shared-weight forward does not handle; merge the adapter instead"
            )


def stacked_forward(base_model: nn.Module, arms: list[LoRAARM], input_ids: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
    """Hidden states [(K+1)*T, H] of the base (rows 0..T-1) and each LoRA ARM (next blocks
    of T rows), through the base model's (a vLLM LlamaModel / Qwen2Model) shared weights."""
    n = len(arms) + 1
    hidden = base_model.embed_input_ids(input_ids)
    t = hidden.shape[0]
    x = hidden.repeat(n, 1)
    pos = positions.repeat(n)
    residual = None

    def add_deltas(i: int, fused: str, inputs: torch.Tensor, out: torch.Tensor) -> None:
        for j, arm in enumerate(arms, start=1):
            lora = arm.layers[i].lora
            if fused in lora:
                rows = slice(j * t, (j + 1) * t)
                lora[fused].add_delta(inputs[rows], out[rows])

    for i, layer in enumerate(base_model.layers):
        if residual is None:
            residual, x = x, layer.input_layernorm(x)
        else:
            x, residual = layer.input_layernorm(x, residual)
        attn = layer.self_attn
        qkv, _ = attn.qkv_proj(x)  # one matmul for all K+1 row blocks
        add_deltas(i, "qkv_proj", x, qkv)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(pos, q, k)
        outs = [attn.attn(q[:t], k[:t], v[:t])]  # each model on its own KV cache
        for j, arm in enumerate(arms, start=1):
            rows = slice(j * t, (j + 1) * t)
            outs.append(arm.layers[i].self_attn.attn(q[rows], k[rows], v[rows]))
        attn_out = torch.cat(outs)
        x, _ = attn.o_proj(attn_out)
        add_deltas(i, "o_proj", attn_out, x)
        x, residual = layer.post_attention_layernorm(x, residual)
        mlp = layer.mlp
        gate_up, _ = mlp.gate_up_proj(x)
        add_deltas(i, "gate_up_proj", x, gate_up)
        act = mlp.act_fn(gate_up)
        x, _ = mlp.down_proj(act)
        add_deltas(i, "down_proj", act, x)
    x, _ = base_model.norm(x, residual)
    return x


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters as loaded (read before vLLM's CPU repacking, which
    leaves empty placeholders behind)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
