"""The real MiniCPM-V 2.6 snapshot's code, not only our stand-in's: quantkit's module tree and processor compute
what the published files compute, and quantize / eval / verify --static never import a checkpoint's code.

The published files (../shared/fixtures/minicpmv26-hub-code) were written for transformers 4.40 and torch 2.1.
To run them as a reference here, the test supplies what today's stack lacks: the `List` name that resampler.py
took from `torch.nn.functional import *`, and an empty `torchvision` module (imported, never used). The model
class is built directly (its `from_pretrained` path fails on transformers 5: the class never calls post_init).
"""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantkit.archs import MINICPMV26
from quantkit.io.manifest import hash_file, read_manifest
from quantkit.io.model_loading import load_model, shard_tensors

pytestmark = pytest.mark.slow

# (width, height): not sliced (upscaled), 2 x 1 slices, a tall 1 x 3, a large one at the 9-slice limit.
IMAGE_SIZES = [(200, 150), (640, 480), (300, 900), (1400, 1000)]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True,
                          timeout=900, check=False)


@pytest.fixture(scope="module")
def published(published_dir: Path):
    """(model, processor) from the published code on the published-code stand-in, float32.

    The published image_processing_minicpmv.py registers its class with AutoImageProcessor when imported; that
    global registration is undone afterwards, or later loads of the stand-in's own processor would get it."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    registered = dict(IMAGE_PROCESSOR_MAPPING._extra_content)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "List", list, raising=False)  # typing.List, as the 2024 code expected
        patch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
        config = AutoConfig.from_pretrained(published_dir, trust_remote_code=True)
        model_class = get_class_from_dynamic_module("modeling_minicpmv.MiniCPMV", str(published_dir))
        model = model_class(config)
        state = {name: tensor.float() for name, tensor in shard_tensors(published_dir)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(name.endswith("pos_embed") for name in missing)
        processor = AutoProcessor.from_pretrained(published_dir, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), "not the published class"
    yield model.float().eval(), processor
    IMAGE_PROCESSOR_MAPPING._extra_content.clear()
    IMAGE_PROCESSOR_MAPPING._extra_content.update(registered)


@pytest.fixture(scope="module")
def ours(published_dir: Path):
    return load_model(published_dir, MINICPMV26, torch.float32), MINICPMV26.load_processor(published_dir)


def published_inputs(processor, prompt: str, images: list[Image.Image]) -> dict:
    out = processor(text=[prompt], images=[images], return_tensors="pt")
    return {"input_ids": out["input_ids"], "pixel_values": out["pixel_values"], "tgt_sizes": out["tgt_sizes"],
            "image_bound": out["image_bound"], "position_ids": torch.arange(out["input_ids"].shape[1])[None]}


@pytest.mark.parametrize("sizes", [[], *([s] for s in IMAGE_SIZES), IMAGE_SIZES[:2]],
                         ids=["text", *(f"{w}x{h}" for w, h in IMAGE_SIZES), "two-images"])
def test_processor_matches_the_published_one(published, ours, sizes):
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    prompt = ours[1].chat_prompt("What is shown here?", len(images))
    expected = published_inputs(published[1], prompt, images) if images else None
    got = ours[1].encode(prompt, images)
    if expected is None:  # the published processor needs images; text goes through the tokenizer alone
        assert got["input_ids"][0].tolist() == published[1].tokenizer.encode(prompt)
        return
    assert torch.equal(got["input_ids"], expected["input_ids"].long())
    assert [b.tolist() for b in got["image_bound"]] == [b.tolist() for b in expected["image_bound"]]
    assert got["tgt_sizes"][0].tolist() == expected["tgt_sizes"][0].tolist()
    assert len(got["pixel_values"][0]) == len(expected["pixel_values"][0]) > 0
    for mine, theirs in zip(got["pixel_values"][0], expected["pixel_values"][0], strict=True):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sizes", [[], [(640, 480)], [(1400, 1000)], [(200, 150), (300, 900)]],
                         ids=["text", "one-image", "nine-slices", "two-images"])
def test_module_tree_computes_what_the_published_model_computes(published, ours, sizes):
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    prompt = ours[1].chat_prompt("Describe the picture in detail.", len(images))
    data = published_inputs(published[1], prompt, images) if images else ours[1].encode(prompt, [])
    if not images:
        data = {**data, "pixel_values": [[]], "tgt_sizes": [[]], "image_bound": [[]]}
    with torch.no_grad():
        expected = published[0](data=data, use_cache=False).logits
        got = ours[0](data=data, use_cache=False).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Not vacuous: with images, the vision path changes the logits by far more than the tolerance.
    if images:
        text_only = ours[0](**ours[1]("Describe the picture in detail.", [])).logits[0, -1]
        assert (got[0, -1] - text_only).abs().max() > 1e-2


def test_every_checkpoint_tensor_is_loaded_by_name(published_dir: Path, tmp_path: Path):
    from quantkit.errors import InputError

    folder = shutil.copytree(published_dir, tmp_path / "renamed")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight = "vpm.post_layernorm.bias"
    shard = folder / index["weight_map"][weight]
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shard))
    tensors["vpm.post_layernorm.shift"] = tensors.pop(weight)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"]["vpm.post_layernorm.shift"] = index["weight_map"].pop(weight)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="vpm.post_layernorm.shift"):
        load_model(folder, MINICPMV26, torch.float32)
    del index["weight_map"]["vpm.post_layernorm.shift"]
    tensors.pop("vpm.post_layernorm.shift")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="missing.*vpm.post_layernorm.bias"):
        load_model(folder, MINICPMV26, torch.float32)


@pytest.fixture(scope="module")
def image_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 image rows (a prompt and a picture each; one 640x480, sliced) alone, and 2 of them with text."""
    folder = tmp_path_factory.mktemp("calib")
    rows = []
    for i in range(4):
        width, height = (640, 480) if i == 0 else (320, 240)
        picture(width, height, seed=i).save(folder / f"image{i}.png")
        rows.append({"text": f"Describe image number {i} in one sentence.", "images": [f"image{i}.png"]})
    (folder / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from pydoc_data.topics import topics

    texts = [{"text": topics[k]} for k in sorted(topics)[:40]]
    (folder / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + texts))
    return folder


@pytest.mark.parametrize("calib, n_samples, expected", [
    ("images.jsonl", 4, {"text_blocks": 0, "multimodal_samples": 4}),
    ("mixed.jsonl", 4, {"text_blocks": 2, "multimodal_samples": 2}),
], ids=["images-only", "mixed"])
def test_quantize_the_published_snapshot_with_images(published_dir, image_calibration, tmp_path, calib, n_samples,
                                                     expected):
    from quantkit.api import quantize, verify_static

    out = tmp_path / "release"
    quantize(published_dir, out, calib=str(image_calibration / calib), n_samples=n_samples, seq_len=64,
             device="cpu")
    calibration = read_manifest(out)["calibration"]
    assert {k: calibration[k] for k in expected} == expected
    report = verify_static(out, source=published_dir)
    assert report.ok, [c.message for c in report.failed()]


def test_release_keeps_the_published_code_byte_identical(published_dir: Path, published_awq_release: Path):
    code = sorted(p.name for p in published_dir.glob("*.py"))
    assert len(code) == 7
    for name in code:
        assert (published_awq_release / name).read_bytes() == (published_dir / name).read_bytes()
    manifest = read_manifest(published_awq_release)
    assert manifest["remote_code"] == {name: hash_file(published_dir / name) for name in code}
    from quantkit.api import verify_static
    from quantkit.card import render_card

    report = verify_static(published_awq_release, source=published_dir)
    assert report.ok, [c.message for c in report.failed()]

    card = render_card(published_awq_release)
    for name in code:
        assert f"`{name}` | `{hash_file(published_dir / name)}`" in card


def test_nothing_usable_in_the_calibration_set_is_refused(published_dir: Path, tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    proc = run_cli("quantize", published_dir, tmp_path / "out", "--calib", tmp_path / "empty.jsonl", "--device", "cpu")
    assert proc.returncode != 0 and "no usable sample" in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_quantize_eval_and_static_verify_import_no_checkpoint_code(raising_code_dir: Path, tmp_path: Path):
    """Every code file of this checkpoint raises on import; the whole CPU pipeline still runs."""
    out = tmp_path / "release"
    proc = run_cli("quantize", raising_code_dir, out, "--calib", "builtin:pydoc", "--n-samples", "4",
                   "--seq-len", "64", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from quantkit.api import evaluate, verify_static

    report = verify_static(out, source=raising_code_dir)
    assert report.ok, [c.message for c in report.failed()]
    evaluation = evaluate(out, raising_code_dir, n_samples=2, seq_len=64)
    assert evaluation.n_blocks == 2 and 0 < evaluation.kl_mean < 1
