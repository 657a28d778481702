"""`quantkit quantize` on the MiniCPM-V 2.6 stand-in: release folder, resume, multimodal calibration, refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from quantkit.api import quantize, verify_static
from quantkit.archs import MINICPMV26
from quantkit.awq.engine import capture_layer_inputs, outside_layers_on
from quantkit.awq.settings import QuantSettings
from quantkit.calib import CalibSample, build_calibration_set
from quantkit.cli import app
from quantkit.errors import DependencyError, InputError
from quantkit.io.model_loading import load_model
from quantkit.io.shards import ShardReader
from quantkit.quantize import calibration_forwards, work_folder

SMALL = {"calib": "builtin:pydoc", "n_samples": 4, "seq_len": 64, "device": "cpu"}


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_release_passes_static_verify_and_loads(awq_release: Path, standin_dir: Path):
    from transformers import AutoConfig, AutoProcessor

    report = verify_static(awq_release, source=standin_dir)
    assert report.ok, [c.message for c in report.checks if not c.ok]
    config = AutoConfig.from_pretrained(awq_release, trust_remote_code=True)
    assert config.quantization_config["modules_to_not_convert"] == ["vpm", "resampler"]
    assert AutoProcessor.from_pretrained(awq_release, trust_remote_code=True) is not None
    manifest = json.loads((awq_release / "quantkit-manifest.json").read_text())
    layers = manifest["quantization"]["layers"]
    assert [layer["index"] for layer in layers] == [0, 1]
    assert set(layers[0]["ratios"]) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    assert not work_folder(awq_release).exists()


def test_killed_run_resumes_bit_identical(standin_dir: Path, tmp_path: Path):
    uninterrupted = tmp_path / "straight"
    quantize(standin_dir, uninterrupted, **SMALL)

    resumed = tmp_path / "resumed"

    def die_after_first_layer(report, n_layers):
        if report.index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(standin_dir, resumed, on_layer_done=die_after_first_layer, **SMALL)
    assert not resumed.exists()
    state = json.loads((work_folder(resumed) / "state.json").read_text())
    assert state["completed_layers"] == 1

    result = quantize(standin_dir, resumed, **SMALL)
    assert result.resumed_from_layer == 1
    assert shard_hashes(resumed) == shard_hashes(uninterrupted)
    assert not work_folder(resumed).exists()


def test_changed_settings_do_not_resume_a_foreign_work_folder(standin_dir: Path, tmp_path: Path):
    """A work folder left by a group-size-128 run is not resumed by a group-size-64 one: that run starts at
    layer 0 and its release holds 64-wide groups throughout."""
    out = tmp_path / "out"

    def die(report, n_layers):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(standin_dir, out, on_layer_done=die, **SMALL)
    assert json.loads((work_folder(out) / "state.json").read_text())["completed_layers"] == 1
    result = quantize(standin_dir, out, **SMALL, settings=QuantSettings(group_size=64))
    assert result.resumed_from_layer == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64
    with ShardReader(out) as reader:  # q_proj of the tiny stand-in: 256 inputs in 4 groups of 64, 256 outputs
        for layer in (0, 1):
            assert reader.shape_dtype(f"llm.model.layers.{layer}.self_attn.q_proj.scales") == ([4, 256], "F16")


def test_image_samples_reach_the_llm_through_the_vision_path(standin_dir: Path, tmp_path: Path):
    """The layer-0 inputs of an image sample hold vision features where the processor put <unk> slots."""
    from transformers import AutoTokenizer

    image = tmp_path / "red.png"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(image)
    tokenizer = AutoTokenizer.from_pretrained(standin_dir, trust_remote_code=True)
    calib = build_calibration_set([CalibSample("Describe the picture.", (image,)),
                                   CalibSample("plain text " * 200)], tokenizer, n_samples=2, seq_len=64)
    model = load_model(standin_dir, MINICPMV26, torch.float32)
    from quantkit.awq.settings import QuantSettings

    forwards = calibration_forwards(model, MINICPMV26, standin_dir, calib, QuantSettings(), torch.device("cpu"),
                                    torch.float32)
    inputs = capture_layer_inputs(model, MINICPMV26, forwards, "cpu")
    assert len(inputs.hidden) == 2
    image_hidden = inputs.hidden[1][0]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "(<image>./</image>)\nDescribe the picture."}],
                                        tokenize=False, add_generation_prompt=True)
    assert image_hidden.shape[0] > len(tokenizer(ids)["input_ids"]) + 60  # the placeholders were expanded
    unk = model.llm.get_input_embeddings().weight[tokenizer.unk_token_id]
    slots = (image_hidden - unk).abs().sum(dim=-1) < 1e-6
    assert not slots.any(), "image placeholder slots still hold the <unk> embedding: vision features missing"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU has no other device to visit)")
def test_outside_layers_visit_the_device_and_get_their_own_tensors_back(standin_dir: Path):
    """For the capture, the embeddings and the vision tower go to the device; the decoder layers and the output
    head stay; after, every moved tensor is the very host tensor it was (put back, not copied back)."""
    model = load_model(standin_dir, MINICPMV26, torch.float32)
    embed, head = model.llm.get_input_embeddings().weight, model.get_submodule(MINICPMV26.output_head).weight
    vision = next(model.vpm.parameters())
    layer = next(model.get_submodule(MINICPMV26.decoder_layers)[0].parameters())
    tensors = {"embed": embed, "head": head, "vision": vision, "layer": layer}
    before = {name: (t.device, t.data_ptr()) for name, t in tensors.items()}
    with outside_layers_on(model, MINICPMV26, "cuda"):
        assert embed.device.type == vision.device.type == "cuda"
        assert head.device.type == layer.device.type == "cpu"
    assert {name: (t.device, t.data_ptr()) for name, t in tensors.items()} == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_on_a_gpu_passes_the_static_checks(standin_dir: Path, tmp_path: Path):
    """The GPU path of `quantize`: kernels compiled while the model loads, the capture on the device, the
    layers searched there (fused kernels where the shapes allow); the release checks out like the CPU one."""
    out = tmp_path / "gpu"
    result = quantize(standin_dir, out, **{**SMALL, "device": "cuda"})
    report = verify_static(out, source=standin_dir)
    assert report.ok, [c.message for c in report.checks if not c.ok]
    assert result.peak_gpu_gib is not None and result.peak_gpu_gib > 0


def test_too_little_calibration_is_refused(standin_dir: Path, tmp_path: Path):
    text = tmp_path / "calib.txt"
    text.write_text("only a few words here\n\nand here")
    with pytest.raises(InputError, match=r"calib.txt has \d+ text tokens, but 4 blocks x 64 tokens = 256"):
        quantize(standin_dir, tmp_path / "out", **{**SMALL, "calib": str(text)})
    assert not (tmp_path / "out").exists()


def test_refusals(standin_dir: Path, tmp_path: Path):
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(InputError, match="already exists; pass --force"):
        quantize(standin_dir, existing, **SMALL)
    with pytest.raises(InputError, match="does not exist"):
        quantize(tmp_path / "nowhere", tmp_path / "o1", **SMALL)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match="model_type 'bert' is not supported"):
        quantize(bert, tmp_path / "o2", **SMALL)
    old = tmp_path / "minicpmv2"
    shutil.copytree(standin_dir, old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "version": 2.5}))
    with pytest.raises(InputError, match="version 2.5 is not supported"):
        quantize(old, tmp_path / "o3", **SMALL)
    with pytest.raises(InputError, match="calibration file './missing.jsonl' does not exist"):
        quantize(standin_dir, tmp_path / "o4", **{**SMALL, "calib": "./missing.jsonl"})
    if not torch.cuda.is_available():
        with pytest.raises(DependencyError, match="no CUDA GPU"):
            quantize(standin_dir, tmp_path / "o5", **{**SMALL, "device": "cuda"})


def test_cli_reports_user_errors_in_one_line(tmp_path: Path):
    from quantkit.cli import main

    runner = CliRunner()
    result = runner.invoke(app, ["quantize", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert isinstance(result.exception, InputError)
    result = runner.invoke(app, ["quantize", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--method", "gptq"])
    assert isinstance(result.exception, InputError) and "method='gptq': use one of awq, awq-gptq" in str(
        result.exception)
    with pytest.raises(SystemExit) as exit_info:
        import sys

        argv = sys.argv
        sys.argv = ["quantkit", "quantize", str(tmp_path / "nowhere"), str(tmp_path / "out")]
        try:
            main()
        finally:
            sys.argv = argv
    assert exit_info.value.code == 1
