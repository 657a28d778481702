"""Run one model variant through vLLM in a subprocess (quantkit.verify.vllm_worker) and collect what it did.

One process per variant: the memory of the 16-bit model is freed before the int4 one loads, and a variant that
cannot load gives a `VariantRun` with `ok=False`, the error and the tail of vLLM's log, not a crash of verify.
Engine facts that vLLM only logs (which linear kernel serves the int4 weights, the weight memory on a GPU) are
parsed from the worker's output; the rest comes back in the worker's JSON result.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.archs import ChatFormat
from quantkit.errors import DependencyError, InputError
from quantkit.verify.prompts import Prompt
from quantkit.verify.vllm_cpu_plugin import APPLIED_LOG_LINE

LEGACY_AWQ_KERNELS = ("AutoAWQLinearMethod", "AWQLinearMethod")
"""vLLM's unoptimized AWQ path (Triton dequantize + matmul): what `quantization="awq"` or an unsupported
layer shape falls back to. Several times slower than Marlin / Machete (vLLM issue 21376)."""
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class SpeedPlan:
    """Synthetic load for the throughput numbers: `batches` of `prompt_len` random tokens, `decode_tokens` decode
    steps timed after the first token, each figure the median of `repeats` runs (quantkit.verify.speed)."""

    prompt_len: int
    decode_tokens: int
    batches: tuple[int, ...]
    repeats: int = 3


CPU_SPEED = SpeedPlan(prompt_len=128, decode_tokens=64, batches=(1, 8))
GPU_SPEED = SpeedPlan(prompt_len=512, decode_tokens=256, batches=(1, 8))
"""The GPU plan matches issue 13's independent timing (512 in, 256 decoded; batch 1 and 8): 256 steps of ~4 ms
make a start-up cost of a few ms invisible; ~10 s per engine, which the setup trial starts up to 5 times."""


@dataclass(frozen=True)
class EngineSettings:
    """How each variant's engine is started and driven; defaults suit MiniCPM-V 2.6 on one GPU or a CPU."""

    max_model_len: int = 4096
    max_tokens: int = 64
    """Greedy tokens generated per prompt (the continuation compared token by token)."""
    top_k: int = 20
    """Logprobs per position (vLLM's default ceiling, max_logprobs, is 20)."""
    dtype: str = "auto"
    gpu_memory_utilization: float | None = None
    """None: 0.9 on a GPU; 0.3 on the CPU backend, where it is the fraction of NUMA node 0's RAM."""
    speed: SpeedPlan | None = None
    """None: CPU_SPEED or GPU_SPEED by device; use `measure_speed=False` to skip."""
    measure_speed: bool = True
    timeout_s: float = 1800.0
    tensor_parallel_size: int = 1
    """GPUs each engine is split across (vLLM's tensor parallelism); the same for both variants and the speed
    trials. More than 1 needs as many visible GPUs (check_tensor_parallel)."""


@dataclass
class PromptRun:
    """One prompt through one variant. Logprobs are per position, {token id: logprob}."""

    id: str
    prompt_tokens: int
    """Prompt length after vLLM expanded the image placeholders."""
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[dict[int, float]]
    """Top-k at each greedy step."""
    forced_token_ids: list[int]
    """The continuation scored with prompt_logprobs: the reference's greedy tokens."""
    forced_logprobs: list[dict[int, float]]


@dataclass
class VariantRun:
    """Everything verify learned from one engine: outputs, speed, memory, kernel, or why it failed."""

    label: str
    model_dir: str
    ok: bool
    error: str | None = None
    log_tail: str = ""
    wall_s: float = 0.0
    engine_start_s: float | None = None
    kernel: str | None = None
    kernel_warning: str | None = None
    quantization: str | None = None
    dtype: str | None = None
    weights_bytes: int | None = None
    weights_source: str | None = None
    kv_cache_tokens: int | None = None
    max_model_len: int | None = None
    cpu_fix_applied: bool = False
    device: str | None = None
    gpu_name: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    prompts: list[PromptRun] = field(default_factory=list)
    speed: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-prompt outputs (those go into the report next to their metrics)."""
        data = asdict(self)
        data.pop("prompts")
        return data


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def check_tensor_parallel(size: int) -> None:
    """Fail before any engine starts when `size` GPUs per engine cannot be had here."""
    if size < 1:
        raise InputError(f"--tensor-parallel-size {size}: use 1 (one GPU per engine) or more.")
    if size == 1:
        return
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise DependencyError(
            f"--tensor-parallel-size {size}: no CUDA GPU is visible; quantkit runs vLLM on the CPU as one engine "
            "process only (vLLM's CPU tensor parallelism is not driven by quantkit). Use --tensor-parallel-size 1 "
            "here, or a machine with GPUs.")
    if visible < size:
        raise DependencyError(
            f"--tensor-parallel-size {size}: only {visible} CUDA GPU(s) visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use {visible} or fewer.")


def worker_env(gpu: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: vLLM's CPU settings when there is no GPU (callers' own values win), then
    `extra` (e.g. VLLM_DISABLED_KERNELS for a kernel comparison), which wins over both.

    On the CPU the engine core runs inside the worker (VLLM_ENABLE_V1_MULTIPROCESSING=0): a second process
    would import vLLM again and hand-shake with it, 24 s of a 28 s engine start for SmolLM2 on 2 cores
    (3.5 s in process). On a GPU vLLM's own process layout is kept: it is what the speed figures describe."""
    env = dict(os.environ)
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if not gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.update(extra or {})
    return env


def parse_kernel(log: str) -> tuple[str | None, str | None]:
    """(kernel, warning) from vLLM's log: the mixed-precision kernel it chose for the int4 linears."""
    chosen = list(dict.fromkeys(re.findall(r"Using (\w+) for (?:AutoAWQ\w*LinearMethod|mixed-precision linear)",
                                           log)))
    kernel = ", ".join(chosen) if chosen else None
    if "Falling back to unoptimized AWQ kernels" in log or any(k in (kernel or "") for k in LEGACY_AWQ_KERNELS):
        return kernel or "AutoAWQLinearMethod", (
            "vLLM serves (some) int4 layers with its legacy unoptimized AWQ kernel: check that nothing passes "
            "quantization='awq' and that every quantized linear's shape suits Marlin (multiples of 64/128)"
        )
    return kernel, None


def parse_weights_gib(log: str) -> float | None:
    """GiB of weights vLLM reports after loading (GPU model runner only; the CPU runner logs no size)."""
    found = re.findall(r"Model loading took ([\d.]+) GiB", log)
    return float(found[-1]) if found else None


def parse_kv_tokens(log: str) -> int | None:
    found = re.findall(r"KV cache size: ([\d,]+) tokens", log)
    return int(found[-1].replace(",", "")) if found else None


_LOG_PREFIX = re.compile(r"^(?:\([\w ]+pid=\d+\) )?(?:(?:ERROR|WARNING|INFO) [\d:\- ]+\[[^\]]+\] )?")
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception): \S")
_WRAPPER_MESSAGES = ("See root cause above", "See stack trace for root cause")


def root_cause(log: str, max_lines: int = 8) -> str | None:
    """The first exception in vLLM's log that is not one of its "see above" wrappers, with the indented lines
    that continue it (e.g. each kernel's reason for refusing a layer); None when the log holds none."""
    lines = [_LOG_PREFIX.sub("", line) for line in log.splitlines()]
    for index, line in enumerate(lines):
        if _EXCEPTION_LINE.match(line) and not any(wrapper in line for wrapper in _WRAPPER_MESSAGES):
            follow = []
            for extra in lines[index + 1 : index + max_lines]:
                if not extra.startswith(" ") or extra.lstrip().startswith(("File ", "^")):
                    break
                follow.append(extra.strip())
            return " ".join([line.strip(), "; ".join(follow)]).strip()
    return None


def checkpoint_weight_bytes(model_dir: str | Path) -> int:
    """Bytes of the safetensors shards: the loaded weights' size where vLLM does not report it (CPU)."""
    return sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors"))


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _end_process_group(process: subprocess.Popen) -> None:
    """Kill what is left of the worker's own process group (engine processes orphaned by a crash or timeout)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _run_worker(request: dict[str, Any], workdir: Path, gpu: bool, timeout_s: float,
                extra_env: dict[str, str] | None = None) -> tuple[dict[str, Any], str, float]:
    """(result or {"error": ...}, combined log, wall seconds). The worker gets its own process group so a
    timeout also ends the engine processes it spawned."""
    request_path, result_path, log_path = workdir / "request.json", workdir / "result.json", workdir / "vllm.log"
    request_path.write_text(json.dumps(request))
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "quantkit.verify.vllm_worker", str(request_path), str(result_path)],
            stdout=log, stderr=subprocess.STDOUT, env=worker_env(gpu, extra_env), start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        _end_process_group(process)
    wall_s = time.perf_counter() - started
    text = log_path.read_text(errors="replace")
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    elif returncode is None:
        result = {"error": f"the vLLM worker ran past {timeout_s:.0f} s and was stopped"}
    else:
        result = {"error": f"the vLLM worker exited with code {returncode} without a result "
                           "(killed, e.g. out of memory?)"}
    return result, text, wall_s


def run_variant(
    label: str,
    model_dir: str | Path,
    prompts: list[Prompt],
    settings: EngineSettings,
    teacher: dict[str, list[int]] | None = None,
    dtype: str | None = None,
    extra_env: dict[str, str] | None = None,
    compilation_config: dict[str, Any] | None = None,
    chat: ChatFormat | None = None,
    remote_code: bool = True,
) -> VariantRun:
    """Load `model_dir` in vLLM, greedy-decode every prompt, score the teacher's continuations (or its own),
    time synthetic prefill/decode; returns what happened, including failure.

    `teacher` maps prompt id -> token ids to teacher-force (the reference's greedy outputs); `dtype` overrides
    settings.dtype so both variants compute in the same precision; `extra_env` is set in the worker and
    `compilation_config` passed to vLLM (no prompts and either of them = a speed-only run of another setup).
    `chat` is the architecture's image placeholder and stop tokens (needed when there are prompts);
    `remote_code` whether vLLM runs the checkpoint's Python files (the spec's `remote_code`).
    """
    gpu = has_gpu()
    speed = settings.speed or (GPU_SPEED if gpu else CPU_SPEED)
    video = chat.video_placeholder if chat else None
    request = {
        "model": str(Path(model_dir).resolve()),
        "trust_remote_code": remote_code,
        "max_model_len": settings.max_model_len,
        "max_tokens": settings.max_tokens,
        "top_k": settings.top_k,
        "dtype": dtype or settings.dtype,
        "max_images": max((len(p.images) for p in prompts if not p.sent_as_video(video)), default=0),
        "max_videos": int(any(p.sent_as_video(video) for p in prompts)),  # one video per prompt at most
        "gpu_memory_utilization": settings.gpu_memory_utilization or (0.9 if gpu else 0.3),
        "enforce_eager": not gpu,
        "compilation_config": compilation_config,
        "prompts": [{**p.as_dict(), "content": p.user_content(chat.image_placeholder if chat else None, video),
                     "as_video": p.sent_as_video(video)} for p in prompts],
        "placeholders": [text for text in (chat.image_placeholder, video) if text] if chat else [],
        "stop_tokens": list(chat.stop_tokens) if chat else [],
        "teacher": teacher,
        "speed": asdict(speed) if settings.measure_speed else None,
        "tensor_parallel_size": settings.tensor_parallel_size,
    }
    with tempfile.TemporaryDirectory(prefix=f"quantkit-vllm-{label}-") as workdir:
        result, log, wall_s = _run_worker(request, Path(workdir), gpu, settings.timeout_s, extra_env)

    run = VariantRun(label=label, model_dir=request["model"], ok="error" not in result, wall_s=wall_s,
                     cpu_fix_applied=APPLIED_LOG_LINE in log)
    kernel, run.kernel_warning = parse_kernel(log)
    if not run.ok:
        generic = any(wrapper in result["error"] for wrapper in _WRAPPER_MESSAGES)
        run.error = (root_cause(log) if generic else None) or result["error"]
        run.log_tail = _tail(log + "\n" + result.get("traceback", ""))
        run.kernel = kernel
        return run
    run.kernel = kernel or ("none (16-bit linears)" if not result.get("quantization") else "not in vLLM's log")
    weights_gib = parse_weights_gib(log)
    if weights_gib is not None:
        run.weights_bytes, run.weights_source = int(weights_gib * 2**30), "vLLM log (Model loading took ...)"
    else:
        run.weights_bytes, run.weights_source = checkpoint_weight_bytes(model_dir), "checkpoint safetensors size"
    for key in ("engine_start_s", "quantization", "dtype", "max_model_len", "device", "gpu_name", "versions",
                "speed"):
        setattr(run, key, result[key])
    run.kv_cache_tokens = result.get("kv_cache_tokens") or parse_kv_tokens(log)
    run.cpu_fix_applied = run.cpu_fix_applied or bool(result.get("cpu_fix_applied"))
    run.prompts = [
        PromptRun(
            id=p["id"], prompt_tokens=p["prompt_tokens"], token_ids=p["token_ids"], text=p["text"],
            finish_reason=p["finish_reason"],
            logprobs=[{int(k): v for k, v in pos.items()} for pos in p["logprobs"]],
            forced_token_ids=p["forced_token_ids"],
            forced_logprobs=[{int(k): v for k, v in pos.items()} for pos in p["forced_logprobs"]],
        )
        for p in result["prompts"]
    ]
    return run
