"""The public Python API: one function per CLI command, same parameters. The CLI is a thin layer over this."""

from __future__ import annotations

from quantkit.awq.settings import QuantSettings
from quantkit.evaluate import EvalReport, evaluate
from quantkit.hub import DownloadResult, download
from quantkit.io.release import write_release
from quantkit.quantize import QuantizeResult, quantize
from quantkit.run import RunResult, run
from quantkit.upload import UploadResult, upload
from quantkit.verify.parity import ParityThresholds
from quantkit.verify.pipeline import verify
from quantkit.verify.report import VerifyReport
from quantkit.verify.static import StaticReport, verify_static

__all__ = [
    "DownloadResult",
    "EvalReport",
    "ParityThresholds",
    "QuantSettings",
    "QuantizeResult",
    "RunResult",
    "StaticReport",
    "UploadResult",
    "VerifyReport",
    "download",
    "evaluate",
    "quantize",
    "run",
    "upload",
    "verify",
    "verify_static",
    "write_release",
]
