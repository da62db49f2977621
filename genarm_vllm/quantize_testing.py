"""Quantized tiny checkpoints for tests: a round-to-nearest int4 quantizer that writes the
real on-disk GPTQ or AWQ format (what vLLM's `auto_gptq` / `auto_awq` methods load, on CPU
through `CPUWNA16LinearKernel`), plus a DEQUANTIZED float32 copy of exactly the same weights
for plain transformers (the reference decoder).

No calibration, no GPU tool: every linear weight of the decoder layers (q/k/v/o, gate/up/down)
is rounded to the nearest of 16 levels per group of `group_size` input channels. The LM head,
the embedding and the norms stay unquantized, as GPTQ/AWQ checkpoints leave them.

Exactness: vLLM runs these methods in bfloat16 or float16 only (their
`get_supported_act_dtypes`), loading scales and every unquantized tensor in the engine's
dtype. So that the engine holds exactly the weights of the dequantized copy, the scales are
powers of two (then `(q - zero) * scale` is exact in bfloat16 whatever order a kernel
dequantizes in) and the unquantized tensors are rounded to bfloat16 in both folders.

Formats (shapes for a torch Linear weight W of [out, in], group g, 4 bits, 8 values per int32):
- GPTQ (v1, sym): qweight int32 [in/8, out], packed along the input dim (value k of a word
  at bits 4k); scales fp16 [in/g, out]; qzeros int32 [in/g, out/8], packed along the output
  dim, holding zero - 1 = 7 (GPTQ v1's off-by-one); g_idx int32 [in] = i // g (no act-order).
  W[o, i] = (q[i, o] - 8) * scales[i // g, o]. config: quant_method "gptq", bits 4,
  group_size g, desc_act false, sym true (vLLM's auto_gptq takes sym only: uint4b8).
- AWQ (GEMM, zero point): qweight int32 [in, out/8] and qzeros int32 [in/g, out/8], packed
  along the output dim in AWQ's interleaved order (0, 2, 4, 6, 1, 3, 5, 7); scales fp16
  [in/g, out]. W[o, i] = (q[i, o] - z[i // g, o]) * scales[i // g, o]. config: quant_method
  "awq", bits 4, group_size g, zero_point true, version "gemm".
CPU kernel limits: input and output sizes multiples of 32; group size 32, 64, 128 or -1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # value j of a packed AWQ word holds column AWQ_ORDER[j]


def _is_quantized(name: str) -> bool:
    parts = name.split(".")
    return ".layers." in name and parts[-1] == "weight" and parts[-2] in QUANTIZED_MODULES


def _pow2(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= x (x > 0)."""
    return torch.exp2(torch.ceil(torch.log2(x)))


def rtn_int4(weight: torch.Tensor, group_size: int, zero_point: bool):
    """Round-to-nearest int4 of a Linear weight [out, in], groups along the input dim.

    Returns q [in, out] (0..15), scales [in/g, out] (powers of two, float32), zeros
    [in/g, out] (8 without zero point) and the dequantized weight [out, in] (float32)."""
    out_size, in_size = weight.shape
    g = in_size if group_size == -1 else group_size
    if in_size % g or in_size % 32 or out_size % 32:
        raise ValueError(f"weight {tuple(weight.shape)}: sizes must be multiples of 32 and of "
                         f"group_size {group_size}")
    w = weight.to(torch.float32).t().reshape(in_size // g, g, out_size)  # [groups, g, out]
    if zero_point:  # asymmetric: levels 0..15 between the group's min and max
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scales = _pow2(((hi - lo) / 15).clamp(min=2.0**-20))
        zeros = torch.round(-lo / scales).clamp(0, 15)
    else:  # symmetric around 8 (GPTQ sym): levels -8..7
        scales = _pow2((w.abs().amax(dim=1) / 7).clamp(min=2.0**-20))
        zeros = torch.full_like(scales, 8)
    q = torch.round(w / scales[:, None, :] + zeros[:, None, :]).clamp(0, 15)
    dequant = ((q - zeros[:, None, :]) * scales[:, None, :]).reshape(in_size, out_size).t()
    return (q.reshape(in_size, out_size).to(torch.int32), scales, zeros.to(torch.int32),
            dequant.contiguous())


def _pack_rows(values: torch.Tensor) -> torch.Tensor:
    """int4 values [R, C] -> int32 [R/8, C], value k of each word at bits 4k (GPTQ qweight)."""
    v = values.to(torch.int64).reshape(values.shape[0] // 8, 8, values.shape[1])
    packed = sum(v[:, k] << (4 * k) for k in range(8))
    return _to_int32(packed)


def _pack_cols(values: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """int4 values [R, C] -> int32 [R, C/8], value k of each word at bits 4k, taken from
    column order[k] of each block of 8 columns (GPTQ qzeros: identity; AWQ: AWQ_ORDER)."""
    v = values.to(torch.int64).reshape(values.shape[0], values.shape[1] // 8, 8)
    packed = sum(v[:, :, order[k]] << (4 * k) for k in range(8))
    return _to_int32(packed)


def _to_int32(packed: torch.Tensor) -> torch.Tensor:
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).contiguous()


def quantize_checkpoint(src: str | Path, dst: str | Path, dequantized: str | Path, *,
                        method: str = "gptq", group_size: int = 32) -> tuple[Path, Path]:
    """Quantize the float model folder `src` (one model.safetensors, as testing.build_model
    writes) to `dst` in `method`'s on-disk format ("gptq" or "awq"), and write the same
    weights, dequantized to float32, as an ordinary model folder `dequantized`."""
    from safetensors.torch import load_file, save_file

    if method not in ("gptq", "awq"):
        raise ValueError(f"method must be 'gptq' or 'awq', got {method!r}")
    src, dst, dequantized = Path(src), Path(dst), Path(dequantized)
    tensors = load_file(src / "model.safetensors")
    quantized: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not _is_quantized(name):
            rounded = tensor.to(torch.bfloat16)  # what a bf16 engine holds
            quantized[name] = rounded.contiguous()
            plain[name] = rounded.to(torch.float32).contiguous()
            continue
        stem = name[: -len(".weight")]
        q, scales, zeros, dequant = rtn_int4(tensor, group_size, zero_point=method == "awq")
        plain[name] = dequant
        quantized[f"{stem}.scales"] = scales.to(torch.float16).contiguous()
        if method == "gptq":
            in_size = q.shape[0]
            quantized[f"{stem}.qweight"] = _pack_rows(q)
            quantized[f"{stem}.qzeros"] = _pack_cols(zeros - 1)  # GPTQ v1 stores zero - 1
            g = in_size if group_size == -1 else group_size
            quantized[f"{stem}.g_idx"] = (torch.arange(in_size) // g).to(torch.int32)
        else:
            quantized[f"{stem}.qweight"] = _pack_cols(q, AWQ_ORDER)
            quantized[f"{stem}.qzeros"] = _pack_cols(zeros, AWQ_ORDER)
    config = json.loads((src / "config.json").read_text())
    for folder, weights in ((dst, quantized), (dequantized, plain)):
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    quant_config = (
        {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
         "sym": True, "static_groups": False, "true_sequential": True, "lm_head": False,
         "damp_percent": 0.01, "checkpoint_format": "gptq"}
        if method == "gptq" else
        {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
         "version": "gemm", "modules_to_not_convert": None}
    )
    (dst / "config.json").write_text(json.dumps(
        {**config, "torch_dtype": "bfloat16", "quantization_config": quant_config}, indent=2))
    (dequantized / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"},
                                                        indent=2))
    return dst, dequantized


def unpack_gptq(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float weight [out, in] of a sym GPTQ layer (for tests of the packing)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = (qweight.unsqueeze(1) >> shifts[None, :, None]) & 15  # [in/8, 8, out]
    q = q.reshape(-1, qweight.shape[1]).to(torch.float32)
    g = q.shape[0] // scales.shape[0]
    return ((q - 8) * scales.to(torch.float32).repeat_interleave(g, dim=0)).t()


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float weight [out, in] of an AWQ layer (for tests of the packing)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)

    def unpack(packed):  # [R, C/8] -> [R, C] in column order
        v = (packed.unsqueeze(-1) >> shifts) & 15  # [R, C/8, 8], value k = column AWQ_ORDER[k]
        out = torch.empty_like(v)
        out[..., list(AWQ_ORDER)] = v
        return out.reshape(packed.shape[0], -1).to(torch.float32)

    q, z = unpack(qweight), unpack(qzeros)
    g = q.shape[0] // scales.shape[0]
    s = scales.to(torch.float32).repeat_interleave(g, dim=0)
    return ((q - z.repeat_interleave(g, dim=0)) * s).t()
