"""`quantize()`: source folder -> calibration -> a backend, layer by layer -> vLLM-ready release folder.

The orchestration around the engines: loading, device placement, the resumable work folder, progress, and
handing the quantized layers to the save layer. Both backends (the native engine, upstream AutoAWQ) return the
same `QuantizedLayers`; one tail writes the release from them.

With `ranks` > 1 the native engine runs data parallel (quantkit.ranks): one process per GPU (or per gloo rank on
the CPU), each calibrating on every ranks-th micro-batch, the sums over tokens added up through
torch.distributed, so every rank makes the same choices as one process would; rank 0 alone writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantkit.archs import ArchSpec, spec_for_config
from quantkit.awq.engine import (
    LayerInputs,
    LayerReport,
    LayerResult,
    capture_layer_inputs,
    compile_kernels_ahead,
    outside_layers_on,
    quantize_layers,
    to_device,
)
from quantkit.awq.reduce import strided_positions
from quantkit.awq.settings import QuantSettings, default_method
from quantkit.calib import BUILTIN_PYDOC, CalibrationSet, load_calibration, micro_batches
from quantkit.errors import DependencyError, InputError
from quantkit.io.checkpoint import LayerCheckpoints
from quantkit.io.model_loading import load_model, load_model_streaming, load_tokenizer
from quantkit.io.release import write_release
from quantkit.ranks import RankContext, check_ranks, run_ranks


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything `quantize()` does to a source besides where it writes: calibration, the AWQ settings, device,
    backend and shard size. The defaults are the recommended release."""

    calib: str = BUILTIN_PYDOC
    """A .txt/.jsonl/.parquet file, a folder of them, a `datasets` id ORG/NAME[:CONFIG], or builtin:pydoc."""
    calib_revision: str | None = None
    calib_split: str = "train"
    text_field: str = "text"
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    """Seed of the calibration sampling."""
    settings: QuantSettings | None = None
    """None: QuantSettings' defaults (method awq-gptq), with method awq on the autoawq backend (all it runs)."""
    device: str = "auto"
    backend: str = "native"
    """native (quantkit's engine) or autoawq (upstream AutoAWQ 0.2.9 from the same arch spec, the reference; it
    holds the whole 16-bit model in host memory, by AutoAWQ's design)."""
    max_shard_bytes: int = 4 * 2**30
    ranks: int = 1
    """Processes that share the calibration (data parallel, native backend): on a GPU machine one per GPU
    (cuda:0 .. cuda:ranks-1, NCCL); with device="cpu", gloo processes on the CPU. Each takes every ranks-th
    micro-batch (text micro-batches hold at most ceil(n_samples / ranks) blocks so that each rank has one); the
    choices and the packed tensors are those of one process with the same micro-batches. Not resumable."""
    rank_timeout_s: float = 1800.0
    """With ranks > 1: the longest a rank waits for the others in one collective before failing."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"backend {self.backend!r}: use {' or '.join(map(repr, BACKENDS))}.")
        if self.settings is None:
            object.__setattr__(self, "settings", QuantSettings(method=default_method(self.backend)))
        if self.ranks < 1:
            raise InputError(f"ranks={self.ranks}: use 1 (one process) or more.")
        if self.ranks > 1 and self.backend != "native":
            raise InputError(f"ranks={self.ranks} with backend {self.backend!r}: only the native engine runs on "
                             "several processes; use backend native or ranks 1.")


@dataclass
class QuantizeResult:
    out_dir: Path
    layers: list[dict[str, Any]]
    calibration: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    resumed_from_layer: int = 0
    device: str = "cpu"
    peak_gpu_gib: float | None = None


def read_source_config(source: Path) -> tuple[dict[str, Any], ArchSpec]:
    config_path = source / "config.json"
    if not source.is_dir():
        raise InputError(f"source folder {source} does not exist; run `quantkit download MODEL` first.")
    if not config_path.is_file():
        raise InputError(f"{config_path} is missing: {source} is not a Hugging Face model folder.")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise InputError(f"{config_path} is not valid JSON ({err}).") from err
    if "quantization_config" in config:
        raise InputError(f"{config_path} already has a quantization_config: quantize the 16-bit model instead.")
    return config, spec_for_config(config, source=str(config_path))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DependencyError(
            f"--device {device}: no CUDA GPU is visible to torch {torch.__version__}. "
            "Run on a GPU machine, or pass --device cpu (slow; fine for small models)."
        )
    return torch.device(device)


def compute_dtype(config: dict[str, Any], device: torch.device) -> torch.dtype:
    """float32 on the CPU (fast and exact there); the checkpoint's 16-bit dtype on a GPU."""
    if device.type == "cpu":
        return torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        str(config.get("torch_dtype", config.get("dtype", "bfloat16"))), torch.bfloat16
    )


def job_fingerprint(source: Path, settings: QuantSettings, calib: CalibrationSet, device: torch.device,
                    dtype: torch.dtype) -> str:
    """Identity of a quantize job: a work folder from another job is never resumed."""
    digest = hashlib.sha256()
    digest.update((source / "config.json").read_bytes())
    for weights in sorted(source.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    digest.update(json.dumps(settings.as_dict(), sort_keys=True).encode())
    digest.update(calib.fingerprint.encode())
    digest.update(f"{device.type}:{dtype}".encode())
    return digest.hexdigest()


def work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.quantkit-work"


def rank_batch_tokens(calib: CalibrationSet, settings: QuantSettings, ranks: int) -> int:
    """Tokens per text micro-batch with `ranks` ranks: settings.max_batch_tokens, lowered so that the text
    blocks make at least `ranks` micro-batches (ceil(blocks / ranks) blocks each) when there are enough."""
    blocks, seq_len = calib.blocks.shape[0], max(1, calib.blocks.shape[1])
    if ranks == 1 or blocks == 0:
        return settings.max_batch_tokens
    return min(settings.max_batch_tokens, math.ceil(blocks / ranks) * seq_len)


def calibration_forwards(model: torch.nn.Module, spec: ArchSpec, source: Path, calib: CalibrationSet,
                         settings: QuantSettings, device: torch.device, dtype: torch.dtype,
                         max_batch_tokens: int | None = None) -> list[Callable]:
    """One callable per forward pass: text micro-batches through the LLM, multimodal samples through the model's
    real vision path (processor -> vision side -> LLM). `max_batch_tokens`: instead of the settings' one."""
    lm = model.get_submodule(spec.language_model) if spec.language_model else model
    forwards: list[Callable] = [
        (lambda chunk=chunk: lm(input_ids=chunk.to(device), use_cache=False))
        for chunk in micro_batches(calib.blocks, max_batch_tokens or settings.max_batch_tokens)
    ]
    if calib.multimodal:
        if spec.load_processor is None:
            raise InputError(f"calibration has image samples but {spec.name} is a text-only architecture; "
                             "give text-only calibration data.")
        from PIL import Image

        processor = spec.load_processor(source)
        for sample in calib.multimodal:
            images = [Image.open(p).convert("RGB") for p in sample.images]
            kwargs = _cast_floats(to_device(processor(sample.text, images), device), dtype)
            forwards.append(lambda kwargs=kwargs: model(**kwargs))
    return forwards


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


@dataclass
class QuantizedLayers:
    """What a backend hands the release writer: every decoder layer's new state and what was chosen for it."""

    tensors: Mapping[str, torch.Tensor]
    """`write_release`'s `layer_tensors`: full names under `{spec.checkpoint_prefix}.{i}.`, on the CPU (or read
    from the work folder's layer files when looked up)."""
    reports: list[dict[str, Any]]
    """One `LayerReport` (as a dict) per layer, in layer order."""
    record: dict[str, Any] = field(default_factory=dict)
    """The backend's own entries of the manifest's `quantization` section (its version, where it resumed)."""
    resumed_from_layer: int = 0
    peak_gpu_gib: float | None = None


@dataclass
class _Job:
    """One quantize call as the backends see it (calibration already loaded)."""

    source: Path
    out: Path
    spec: ArchSpec
    config: QuantizeConfig
    calibration: CalibrationSet
    device: torch.device
    dtype: torch.dtype
    timings: dict[str, float]
    on_layer_done: Callable[[LayerReport, int], None] | None
    rank: RankContext | None = None
    """With ranks > 1: this process's rank (only rank 0 writes files)."""


@dataclass(frozen=True)
class Backend:
    """A way to quantize the decoder layers: `check` fails before any work when it cannot run with a device,
    settings and architecture; `layers` yields the quantized layers while the release is written from them."""

    check: Callable[[torch.device, QuantSettings, ArchSpec | None], None]
    layers: Callable[[_Job], AbstractContextManager[QuantizedLayers]]


def quantize(
    source: str | Path,
    out: str | Path,
    config: QuantizeConfig | None = None,
    *,
    force: bool = False,
    on_layer_done: Callable[[LayerReport, int], None] | None = None,
    manifest_extra: dict[str, Any] | None = None,
    **options: Any,
) -> QuantizeResult:
    """AWQ-quantize `source` (a 16-bit Hugging Face folder) into the release folder `out`, as `config` says.

    Instead of `config`, its fields may be given as keywords (`calib=`, `n_samples=`, `settings=`, `device=`,
    `backend=`, ...), which build one. Resumes a killed native run with the same config from its last finished
    layer (bit-identical result). `on_layer_done(report, n_layers)` is called after each layer (progress bars).
    `manifest_extra`: more manifest sections (e.g. the recipe that asked for this release), written in the same
    atomic rename. `backend="autoawq"` runs upstream AutoAWQ 0.2.9 from the same arch spec instead of the native
    engine (the reference the native engine is checked against; not resumable) and writes the same folder.
    """
    if config is not None and options:
        raise TypeError(f"quantize() takes a config or its fields as keywords, not both ({', '.join(options)})")
    config = config or QuantizeConfig(**options)
    source, out = Path(source), Path(out)
    read_source_config(source)
    if out.exists() and not force:
        raise InputError(f"output folder {out} already exists; pass --force to replace it.")
    if config.ranks == 1:
        return _quantize(source, out, config, force, on_layer_done, manifest_extra)
    device_type = resolve_device(config.device).type
    check_ranks(config.ranks, device_type)
    relay = None if on_layer_done is None else (lambda message: on_layer_done(*message))
    return run_ranks(_rank_quantize, (source, out, config, force, manifest_extra), config.ranks, device_type,
                     timeout_s=config.rank_timeout_s, on_message=relay)


def _rank_quantize(rank: RankContext, source: Path, out: Path, config: QuantizeConfig, force: bool,
                   manifest_extra: dict[str, Any] | None) -> QuantizeResult | None:
    """One rank of a data-parallel quantize (started by run_ranks); rank 0 sends progress and returns the result."""
    return _quantize(source, out, config, force, lambda report, n: rank.send((report, n)), manifest_extra, rank)


def _quantize(source: Path, out: Path, config: QuantizeConfig, force: bool,
              on_layer_done: Callable[[LayerReport, int], None] | None, manifest_extra: dict[str, Any] | None,
              rank: RankContext | None = None) -> QuantizeResult | None:
    source_config, spec = read_source_config(source)
    dev = torch.device(rank.device) if rank is not None else resolve_device(config.device)
    dtype = compute_dtype(source_config, dev)
    backend = BACKENDS[config.backend]
    backend.check(dev, config.settings, spec)

    timings: dict[str, float] = {}
    started = time.perf_counter()
    tokenizer = load_tokenizer(source, spec)
    calibration = load_calibration(config.calib, tokenizer, n_samples=config.n_samples, seq_len=config.seq_len,
                                   seed=config.seed, revision=config.calib_revision, split=config.calib_split,
                                   text_field=config.text_field)
    timings["calibration_s"] = time.perf_counter() - started

    job = _Job(source, out, spec, config, calibration, dev, dtype, timings, on_layer_done, rank)
    with backend.layers(job) as layers:
        if rank is not None and rank.rank != 0:
            return None
        started = time.perf_counter()
        result = QuantizeResult(out_dir=out, layers=layers.reports, calibration=calibration.describe(),
                                seconds=timings, resumed_from_layer=layers.resumed_from_layer, device=str(dev),
                                peak_gpu_gib=layers.peak_gpu_gib)
        write_release(
            source, out, layers.tensors, spec, config.settings, force=force, max_shard_bytes=config.max_shard_bytes,
            manifest_extra={
                "quantization": {"backend": config.backend, **layers.record, "settings": config.settings.as_dict(),
                                 "seed": config.seed, "device": str(dev),
                                 **({"ranks": config.ranks} if config.ranks > 1 else {}),
                                 "compute_dtype": str(dtype).removeprefix("torch."), "seconds": timings,
                                 "layers": layers.reports},
                "calibration": calibration.describe(),
                **(manifest_extra or {}),
            },
        )
        timings["save_s"] = time.perf_counter() - started
    return result


@contextmanager
def _native_layers(job: _Job) -> Iterator[QuantizedLayers]:
    """The native engine, each finished layer saved to the work folder (a killed run resumes there) and the
    release written from those files; the folder is removed once the release is written, kept if anything
    fails. Decoder layers are read from the source shards when their turn comes and dropped after, so host
    memory holds the non-decoder parts and about one layer."""
    spec, dev, timings, rank = job.spec, job.device, job.timings, job.rank
    compile_kernels_ahead(dev, job.dtype, job.config.settings)  # while the model loads
    if rank is not None and rank.rank != 0:
        yield from _native_rank_layers(job)
        return
    fingerprint = job_fingerprint(job.source, job.config.settings, job.calibration, dev, job.dtype)
    if rank is not None:  # a data-parallel run does not resume: every rank would need its own layer inputs
        fingerprint += f":ranks={rank.world_size}:{uuid.uuid4()}"
    checkpoints = LayerCheckpoints(work_folder(job.out), fingerprint)
    try:
        started = time.perf_counter()
        model, layer_weights = load_model_streaming(job.source, spec, job.dtype)
        timings["load_s"] = time.perf_counter() - started
        n_layers = len(model.get_submodule(spec.decoder_layers))
        start = checkpoints.completed_layers

        started = time.perf_counter()
        if start == 0:
            inputs = _capture_share(model, job)
            checkpoints.save_kwargs(inputs.kwargs)
        elif start < n_layers:
            inputs = LayerInputs(hidden=[h.to(dev) for h in checkpoints.load_inputs(start)],
                                 kwargs=to_device(checkpoints.load_kwargs(), dev))
        timings["capture_s"] = time.perf_counter() - started

        def layer_done(result: LayerResult, next_hidden: list[torch.Tensor]) -> None:
            last = result.report.index == n_layers - 1
            checkpoints.save_layer(result.report.index, result.tensors, [] if last else next_hidden,
                                   asdict(result.report))
            if job.on_layer_done is not None:
                job.on_layer_done(result.report, n_layers)

        started = time.perf_counter()
        if start < n_layers:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            quantize_layers(model, spec, job.config.settings, inputs, dev, start=start, on_layer_done=layer_done,
                            layer_weights=layer_weights, reducer=rank.reducer if rank is not None else None)
            del inputs
        checkpoints.flush()
        timings["layers_s"] = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None

        reports = [checkpoints.reports()[str(i)] for i in range(n_layers)]
        del model
        yield QuantizedLayers(tensors=checkpoints.saved_layers(spec.layer_prefix, n_layers), reports=reports,
                              record={"resumed_from_layer": start}, resumed_from_layer=start, peak_gpu_gib=peak)
    except BaseException:
        checkpoints.close(remove=False)
        raise
    checkpoints.close(remove=True)


def _capture_share(model: torch.nn.Module, job: _Job) -> LayerInputs:
    """Decoder layer 0's inputs for this process's calibration forwards: all of them, or with several ranks every
    ranks-th (text micro-batches sized by rank_batch_tokens), with their global positions."""
    spec, dev, rank = job.spec, job.device, job.rank
    world = rank.world_size if rank is not None else 1
    with outside_layers_on(model, spec, dev):
        forwards = calibration_forwards(model, spec, job.source, job.calibration, job.config.settings, dev,
                                        job.dtype,
                                        max_batch_tokens=rank_batch_tokens(job.calibration, job.config.settings, world))
        positions = None
        if rank is not None:
            if len(forwards) < world:
                raise InputError(f"{world} ranks but only {len(forwards)} calibration forwards "
                                 f"({job.calibration.blocks.shape[0]} text blocks, {len(job.calibration.multimodal)} "
                                 "image samples): every rank needs at least one; use more --n-samples or fewer ranks.")
            positions = strided_positions(len(forwards), rank.rank, world)
            forwards = [forwards[i] for i in positions]
        inputs = capture_layer_inputs(model, spec, forwards, dev)
        inputs.positions = positions
        del forwards  # they hold the model, which is dropped before the release is written
    return inputs


def _native_rank_layers(job: _Job) -> Iterator[QuantizedLayers]:
    """A rank other than 0: the same capture and layers on its own share, writing nothing."""
    model, layer_weights = load_model_streaming(job.source, job.spec, job.dtype)
    inputs = _capture_share(model, job)
    quantize_layers(model, job.spec, job.config.settings, inputs, job.device, layer_weights=layer_weights,
                    reducer=job.rank.reducer)
    yield QuantizedLayers(tensors={}, reports=[])


@contextmanager
def _autoawq_layers(job: _Job) -> Iterator[QuantizedLayers]:
    """AutoAWQ's own layer loop over the model held in memory (no work folder). Plain causal LMs calibrate
    through AutoAWQ's own capture of the token blocks; MiniCPM-V (and image samples) through quantkit's
    forwards, the real vision path included."""
    from quantkit.awq.autoawq_backend import AUTOAWQ_VERSION, capture_for_autoawq, quantize_with_autoawq

    spec, timings, on_layer_done = job.spec, job.timings, job.on_layer_done
    started = time.perf_counter()
    model = load_model(job.source, spec, job.dtype)
    timings["load_s"] = time.perf_counter() - started
    n_layers = len(model.get_submodule(spec.decoder_layers))
    started = time.perf_counter()
    blocks, capture = job.calibration.blocks, None
    if spec.language_model or job.calibration.multimodal:
        forwards = calibration_forwards(model, spec, job.source, job.calibration, job.config.settings, job.device,
                                        job.dtype)
        blocks, capture = None, capture_for_autoawq(model, spec, forwards, job.calibration.seq_len, job.device)
    timings["capture_s"] = time.perf_counter() - started

    started = time.perf_counter()
    results = quantize_with_autoawq(
        model, spec, job.config.settings, blocks=blocks, capture=capture,
        on_layer_done=None if on_layer_done is None else lambda result: on_layer_done(result.report, n_layers))
    timings["layers_s"] = time.perf_counter() - started
    layer_tensors = {f"{spec.layer_prefix(r.report.index)}.{name}": tensor
                     for r in results for name, tensor in r.tensors.items()}
    reports = [asdict(r.report) for r in results]
    peaks = [r.report.peak_gpu_bytes for r in results if r.report.peak_gpu_bytes is not None]
    del model, results
    yield QuantizedLayers(tensors=layer_tensors, reports=reports, record={"autoawq_version": AUTOAWQ_VERSION},
                          peak_gpu_gib=max(peaks) / 2**30 if peaks else None)


def _no_check(device: torch.device, settings: QuantSettings, spec: ArchSpec | None = None) -> None:
    """The native engine runs on any torch device with any valid settings, for every arch spec."""


def _autoawq_check(device: torch.device, settings: QuantSettings, spec: ArchSpec | None = None) -> None:
    """AutoAWQ installed, a device and settings it can run, and an arch it quantizes faithfully (`spec`, where
    known: a recipe is checked before its source is downloaded)."""
    from quantkit.awq.autoawq_backend import check_available

    if spec is not None and spec.autoawq_unsupported:
        raise InputError(f"--backend autoawq does not support {spec.card.display_name}: "
                         f"{spec.autoawq_unsupported}. Use --backend native (the default).")
    check_available(device, settings)


BACKENDS: dict[str, Backend] = {
    "native": Backend(check=_no_check, layers=_native_layers),
    "autoawq": Backend(check=_autoawq_check, layers=_autoawq_layers),
}
