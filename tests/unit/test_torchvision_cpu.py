"""quantkit.torchvision_cpu lets PyPI's CUDA torchvision import beside a CPU torch, and changes nothing else."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from quantkit import torchvision_cpu

CHILD = """
import json, sys
from quantkit import torchvision_cpu
torchvision_cpu.install()
torchvision_cpu.install()  # idempotent
import torch, torchvision
import transformers.image_utils  # imports torchvision.transforms when torchvision is installed
print(json.dumps({"has_ops": torchvision.extension._has_ops(), "nms": hasattr(torch.ops.torchvision, "nms"),
                  "hooks": sum(type(f).__name__ == "_Finder" for f in sys.meta_path)}))
"""


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_imports_with_the_hook() -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["nms"] and result["hooks"] == 1  # declared by the hook, or by the ops library where it loads


def test_the_finder_never_finds_a_module() -> None:
    assert torchvision_cpu._Finder().find_spec("json") is None
    assert torchvision_cpu._Finder().find_spec("torchvision._meta_registrations") is None
