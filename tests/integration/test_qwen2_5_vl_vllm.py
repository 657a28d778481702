"""vLLM loads the tiny Qwen2.5-VL stand-in (16-bit) and its int4 release natively (no remote code) and generates
for text, one image, two images and a video; both variants expand the placeholders alike and agree on most of the
first token's top-5 (a wrong nibble order or scale layout would share none).

vLLM's Qwen2-VL family imports transformers' torchvision-backed image and video processors. On CPU machines
scripts/install_vllm_cpu.sh keeps PyPI's (CUDA) torchvision and installs quantkit.torchvision_cpu's import hook so
that it imports beside the CPU torch; without an importable torchvision the test is skipped with that reason.
Work under `__main__` in a child process, as for MiniCPM-V.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed; on CPU machines run scripts/install_vllm_cpu.sh"),
]


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA build beside a CPU torch raises RuntimeError, not ImportError
        return False
    return True


SITECUSTOMIZE = '''
import torch

if not torch.cuda.is_available():
    torch.cuda.is_current_stream_capturing = lambda: False
'''

RUNNER = '''
import json, sys
import numpy as np
from PIL import Image

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    def turn(vision):
        return ("<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n" + vision
                + "Describe it.<|im_end|>\\n<|im_start|>assistant\\n")

    image = "<|vision_start|><|image_pad|><|vision_end|>"
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (112, 140, 3), dtype=np.uint8)) for _ in range(2)]
    frames = rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    prompts = {
        "text": {"prompt": turn("")},
        "image": {"prompt": turn(image), "multi_modal_data": {"image": pictures[0]}},
        "multi_image": {"prompt": turn(image + image), "multi_modal_data": {"image": pictures}},
        "video": {"prompt": turn(video), "multi_modal_data": {"video": (frames, {"fps": 2.0, "total_num_frames": 4,
                  "frames_indices": list(range(4)), "video_backend": "opencv", "duration": 2.0})}},
    }
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=5)
    for folder in sys.argv[1:]:
        llm = LLM(model=folder, max_model_len=2048, enforce_eager=True, gpu_memory_utilization=0.3,
                  limit_mm_per_prompt={"image": 2, "video": 1}, dtype="bfloat16")
        for name, out in zip(prompts, llm.generate(list(prompts.values()), params)):
            print("RESULT " + json.dumps({"folder": folder, "name": name, "prompt_tokens": len(out.prompt_token_ids),
                                          "tokens": list(out.outputs[0].token_ids),
                                          "top5": {str(t): p.logprob for t, p in out.outputs[0].logprobs[0].items()}}),
                  flush=True)
        del llm
'''


@pytest.fixture(scope="module")
def qwen_release_for_vllm(qwen25vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quantkit.api import quantize

    out = tmp_path_factory.mktemp("qwen-vllm") / "qwen2.5-vl-tiny-awq"
    quantize(qwen25vl_dir, out, calib="builtin:pydoc", n_samples=4, seq_len=64, device="cpu")
    return out


@pytest.mark.skipif(not _torchvision_importable(),
                    reason="vLLM's Qwen2.5-VL imports transformers' torchvision processors and torchvision does not "
                           "import here; on CPU machines run scripts/install_vllm_cpu.sh")
def test_vllm_runs_text_image_images_video_on_16bit_and_int4(qwen25vl_dir: Path, qwen_release_for_vllm: Path,
                                                            tmp_path: Path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp_path / "run_vllm.py").write_text(textwrap.dedent(RUNNER))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process: one vLLM import, not two
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(tmp_path / "run_vllm.py"), str(qwen25vl_dir), str(qwen_release_for_vllm)],
                          check=False, env=env, capture_output=True, text=True, timeout=900)
    results = [json.loads(line.removeprefix("RESULT ")) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(results) == 8, proc.stderr[-4000:]
    by = {(Path(r["folder"]).name, r["name"]): r for r in results}
    for name in ("text", "image", "multi_image", "video"):
        reference, int4 = by[(qwen25vl_dir.name, name)], by[(qwen_release_for_vllm.name, name)]
        assert len(reference["tokens"]) == len(int4["tokens"]) == 4, name
        assert reference["prompt_tokens"] == int4["prompt_tokens"], name
    text = by[(qwen25vl_dir.name, "text")]["prompt_tokens"]
    assert by[(qwen25vl_dir.name, "image")]["prompt_tokens"] == text + 3 - 1 + 20  # 140 x 112 px: 20 merged patches
    assert by[(qwen25vl_dir.name, "multi_image")]["prompt_tokens"] == text + 2 * (3 - 1 + 20)
    # 4 frames of 56 x 56 px: 2 temporal patches (of 2 frames) x 4 x 4 patches / 2 x 2 merge = 8
    assert by[(qwen25vl_dir.name, "video")]["prompt_tokens"] == text + 3 - 1 + 8
    # Parity: the tiny random model's logits are nearly flat, so greedy tokens may differ; the first token's top-5
    # sets share 4 of 5 for every prompt (measured on 2 CPU cores, bf16); a broken int4 layout would share ~none.
    shared = {name: len(set(by[(qwen25vl_dir.name, name)]["top5"]) & set(by[(qwen_release_for_vllm.name, name)]["top5"]))
              for name in ("text", "image", "multi_image", "video")}
    assert all(n >= 3 for n in shared.values()), shared
