"""LoRA reward models on the base's own weights: one weight copy for base and ARMs.

GenARM's own ARMs (the official HH-RLHF and PKU recipes) and this project's demo ARMs are
LoRA adapters trained on the base model itself. Merged, such an ARM is a second full copy
of the base: twice the weight memory, and twice the weight bytes read per decoding step.
Here a reward model may instead be a PEFT LoRA adapter folder (adapter_config.json +
adapter_model.safetensors or adapter_model.bin) trained on the base:

- `read_adapter` / `check_adapter` (lora_adapter.py, light: no vLLM import) read the folder
  and check that it fits the loaded base (architecture, layer count, every A/B shape, target
  modules), with errors that name the adapter, the tensor and what the base needs.
- `LoRAARM` (one per adapter, a sub-module of GenARMForCausalLM named arm_a, arm_b, ...)
  holds the adapter's A/B matrices and its OWN vLLM Attention layers, so its own paged KV
  cache in the engine's one block table, as every full-weight ARM has.
- `stacked_forward` (stacked_llama.py) runs the base and K LoRA ARMs together: in every decoder layer the K+1
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

import torch
from torch import nn

from genarm_vllm.engine.lora_adapter import TARGETS, LoRAAdapter, module_shapes


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
    Attention layers (named <prefix>.layers.N.self_attn.attn, hence its own KV cache).
    With adapter None it is the base itself as a guiding model (reward model "self",
    genarm_vllm/guidance.py): no A/B, only its own attention layers and KV."""

    def __init__(self, adapter: LoRAAdapter | None, base_model: nn.Module, vllm_config, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.attention import Attention

        self.adapter, self.prefix = adapter, prefix
        config = vllm_config.model_config.hf_config
        dtype = lora_dtype(vllm_config.model_config.dtype)
        shapes = module_shapes(config) if adapter is not None else None
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
            loras = {}
            if adapter is None:
                layers.append(LoRAARMLayer(attn, loras))
                continue
            sizes = {"qkv_proj": [base_attn.q_size, base_attn.kv_size, base_attn.kv_size],
                     "o_proj": [shapes["o_proj"][1]], "gate_up_proj": [shapes["gate_proj"][1]] * 2,
                     "down_proj": [shapes["down_proj"][1]]}
            for fused in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                parts = []
                for module, (target, position) in TARGETS.items():
                    if adapter is not None and target == fused and (i, module) in adapter.shapes:
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
        if self.adapter is None:  # "self": nothing of its own to load
            return loaded
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
