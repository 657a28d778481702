"""The fused Triton kernels against the torch code they replace.

They run on a CUDA GPU with Triton, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1 set before
Python starts, with triton installed); otherwise they are skipped, as the CPU wheels of torch carry no Triton.
"""

import pytest
import torch

from quantkit.awq import kernels, search
from quantkit.awq.gptq import gptq_round
from quantkit.awq.quant import fake_quantize, quantize
from quantkit.awq.settings import QuantSettings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not kernels.available(torch.empty(0, device=DEVICE)),
    reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")


@pytest.mark.skipif(DEVICE != "cuda", reason="only a GPU compiles; Triton's interpreter has nothing to compile")
def test_compile_ahead_compiles_what_real_shapes_launch():
    """Runs first in the module (a fresh process has compiled nothing): after compile_ahead, launches at
    MiniCPM-V 2.6's k_proj shape (512 x 3584, bf16) and a GPTQ block find every kernel compiled already."""
    jits = [kernels._scaled_fake_quant_kernel, kernels._clip_search_kernel, kernels._round_block_kernel]
    index = torch.cuda.current_device()
    kernels.compile_ahead(torch.device(DEVICE), torch.bfloat16, 4, 128, gptq_columns=128)
    kernels._wait_for_compile_ahead()
    compiled = [len(jit.device_caches[index][0]) for jit in jits]
    assert min(compiled) >= 1
    w = torch.randn(512, 3584, device=DEVICE, dtype=torch.bfloat16)
    kernels.scaled_fake_quant(w, torch.rand(3584, device=DEVICE) + 0.5, 4, 128)
    grams = torch.eye(128, device=DEVICE).expand(28, -1, -1)
    kernels.clip_search(w, grams, [1 - step / 20 for step in range(10)], 4, 128)
    block = torch.randn(128, 3584, device=DEVICE)
    kernels.round_block_(block, torch.ones_like(block), torch.zeros(128, 128, device=DEVICE),
                         torch.empty_like(block), torch.empty_like(block), 15)
    torch.cuda.synchronize()
    assert [len(jit.device_caches[index][0]) for jit in jits] == compiled


def test_a_failed_compile_ahead_surfaces_at_the_first_kernel_call(monkeypatch):
    """The worker thread's error is not lost: the first kernel call raises it (and a second call runs)."""
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_scaled_fake_quant", broken)
    kernels.compile_ahead(torch.device(DEVICE), torch.float32, 4, 128)
    kernels._compiling.exception()  # waits for the worker, leaving its outcome to the first call
    monkeypatch.undo()
    w = torch.randn(32, 256, device=DEVICE)
    with pytest.raises(RuntimeError, match="no compiler"):
        kernels.scaled_fake_quant(w, torch.ones(256, device=DEVICE), 4, 128)
    assert torch.equal(kernels.scaled_fake_quant(w, torch.ones(256, device=DEVICE), 4, 128), fake_quantize(w, 4, 128))


def weights(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    w[:, ::37] *= 8.0  # outlier channels, as real layers have
    w[3, :64] = 0.25  # a constant group: its range clamps at 1e-5
    return w.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_fake_quant_is_bit_identical_to_torch(dtype: torch.dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter truncates float32 -> bfloat16 casts; the GPU rounds to nearest even")
    w = weights(80, 384, dtype, seed=0)
    scales = torch.rand(384, generator=torch.Generator().manual_seed(1)).add_(0.05).mul_(3).to(DEVICE)
    s = scales.to(dtype)
    expected = fake_quantize(w * s, 4, 128) / s
    fused = kernels.scaled_fake_quant(w, scales, 4, 128)
    assert fused.dtype == dtype
    assert torch.equal(fused, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_clip_search_picks_the_torch_search_bounds(dtype: torch.dtype, monkeypatch):
    settings = QuantSettings(group_size=128)
    w = weights(96, 256, dtype, seed=2)
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x[:, 5] *= 20.0
    grams = search.group_grams([x], settings.group_size)
    fused_max, fused_loss = search.search_clip(w, [x], settings, grams)
    monkeypatch.setattr(kernels, "triton", None)  # the torch search
    torch_max, torch_loss = search.search_clip(w, [x], settings, grams)
    assert fused_max.shape == torch_max.shape == (96, 2)
    # TF32 products on a GPU sum in another order: a near tie may go the other way, at the same loss
    assert (fused_max == torch_max).float().mean() > 0.97
    assert fused_loss == pytest.approx(torch_loss, rel=1e-3)


@pytest.mark.parametrize("block_size", [128, 96])  # 96: every block is padded to 128 columns
def test_gptq_column_loop_rounds_as_the_torch_loop(block_size: int, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1024, 256, generator=gen) @ (torch.eye(256) + 0.1 * torch.randn(256, 256, generator=gen))
    w = torch.randn(48, 256, generator=gen)
    h, grid = (x.t() @ x).to(DEVICE), quantize(w.to(DEVICE), 4, 64)
    fused = gptq_round(w.to(DEVICE), h, grid, damp=0.01, block_size=block_size)
    monkeypatch.setattr(kernels, "triton", None)  # the torch loop (a CUDA graph on a GPU)
    expected = gptq_round(w.to(DEVICE), h, grid, damp=0.01, block_size=block_size)
    # fused multiply-adds may move a weight that sits on a rounding midpoint by one step
    assert (fused.q != expected.q).float().mean() < 0.002
    assert (fused.q - expected.q).abs().max() <= 1
    assert torch.equal(fused.scales, grid.scales) and torch.equal(fused.zeros, grid.zeros)


def test_a_group_that_is_not_one_tile_takes_the_torch_code():
    w = weights(80, 384, torch.float32, seed=5)
    assert kernels.available(w, 128) and not kernels.available(w, 96) and not kernels.available(w, 8)
    scales = torch.rand(384, generator=torch.Generator().manual_seed(6)).add_(0.5).to(DEVICE)
    settings = QuantSettings(group_size=96)
    assert torch.equal(search.scaled_fake_quant(w, scales, settings), fake_quantize(w * scales, 4, 96) / scales)
