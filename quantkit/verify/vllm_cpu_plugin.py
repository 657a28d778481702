"""A vLLM general plugin (entry point group `vllm.general_plugins`) that makes MiniCPM-V image requests work
on a CPU-only torch.

vLLM's MiniCPMV `Resampler2_5.forward` asks `torch.cuda.is_current_stream_capturing()`; a CPU-only torch build
raises there ("Tried to instantiate dummy base class _cuda_isCurrentStreamCapturing"), which kills the engine at
the first image. No CUDA stream can be capturing when torch has no CUDA, so answering False is exact. vLLM loads
general plugins in every process it starts (front end, engine core, workers), which a patch made only in the
caller's process would miss. On a CUDA or ROCm build the plugin does nothing.

It also installs quantkit.torchvision_cpu's import hook (a no-op where torchvision's ops library loads), so vLLM's
Qwen2-VL family can import PyPI's CUDA torchvision beside a CPU torch even in a venv without the
`quantkit-torchvision-cpu.pth` file that scripts/install_vllm_cpu.sh writes.
"""

from __future__ import annotations

import logging

PATCH_MARKER = "__quantkit_cpu_fix__"
"""Attribute set on the replacement function, so a process can tell that the fix is active."""
APPLIED_LOG_LINE = "quantkit CPU fix applied: torch.cuda.is_current_stream_capturing -> False (CPU-only torch)"

logger = logging.getLogger("quantkit.vllm_cpu_plugin")


def _never_capturing() -> bool:
    return False


setattr(_never_capturing, PATCH_MARKER, True)


def torch_has_cuda() -> bool:
    """Whether this torch build was compiled with CUDA or ROCm (not whether a GPU is visible)."""
    import torch

    return torch.version.cuda is not None or torch.version.hip is not None


def is_applied() -> bool:
    """Whether the fix is active in this process."""
    import torch

    return bool(getattr(torch.cuda.is_current_stream_capturing, PATCH_MARKER, False))


def register() -> None:
    """Entry point vLLM calls (possibly several times per process): patch once, only on a CPU-only torch."""
    from quantkit import torchvision_cpu

    torchvision_cpu.install()
    if torch_has_cuda() or is_applied():
        return
    import torch

    torch.cuda.is_current_stream_capturing = _never_capturing
    logger.warning(APPLIED_LOG_LINE)
