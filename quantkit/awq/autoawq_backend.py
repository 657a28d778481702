"""The AutoAWQ backend: upstream AutoAWQ 0.2.9 driven by the same ArchSpec the native engine reads.

The original workflow used a patched AutoAWQ fork that cannot be installed. Instead of a second copy of the
model knowledge, this adapter builds AutoAWQ's model definition (a `BaseAWQForCausalLM` subclass) at runtime
from the ArchSpec, and runs AutoAWQ's own per-layer loop (`AwqQuantizer.quantize`) through a small subclass
of its quantizer that:

- makes the grid search's saved weights a real copy on the CPU. AutoAWQ 0.2.9 saves them with
  `{k: v.cpu() ...}`, which on a CPU tensor returns the tensor itself; the in-place `mul_` of every grid point
  then leaks into the "restored" weights (measured on SmolLM2-135M: perplexity 15.7 -> ~179,000 from the
  scale + clip transform alone). On a GPU `.cpu()` copies, so nothing changes there.
- captures the layer-0 inputs through quantkit's calibration forwards where AutoAWQ's `model(input_ids)`
  capture cannot run (MiniCPM-V: `MiniCPMV.forward` takes `data=`, and image samples must go through the real
  vision path), instead of the fork's broken `model(**samples)`.
- records each layer's chosen scaling ratio, its loss, the scales and the clip bounds, and hands every
  finished layer's AutoAWQ GEMM tensors on, so the result goes through the same save layer as the native one.

Everything else (grid search, clip search, the quantization, the GEMM packing) is AutoAWQ's code unchanged.
"""

from __future__ import annotations

import functools
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.archs.spec import ArchSpec
from quantkit.awq.engine import (
    LayerReport,
    LayerResult,
    capture_layer_inputs,
    outside_layers_on,
)
from quantkit.awq.settings import QuantSettings
from quantkit.errors import DependencyError, InputError

AUTOAWQ_VERSION = "0.2.9"
INSTALL_HINT = "pip install 'quantkit[autoawq]'"


def import_autoawq() -> types.SimpleNamespace:
    """AutoAWQ's modules this adapter uses; DependencyError naming the install command when it is missing.

    `awq.utils.calib_data` imports `datasets` at module level only for `load_dataset`, which this adapter never
    calls (calibration always arrives as token blocks or captured activations). Where `datasets` is not
    installed (the GPU image), a stand-in module is visible for the duration of the import only.
    """
    stub = None
    try:
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")

        def load_dataset(*args: Any, **kwargs: Any) -> Any:
            raise DependencyError("AutoAWQ tried to load a dataset: quantkit feeds it token blocks instead.")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
    try:
        with warnings.catch_warnings(record=True):  # AutoAWQ's import-time notice and its global filter change
            import awq
            from awq.models import auto as awq_auto
            from awq.models import base as awq_base
            from awq.models._config import AwqConfig
            from awq.quantize import quantizer as awq_quantizer
    except ImportError as err:
        raise DependencyError(
            f"--backend autoawq needs AutoAWQ {AUTOAWQ_VERSION} ({err}); install it with: {INSTALL_HINT}"
        ) from err
    finally:
        if stub is not None and sys.modules.get("datasets") is stub:
            del sys.modules["datasets"]
    if awq.__version__ != AUTOAWQ_VERSION:
        raise DependencyError(
            f"AutoAWQ {awq.__version__} is installed; quantkit's adapter is written against {AUTOAWQ_VERSION} "
            f"(its quantizer internals differ between releases): {INSTALL_HINT}"
        )
    return types.SimpleNamespace(auto=awq_auto, base=awq_base, quantizer=awq_quantizer, AwqConfig=AwqConfig)


def model_definition(spec: ArchSpec) -> type:
    """AutoAWQ's model definition for `spec`: a BaseAWQForCausalLM subclass whose static methods read the spec.

    The scaling groups become AutoAWQ's `get_layers_for_scaling` entries (prev_op, layers, inp, module2inspect,
    kwargs), groups with `only_if_shapes_match` are dropped where the shapes differ, as in AutoAWQ's own Qwen2.
    """
    if spec.name not in _DEFINITIONS:
        _DEFINITIONS[spec.name] = _build_model_definition(spec)
    return _DEFINITIONS[spec.name]


_DEFINITIONS: dict[str, type] = {}


def _build_model_definition(spec: ArchSpec) -> type:
    awq = import_autoawq()

    def get_model_layers(model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(spec.decoder_layers)

    def get_act_for_scaling(module: nn.Module) -> dict:
        return {"is_scalable": False}

    def move_embed(model: nn.Module, device: str | torch.device) -> None:
        """What AutoAWQ needs outside the layers while it loops: the input embeddings and the rotary tables."""
        language_model = model.get_submodule(spec.language_model) if spec.language_model else model
        language_model.get_input_embeddings().to(device)
        model.get_submodule(spec.rotary_embedding).to(device)

    def get_layers_for_scaling(module: nn.Module, input_feat: dict, module_kwargs: dict) -> list[dict]:
        entries = []
        for group in spec.scaling_groups:
            if not group.applies(lambda name: module.get_submodule(name).weight.shape):
                continue
            entry = {
                "prev_op": module.get_submodule(group.prev),
                "layers": [module.get_submodule(name) for name in group.linears],
                "inp": input_feat[group.linears[0]],
            }
            if group.inspect is not None:
                entry["module2inspect"] = module.get_submodule(group.inspect)
            if group.inspect_takes_layer_kwargs:
                entry["kwargs"] = module_kwargs
            entries.append(entry)
        return entries

    return type(
        f"{spec.name.capitalize()}SpecAWQForCausalLM",
        (awq.base.BaseAWQForCausalLM,),
        {
            "__doc__": f"AutoAWQ model definition generated from quantkit's {spec.name!r} ArchSpec.",
            "layer_type": "decoder layer",
            "max_seq_len_key": "max_position_embeddings",
            "modules_to_not_convert": list(spec.modules_to_not_convert) or None,
            "get_model_layers": staticmethod(get_model_layers),
            "get_act_for_scaling": staticmethod(get_act_for_scaling),
            "move_embed": staticmethod(move_embed),
            "get_layers_for_scaling": staticmethod(get_layers_for_scaling),
        },
    )


def register(spec: ArchSpec) -> type:
    """Make AutoAWQ's own entry points (`AutoAWQForCausalLM.from_pretrained`) know spec's model types that it
    does not define itself (MiniCPM-V's type), loaded through the spec's transformers auto class; returns the
    generated definition."""
    awq = import_autoawq()
    definition = model_definition(spec)
    for model_type in spec.model_types:
        awq.auto.AWQ_CAUSAL_LM_MODEL_MAP.setdefault(model_type, definition)
        awq.base.TRANSFORMERS_AUTO_MAPPING_DICT.setdefault(model_type, spec.auto_class)
    return definition


@dataclass
class _Capture:
    """Layer-0 inputs as AutoAWQ holds them: one [n, seq_len, hidden] tensor and one kwargs dict."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


@functools.cache
def _quantizer_class() -> type:
    awq = import_autoawq()

    class SpecAwqQuantizer(awq.quantizer.AwqQuantizer):
        """AutoAWQ 0.2.9's quantizer, with the CPU copy fix, an optional external capture, and records."""

        def __init__(self, *args: Any, capture: _Capture | None, spec: ArchSpec,
                     on_layer_done: Callable[[LayerResult], None] | None, **kwargs: Any) -> None:
            self._capture = capture
            self._spec = spec
            self._on_layer_done = on_layer_done
            self._grid_losses: list[float] | None = None
            self._reports: dict[int, LayerReport] = {}
            self._scales: dict[int, dict[str, torch.Tensor]] = {}
            self._clips: dict[int, dict[str, torch.Tensor]] = {}
            self._started: dict[int, float] = {}
            self.results: list[LayerResult] = []
            super().__init__(*args, **kwargs)

        def init_quant(self, n_samples: int = 128, max_seq_len: int = 512) -> tuple:
            if self._capture is None:
                return super().init_quant(n_samples=n_samples, max_seq_len=max_seq_len)
            layers = self.awq_model.get_model_layers(self.model)
            return layers, dict(self._capture.kwargs), self._capture.hidden

        def _layer_index(self, layer: nn.Module) -> int:
            return next(i for i, m in enumerate(self.modules) if m is layer)

        def _get_input_feat(self, layer: nn.Module, named_linears: dict) -> dict:
            index = self._layer_index(layer)
            device = next(layer.parameters()).device
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            unexpected = sorted(set(named_linears) - set(self._spec.linears))
            if unexpected:
                raise InputError(f"decoder layer {index} has linears {unexpected} that the {self._spec.name} "
                                 "spec does not list; AutoAWQ would quantize them.")
            self._started[index] = time.perf_counter()
            self._reports[index] = LayerReport(index=index)
            self._scales[index], self._clips[index] = {}, {}
            return super()._get_input_feat(layer, named_linears)

        def _search_best_scale(self, module: nn.Module, prev_op: nn.Module, layers: list, inp: torch.Tensor,
                               module2inspect: nn.Module | None = None, kwargs: dict | None = None) -> tuple:
            self._grid_losses = []
            try:
                prev_name, names, scales = super()._search_best_scale(
                    module, prev_op, layers, inp, module2inspect, {} if kwargs is None else kwargs)
                losses = self._grid_losses
            finally:
                self._grid_losses = None
            best = losses.index(min(losses))  # AutoAWQ keeps the first minimum (strict '<')
            index = self._layer_index(module)
            self._reports[index].ratios[prev_name] = best / len(losses)
            self._reports[index].scale_losses[prev_name] = losses[best]
            self._scales[index][prev_name] = scales.float()
            return prev_name, names, scales

        def _compute_loss(self, fp16_output: torch.Tensor, int_w_output: torch.Tensor,
                          device: torch.device) -> float:
            loss = super()._compute_loss(fp16_output, int_w_output, device)
            if self._grid_losses is not None:
                self._grid_losses.append(loss)
            return loss

        def _compute_best_scale(self, x: torch.Tensor, w_mean: torch.Tensor, x_mean: torch.Tensor,
                                module2inspect: nn.Module, linears2scale: list, fp16_output: torch.Tensor,
                                kwargs: dict | None = None) -> torch.Tensor:
            """AutoAWQ's grid search, with the weights it saves for restoring really copied on the CPU.

            It saves `{k: v.cpu() for k, v in module2inspect.state_dict().items()}`; for the duration of the
            call, module2inspect.state_dict returns CPU tensors cloned (GPU tensors unchanged: `.cpu()` copies
            those), so the in-place `mul_` of a grid point no longer reaches the saved copy.
            """
            original_state_dict = module2inspect.state_dict

            def copied_state_dict(*args: Any, **kw: Any) -> dict[str, torch.Tensor]:
                state = original_state_dict(*args, **kw)
                return type(state)((k, v.clone() if v.device.type == "cpu" else v) for k, v in state.items())

            module2inspect.state_dict = copied_state_dict
            try:
                return super()._compute_best_scale(x, w_mean, x_mean, module2inspect, linears2scale,
                                                   fp16_output, {} if kwargs is None else kwargs)
            finally:
                del module2inspect.state_dict

        def _search_best_clip(self, layer: nn.Module, named_linears: dict, input_feat: dict) -> list:
            clip_list = super()._search_best_clip(layer, named_linears, input_feat)
            index = self._layer_index(layer)
            for name, max_val in clip_list:
                self._clips[index][name] = max_val.reshape(max_val.shape[0], -1).float().cpu()
            return clip_list

        def _apply_quant(self, module: nn.Module, named_linears: dict) -> None:
            super()._apply_quant(module, named_linears)
            index = self._layer_index(module)
            tensors = {name: t.detach().to("cpu", copy=True) for name, t in module.state_dict().items()}
            report = self._reports[index]
            device = next(module.parameters()).device
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                report.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
            report.seconds = time.perf_counter() - self._started[index]
            result = LayerResult(report=report, tensors=tensors, scales=self._scales[index],
                                 clips=self._clips[index])
            self.results.append(result)
            if self._on_layer_done is not None:
                self._on_layer_done(result)

    return SpecAwqQuantizer


def check_device(device: torch.device) -> None:
    """AutoAWQ places every layer on cuda:0 when a GPU is visible and on the CPU otherwise, whatever is asked."""
    chosen = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    wanted = torch.device("cuda:0") if device == torch.device("cuda") else device
    if wanted != chosen:
        raise InputError(f"--backend autoawq runs on {chosen} here (AutoAWQ picks the device itself); "
                         f"--device {device} cannot be honoured. Use --device auto or the native backend.")


def check_settings(settings: QuantSettings) -> None:
    """AutoAWQ's search grids are fixed (they equal QuantSettings' defaults) and it rounds to nearest: refuse
    other values. Its clip search always scores 512 strided tokens, whatever `clip_tokens` (None, the native
    default, or 512) says, and its scale search every grid point on every token, whatever `scale_screen_tokens`
    and `scale_finalists` say (the native engine's shortcut, not a different search target)."""
    if settings.method != "awq":
        raise InputError(f"--backend autoawq rounds to nearest (method awq); method {settings.method!r} needs the "
                         "native backend. Set method awq (--method awq, `method: awq` in a recipe, "
                         "QuantSettings(method='awq')) or use --backend native.")
    defaults = QuantSettings()
    searched = ("scale_grid", "clip_grid", "clip_max_shrink")
    changed = [name for name in searched if getattr(settings, name) != getattr(defaults, name)]
    if settings.clip_tokens not in (None, 512):
        changed.append("clip_tokens")
    if changed:
        raise InputError(f"--backend autoawq runs AutoAWQ's fixed search grids; {', '.join(changed)} cannot "
                         "change (use the native backend).")


def check_available(device: torch.device, settings: QuantSettings) -> None:
    """Fail before any work when AutoAWQ is missing or cannot run on `device` with `settings`."""
    import_autoawq()
    check_device(device)
    check_settings(settings)


def _windows(hidden: list[torch.Tensor], seq_len: int) -> torch.Tensor:
    """[n, seq_len, hidden]: text micro-batches as they are, variable-length (image) samples concatenated
    along the tokens and cut into seq_len windows like the text stream (a tail shorter than seq_len is left
    out), because AutoAWQ holds all calibration activations in one tensor with one set of layer kwargs."""
    blocks = [h for h in hidden if h.shape[1] == seq_len]
    ragged = [h.reshape(-1, h.shape[-1]) for h in hidden if h.shape[1] != seq_len]
    if ragged:
        stream = torch.cat(ragged)
        usable = stream.shape[0] // seq_len * seq_len
        if usable:
            blocks.append(stream[:usable].reshape(-1, seq_len, stream.shape[-1]))
    if not blocks:
        raise InputError(f"the image samples give fewer than {seq_len} tokens: AutoAWQ needs whole "
                         "--seq-len windows; add samples or lower --seq-len.")
    return torch.cat(blocks)


def capture_for_autoawq(model: nn.Module, spec: ArchSpec, forwards: Iterable[Callable[[], Any]], seq_len: int,
                        device: torch.device) -> _Capture:
    """Layer-0 inputs through quantkit's calibration forwards (text and the real vision path), in AutoAWQ's form.

    The layer kwargs (rotary tables, causal mask) depend only on the sequence length: they come from one
    probe forward of a [1, seq_len] block, so they broadcast over every window.
    """
    language_model = model.get_submodule(spec.language_model) if spec.language_model else model
    probe = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    with outside_layers_on(model, spec, device):
        inputs = capture_layer_inputs(model, spec, forwards, device)
        kwargs = capture_layer_inputs(
            model, spec, [lambda: language_model(input_ids=probe, use_cache=False)], device).kwargs[0]
    return _Capture(hidden=_windows(inputs.hidden, seq_len), kwargs=kwargs)


def quantize_with_autoawq(
    model: nn.Module,
    spec: ArchSpec,
    settings: QuantSettings,
    *,
    blocks: torch.Tensor | None = None,
    capture: _Capture | None = None,
    export_compatible: bool = False,
    on_layer_done: Callable[[LayerResult], None] | None = None,
) -> list[LayerResult]:
    """Run AutoAWQ 0.2.9 on `model`'s decoder layers; returns one LayerResult per layer (as the native engine).

    Calibration is either `blocks` [n, seq_len] token ids, fed to AutoAWQ's own capture (a plain causal LM),
    or a `capture` from `capture_for_autoawq`. With `export_compatible`, AutoAWQ only applies its scales and
    clips to the 16-bit weights (no quantization, no results): the model is left transformed in place.
    Otherwise the model's decoder linears are replaced by AutoAWQ's packed WQLinear_GEMM modules.
    The search grids must be the defaults (AutoAWQ's, which it does not let change); `inputs_from_quantized`
    and `max_batch_tokens` steer the native engine only: AutoAWQ feeds each layer the 16-bit outputs of the
    previous one and runs all calibration samples in one batch.
    """
    if (blocks is None) == (capture is None):
        raise ValueError("pass exactly one of blocks (token ids) or capture (layer-0 activations)")
    check_settings(settings)
    awq = import_autoawq()
    definition = register(spec)
    quant_config = {"zero_point": settings.zero_point, "q_group_size": settings.group_size,
                    "w_bit": settings.bits, "version": settings.version.upper()}
    awq_model = definition(model, spec.model_types[0], is_quantized=False, config=model.config,
                           quant_config=awq.AwqConfig.from_dict(quant_config), processor=None)
    language_model = model.get_submodule(spec.language_model) if spec.language_model else model
    use_cache = language_model.config.use_cache
    language_model.config.use_cache = False  # AutoAWQ loads its models so: no KV cache in the capture forward
    n, seq_len = (blocks.shape if blocks is not None else capture.hidden.shape[:2])
    try:
        awq_model.quantize(
            tokenizer=None,
            quant_config=quant_config,
            calib_data=blocks.tolist() if blocks is not None else None,
            duo_scaling=settings.duo_scaling,
            export_compatible=export_compatible,
            apply_clip=settings.clip,
            max_calib_samples=int(n),
            max_calib_seq_len=int(seq_len),
            quantizer_cls=_quantizer_class(),
            capture=capture,
            spec=spec,
            on_layer_done=on_layer_done,
        )
    finally:
        language_model.config.use_cache = use_cache
    return awq_model.quantizer.results
