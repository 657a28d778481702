"""Group-wise asymmetric integer quantization and the AutoAWQ GEMM packing.

Weights are [out_features, in_features]; groups run along in_features. A weight w becomes an integer
q = clamp(round(w / s) + z, 0, 2^bits - 1) and dequantizes to (q - z) * s, with one fp16 scale s and one
integer zero z per (output row, group). Scales are rounded to fp16 *before* q is computed, so what the search
evaluates is exactly what the packed checkpoint holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# AutoAWQ GEMM: nibble i of each int32 holds output column 8 * k + ORDER[i].
GEMM_NIBBLE_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK_FACTOR = 8


@dataclass(frozen=True)
class GroupQuant:
    """An integer weight with its group parameters: q and zeros are int64, scales fp16 (all [out, ...])."""

    q: torch.Tensor  # [out, in]
    scales: torch.Tensor  # [out, in // group_size], fp16
    zeros: torch.Tensor  # [out, in // group_size]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros).to(dtype)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
    return w.reshape(out_features, in_features // group_size, group_size)


def quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> GroupQuant:
    """Min-max asymmetric quantization of `w` [out, in] (the AutoAWQ zero-point recipe)."""
    max_int = 2**bits - 1
    g = _grouped(w.float(), group_size)
    w_max = g.amax(dim=-1)
    w_min = g.amin(dim=-1)
    scales = ((w_max - w_min).clamp(min=1e-5) / max_int).to(torch.float16)
    s = scales.float()
    zeros = (-torch.round(w_min / s)).clamp(0, max_int)
    q = (torch.round(g / s.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, max_int)
    return GroupQuant(q=q.reshape(w.shape).to(torch.int64), scales=scales, zeros=zeros.to(torch.int64))


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(q - z) * s in float32, for q [out, in] and per-group scales/zeros [out, groups]."""
    groups = scales.shape[-1]
    g = q.reshape(q.shape[0], groups, -1).float()
    return ((g - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(q.shape)


def fake_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """quantize -> dequantize, returned in w's dtype: the weight the int4 checkpoint will compute with."""
    g = _grouped(w.to(torch.float32, copy=True), group_size)
    return fake_quantize_groups_(g, bits).reshape(w.shape).to(w.dtype)


def fake_quantize_groups_(g: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """In place on float32 groups [..., group_size]: the searches' hot path, so no temporaries of g's size."""
    max_int = 2**bits - 1
    w_min, w_max = torch.aminmax(g, dim=-1, keepdim=True)
    s = ((w_max - w_min).clamp_(min=1e-5) / max_int).to(torch.float16).float()
    z = (-torch.round(w_min / s)).clamp_(0, max_int)
    # clamp(round(w / s) + z, 0, max) - z, as one clamp: the same integers, two passes over g fewer
    return g.div_(s).round_().clamp_(min=-z, max=max_int - z).mul_(s)


def _pack_columns(x: torch.Tensor) -> torch.Tensor:
    """[rows, cols] integers in 0..15 -> [rows, cols / 8] int32 in the GEMM nibble order."""
    rows, cols = x.shape
    if cols % PACK_FACTOR:
        raise ValueError(f"{cols} columns cannot be packed 8 per int32")
    nibbles = x.to(torch.int64).reshape(rows, cols // PACK_FACTOR, PACK_FACTOR)[..., list(GEMM_NIBBLE_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=x.device)
    packed = (nibbles << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_columns: [rows, n] int32 -> [rows, 8 n] int64."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    nibbles = ((packed.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 0xF
    columns = torch.empty_like(nibbles)
    columns[..., list(GEMM_NIBBLE_ORDER)] = nibbles
    return columns.reshape(packed.shape[0], -1)


def pack_gemm(quant: GroupQuant) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors: qweight int32 [in, out/8], qzeros int32 [groups, out/8], scales fp16 [groups, out]."""
    return {
        "qweight": _pack_columns(quant.q.t()),
        "qzeros": _pack_columns(quant.zeros.t()),
        "scales": quant.scales.t().contiguous().to(torch.float16),
    }


def unpack_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> GroupQuant:
    """Read AutoAWQ GEMM tensors back into [out, ...] integers and scales."""
    return GroupQuant(
        q=_unpack_columns(qweight).t().contiguous(),
        scales=scales.t().contiguous(),
        zeros=_unpack_columns(qzeros).t().contiguous(),
    )


def dequantize_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in] that a GEMM-packed linear computes with."""
    return unpack_gemm(qweight, qzeros, scales).dequantize()
