"""Which vLLM setup serves each variant fastest, per batch size: a bounded trial of speed-only engine starts.

vLLM takes the first int4 kernel in its list that supports a layer (on Hopper: Machete, then AllSpark, Marlin),
not the fastest one; `VLLM_DISABLED_KERNELS` moves down that list. Its default CUDA-graph mode is not always the
fastest for decode either; `compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"}` captures each whole
decode step. Every setup costs an engine start (~2 min for a 7B model on an H200), so after the two parity
runs (both with vLLM's defaults) the trial runs at most `max_runs` more, in this order:

1. int4 with vLLM's kernel disabled (Machete -> Marlin);
2. the per-step floor: the tiny MiniCPM-V stand-in, 16-bit, vLLM's defaults (one decode step of a model with
   almost no weights: what vLLM's step costs around the matmuls);
3. int4 with the kernel fastest at batch 1 so far, FULL_DECODE_ONLY;
4. 16-bit, FULL_DECODE_ONLY.

Kernel and CUDA-graph setups exist only on CUDA: on the CPU they are listed as skipped, with the reason, and cost
nothing. Trials cut by the budget are listed too, so the report says what was not tried.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.verify.speed import bandwidth_floor_ms, hbm_bytes_per_s
from quantkit.verify.vllm_runner import EngineSettings, VariantRun, run_variant

DISABLE_ENV = "VLLM_DISABLED_KERNELS"
FULL_DECODE_ONLY = "FULL_DECODE_ONLY"
DEFAULT_SPEED_TRIALS = 3
"""Speed-only engine starts after the two parity runs: 5 in all on a GPU (one of them the tiny floor model)."""
VARIANT_NAMES = {"reference": "16-bit", "int4": "int4", "floor": "tiny stand-in (per-step floor)"}


@dataclass(frozen=True)
class Setup:
    """How vLLM is started: int4 kernels disabled through the environment, and a CUDA-graph mode (None: vLLM's)."""

    disabled_kernels: tuple[str, ...] = ()
    cudagraph_mode: str | None = None

    @property
    def env(self) -> dict[str, str]:
        return {DISABLE_ENV: ",".join(self.disabled_kernels)} if self.disabled_kernels else {}

    @property
    def compilation_config(self) -> dict[str, str] | None:
        return {"cudagraph_mode": self.cudagraph_mode} if self.cudagraph_mode else None

    @property
    def name(self) -> str:
        parts = [f"{DISABLE_ENV}={','.join(self.disabled_kernels)}"] if self.disabled_kernels else []
        parts += [f"cudagraph_mode {self.cudagraph_mode}"] if self.cudagraph_mode else []
        return ", ".join(parts) or "vLLM defaults"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "env": self.env, "compilation_config": self.compilation_config,
                "disabled_kernels": list(self.disabled_kernels), "cudagraph_mode": self.cudagraph_mode}


@dataclass
class SpeedTrial:
    """One variant's speed under one setup, or why it was not measured (`skipped`: never started)."""

    variant: str
    """"reference" (16-bit), "int4" or "floor" (the tiny stand-in)."""
    setup: Setup
    kernel: str | None = None
    ok: bool = False
    error: str | None = None
    skipped: bool = False
    engine_start_s: float | None = None
    weights_bytes: int | None = None
    speed: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_run(cls, variant: str, setup: Setup, run: VariantRun) -> SpeedTrial:
        ok = run.ok and bool(run.speed)
        return cls(variant=variant, setup=setup, kernel=run.kernel, ok=ok,
                   error=None if ok else run.error or "no speed measured", engine_start_s=run.engine_start_s,
                   weights_bytes=run.weights_bytes, speed=run.speed)

    def row(self, batch: int) -> dict[str, Any] | None:
        return next((row for row in self.speed if row["batch"] == batch), None)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "setup": self.setup.as_dict()}


def _kernel_names(kernel: str | None) -> list[str]:
    return [name.strip() for name in (kernel or "").split(",") if name.strip().endswith("Kernel")]


def run_trials(
    folder: str | Path,
    reference: str | Path,
    parity_runs: dict[str, VariantRun],
    settings: EngineSettings,
    *,
    gpu: bool,
    dtype: str | None = None,
    max_runs: int = DEFAULT_SPEED_TRIALS,
    floor_model: Callable[[], Path | None] = lambda: None,
    progress: Callable[[str], None] | None = None,
    remote_code: bool = True,
) -> list[SpeedTrial]:
    """The parity runs as the default-setup trials, then the numbered trials of the module docstring, each a
    speed-only engine start while `max_runs` allows. `floor_model` builds the tiny model (None: none for this
    architecture); it is called only when the floor trial runs. A VLLM_DISABLED_KERNELS the user set is kept."""
    say = progress or (lambda line: None)
    user = Setup(tuple(name for name in os.environ.get(DISABLE_ENV, "").split(",") if name))
    trials = [SpeedTrial.from_run(label, user, run) for label, run in parity_runs.items()]
    budget = [max_runs]

    def attempt(variant: str, model: Callable[[], Path | None], setup: Setup, cuda_only: bool,
                missing: str = "") -> None:
        if cuda_only and not gpu:
            trials.append(SpeedTrial(variant, setup, skipped=True, error="CUDA only (not run on this device)"))
            return
        if budget[0] <= 0:
            trials.append(SpeedTrial(variant, setup, skipped=True,
                                     error=f"the trial's {max_runs} engine starts were spent"))
            return
        model_dir = model()
        if model_dir is None:
            trials.append(SpeedTrial(variant, setup, skipped=True, error=missing))
            return
        budget[0] -= 1
        say(f"vLLM: speed of {VARIANT_NAMES[variant]} with {setup.name}")
        run = run_variant(f"{variant}-trial", model_dir, [], settings, dtype=dtype, extra_env=setup.env or None,
                          compilation_config=setup.compilation_config, remote_code=remote_code)
        trials.append(SpeedTrial.from_run(variant, setup, run))
        last = trials[-1]
        say(f"vLLM: {last.kernel} decode {last.speed[0]['decode_tok_s']:.1f} tok/s at batch {last.speed[0]['batch']}"
            if last.ok else f"vLLM: {VARIANT_NAMES[variant]} with {setup.name} failed: {last.error}")

    int4 = next((t for t in trials if t.variant == "int4" and t.ok), None)
    if int4 is None:
        return trials
    names = _kernel_names(int4.kernel)
    alternative = Setup(tuple(dict.fromkeys([*user.disabled_kernels, *names])))
    attempt("int4", lambda: Path(folder) if names else None, alternative, cuda_only=True,
            missing=f"vLLM's int4 kernel is not known ({int4.kernel})")
    attempt("floor", floor_model, Setup(), cuda_only=False, missing="no tiny stand-in for this architecture")
    fastest = max((t for t in trials if t.variant == "int4" and t.ok), key=lambda t: t.speed[0]["decode_tok_s"])
    attempt("int4", lambda: Path(folder), Setup(fastest.setup.disabled_kernels, FULL_DECODE_ONLY), cuda_only=True)
    attempt("reference", lambda: Path(reference), Setup(user.disabled_kernels, FULL_DECODE_ONLY), cuda_only=True)
    return trials


def recommend(trials: list[SpeedTrial], device_name: str | None, dtype: str | None = None,
              max_model_len: int | None = None, remote_code: bool = True) -> dict[str, Any] | None:
    """Per batch size, the fastest measured setup of each variant (ties: the earlier trial, vLLM's defaults
    first), the int4 / 16-bit decode ratio of those, and beside it the floors: the tiny stand-in's step time
    (per-step floor) and each variant's weights read once at the device's bandwidth (bandwidth floor).
    `dtype` and `max_model_len` are the engine arguments the trials ran with, kept for the serve command, as is
    `remote_code` (the arch spec's: whether it needs --trust-remote-code)."""
    measured = {variant: [t for t in trials if t.variant == variant and t.ok] for variant in VARIANT_NAMES}
    if not measured["int4"]:
        return None
    floor = measured["floor"][0] if measured["floor"] else None
    rows = []
    for batch in [row["batch"] for row in measured["int4"][0].speed]:
        row: dict[str, Any] = {"batch": batch}
        for variant in ("reference", "int4"):
            candidates = [t for t in measured[variant] if t.row(batch)]
            if not candidates:
                continue
            best = max(candidates, key=lambda t: t.row(batch)["decode_tok_s"])
            default = candidates[0].row(batch)["decode_tok_s"]
            row[variant] = {"setup": best.setup.as_dict(), "kernel": best.kernel,
                            "decode_tok_s": best.row(batch)["decode_tok_s"],
                            "ms_per_step": best.row(batch)["ms_per_step"],
                            "vs_default": best.row(batch)["decode_tok_s"] / default,
                            "bandwidth_floor_ms": bandwidth_floor_ms(best.weights_bytes, device_name)}
        if "reference" in row:
            row["int4_vs_16bit"] = row["int4"]["decode_tok_s"] / row["reference"]["decode_tok_s"]
        floor_row = floor.row(batch) if floor else None
        row["floor_ms_per_step"] = floor_row["ms_per_step"] if floor_row else None
        rows.append(row)
    return {"rows": rows, "device": device_name, "hbm_bytes_per_s": hbm_bytes_per_s(device_name),
            "dtype": dtype, "max_model_len": max_model_len, "trust_remote_code": remote_code}


def serve_command(model: str, recommendation: dict[str, Any], variant: str = "int4", batch_index: int = 0) -> str:
    """The shell line that starts `vllm serve` with the setup `recommend` found fastest for `variant` at its
    `batch_index`-th batch size: the environment, then the engine arguments verify measured with."""
    setup = recommendation["rows"][batch_index][variant]["setup"]
    dtype, max_model_len = recommendation.get("dtype"), recommendation.get("max_model_len")
    words = [f"{key}={shlex.quote(value)}" for key, value in setup["env"].items()]
    words += ["vllm", "serve", shlex.quote(model)]
    words += ["--trust-remote-code"] if recommendation.get("trust_remote_code", True) else []
    words += ["--dtype", dtype] if dtype and dtype != "auto" else []
    words += ["--max-model-len", str(max_model_len)] if max_model_len else []
    if setup["compilation_config"]:
        words += ["--compilation-config", shlex.quote(json.dumps(setup["compilation_config"]))]
    return " ".join(words)
