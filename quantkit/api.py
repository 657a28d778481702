"""The public Python API: one function per CLI command, same parameters. The CLI is a thin layer over this.

Names resolve on first use (PEP 562), so `quantkit --help` and light commands do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "QuantSettings": "quantkit.awq.settings",
    "EvalReport": "quantkit.evaluate",
    "evaluate": "quantkit.evaluate",
    "DownloadResult": "quantkit.hub",
    "download": "quantkit.hub",
    "write_release": "quantkit.io.release",
    "QuantizeResult": "quantkit.quantize",
    "quantize": "quantkit.quantize",
    "RunResult": "quantkit.run",
    "run": "quantkit.run",
    "UploadResult": "quantkit.upload",
    "upload": "quantkit.upload",
    "ParityThresholds": "quantkit.verify.parity",
    "verify": "quantkit.verify.pipeline",
    "VerifyReport": "quantkit.verify.report",
    "StaticReport": "quantkit.verify.static",
    "verify_static": "quantkit.verify.static",
}

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

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'quantkit.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
