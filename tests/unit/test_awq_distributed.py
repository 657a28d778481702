"""Data-parallel calibration on 2 gloo ranks (CPU) makes exactly the choices of one process.

Each rank takes every 2nd micro-batch; the sums over tokens meet through quantkit.awq.reduce. Float64 sums of the
micro-batches' float32 parts do not depend on the order they are added in, so nothing here needs a tolerance:
the scales, clip bounds, losses and packed tensors are bit-identical. One condition: each micro-batch's own
float32 arithmetic must be the same in both runs, and on the CPU a reduction (a dot product) is split by the
thread count; the one-process runs here use the ranks' thread count (with another, the losses differ by ~1e-7
relative and the choices stay the same).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantkit.awq.reduce import BatchLayout, batch_layout, strided_positions
from quantkit.awq.search import (
    channel_mean_abs,
    clip_grams,
    gram,
    screening_subset,
    search_clip,
    search_scales_block,
    search_scales_linear,
)
from quantkit.awq.settings import QuantSettings
from quantkit.errors import DependencyError, InputError
from quantkit.ranks import RankFailed, run_ranks

SETTINGS = QuantSettings(scale_screen_tokens=96, clip_tokens=200)


def _batches() -> list[torch.Tensor]:
    """5 micro-batches [B, 32, 256] of uneven sizes, a few salient channels (rank 0 gets 3, rank 1 gets 2)."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(rows, 32, 256, generator=gen) for rows in (2, 3, 1, 2, 2)]
    for x in batches:
        x[..., ::32] *= 25.0
    return batches


def _block() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(256, 128, bias=False)


@torch.no_grad()
def _searches(batches: list[torch.Tensor], reducer=None, positions=None) -> dict:
    """Every statistic and choice of the searches on `batches` (this rank's share)."""
    block = _block()
    layout = batch_layout(batches, reducer, positions)
    x_mean = channel_mean_abs(batches, reducer)
    g = gram(batches, reducer)
    linear = search_scales_linear(block.weight, batches, x_mean, SETTINGS, input_gram=g, reducer=reducer)
    screen = screening_subset(batches, SETTINGS.scale_screen_tokens, whole_batches=False, layout=layout)
    blockwise = search_scales_block([block], batches, x_mean, lambda i, x: block(x), SETTINGS, screen, reducer)
    grams = clip_grams(batches, SETTINGS, reducer, layout)
    max_val, clip_loss = search_clip(block.weight, batches, SETTINGS, grams)
    return {"x_mean": x_mean, "gram": g[0], "tokens": g[1], "linear": (linear.ratio, linear.losses),
            "block": (blockwise.ratio, blockwise.losses), "screened": len(screen or []), "clip_grams": grams,
            "clip": max_val, "clip_loss": clip_loss}


def _searches_on_rank(rank, batches: list[torch.Tensor]) -> dict:
    positions = strided_positions(len(batches), rank.rank, rank.world_size)
    return _searches([batches[i] for i in positions], rank.reducer, positions)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_two_gloo_ranks_sum_the_searches_statistics_to_one_process_choices():
    batches = _batches()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each rank gets
    try:
        one = _searches(batches)
    finally:
        torch.set_num_threads(threads)
    two = run_ranks(_searches_on_rank, (batches,), world_size=2, device_type="cpu", timeout_s=120,
                    threads_per_rank=1)
    assert one["tokens"] == two["tokens"] == 10 * 32
    # the screen is every 4th of the 10 sequences (0, 4, 8): rank 0's share holds 0 and 8, rank 1's holds 4
    assert (one.pop("screened"), two.pop("screened")) == (3, 2)
    assert sum(not math.isnan(v) for v in one["block"][1]) == SETTINGS.scale_finalists
    different = [key for key in one if not _same(one[key], two[key])]
    assert not different, {key: (one[key], two[key]) for key in different}


def test_a_screen_picks_over_every_ranks_micro_batches():
    batches = [torch.full((2, 4, 8), float(i)) for i in range(4)]  # 8 sequences of 4 tokens
    whole = screening_subset(batches, 8, whole_batches=False)  # every 4th sequence: 0 (batch 0), 4 (batch 2)
    assert [(i, x[0, 0, 0].item(), x.shape[0]) for i, x in whole] == [(0, 0.0, 1), (2, 2.0, 1)]
    shapes = ((2, 4),) * 4
    rank1 = screening_subset(batches[1::2], 8, False, BatchLayout((1, 3), shapes))
    assert rank1 == []  # rank 1 (batches 1 and 3) holds none of the screen; rank 0 holds both
    rank0 = screening_subset(batches[0::2], 8, False, BatchLayout((0, 2), shapes))
    assert [(i, x[0, 0, 0].item()) for i, x in rank0] == [(0, 0.0), (1, 2.0)]


def _fail_on_rank_1(rank) -> int:
    if rank.rank == 1:
        raise InputError("rank 1 cannot read its share")
    rank.reducer.sum_(torch.zeros(1))  # rank 0 waits here for rank 1, which never comes
    return 0


def test_a_failing_rank_stops_the_others_with_its_error():
    with pytest.raises(InputError, match="rank 1 cannot read its share"):
        run_ranks(_fail_on_rank_1, (), world_size=2, device_type="cpu", timeout_s=120)


def test_more_gpus_than_visible_is_refused_before_any_work():
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DependencyError, match=f"--gpus {visible + 1}"):
        run_ranks(_fail_on_rank_1, (), world_size=visible + 1, device_type="cuda")
    assert issubclass(RankFailed, Exception)


def test_quantize_on_two_cpu_ranks_writes_the_one_process_release(qwen2_dir: Path, tmp_path: Path):
    """The tiny Qwen2, 8 x 64 pydoc tokens in 4 micro-batches (2 per rank), screening and strided clip tokens
    on: the same ratios, losses and bit-identical packed tensors as one process."""
    from quantkit.api import QuantizeConfig, quantize

    settings = QuantSettings(max_batch_tokens=128, scale_screen_tokens=192, clip_tokens=300)
    common = {"calib": "builtin:pydoc", "n_samples": 8, "seq_len": 64, "settings": settings, "device": "cpu"}
    seen: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # what each of the 2 ranks gets (see the top)
    try:
        one = quantize(qwen2_dir, tmp_path / "one", QuantizeConfig(**common))
    finally:
        torch.set_num_threads(threads)
    two = quantize(qwen2_dir, tmp_path / "two", QuantizeConfig(**common, ranks=2),
                   on_layer_done=lambda report, n: seen.append(report.index))
    assert seen == [0, 1]  # rank 0's progress reaches the caller
    for key in ("ratios", "scale_losses", "clip_losses", "output_rel_mse"):
        assert [layer[key] for layer in two.layers] == [layer[key] for layer in one.layers], key
    tensors = [{k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}
               for folder in (tmp_path / "one", tmp_path / "two")]
    assert tensors[0].keys() == tensors[1].keys()
    assert [k for k in tensors[0] if not torch.equal(tensors[0][k], tensors[1][k])] == []
    manifest = json.loads((tmp_path / "two" / "quantkit-manifest.json").read_text())
    assert manifest["quantization"]["ranks"] == 2
    assert not (tmp_path / ".two.quantkit-work").exists()
