"""verify-report.{json,md} writing, the manifest update, the side-by-side table and the GPU-fit arithmetic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from quantkit.archs import MINICPMV26_LLM_SHAPES
from quantkit.card import write_card
from quantkit.io.manifest import hash_file, read_manifest, write_manifest
from quantkit.testing.standin import REAL, weight_specs
from quantkit.verify.capacity import GIB, fit_in_memory, kv_bytes_per_token
from quantkit.verify.parity import ParityThresholds, prompt_parity
from quantkit.verify.report import REPORT_JSON, REPORT_MD, VerifyReport, speed_memory_rows, write_report


def variant(kernel: str, weights_gib: float, decode: float) -> dict:
    return {"ok": True, "kernel": kernel, "weights_bytes": int(weights_gib * GIB), "kv_cache_tokens": 1000,
            "engine_start_s": 30.0, "dtype": "float16", "weights_source": "checkpoint safetensors size",
            "speed": [{"batch": 1, "prefill_tok_s": 100.0, "decode_tok_s": decode},
                      {"batch": 8, "prefill_tok_s": 400.0, "decode_tok_s": decode * 5}]}


def sample_report(folder: Path) -> VerifyReport:
    metrics = prompt_parity("cap", [{0: -0.1}], [{0: -0.2}], [0], [0], "Paris", "Paris", ParityThresholds())
    return VerifyReport(
        folder=str(folder), reference="/models/fp16", passed=metrics.passed, reasons=[],
        environment={"device": "cpu", "vllm": "0.32.0", "cpu_fix_plugin_applied": True},
        static={"ok": True, "summary": {"passed": 13, "failed": 0, "skipped": 0},
                "checks": [{"name": "manifest", "ok": True, "message": "18 files"}]},
        thresholds=ParityThresholds().as_dict(),
        prompts=[{"id": "cap", "kind": "text", "text": "Capital of France?", "images": [],
                  "reference": {"text": "Paris", "tokens": 1, "finish_reason": "stop", "prompt_tokens": 9},
                  "int4": {"text": "Paris", "tokens": 1, "finish_reason": "stop", "prompt_tokens": 9},
                  "metrics": metrics.as_dict()}],
        variants={"reference": variant("none (16-bit linears)", 2.0, 10.0),
                  "int4": variant("CPUWNA16LinearKernel", 0.5, 20.0)},
    )


def test_report_files_and_manifest(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    write_manifest(tmp_path, {"quantization": {"bits": 4}})
    report = sample_report(tmp_path)
    json_path, md_path = write_report(report, tmp_path)

    data = json.loads(json_path.read_text())
    assert data["verdict"] == "PASS" and data["prompts"][0]["metrics"]["mean_kl"] == pytest.approx(
        report.prompts[0]["metrics"]["mean_kl"])
    assert data["variants"]["int4"]["kernel"] == "CPUWNA16LinearKernel"
    markdown = md_path.read_text()
    assert markdown.startswith("# quantkit verify: PASS")
    assert "| cap | text | 1 |" in markdown and "| decode tok/s, batch 8 | 50 | 100 | 2 |" in markdown
    assert "cpu_fix_plugin_applied | yes" in markdown and "```text\nParis\n```" in markdown

    manifest = read_manifest(tmp_path)
    assert manifest["quantization"] == {"bits": 4}
    assert manifest["verify"]["verdict"] == "PASS" and manifest["verify"]["report_json"] == REPORT_JSON
    entries = {entry["path"]: entry for entry in manifest["files"]}
    assert set(entries) == {"config.json", REPORT_JSON, REPORT_MD}
    assert entries[REPORT_MD]["sha256"] == hash_file(md_path)

    report.passed, report.reasons = False, ["prompt cap: mean KL 9 > 0.1"]
    write_report(report, tmp_path)  # a second run replaces the entries instead of adding more
    manifest = read_manifest(tmp_path)
    assert [e["path"] for e in manifest["files"]].count(REPORT_JSON) == 1
    assert manifest["verify"]["verdict"] == "FAIL"
    assert "## Why it failed\n\n- prompt cap: mean KL 9 > 0.1" in md_path.read_text()


def test_report_without_manifest_and_with_a_failed_variant(tmp_path: Path) -> None:
    report = VerifyReport(folder=str(tmp_path), reference="/models/fp16", passed=False,
                          reasons=["reference variant (/models/fp16) failed to run in vLLM: OSError: bad json"],
                          environment={}, static=None,
                          variants={"reference": {"ok": False, "error": "OSError: bad json",
                                                  "log_tail": "Traceback ...\nOSError: bad json"}})
    write_report(report, tmp_path)
    assert not (tmp_path / "quantkit-manifest.json").exists()
    markdown = (tmp_path / REPORT_MD).read_text()
    assert "## reference failed to run in vLLM" in markdown and "OSError: bad json" in markdown


def test_speed_memory_rows_side_by_side() -> None:
    rows = {what: (ref, q) for what, ref, q in speed_memory_rows(
        {"reference": variant("none", 2.0, 10.0), "int4": variant("Marlin", 0.5, 20.0)})}
    assert rows["weights GiB"] == pytest.approx((2.0, 0.5))
    assert rows["decode tok/s, batch 1"] == (10.0, 20.0) and rows["prefill tok/s, batch 8"] == (400.0, 400.0)
    assert rows["linear kernel"] == ("none", "Marlin")
    partial = {what for what, *_ in speed_memory_rows({"reference": {"ok": False}})}
    assert "decode tok/s, batch 8" not in partial


def test_kv_bytes_per_token_of_minicpmv26() -> None:
    # Qwen2-7B: 28 layers x (K + V) x 4 KV heads x 128 dims x 2 bytes = 56 KiB per token.
    assert kv_bytes_per_token(MINICPMV26_LLM_SHAPES) == 28 * 2 * 4 * 128 * 2 == 57344
    assert kv_bytes_per_token({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256}) == \
        2 * 2 * 4 * 64 * 2


def test_fit_in_24_gib_for_real_minicpmv26_shapes() -> None:
    """Does MiniCPM-V 2.6 fit an RTX 4090, by calculation: fp16 (8.1 B params) vs AWQ int4 (g128) on 24 GiB."""
    quantized = {".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.", ".gate_proj.", ".up_proj.", ".down_proj."}
    fp16_bytes = int4_bytes = 0
    for spec in weight_specs(REAL):
        fp16_bytes += 2 * spec.numel
        is_quantized = spec.name.startswith("llm.model.layers.") and spec.name.endswith(".weight") and any(
            q in spec.name for q in quantized)
        # int4 values + fp16 scale and 4-bit zero per group of 128 inputs
        int4_bytes += spec.numel // 2 + spec.numel // 128 * 2 + spec.numel // 128 // 2 if is_quantized \
            else 2 * spec.numel
    kv = kv_bytes_per_token(MINICPMV26_LLM_SHAPES)
    fp16 = fit_in_memory(24, fp16_bytes, kv, 32768)
    int4 = fit_in_memory(24, int4_bytes, kv, 32768)
    assert fp16.weights_gib == pytest.approx(15.09, abs=0.01) and int4.weights_gib == pytest.approx(6.09, abs=0.01)
    # 21.6 GiB budget - weights - 2 GiB reserve, at 56 KiB per token.
    assert fp16.kv_cache_tokens == int((24 * 0.9 - 2) * GIB - fp16_bytes) // kv
    assert (fp16.max_batch, int4.max_batch) == (fp16.kv_cache_tokens // 2048, int4.kv_cache_tokens // 2048)
    assert 2.5 < int4.kv_cache_tokens / fp16.kv_cache_tokens < 3.5  # the seed: int4 fits ~3x the context
    assert fp16.max_len == int4.max_len == 32768
    assert fit_in_memory(16, fp16_bytes, kv, 32768).max_batch == 0  # fp16 weights alone fill a 16 GiB card


def test_report_files_name_local_paths_by_their_names(tmp_path: Path) -> None:
    release, source, suite = tmp_path / "releases" / "demo", tmp_path / "models" / "src", tmp_path / "p.jsonl"
    release.mkdir(parents=True)
    report = sample_report(release)
    report.reference = str(source)
    report.settings = {"prompts": str(suite)}
    report.reasons = [f"int4 variant ({release}) failed to run in vLLM: {source}/config.json: bad"]
    json_path, md_path = write_report(report, release)
    data = json.loads(json_path.read_text())
    assert (data["folder"], data["reference"], data["settings"]["prompts"]) == ("demo", "src", "p.jsonl")
    assert data["reasons"] == ["int4 variant (demo) failed to run in vLLM: src/config.json: bad"]
    markdown = md_path.read_text()
    assert "- int4 folder: `demo`\n- 16-bit reference: `src`" in markdown
    assert str(tmp_path) not in markdown + json_path.read_text()


def test_no_decisive_position_is_said_not_printed_as_agreement(tmp_path: Path) -> None:
    """Random weights: the 16-bit model's next-token probabilities are flat, no position is decisive and the
    greedy texts differ; top-1 agreement (1.0 by definition) must not read as a measurement."""
    flat = [{0: math.log(0.5), 1: math.log(0.5)}] * 3
    metrics = prompt_parity("noise", flat, flat, [0, 0, 0], [1, 1, 1], "aaa", "bbb", ParityThresholds())
    assert metrics.decisive_positions == 0 and metrics.top1_agreement == 1.0
    report = sample_report(tmp_path)
    report.prompts[0]["metrics"] = metrics.as_dict()
    write_report(report, tmp_path)
    markdown = (tmp_path / REPORT_MD).read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| cap |"))
    assert row.split(" | ")[5] == "– (no decisive position)"
    assert "no position of that prompt had the 16-bit model's top-1 probability lead its runner-up by at least " \
           "0.05" in markdown
    (tmp_path / "config.json").write_text('{"model_type": "minicpmv", "version": 2.6}')
    write_manifest(tmp_path, {})
    card = (write_card(tmp_path)[0]).read_text()
    assert "| cap | text | 3 | 0 | – (no decisive position) | 0 | pass |" in card
    assert "no position of that prompt" in card


def test_card_and_report_print_a_figure_alike(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "minicpmv", "version": 2.6}')
    write_manifest(tmp_path, {})
    report = sample_report(tmp_path)
    report.variants["int4"]["speed"][0]["decode_tok_s"] = 22681.3
    report.prompts[0]["metrics"]["mean_kl"] = 0.000123456
    write_report(report, tmp_path)
    card = (write_card(tmp_path)[0]).read_text()
    markdown = (tmp_path / REPORT_MD).read_text()
    for text in (markdown, card):
        assert "| decode tok/s, batch 1 | 10 | 22,681 |" in text
        assert "| cap | text | 1 | 0.0001235 |" in text
        assert "e+0" not in text
