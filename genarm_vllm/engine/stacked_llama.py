"""The base and its LoRA ARMs in one pass over the base's weights: a stacked Llama decoder.

`stacked_forward` is a copy of the forward of vLLM's Llama decoder stack, mirrored from
vllm/model_executor/models/llama.py (`LlamaModel.forward` and `LlamaDecoderLayer.forward`
with `LlamaAttention.forward` and `LlamaMLP.forward`, vLLM 0.32.0 and 0.33.0 alike), changed
in one way: the K+1 row blocks (base rows, then each ARM's) go through each shared linear
layer as one matmul, the ARM's LoRA delta is added to its own block, and attention runs per
model on its own KV cache. Norms, rotary embedding and the activation act row by row, so
they run on all rows at once (an ARM's norm weights are the base's). When vLLM's Llama
forward changes, this copy must follow; `check_base_layout` refuses a base whose decoder
layer lacks what it reads.
"""

from __future__ import annotations

import torch
from torch import nn

from genarm_vllm.engine.lora_arm import LoRAARM


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
                    positions: torch.Tensor, views: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                    ) -> torch.Tensor:
    """Hidden states [(K+1)*T, H] of the base (rows 0..T-1) and each LoRA ARM (next blocks
    of T rows), through the base model's (a vLLM LlamaModel / Qwen2Model) shared weights.

    views: per model (the base, then each ARM), its own (input_ids, positions) (per-model
    prompts, prompt_views.py); the blocks then have each view's own row count, in order."""
    if views is None:
        views = [(input_ids, positions)] * (len(arms) + 1)
    sizes = [ids.shape[0] for ids, _ in views]
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    blocks = [slice(bounds[j], bounds[j + 1]) for j in range(len(sizes))]
    if all(ids is views[0][0] for ids, _ in views):
        x = base_model.embed_input_ids(input_ids).repeat(len(sizes), 1)
        pos = positions.repeat(len(sizes))
    else:
        x = base_model.embed_input_ids(torch.cat([ids for ids, _ in views]))
        pos = torch.cat([p for _, p in views])
    residual = None

    def add_deltas(i: int, fused: str, inputs: torch.Tensor, out: torch.Tensor) -> None:
        for j, arm in enumerate(arms, start=1):
            lora = arm.layers[i].lora
            if fused in lora and sizes[j]:
                lora[fused].add_delta(inputs[blocks[j]], out[blocks[j]])

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
        outs = []
        for j, attn_layer in enumerate([attn.attn, *(arm.layers[i].self_attn.attn for arm in arms)]):
            rows = blocks[j]
            if sizes[j]:  # each model on its own KV cache
                outs.append(attn_layer(q[rows], k[rows], v[rows]))
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
