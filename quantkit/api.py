"""The public Python API: one function per CLI command, same parameters. The CLI is a thin layer over this."""

from __future__ import annotations

from quantkit.awq.settings import QuantSettings
from quantkit.evaluate import EvalReport, evaluate
from quantkit.hub import DownloadResult, download
from quantkit.io.release import write_release
from quantkit.quantize import QuantizeResult, quantize
from quantkit.verify.static import StaticReport, verify_static

__all__ = [
    "DownloadResult",
    "EvalReport",
    "QuantSettings",
    "QuantizeResult",
    "StaticReport",
    "download",
    "evaluate",
    "quantize",
    "verify_static",
    "write_release",
]
