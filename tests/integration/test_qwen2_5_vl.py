"""Qwen2.5-VL from its spec alone: the tiny faithful stand-in quantized with text and image calibration (the
M-RoPE positions the model computes reach layer 0), the release laid out as vLLM reads it, verify --static."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from quantkit.api import quantize, verify_static
from quantkit.archs import QWEN2_5_VL
from quantkit.awq.engine import capture_layer_inputs
from quantkit.awq.settings import QuantSettings
from quantkit.calib import CalibSample, build_calibration_set
from quantkit.errors import InputError
from quantkit.io.model_loading import load_model, load_tokenizer
from quantkit.io.shards import ShardReader
from quantkit.quantize import calibration_forwards


@pytest.fixture(scope="module")
def qwen_calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two image rows (one and two images) and enough pydoc text for 4 x 64-token blocks."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("qwen-calib")
    Image.new("RGB", (140, 112), (200, 30, 30)).save(folder / "red.png")
    Image.effect_noise((84, 84), 60).convert("RGB").save(folder / "noise.png")
    rows = [{"text": "Describe the picture.", "images": ["red.png"]},
            {"text": "Compare the two pictures.", "images": ["red.png", "noise.png"]}]
    rows += [{"text": topics[key]} for key in sorted(topics)[:20]]
    (folder / "calib.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder / "calib.jsonl"


@pytest.fixture(scope="module")
def qwen_release(qwen25vl_dir: Path, qwen_calib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qwen-awq") / "qwen2.5-vl-tiny-awq"
    quantize(qwen25vl_dir, out, calib=str(qwen_calib), n_samples=6, seq_len=64, device="cpu")
    return out


def test_release_is_the_hub_layout_and_passes_static_verify(qwen_release: Path, qwen25vl_dir: Path):
    report = verify_static(qwen_release, source=qwen25vl_dir)
    assert report.ok, [c.message for c in report.checks if not c.ok]
    config = json.loads((qwen_release / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == ["visual"]
    assert config["model_type"] == "qwen2_5_vl" and "text_config" not in config  # flat, as the Hub's
    with ShardReader(qwen_release) as release, ShardReader(qwen25vl_dir) as source:
        names = set(release.mapping)
        assert {"model.layers.1.mlp.down_proj.qweight", "model.layers.0.self_attn.q_proj.qzeros",
                "model.layers.0.self_attn.q_proj.bias", "lm_head.weight", "model.embed_tokens.weight"} <= names
        assert not any(".language_model." in n or n.startswith("model.visual.") or n.endswith("proj.weight")
                       and n.startswith("model.layers.") for n in names)
        visual = sorted(n for n in source.mapping if n.startswith("visual."))
        assert visual and all(n in names for n in visual)
        assert torch.equal(release.get("visual.merger.mlp.0.weight"),
                           source.get("visual.merger.mlp.0.weight").to(torch.float16))
    manifest = json.loads((qwen_release / "quantkit-manifest.json").read_text())
    assert manifest["calibration"]["multimodal_samples"] == 2
    assert manifest["quantization"]["arch"] == "qwen2_5_vl"


def test_image_samples_reach_layer_0_with_mrope_positions(qwen25vl_dir: Path, qwen_calib: Path):
    """An image sample runs through the vision tower and arrives at layer 0 with the rotary tables of the 3-D
    positions the model computes from image_grid_thw (not the text positions 0..L-1)."""
    model = load_model(qwen25vl_dir, QWEN2_5_VL, torch.float32)
    tokenizer = load_tokenizer(qwen25vl_dir, QWEN2_5_VL)
    image = qwen_calib.parent / "red.png"
    calib = build_calibration_set([CalibSample("Describe the picture.", (image,)), CalibSample("text " * 100)],
                                  tokenizer, n_samples=2, seq_len=32)
    forwards = calibration_forwards(model, QWEN2_5_VL, qwen25vl_dir, calib, QuantSettings(), torch.device("cpu"),
                                    torch.float32)
    inputs = capture_layer_inputs(model, QWEN2_5_VL, forwards, "cpu")
    kwargs = QWEN2_5_VL.load_processor(qwen25vl_dir)("Describe the picture.", [Image.open(image).convert("RGB")])
    ids = kwargs["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((ids == image_id).sum()) == 20  # 140 x 112 px: 10 x 8 patches of 14, merged 2 x 2
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=kwargs["mm_token_type_ids"],
                                              image_grid_thw=kwargs["image_grid_thw"])
    assert not torch.equal(positions[1], positions[2])  # height and width differ over the image
    hidden = inputs.hidden[1]
    assert hidden.shape[1] == ids.shape[1]
    cos, sin = model.model.language_model.rotary_emb(hidden, positions)
    got_cos, got_sin = inputs.kwargs[1]["position_embeddings"]
    assert torch.allclose(got_cos, cos) and torch.allclose(got_sin, sin)
    text_cos, _ = model.model.language_model.rotary_emb(hidden, torch.arange(ids.shape[1])[None].expand(3, 1, -1))
    assert not torch.allclose(got_cos, text_cos)
    embeds = model.get_input_embeddings().weight[image_id]
    assert not ((hidden[0][ids[0] == image_id] - embeds).abs().sum(-1) < 1e-6).any()  # vision features there


def test_autoawq_backend_refuses_it(qwen25vl_dir: Path, tmp_path: Path):
    with pytest.raises(InputError, match="--backend autoawq does not support Qwen2.5-VL: .*M-RoPE.*--backend native"):
        quantize(qwen25vl_dir, tmp_path / "out", calib="builtin:pydoc", n_samples=2, seq_len=32, device="cpu",
                 backend="autoawq")
    assert not (tmp_path / "out").exists()
