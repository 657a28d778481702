"""Let a torchvision whose compiled ops library cannot load (PyPI's CUDA build beside a CPU-only torch) import.

PyPI's Linux torchvision wheels are CUDA builds: their `_C.so` links libtorch_cuda, so beside torch+cpu torchvision
skips it (`extension._has_ops()` is False) and would work for what transformers and vLLM use (the pure-Python
`transforms.v2`), except that `torchvision._meta_registrations` registers fake kernels for `torchvision::nms` and
`torchvision::qnms` unconditionally, which raises "operator torchvision::nms does not exist" on `import torchvision`
(and so on `import transformers.image_utils`). `install()` adds an import hook that, just before that module runs
and only when the ops library did not load, declares the two operator schemas (no kernels: calling them still
fails, as it would without the library). scripts/install_vllm_cpu.sh installs it for every process of the venv
through a `.pth` file; the vLLM plugin installs it too. Nothing here imports torch until torchvision is imported.
"""

from __future__ import annotations

import sys

HOOKED_MODULE = "torchvision._meta_registrations"
SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
"""The `torchvision::` operators `_meta_registrations` registers without checking `extension._has_ops()`."""

_library = None  # the torch.library.Library holding the declared schemas; must stay alive


def declare_missing_ops() -> list[str]:
    """Declare the schemas of `SCHEMAS` that torch does not know (none when torchvision's `_C` loaded)."""
    global _library
    import torch

    missing = [name for name in SCHEMAS if not hasattr(torch.ops.torchvision, name)]
    if missing:
        if _library is None:
            _library = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _library.define(SCHEMAS[name])
    return missing


class _Finder:
    """A sys.meta_path finder (duck-typed: importlib.abc would cost every interpreter start ~8 ms)."""

    def find_spec(self, fullname, path=None, target=None):
        """Finds nothing (the normal finders load every module); declares the schemas before the hooked module."""
        extension = sys.modules.get("torchvision.extension")
        if fullname == HOOKED_MODULE and extension is not None and not extension._has_ops():
            declare_missing_ops()


def install() -> None:
    """Add the import hook once per process (cheap: imports nothing heavy)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
        if "torchvision.extension" in sys.modules and HOOKED_MODULE not in sys.modules:
            _Finder().find_spec(HOOKED_MODULE)


def is_installed() -> bool:
    return any(isinstance(finder, _Finder) for finder in sys.meta_path)
