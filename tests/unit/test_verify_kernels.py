"""The vLLM setup trial: which engine starts it makes within its budget, what it skips on the CPU, what it
recommends per batch size, and the `vllm serve` command the report and the card carry."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantkit.card import render_card
from quantkit.verify import kernels
from quantkit.verify.kernels import DISABLE_ENV, FULL_DECODE_ONLY, Setup, recommend, run_trials, serve_command
from quantkit.verify.report import VerifyReport, floors_note, render_markdown
from quantkit.verify.vllm_runner import EngineSettings, VariantRun

GIB = 2**30


def _run(kernel: str | None, decode: dict[int, float], weights_gib: float = 5.0, error: str | None = None) -> VariantRun:
    """A finished engine whose decode ran at `decode` tok/s per batch size."""
    speed = [{"batch": b, "decode_tok_s": tok_s, "ms_per_step": 1000 * b / tok_s, "prefill_tok_s": 30000.0}
             for b, tok_s in decode.items()]
    return VariantRun(label="x", model_dir="/m", ok=error is None, error=error, kernel=kernel, engine_start_s=100.0,
                      weights_bytes=int(weights_gib * GIB), speed=speed)


# Issue 13's H200 measurements (tok/s at batch 1 and 8), as the fake vLLM's answers per (model, setup)
H200 = {
    ("/fp16", Setup()): ("none (16-bit linears)", {1: 200.0, 8: 1600.0}, 15.0),
    ("/fp16", Setup((), FULL_DECODE_ONLY)): ("none (16-bit linears)", {1: 200.0, 8: 1600.0}, 15.0),
    ("/int4", Setup()): ("MacheteLinearKernel", {1: 250.0, 8: 2000.0}, 6.0),
    ("/int4", Setup(("MacheteLinearKernel",))): ("MarlinLinearKernel", {1: 320.0, 8: 2200.0}, 6.0),
    ("/int4", Setup(("MacheteLinearKernel",), FULL_DECODE_ONLY)): ("MarlinLinearKernel", {1: 310.0, 8: 2400.0}, 6.0),
    ("/tiny", Setup()): ("none (16-bit linears)", {1: 500.0, 8: 3200.0}, 0.2),
}


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Setup]]:
    """run_variant answering from H200; records each engine start as (model, setup)."""
    starts: list[tuple[str, Setup]] = []

    def run_variant(label, folder, prompts, settings, dtype=None, extra_env=None, compilation_config=None,
                    remote_code=True):
        assert prompts == [] and dtype == "float16"  # speed-only, in the release's dtype
        disabled = tuple((extra_env or {}).get(DISABLE_ENV, "").split(",")) if extra_env else ()
        setup = Setup(disabled, (compilation_config or {}).get("cudagraph_mode"))
        starts.append((str(folder), setup))
        kernel, decode, weights = H200[(str(folder), setup)]
        return _run(kernel, decode, weights)

    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "run_variant", run_variant)
    return starts


def _parity_runs() -> dict[str, VariantRun]:
    return {label: _run(*H200[(model, Setup())]) for label, model in (("reference", "/fp16"), ("int4", "/int4"))}


def _trials(max_runs: int, gpu: bool = True, floor: Path | None = Path("/tiny")) -> list[kernels.SpeedTrial]:
    return run_trials("/int4", "/fp16", _parity_runs(), EngineSettings(), gpu=gpu, dtype="float16",
                      max_runs=max_runs, floor_model=lambda: floor)


def test_default_budget_on_a_gpu_tries_marlin_the_floor_and_full_decode_only(fake_vllm: list) -> None:
    trials = _trials(kernels.DEFAULT_SPEED_TRIALS)
    assert fake_vllm == [("/int4", Setup(("MacheteLinearKernel",))), ("/tiny", Setup()),
                         ("/int4", Setup(("MacheteLinearKernel",), FULL_DECODE_ONLY))]  # FDO on the faster kernel
    assert [(t.variant, t.setup.name, t.ok, t.skipped) for t in trials] == [
        ("reference", "vLLM defaults", True, False),
        ("int4", "vLLM defaults", True, False),
        ("int4", "VLLM_DISABLED_KERNELS=MacheteLinearKernel", True, False),
        ("floor", "vLLM defaults", True, False),
        ("int4", "VLLM_DISABLED_KERNELS=MacheteLinearKernel, cudagraph_mode FULL_DECODE_ONLY", True, False),
        ("reference", "cudagraph_mode FULL_DECODE_ONLY", False, True),
    ]
    assert trials[-1].error == "the trial's 3 engine starts were spent"


def test_a_larger_budget_adds_the_16bit_full_decode_only_run_and_zero_runs_nothing(fake_vllm: list) -> None:
    assert len(_trials(4)) == 6 and fake_vllm[-1] == ("/fp16", Setup((), FULL_DECODE_ONLY))
    fake_vllm.clear()
    trials = _trials(0)
    assert fake_vllm == [] and [t.skipped for t in trials] == [False, False, True, True, True, True]


def test_on_the_cpu_kernel_and_cuda_graph_runs_are_skipped_and_cost_no_budget(fake_vllm: list) -> None:
    trials = _trials(1, gpu=False)
    assert fake_vllm == [("/tiny", Setup())]
    cuda_only = [t for t in trials if t.variant != "floor" and t.skipped]
    assert len(cuda_only) == 3 and {t.error for t in cuda_only} == {"CUDA only (not run on this device)"}
    no_floor = _trials(1, gpu=False, floor=None)
    assert no_floor[3].variant == "floor" and no_floor[3].error == "no tiny stand-in for this architecture"


def test_the_fastest_setup_per_batch_its_ratio_and_both_floors(fake_vllm: list) -> None:
    best = recommend(_trials(4), "NVIDIA H200", "float16", 4096)
    one, eight = best["rows"]
    assert one["int4"]["setup"]["name"] == "VLLM_DISABLED_KERNELS=MacheteLinearKernel"  # 320 beats FDO's 310
    assert eight["int4"]["setup"]["name"] == ("VLLM_DISABLED_KERNELS=MacheteLinearKernel, "
                                              "cudagraph_mode FULL_DECODE_ONLY")
    assert one["reference"]["setup"]["name"] == "vLLM defaults"  # a tie goes to vLLM's defaults
    assert (one["int4_vs_16bit"], eight["int4_vs_16bit"]) == (1.6, 1.5)  # 320 / 200, 2400 / 1600
    assert (one["int4"]["vs_default"], eight["int4"]["vs_default"]) == (1.28, 1.2)  # over Machete's 250, 2000
    assert (one["floor_ms_per_step"], eight["floor_ms_per_step"]) == (2.0, 2.5)  # tiny: 1 / 500, 8 / 3200
    # weights read once per step at 4.8 TB/s: 15 GiB -> 3.36 ms, 6 GiB -> 1.34 ms
    assert one["reference"]["bandwidth_floor_ms"] == pytest.approx(15 * GIB / 4.8e9)
    assert one["int4"]["bandwidth_floor_ms"] == pytest.approx(6 * GIB / 4.8e9)
    assert best["hbm_bytes_per_s"] == 4.8e12


def test_serve_command_sets_the_environment_and_the_measured_engine_arguments(fake_vllm: list) -> None:
    best = recommend(_trials(3), "NVIDIA H200", "float16", 4096)
    assert serve_command("org/MiniCPM-V-2_6-AWQ", best) == (
        "VLLM_DISABLED_KERNELS=MacheteLinearKernel vllm serve org/MiniCPM-V-2_6-AWQ --trust-remote-code "
        "--dtype float16 --max-model-len 4096")
    assert serve_command("/rel ease", best, batch_index=1) == (
        "VLLM_DISABLED_KERNELS=MacheteLinearKernel vllm serve '/rel ease' --trust-remote-code --dtype float16 "
        "--max-model-len 4096 --compilation-config '{\"cudagraph_mode\": \"FULL_DECODE_ONLY\"}'")
    assert serve_command("m", best, variant="reference") == (
        "vllm serve m --trust-remote-code --dtype float16 --max-model-len 4096")
    native = recommend(_trials(3), "NVIDIA H200", "float16", 4096, remote_code=False)  # a spec without remote code
    assert serve_command("m", native, variant="reference") == "vllm serve m --dtype float16 --max-model-len 4096"


def test_nothing_is_recommended_without_an_int4_figure() -> None:
    failed = kernels.SpeedTrial.from_run("int4", Setup(), _run(None, {}, error="boom"))
    assert not failed.ok and failed.error == "boom" and recommend([failed], None) is None


def test_report_and_card_carry_the_table_and_the_serve_command(fake_vllm: list, tmp_path: Path) -> None:
    trials = _trials(3)
    report = VerifyReport(folder="/int4", reference="/fp16", passed=True, reasons=[],
                          environment={"device": "cuda"}, static=None,
                          variants={"int4": {"ok": True, "kernel": "MacheteLinearKernel"}},
                          speed_trials=[t.as_dict() for t in trials],
                          speed_recommendation=recommend(trials, "NVIDIA H200", "float16", 4096))
    markdown = render_markdown(report)
    assert ("| int4 | VLLM_DISABLED_KERNELS=MacheteLinearKernel | MarlinLinearKernel | 100 | 320.0 (3.12) | "
            "2,200.0 (3.64) | 30,000 |") in markdown
    assert ("| 16-bit | cudagraph_mode FULL_DECODE_ONLY | skipped: the trial's 3 engine starts were spent |"
            in markdown)
    assert ("| 1 | vLLM defaults | 200.0 (5.00) | VLLM_DISABLED_KERNELS=MacheteLinearKernel "
            "(MarlinLinearKernel) | 320.0 (3.12) | 1.60x | 2.00 | 3.36 / 1.34 |") in markdown
    assert ("```bash\nVLLM_DISABLED_KERNELS=MacheteLinearKernel vllm serve /int4 --trust-remote-code --dtype float16 "
            "--max-model-len 4096\n```") in markdown
    assert "At batch 8 the fastest was VLLM_DISABLED_KERNELS=MacheteLinearKernel, cudagraph_mode" in markdown
    assert "read once per step at 4.80 TB/s (quantkit.verify.speed.HBM_BYTES_PER_S for NVIDIA H200)" in markdown
    cpu = {**report.speed_recommendation, "device": "cpu (2 cores visible)", "hbm_bytes_per_s": None}
    assert floors_note(cpu).endswith("Bandwidth floor: none: no memory bandwidth is known for device cpu (2 cores "
                                     "visible).")

    (tmp_path / "verify-report.json").write_text(__import__("json").dumps(report.as_dict()))
    (tmp_path / "config.json").write_text('{"model_type": "minicpmv", "version": 2.6}\n')
    card = render_card(tmp_path, repo_id="org/MiniCPM-V-2_6-AWQ")
    assert ("Setups compared by verify on that machine (cuda). Fastest int4 setup at batch 1 (320.0 tok/s, 1.60x "
            "the 16-bit model, 1.28x vLLM's defaults):") in card
    assert ("```bash\nVLLM_DISABLED_KERNELS=MacheteLinearKernel vllm serve org/MiniCPM-V-2_6-AWQ --trust-remote-code "
            "--dtype float16 --max-model-len 4096\n```") in card
