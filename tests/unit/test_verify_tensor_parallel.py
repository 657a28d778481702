"""`verify --tensor-parallel-size N`: refused without N GPUs, passed to vLLM for both variants, recorded in the
report (no vLLM run: the worker and the engine are faked)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantkit.errors import DependencyError, InputError
from quantkit.verify import pipeline, vllm_runner, vllm_worker
from quantkit.verify.report import VerifyReport, render_markdown
from quantkit.verify.vllm_runner import EngineSettings, VariantRun, check_tensor_parallel, run_variant


def test_the_size_reaches_the_worker_request_and_vllms_llm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    requests = []

    def fake_worker(request, workdir, gpu, timeout_s, extra_env=None):
        requests.append(request)
        return {"error": "not started (test)"}, "", 0.0

    monkeypatch.setattr(vllm_runner, "_run_worker", fake_worker)
    run = run_variant("int4", tmp_path, [], EngineSettings(tensor_parallel_size=2))
    assert not run.ok and requests[0]["tensor_parallel_size"] == 2

    made = []
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=lambda **kw: made.append(kw)))
    vllm_worker._engine(requests[0])
    assert made[0]["tensor_parallel_size"] == 2
    vllm_worker._engine({**requests[0], "tensor_parallel_size": 1})  # vLLM's default stays vLLM's
    assert "tensor_parallel_size" not in made[1]


def test_more_than_the_visible_gpus_is_refused():
    check_tensor_parallel(1)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DependencyError, match=f"--tensor-parallel-size {max(2, visible + 1)}"):
        check_tensor_parallel(max(2, visible + 1))
    with pytest.raises(InputError):
        check_tensor_parallel(0)


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "bfloat16"}
    folders = []
    for name in ("int4", "fp16"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        folders.append(tmp_path / name)
    return folders[0], folders[1]


def test_verify_refuses_before_any_engine_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(vllm_runner, "_run_worker", lambda *a, **k: pytest.fail("an engine was started"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    release, reference = _folders(tmp_path)
    with pytest.raises(DependencyError, match="--tensor-parallel-size 2: no CUDA GPU"):
        pipeline.verify(release, reference=reference, tensor_parallel_size=2)


def test_verify_runs_both_variants_with_the_size_and_reports_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    release, reference = _folders(tmp_path)
    sizes = []

    def fake_run_variant(label, folder, prompts, settings, **kwargs):
        sizes.append((label, settings.tensor_parallel_size))
        if label == "reference":
            return VariantRun(label=label, model_dir=str(folder), ok=True, engine_start_s=1.0, kernel="none")
        return VariantRun(label=label, model_dir=str(folder), ok=False, error="stop here (test)")

    static = types.SimpleNamespace(ok=True, failed=list, to_dict=lambda: {"ok": True, "checks": []})
    monkeypatch.setattr(pipeline, "verify_static", lambda *a, **k: static)
    monkeypatch.setattr(pipeline, "check_tensor_parallel", lambda size: None)  # as on a 2-GPU machine
    monkeypatch.setattr(pipeline, "run_variant", fake_run_variant)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    report = pipeline.verify(release, reference=reference, tensor_parallel_size=2)
    assert sizes == [("reference", 2), ("int4", 2)]
    assert report.settings["tensor_parallel_size"] == 2
    assert json.loads((release / "verify-report.json").read_text())["settings"]["tensor_parallel_size"] == 2
    assert "- vLLM tensor parallel size: 2 (both variants)" in (release / "verify-report.md").read_text()
    static_only = VerifyReport(folder="/r", reference=None, passed=True, reasons=[], environment={}, static=None)
    assert "tensor parallel" not in render_markdown(static_only)  # no vLLM run, nothing to say


def test_the_cli_option_reaches_the_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from quantkit import api
    from quantkit.cli import app

    seen = {}

    def fake_verify(folder, **kwargs):
        seen.update(kwargs)
        raise InputError("stop here (test)")

    monkeypatch.setattr(api, "verify", fake_verify)
    result = CliRunner().invoke(app, ["verify", str(tmp_path), "--reference", str(tmp_path),
                                      "--tensor-parallel-size", "4"])
    assert isinstance(result.exception, InputError) and seen["tensor_parallel_size"] == 4
