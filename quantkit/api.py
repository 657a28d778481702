"""The public Python API: one function per CLI command, same parameters, plus the config and report types they
take and return and the report rows the CLI prints. The CLI is a thin layer over this and imports nothing else.

Names resolve on first use (PEP 562), so `quantkit --help` and light commands do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "QuantSettings": "quantkit.awq.settings",
    "default_method": "quantkit.awq.settings",
    "EvalReport": "quantkit.evaluate",
    "evaluate": "quantkit.evaluate",
    "DownloadResult": "quantkit.hub",
    "download": "quantkit.hub",
    "write_release": "quantkit.io.release",
    "QuantizeConfig": "quantkit.quantize",
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
    # how the CLI prints what verify returns: the same rows, cells and notes as verify-report.md
    "DEFAULT_SPEED_TRIALS": "quantkit.verify.kernels",
    "RECOMMENDATION_HEADER": "quantkit.verify.report",
    "floors_note": "quantkit.verify.report",
    "no_decisive_note": "quantkit.verify.report",
    "recommendation_rows": "quantkit.verify.report",
    "serve_advice": "quantkit.verify.report",
    "size_reason": "quantkit.verify.static",
    "speed_memory_rows": "quantkit.verify.report",
    "speed_trial_rows": "quantkit.verify.report",
    "top1_cell": "quantkit.verify.report",
}

__all__ = [
    "DEFAULT_SPEED_TRIALS",
    "RECOMMENDATION_HEADER",
    "DownloadResult",
    "EvalReport",
    "ParityThresholds",
    "QuantSettings",
    "QuantizeConfig",
    "QuantizeResult",
    "RunResult",
    "StaticReport",
    "UploadResult",
    "VerifyReport",
    "default_method",
    "download",
    "evaluate",
    "floors_note",
    "no_decisive_note",
    "quantize",
    "recommendation_rows",
    "run",
    "serve_advice",
    "size_reason",
    "speed_memory_rows",
    "speed_trial_rows",
    "top1_cell",
    "upload",
    "verify",
    "verify_static",
    "write_release",
]

if TYPE_CHECKING:
    from quantkit.awq.settings import QuantSettings, default_method
    from quantkit.evaluate import EvalReport, evaluate
    from quantkit.hub import DownloadResult, download
    from quantkit.io.release import write_release
    from quantkit.quantize import QuantizeConfig, QuantizeResult, quantize
    from quantkit.run import RunResult, run
    from quantkit.upload import UploadResult, upload
    from quantkit.verify.kernels import DEFAULT_SPEED_TRIALS
    from quantkit.verify.parity import ParityThresholds
    from quantkit.verify.pipeline import verify
    from quantkit.verify.report import (
        RECOMMENDATION_HEADER,
        VerifyReport,
        floors_note,
        no_decisive_note,
        recommendation_rows,
        serve_advice,
        speed_memory_rows,
        speed_trial_rows,
        top1_cell,
    )
    from quantkit.verify.static import StaticReport, size_reason, verify_static


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'quantkit.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
