"""The vLLM-free parts of `verify`: prompt suites, the CPU plugin, log parsing, argument errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from quantkit.archs import MINICPMV26, QWEN2
from quantkit.errors import DependencyError, InputError
from quantkit.verify import pipeline, vllm_cpu_plugin
from quantkit.verify.prompts import DEFAULT_SUITE, load_prompts, prompts_for
from quantkit.verify.vllm_runner import (
    parse_kernel,
    parse_kv_tokens,
    parse_weights_gib,
    root_cause,
    worker_env,
)

IMAGE_PLACEHOLDER = MINICPMV26.chat.image_placeholder


def test_default_suite_covers_every_kind_with_real_images() -> None:
    prompts = load_prompts()
    assert {p.kind for p in prompts} == {"text", "image", "multi_image", "video"}
    for prompt in prompts:
        assert prompt.user_content(IMAGE_PLACEHOLDER).count(IMAGE_PLACEHOLDER) == len(prompt.images)
        for path in prompt.images:
            assert Path(path).stat().st_size < 16_000
            with Image.open(path) as image:
                expected = (320, 240) if prompt.kind == "video" else (640, 480)
                assert image.size == expected
    video = next(p for p in prompts if p.kind == "video")
    assert video.user_content(IMAGE_PLACEHOLDER).startswith("\n".join([IMAGE_PLACEHOLDER] * len(video.images)) + "\n")


def test_a_video_goes_as_one_video_where_the_architecture_has_a_video_placeholder(tmp_path: Path) -> None:
    """Qwen2.5-VL: the video prompt is one <|video_pad|> line and its frames one [frames, H, W, 3] array with
    metadata; images stay images. MiniCPM-V 2.6 (no video placeholder): the frames go as images."""
    from quantkit.archs import QWEN2_5_VL
    from quantkit.verify.vllm_worker import VIDEO_FPS, _chat_token_ids, _multi_modal_data

    chat = QWEN2_5_VL.chat
    video = next(p for p in load_prompts() if p.kind == "video")
    content = video.user_content(chat.image_placeholder, chat.video_placeholder)
    assert content == f"{chat.video_placeholder}\n{video.text}" and chat.image_placeholder not in content
    assert video.user_content(IMAGE_PLACEHOLDER, MINICPMV26.chat.video_placeholder).count(IMAGE_PLACEHOLDER) == 4

    data = _multi_modal_data({**video.as_dict(), "as_video": True})
    frames, metadata = data["video"]
    assert frames.shape == (4, 240, 320, 3) and frames.dtype.name == "uint8"
    assert metadata["total_num_frames"] == 4 and metadata["fps"] == VIDEO_FPS
    assert len(_multi_modal_data({**video.as_dict(), "as_video": False})["image"]) == 4
    odd = tmp_path / "odd.png"
    Image.new("RGB", (64, 48)).save(odd)
    with pytest.raises(ValueError, match=r"'video-ball'.*2 sizes \(64x48, 320x240\).*resize them"):
        _multi_modal_data({**video.as_dict(), "images": [*video.images[:3], str(odd)], "as_video": True})

    class Tokenizer:  # one id per character, so merges across a placeholder would show
        chat_template = "given"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<u>" + messages[0]["content"] + "</u>"

        def encode(self, text, add_special_tokens):
            return [len(text)] if text in (chat.image_placeholder, chat.video_placeholder) else [ord(c) for c in text]

    text = f"{chat.image_placeholder}\nA\n{chat.video_placeholder}\nB"
    ids = _chat_token_ids(Tokenizer(), text, [chat.image_placeholder, chat.video_placeholder])
    expected = [*map(ord, "<u>"), len(chat.image_placeholder), *map(ord, "\nA\n"), len(chat.video_placeholder),
                *map(ord, "\nB</u>")]
    assert ids == expected


def test_the_suite_keeps_the_kinds_the_architecture_takes() -> None:
    """A text-only LLM gets the shipped suite's text prompts; a user's suite with images is refused for it."""
    suite = load_prompts()
    assert prompts_for(MINICPMV26, suite, user_suite=False) == suite
    assert {p.kind for p in prompts_for(QWEN2, suite, user_suite=False)} == {"text"}
    with pytest.raises(InputError, match="Qwen2 takes text prompts, not image, multi_image, video"):
        prompts_for(QWEN2, suite, user_suite=True)


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "not valid JSON"),
    ('{"id": "a"}', "string `id` and `text`"),
    ('{"id": "a", "text": "t", "kind": "audio"}', "kind 'audio'"),
    ('{"id": "a", "text": "t", "kind": "image", "images": []}', "needs 1 image"),
    ('{"id": "a", "text": "t", "kind": "video", "images": ["f.png"]}', "at least 2"),
    ('{"id": "a", "text": "t", "kind": "image", "images": ["missing.png"]}', "not found"),
])
def test_bad_prompt_files_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "f.png").write_bytes(b"")
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "ok", "text": "hi"}\n' + line + "\n")
    with pytest.raises(InputError, match=message) as caught:
        load_prompts(path)
    assert f"{path}:2" in str(caught.value)


def test_user_prompts_resolve_images_next_to_the_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"id": "x", "kind": "image", "text": "What?", "images": ["a.png"]}) + "\n")
    (prompt,) = load_prompts(path)
    assert prompt.images == (str(tmp_path / "a.png"),)
    with pytest.raises(InputError, match="used twice"):
        path.write_text(path.read_text() * 2)
        load_prompts(path)
    assert DEFAULT_SUITE.is_file()


def test_cpu_plugin_patches_only_a_cpu_only_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", torch.cuda.is_current_stream_capturing)
    vllm_cpu_plugin.register()
    if vllm_cpu_plugin.torch_has_cuda():
        assert not vllm_cpu_plugin.is_applied()
    else:
        assert vllm_cpu_plugin.is_applied() and torch.cuda.is_current_stream_capturing() is False
        vllm_cpu_plugin.register()  # vLLM may call it again in the same process
        assert vllm_cpu_plugin.is_applied()


def test_plugin_is_registered_as_a_vllm_general_plugin() -> None:
    from importlib.metadata import entry_points

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("quantkit_cpu_fix") == "quantkit.verify.vllm_cpu_plugin:register", (
        "entry point missing: reinstall quantkit (pip install -e . --no-deps) after editing pyproject.toml")


def test_log_parsing() -> None:
    log = (
        "(EngineCore pid=1) INFO [auto_awq.py:451] Using CPUWNA16LinearKernel for AutoAWQMarlinLinearMethod\n"
        "(Worker pid=2) INFO [gpu_model_runner.py:5150] Model loading took 5.37 GiB memory and 12.5 seconds\n"
        "(EngineCore pid=1) INFO [kv_cache_utils.py:2327] GPU KV cache size: 1,048,576 tokens, Maximum ...\n"
    )
    assert parse_kernel(log) == ("CPUWNA16LinearKernel", None)
    assert parse_weights_gib(log) == 5.37 and parse_kv_tokens(log) == 1048576
    assert parse_kernel("nothing") == (None, None) and parse_weights_gib("") is None
    kernel, warning = parse_kernel("WARNING Layer 'x' is not supported by AutoAWQMarlin. Falling back to "
                                   "unoptimized AWQ kernels.")
    assert kernel == "AutoAWQLinearMethod" and "legacy" in warning


def test_root_cause_skips_vllms_see_above_wrappers() -> None:
    worker = "(Worker pid=38) ERROR 11-25 11:26:58 [multiproc_executor.py:953]"
    log = f"""\
(EngineCore pid=20) INFO 11-25 11:26:40 [core.py:133] Initializing a V1 LLM engine
{worker}     raise ValueError(
{worker} ValueError: Failed to find a kernel that can implement the WNA16 linear layer. Reasons: 
{worker}  Dynamic4bitLinearKernel cannot implement due to: Unsupported quant type uint4
{worker}  CPUWNA16LinearKernel disabled by environment variable
(EngineCore pid=20) ERROR 11-25 11:27:01 [core.py:1510] EngineCore failed to start.
Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {{}}
"""
    assert root_cause(log) == (
        "ValueError: Failed to find a kernel that can implement the WNA16 linear layer. Reasons: "
        "Dynamic4bitLinearKernel cannot implement due to: Unsupported quant type uint4; "
        "CPUWNA16LinearKernel disabled by environment variable")
    assert root_cause("RuntimeError: Engine core initialization failed. See root cause above.") is None


def test_worker_env_sets_cpu_settings_without_overriding_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    env = worker_env(gpu=False)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    on_gpu = worker_env(gpu=True)
    assert "VLLM_CPU_KVCACHE_SPACE" not in on_gpu and "VLLM_ENABLE_V1_MULTIPROCESSING" not in on_gpu


def test_verify_without_vllm_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm"
                        else real_find_spec(name, *a))
    with pytest.raises(DependencyError, match=r"pip install 'quantkit\[vllm\]'.*install_vllm_cpu\.sh"):
        pipeline.verify(tmp_path, reference=tmp_path)


def test_verify_needs_a_reference_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--reference"):
        pipeline.verify(tmp_path)
    with pytest.raises(InputError, match="not a model folder"):
        pipeline.verify(tmp_path, reference=tmp_path / "nowhere")


def test_verify_refuses_a_missing_release_and_a_negative_kernel_count_before_needing_vllm(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # vLLM absent: checked after these
    with pytest.raises(InputError, match=r"release folder .*nowhere does not exist"):
        pipeline.verify(tmp_path / "nowhere", reference=tmp_path)
    with pytest.raises(InputError, match="speed_trials=-1"):
        pipeline.verify(tmp_path, reference=tmp_path, speed_trials=-1)
