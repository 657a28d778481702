"""verify's speed arithmetic on fake timings: medians, the prefill subtracted, the warm-up at the timed shape, and
the bandwidth floor. No real clock is read: time is a fake that the fake engine advances."""

from __future__ import annotations

import sys
import types

import pytest

from quantkit.verify import vllm_worker
from quantkit.verify.speed import bandwidth_floor_ms, speed_row


def test_each_figure_is_a_median_and_the_prefill_is_subtracted() -> None:
    # prefill medians 0.25 s, long runs 2.25 s (one slow outlier at 9 s): 256 steps of 8 sequences in 2.0 s
    row = speed_row(8, 512, 256, prefill_s=[0.25, 0.5, 0.25], total_s=[2.25, 9.0, 2.25], warmup_s=4.25)
    assert row["prefill_tok_s"] == 16384.0  # 8 x 512 / 0.25
    assert row["decode_tok_s"] == 1024.0  # 8 x 256 / (2.25 - 0.25)
    assert row["ms_per_step"] == 7.8125  # 2000 ms / 256
    assert row["first_run_decode_tok_s"] == 512.0  # the warm-up, timed alone: 8 x 256 / (4.25 - 0.25)
    assert (row["batch"], row["prompt_len"], row["decode_tokens"], row["repeats"]) == (8, 512, 256, 3)


def test_a_decode_not_slower_than_its_prefill_is_refused() -> None:
    with pytest.raises(ValueError, match="batch 1: the 33-token runs"):
        speed_row(1, 128, 32, prefill_s=[0.5], total_s=[0.5], warmup_s=0.5)


def test_bandwidth_floor_from_the_device_name() -> None:
    assert bandwidth_floor_ms(9_600_000_000, "NVIDIA H200") == 2.0  # 9.6 GB at 4.8 TB/s
    assert bandwidth_floor_ms(6_700_000_000, "NVIDIA H100 80GB HBM3") == 2.0  # 6.7 GB at 3.35 TB/s
    assert bandwidth_floor_ms(6_700_000_000, None) is None  # CPU: no bandwidth known
    assert bandwidth_floor_ms(None, "NVIDIA H200") is None


class FakeEngine:
    """`LLM.generate` costing 0.02 s of prefill per sequence and 4 ms per decode step, plus 0.5 s the first
    time a (batch, length) shape runs (what CUDA-graph capture or allocation adds), on a fake clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[tuple[int, int]] = []
        self.prompts: list[tuple[int, ...]] = []

    def generate(self, prompts: list[dict], params: types.SimpleNamespace, use_tqdm: bool) -> None:
        shape = (len(prompts), params.max_tokens)
        self.now += 0.02 * len(prompts) + 0.004 * (params.max_tokens - 1) + (0.5 if shape not in self.calls else 0)
        self.calls.append(shape)
        self.prompts += [tuple(p["prompt_token_ids"]) for p in prompts]


def test_the_warm_up_runs_the_timed_shapes_so_no_first_run_cost_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine()
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=types.SimpleNamespace))
    monkeypatch.setattr(vllm_worker.time, "perf_counter", lambda: engine.now)
    rows = vllm_worker._speed(engine, {"prompt_len": 16, "decode_tokens": 8, "batches": [1, 4], "repeats": 3})
    assert engine.calls == [(1, 1), (1, 9), *[(1, 1), (1, 9)] * 3, (4, 1), (4, 9), *[(4, 1), (4, 9)] * 3]
    assert len(set(engine.prompts)) == len(engine.prompts) and {len(p) for p in engine.prompts} == {16}
    # 8 steps of 4 ms after the first token: 250 tok/s for one sequence, 1000 for four; the 0.5 s is not in it
    assert [row["decode_tok_s"] for row in rows] == pytest.approx([250.0, 1000.0])
    assert [row["ms_per_step"] for row in rows] == pytest.approx([4.0, 4.0])
    assert [row["prefill_tok_s"] for row in rows] == pytest.approx([800.0, 800.0])  # 16 tokens per 0.02 s
    # the first long run at each batch size carries the 0.5 s: timing it (the old method) reads 15x low
    assert [row["first_run_decode_tok_s"] for row in rows] == pytest.approx([8 / 0.532, 32 / 0.532])
