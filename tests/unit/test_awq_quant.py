"""Group quantization maths and the AutoAWQ GEMM packing, against plain reference computations."""

import pytest
import torch

from quantkit.awq.quant import (
    dequantize_gemm,
    fake_quantize,
    pack_gemm,
    quantize,
    unpack_gemm,
)


def reference_dequant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group by group, in float64, the AutoAWQ min-max formula written out."""
    out = torch.empty_like(w, dtype=torch.float64)
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], group_size):
            g = w[row, start : start + group_size].double()
            scale = float(torch.tensor((g.max() - g.min()).clamp(min=1e-5).item() / 15).half())
            zero = min(max(-round(g.min().item() / scale), 0), 15)
            q = torch.clamp(torch.round(g / scale) + zero, 0, 15)
            out[row, start : start + group_size] = (q - zero) * scale
    return out


def test_dequantized_int4_matches_reference_formula():
    torch.manual_seed(1)
    w = torch.randn(16, 256) * torch.linspace(0.1, 3, 256)
    quant = quantize(w, bits=4, group_size=128)
    assert quant.q.min() >= 0 and quant.q.max() <= 15
    assert torch.allclose(quant.dequantize().double(), reference_dequant(w, 128), atol=1e-6)
    assert torch.equal(fake_quantize(w, 4, 128), quant.dequantize())


def test_pack_unpack_round_trip_is_exact():
    torch.manual_seed(2)
    w = torch.randn(256, 384)
    quant = quantize(w, 4, 128)
    packed = pack_gemm(quant)
    assert packed["qweight"].shape == (384, 32) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (3, 32) and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].shape == (3, 256) and packed["scales"].dtype == torch.float16
    back = unpack_gemm(**packed)
    assert torch.equal(back.q, quant.q)
    assert torch.equal(back.zeros, quant.zeros)
    assert torch.equal(back.scales, quant.scales)
    assert torch.equal(dequantize_gemm(**packed), quant.dequantize())


def test_gemm_nibble_order_matches_autoawq_layout():
    """AutoAWQ's GEMM layout: nibble i (bits 4i..4i+3) of packed column k holds output column 8k + [0, 2, 4, 6,
    1, 3, 5, 7][i]. Output column c holds the value c + 1 here, so the first word must read 1 3 5 7 2 4 6 8."""
    q = (torch.arange(16) % 15 + 1).repeat(128, 1).t().contiguous()  # [out=16, in=128]: row c holds c + 1
    quant = quantize(torch.zeros(16, 128), 4, 128)
    quant = type(quant)(q=q, scales=quant.scales, zeros=quant.zeros)
    qweight = pack_gemm(quant)["qweight"]
    word = qweight[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [1, 3, 5, 7, 2, 4, 6, 8]
    assert word == 0x86427531
    assert [(qweight[0, 1].item() & 0xFFFFFFFF) >> (4 * i) & 0xF for i in range(8)] == [9, 11, 13, 15, 10, 12, 14, 1]


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize(torch.randn(8, 100), 4, 128)
