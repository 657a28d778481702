"""Which of vLLM's int4 linear kernels serves the release fastest.

vLLM takes the first kernel in its list that supports a layer (on Hopper: Machete, then AllSpark, Marlin, ...),
not the fastest one for a given batch size; `VLLM_DISABLED_KERNELS` is how a user moves down that list. The
comparison re-runs only the speed plan of the int4 release with each chosen kernel disabled in turn, so the
report can recommend a setting measured on the same machine, in the same run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.verify.vllm_runner import EngineSettings, VariantRun, run_variant

DISABLE_ENV = "VLLM_DISABLED_KERNELS"


@dataclass
class KernelTrial:
    """The int4 release's speed with the kernels in `disabled` unavailable to vLLM."""

    disabled: tuple[str, ...]
    kernel: str | None
    ok: bool
    error: str | None = None
    engine_start_s: float | None = None
    speed: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_run(cls, run: VariantRun, disabled: tuple[str, ...]) -> KernelTrial:
        return cls(disabled=disabled, kernel=run.kernel if run.ok else None, ok=run.ok and bool(run.speed),
                   error=run.error if not run.ok else None if run.speed else "no speed measured",
                   engine_start_s=run.engine_start_s, speed=run.speed)

    @property
    def env(self) -> dict[str, str]:
        return {DISABLE_ENV: ",".join(self.disabled)} if self.disabled else {}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "env": self.env}


def _kernel_names(kernel: str | None) -> list[str]:
    return [name.strip() for name in (kernel or "").split(",") if name.strip().endswith("Kernel")]


def compare_kernels(
    folder: str | Path,
    default_run: VariantRun,
    settings: EngineSettings,
    dtype: str | None = None,
    max_alternatives: int = 2,
    progress: Callable[[str], None] | None = None,
) -> list[KernelTrial]:
    """The default run first, then up to `max_alternatives` speed-only runs, each disabling every kernel seen so
    far; stops when vLLM has no further kernel (the failed trial is kept: its error says so)."""
    already = tuple(name for name in os.environ.get(DISABLE_ENV, "").split(",") if name)
    trials = [KernelTrial.from_run(default_run, already)]
    while len(trials) <= max_alternatives:
        names = _kernel_names(trials[-1].kernel)
        if not trials[-1].ok or not names:
            break
        disabled = tuple(dict.fromkeys([*trials[-1].disabled, *names]))
        if progress:
            progress(f"vLLM: int4 speed with {DISABLE_ENV}={','.join(disabled)}")
        run = run_variant("int4-kernel", folder, [], settings, dtype=dtype, extra_env={DISABLE_ENV: ",".join(disabled)})
        trials.append(KernelTrial.from_run(run, disabled))
        if progress:
            last = trials[-1]
            progress(f"vLLM: {last.kernel} decode {last.speed[0]['decode_tok_s']:.1f} tok/s at batch 1" if last.ok
                     else f"vLLM: no run with {','.join(disabled)} disabled: {last.error}")
    return trials


def recommend(trials: list[KernelTrial]) -> dict[str, Any] | None:
    """The trial with the fastest batch-1 decode (ties: vLLM's default), and how to get it."""
    measured = [t for t in trials if t.ok]
    if not measured:
        return None
    default = measured[0]
    best = max(measured, key=lambda t: t.speed[0]["decode_tok_s"])
    return {
        "kernel": best.kernel,
        "env": best.env,
        "is_default": best is default,
        "decode_tok_s_batch1": best.speed[0]["decode_tok_s"],
        "speedup_vs_default": best.speed[0]["decode_tok_s"] / default.speed[0]["decode_tok_s"],
    }
