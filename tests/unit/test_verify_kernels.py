"""The int4 kernel comparison: which kernels get disabled in turn, when it stops, what it recommends."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantkit.card import kernel_advice
from quantkit.verify import kernels
from quantkit.verify.kernels import DISABLE_ENV, KernelTrial, compare_kernels, recommend
from quantkit.verify.report import VerifyReport, render_markdown
from quantkit.verify.vllm_runner import EngineSettings, VariantRun


def _run(kernel: str | None, decode: float | None, error: str | None = None) -> VariantRun:
    speed = [{"batch": 1, "prompt_len": 512, "decode_tokens": 128, "prefill_tok_s": 9000.0,
              "decode_tok_s": decode}] if decode else []
    return VariantRun(label="int4", model_dir="/m", ok=error is None, error=error, kernel=kernel,
                      engine_start_s=50.0, speed=speed)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """vLLM on a Hopper GPU, as far as kernel choice goes: Machete, then Marlin, then no kernel left."""
    calls: list[dict] = []
    table = {"MacheteLinearKernel": ("MarlinLinearKernel", 150.0),
             "MacheteLinearKernel,MarlinLinearKernel": (None, None)}

    def run_variant(label, folder, prompts, settings, dtype=None, extra_env=None):
        calls.append({"prompts": prompts, "env": extra_env, "dtype": dtype})
        kernel, decode = table[extra_env[DISABLE_ENV]]
        if kernel is None:
            return _run(None, None, error="ValueError: Failed to find a kernel that can implement the layer")
        return _run(kernel, decode)

    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "run_variant", run_variant)
    return calls


def test_each_alternative_disables_every_kernel_seen_so_far(fake_vllm: list[dict]) -> None:
    trials = compare_kernels("/m", _run("MacheteLinearKernel", 120.0), EngineSettings(), dtype="bfloat16",
                             max_alternatives=3)
    assert [t.kernel for t in trials] == ["MacheteLinearKernel", "MarlinLinearKernel", None]
    assert [c["env"][DISABLE_ENV] for c in fake_vllm] == ["MacheteLinearKernel",
                                                          "MacheteLinearKernel,MarlinLinearKernel"]
    assert all(c["prompts"] == [] and c["dtype"] == "bfloat16" for c in fake_vllm)  # speed-only runs
    assert not trials[-1].ok and "Failed to find a kernel" in trials[-1].error
    best = recommend(trials)
    assert best["kernel"] == "MarlinLinearKernel" and not best["is_default"]
    assert best["env"] == {DISABLE_ENV: "MacheteLinearKernel"}
    assert best["speedup_vs_default"] == pytest.approx(150 / 120)


def test_max_alternatives_bounds_the_runs(fake_vllm: list[dict]) -> None:
    trials = compare_kernels("/m", _run("MacheteLinearKernel", 120.0), EngineSettings(), max_alternatives=1)
    assert len(trials) == 2 and len(fake_vllm) == 1


def test_a_user_setting_is_kept_and_extended(fake_vllm: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "MacheteLinearKernel")
    trials = compare_kernels("/m", _run("MarlinLinearKernel", 150.0), EngineSettings(), max_alternatives=2)
    assert trials[0].env == {DISABLE_ENV: "MacheteLinearKernel"}
    assert fake_vllm[0]["env"][DISABLE_ENV] == "MacheteLinearKernel,MarlinLinearKernel"


def test_default_is_recommended_when_fastest_and_nothing_when_nothing_ran() -> None:
    default = KernelTrial.from_run(_run("MacheteLinearKernel", 160.0), ())
    slower = KernelTrial.from_run(_run("MarlinLinearKernel", 150.0), ("MacheteLinearKernel",))
    best = recommend([default, slower])
    assert best["is_default"] and best["env"] == {} and best["speedup_vs_default"] == 1.0
    assert recommend([KernelTrial.from_run(_run(None, None, error="boom"), ())]) is None
    assert compare_kernels("/m", _run("x", None, error="boom"), EngineSettings()) == [
        KernelTrial((), None, False, "boom", 50.0, [])]


def test_report_and_card_name_the_recommendation(tmp_path: Path) -> None:
    trials = [KernelTrial.from_run(_run("MacheteLinearKernel", 120.0), ()),
              KernelTrial.from_run(_run("MarlinLinearKernel", 150.0), ("MacheteLinearKernel",))]
    report = VerifyReport(folder=str(tmp_path), reference=None, passed=True, reasons=[], environment={},
                          static=None, kernels=[t.as_dict() for t in trials], kernel_recommendation=recommend(trials))
    markdown = render_markdown(report)
    assert "## int4 linear kernels (vLLM)" in markdown
    assert "| MarlinLinearKernel | MacheteLinearKernel | 50 | 9,000 | 150 |" in markdown
    assert "start vLLM with `VLLM_DISABLED_KERNELS=MacheteLinearKernel` (1.25x" in markdown
    report.variants = {"int4": {"kernel": "MacheteLinearKernel"}}
    advice = kernel_advice(report.as_dict())
    assert "`MacheteLinearKernel`" in advice and "VLLM_DISABLED_KERNELS=MacheteLinearKernel" in advice
