"""The native AWQ engine: layer by layer over a model's decoder layers, pure torch, no I/O.

Per layer: run it on the calibration activations while capturing every linear's inputs; search one scale
vector per scaling group (all groups against the unmodified layer, as AutoAWQ); apply them; search a clip
bound per linear (except q/k); quantize; run the quantized layer to produce the next layer's inputs.
Only the current layer and the activations live on the compute device.

Several processes may share the calibration micro-batches (data parallel): each runs this same code on its own
share, with a `Reducer` (quantkit.awq.reduce) that adds up every sum over tokens; the weights and every choice
are then the same on every rank. The default reducer is one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import torch
from torch import nn

from quantkit.archs.spec import ArchSpec, ScalingGroup
from quantkit.awq import kernels
from quantkit.awq.gptq import gptq_round_shared
from quantkit.awq.quant import GroupQuant, pack_gemm, quantize
from quantkit.awq.reduce import SINGLE, Reducer, batch_layout, summed
from quantkit.awq.search import (
    apply_clip,
    channel_mean_abs,
    clip_grams,
    gram,
    gram_scoring_is_cheaper,
    screening_subset,
    search_clip,
    search_scales_block,
    search_scales_linear,
)
from quantkit.awq.settings import QuantSettings


@dataclass
class LayerInputs:
    """Calibration activations at a decoder layer's input: micro-batches [B, L, hidden] and their layer kwargs
    (rotary cos/sin, masks, position ids), which are the same for every layer."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    positions: list[int] | None = None
    """With several ranks: the global index of each of this rank's micro-batches (None: the strided share of
    quantkit.awq.reduce.strided_positions, or every micro-batch on one process)."""


@dataclass
class LayerReport:
    """What the searches chose for one layer, for logs, the manifest and the AutoAWQ comparison."""

    index: int
    ratios: dict[str, float] = field(default_factory=dict)
    scale_losses: dict[str, float] = field(default_factory=dict)
    clip_losses: dict[str, float] = field(default_factory=dict)
    output_rel_mse: float = 0.0
    seconds: float = 0.0
    peak_gpu_bytes: int | None = None


@dataclass
class LayerResult:
    report: LayerReport
    tensors: dict[str, torch.Tensor]
    """The layer's complete new state on CPU, names relative to the layer: qweight/qzeros/scales per quantized
    linear (+ bias) and every other parameter (norm weights now carry the AWQ scales)."""
    scales: dict[str, torch.Tensor]
    """Chosen scale vector per scaling group, keyed by the group's `prev` module."""
    clips: dict[str, torch.Tensor]
    """Chosen clip bound [out, groups] per clipped linear."""


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first decoder layer's input is needed."""


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (nested in tuples, lists, dicts) detached and moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@contextmanager
def outside_layers_on(model: nn.Module, spec: ArchSpec, device: torch.device | str) -> Iterator[None]:
    """Everything the calibration forwards run before decoder layer 0 (embeddings, vision tower, rotary tables)
    on `device` for the duration. After, each moved parameter and buffer gets back the tensor it had, instead of
    a copy back from the device: the forwards change none of them (on a GPU that saves a device-to-host copy of
    a 7B model's embeddings). The decoder layers and the output head, which no capture reaches, are not moved."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    skip = (spec.decoder_layers + ".", spec.output_head + ".")
    moved: list[tuple[nn.Module, str, bool, torch.Tensor]] = []  # (module, name, is a parameter, host tensor)
    for name, module in model.named_modules():
        if (name + ".").startswith(skip):
            continue
        for key, param in module.named_parameters(recurse=False):
            if param.device != device:
                moved.append((module, key, True, param.data))
                param.data = param.data.to(device)
        for key, buf in module.named_buffers(recurse=False):
            if buf.device != device:
                moved.append((module, key, False, buf))
                module._buffers[key] = buf.to(device)
    try:
        yield
    finally:
        for module, key, is_param, tensor in moved:
            if is_param:
                module._parameters[key].data = tensor
            else:
                module._buffers[key] = tensor


def compile_kernels_ahead(device: torch.device | str, dtype: torch.dtype, settings: QuantSettings) -> None:
    """On a GPU, compile the fused kernels that quantize_layers will launch on a worker thread, to call before
    loading the model: with nothing in Triton's cache, the first layer otherwise spends ~3.5 s compiling them
    (4.3 s against 0.8 s for the others at MiniCPM-V 2.6's shapes on an H200)."""
    gptq_columns = settings.gptq_block_size if settings.method == "awq-gptq" else None
    kernels.compile_ahead(torch.device(device), dtype, settings.bits, settings.group_size, gptq_columns)


def capture_layer_inputs(
    model: nn.Module, spec: ArchSpec, forwards: Iterable[Callable[[], Any]], device: torch.device | str
) -> LayerInputs:
    """Run each calibration forward until decoder layer 0 and keep what it would have received."""
    layer0 = model.get_submodule(spec.decoder_layers)[0]
    captured = LayerInputs(hidden=[], kwargs=[])

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for key in ("past_key_values", "past_key_value"):
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.hidden.append(hidden.detach().to(device))
        captured.kwargs.append(to_device({k: v for k, v in kwargs.items()}, torch.device(device)))
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for forward in forwards:
                try:
                    forward()
                except _StopForward:
                    pass
                else:
                    raise RuntimeError(f"calibration forward never reached {spec.decoder_layers}.0")
    finally:
        handle.remove()
    return captured


def _group_applies(layer: nn.Module, group: ScalingGroup) -> bool:
    return group.applies(lambda name: layer.get_submodule(name).weight.shape)


@torch.no_grad()
def _apply_scales(layer: nn.Module, group: ScalingGroup, scales: torch.Tensor) -> None:
    """Divide prev's output channels by s and multiply the linears' input columns by s (function unchanged)."""
    prev = layer.get_submodule(group.prev)
    s = scales.to(prev.weight.device)
    if prev.weight.dim() == 1:  # a norm: scale its affine weight (and bias)
        prev.weight.div_(s)
    else:  # a linear feeding the group: scale its output rows
        prev.weight[-s.numel() :].div_(s.view(-1, 1))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for name in group.linears:
        layer.get_submodule(name).weight.mul_(s.view(1, -1))


@torch.no_grad()
def quantize_layer(
    layer: nn.Module, inputs: LayerInputs, spec: ArchSpec, settings: QuantSettings, index: int = 0,
    reducer: Reducer | None = None,
) -> tuple[LayerResult, list[torch.Tensor]]:
    """AWQ on one decoder layer already on the compute device. Returns the result and the next layer's inputs.

    The layer is left holding its fake-quantized (dequantized) weights. `reducer`: how this rank's sums over
    tokens are added to the other ranks' (default: one process); the next layer's inputs are this rank's own.
    """
    reducer = reducer or SINGLE
    started = time.perf_counter()
    device = inputs.hidden[0].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    linears: dict[str, nn.Linear] = {name: layer.get_submodule(name) for name in spec.linears}
    features: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    layout = batch_layout(inputs.hidden, reducer, inputs.positions)
    tokens = sum(rows * length for rows, length in layout.shapes)
    groups = [group for group in spec.scaling_groups if _group_applies(layer, group)]

    def through_gram(group: ScalingGroup) -> bool:
        """A single linear scored through its Gram matrix (always for awq-gptq, which reuses it as the Hessian)."""
        return group.inspect is None and len(group.linears) == 1 and (
            settings.method == "awq-gptq"
            or gram_scoring_is_cheaper(tokens, linears[group.linears[0]].weight.shape, settings))

    # the 16-bit outputs of every block re-run by a search, kept from the layer's own forward as its reference
    block_outputs: dict[str, list[torch.Tensor]] = {
        group.inspect or group.linears[0]: [] for group in groups if not through_gram(group)}

    def keep(store: list[torch.Tensor], take_input: bool) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            store.append((args[0] if take_input else _first(output)).detach())

        return hook

    handles = [lin.register_forward_hook(keep(features[name], True)) for name, lin in linears.items()]
    handles += [layer.get_submodule(name).register_forward_hook(keep(store, False))
                for name, store in block_outputs.items()]
    try:
        float_out = [_first(layer(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs)]
    finally:
        for handle in handles:
            handle.remove()

    report = LayerReport(index=index)
    chosen: list[tuple[ScalingGroup, torch.Tensor]] = []
    unscaled_grams: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # input -> (X^T X, the scales chosen)
    for group in groups:
        group_inputs = features[group.linears[0]]
        x_mean = channel_mean_abs(group_inputs, reducer)
        if through_gram(group):
            input_gram = gram(group_inputs, reducer)
            choice = search_scales_linear(linears[group.linears[0]].weight, group_inputs, x_mean, settings,
                                          input_gram=input_gram, reducer=reducer)
            if settings.method == "awq-gptq":  # the Hessian of the scaled inputs x / s, without another pass
                unscaled_grams[id(group_inputs[0])] = (input_gram[0], choice.scales)
            del input_gram
        else:
            block_name = group.inspect or group.linears[0]
            block = layer.get_submodule(block_name)

            def run_block(i: int, x: torch.Tensor, block: nn.Module = block, group: ScalingGroup = group):
                kwargs = inputs.kwargs[i] if group.inspect_takes_layer_kwargs else {}
                return _first(block(x, **kwargs))

            screen = None
            if settings.scale_screen_tokens is not None:
                screen = screening_subset(group_inputs, settings.scale_screen_tokens,
                                          whole_batches=group.inspect_takes_layer_kwargs, layout=layout)
            choice = search_scales_block(
                [linears[n] for n in group.linears], group_inputs, x_mean, run_block, settings, screen, reducer,
                reference=block_outputs.pop(block_name),
            )
        chosen.append((group, choice.scales))
        report.ratios[group.prev] = choice.ratio
        report.scale_losses[group.prev] = choice.loss

    for group, scales in chosen:
        _apply_scales(layer, group, scales)
        for x in features[group.linears[0]]:  # the group's linears share this input tensor
            x.div_(scales.to(x.dtype))

    # awq-gptq rounds the scaled, unclipped weights (the function to keep) on the clipped weights' grid, with
    # the Gram matrix of the scaled inputs; linears fed the same input (q/k/v, gate/up) share it and one loop.
    targets = {name: lin.weight.detach() for name, lin in linears.items()} if settings.method == "awq-gptq" else {}
    shared_input: list[list[str]] = []
    for name in targets:
        same = next((names for names in shared_input if features[names[0]][0] is features[name][0]), None)
        if same is None:
            shared_input.append([name])
        else:
            same.append(name)

    def hessian(x: list[torch.Tensor]) -> torch.Tensor:
        if id(x[0]) not in unscaled_grams:
            return gram(x, reducer)[0]
        g, s = unscaled_grams.pop(id(x[0]))
        s = s.to(g.device)
        return g.div_(s.unsqueeze(0)).div_(s.unsqueeze(1))

    hessians = [hessian(features[names[0]]) for names in shared_input]
    unscaled_grams.clear()

    clips: dict[str, torch.Tensor] = {}
    if settings.clip:
        last_grams: tuple[int, torch.Tensor] | None = None  # gate/up see the same tensors: computed once
        for name, lin in linears.items():
            if name in spec.no_clip:
                continue
            if last_grams is None or last_grams[0] != id(features[name][0]):
                last_grams = (id(features[name][0]), clip_grams(features[name], settings, reducer, layout))
            max_val, loss = search_clip(lin.weight, features[name], settings, last_grams[1])
            lin.weight.data = apply_clip(lin.weight, max_val, settings.group_size)
            clips[name] = max_val.cpu()
            report.clip_losses[name] = loss
    features.clear()

    tensors: dict[str, torch.Tensor] = {}

    def store(name: str, quant: GroupQuant) -> None:
        for key, value in pack_gemm(quant).items():
            tensors[f"{name}.{key}"] = value.to("cpu", non_blocking=True)  # pinned, overlaps the next steps
        linears[name].weight.data = quant.dequantize(linears[name].weight.dtype)

    for names, hessian in zip(shared_input, hessians):
        grids = [quantize(linears[n].weight, settings.bits, settings.group_size) for n in names]
        rounded = gptq_round_shared([targets[n] for n in names], hessian, grids, settings.gptq_damp,
                                    settings.gptq_block_size, settings.bits, settings.gptq_act_order)
        for name, quant in zip(names, rounded):
            store(name, quant)
    del hessians, targets
    for name, lin in linears.items():
        if f"{name}.qweight" not in tensors:
            store(name, quantize(lin.weight, settings.bits, settings.group_size))
    quantized_weights = {f"{name}.weight" for name in linears}
    for pname, param in layer.named_parameters():
        if pname not in quantized_weights:
            tensors[pname] = param.detach().to("cpu", copy=True)

    quant_out = [_first(layer(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs)]
    err = summed(((q.float() - f.float()).pow(2).sum() for q, f in zip(quant_out, float_out)), reducer,
                 torch.float64)
    ref = summed((f.float().pow(2).sum() for f in float_out), reducer, torch.float64)
    report.output_rel_mse = (err / ref.clamp(min=1e-30)).item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the non-blocking copies above have landed
    report.seconds = time.perf_counter() - started
    if device.type == "cuda":
        report.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    result = LayerResult(
        report=report,
        tensors=tensors,
        scales={g.prev: s.cpu() for g, s in chosen},
        clips=clips,
    )
    return result, (quant_out if settings.inputs_from_quantized else float_out)


class LayerWeights(Protocol):
    """Where decoder layers' weights come from when they are not held by the model: `load` fills layer `index`
    (left on the meta device) just before it is quantized, `release` empties it again once its result exists."""

    def load(self, index: int, layer: nn.Module) -> None: ...

    def release(self, index: int, layer: nn.Module) -> None: ...


def quantize_layers(
    model: nn.Module,
    spec: ArchSpec,
    settings: QuantSettings,
    inputs: LayerInputs,
    device: torch.device | str,
    start: int = 0,
    on_layer_done: Callable[[LayerResult, list[torch.Tensor]], None] | None = None,
    layer_weights: LayerWeights | None = None,
    reducer: Reducer | None = None,
) -> list[LayerResult]:
    """Quantize decoder layers start.. in order; each layer visits the device only while it is processed.

    Without `layer_weights`, the model holds every layer and keeps its original 16-bit weights (copying the
    fake-quantized ones back would cost a device-to-host transfer per layer for nothing); with it, each layer
    is loaded just before its turn and released after, so at most two layers' weights exist at a time (on a GPU
    the next one is read and copied while this one is searched), and each
    result goes to `on_layer_done` only (the list returned is empty: kept, the results would add up to the
    whole quantized model). Either way the quantized state is in the results' tensors.

    `reducer`: with several ranks, each calls this with its own share of the calibration inputs (`inputs`), the
    same model and settings; every rank gets the same results.
    """
    layers: Sequence[nn.Module] = model.get_submodule(spec.decoder_layers)
    device = torch.device(device)
    results = []
    with _tf32_on_cuda(device), _LayerStager(layers, device, layer_weights) as stager:
        for index in range(start, len(layers)):
            layer = layers[index]
            host_state = stager.take(index, prefetch_next=index + 1 < len(layers))
            result, next_hidden = quantize_layer(layer, inputs, spec, settings, index, reducer)
            if layer_weights is not None:
                layer_weights.release(index, layer)
            else:
                for name, t in _tensors(layer):
                    t.data = host_state[name]
            inputs = LayerInputs(hidden=next_hidden, kwargs=inputs.kwargs, positions=inputs.positions)
            if layer_weights is None:
                results.append(result)
            if on_layer_done is not None:
                on_layer_done(result, next_hidden)
    return results


class _LayerStager:
    """Brings decoder layers to the compute device: on a GPU, layer i+1 is read (when streaming), staged in
    page-locked memory and copied on a side stream by a worker thread while layer i is searched, so neither the
    shard read nor the host-to-device copy holds up the GPU (a copy from pageable memory would block the thread
    that issues it, and the searches' host syncs with it); on the host, in line.

    `take(index)` returns the layer on the device and its host tensors by name (None when streaming, where the
    layer is released instead): the searches scale the device copies in place, the host ones are put back."""

    def __init__(self, layers: Sequence[nn.Module], device: torch.device, layer_weights: LayerWeights | None):
        self._layers = layers
        self._device = device
        self._layer_weights = layer_weights
        self._overlap = device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1) if self._overlap else None
        self._stream = torch.cuda.Stream(device) if self._overlap else None
        self._pending: dict[int, Future] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is None:
            return
        self._pool.shutdown(wait=True, cancel_futures=True)
        for index, pending in self._pending.items():  # a layer brought for a run that stopped: put it back
            if pending.cancelled() or pending.exception() is not None:
                continue
            host_state, _ = pending.result()
            layer = self._layers[index]
            if host_state is None:
                self._layer_weights.release(index, layer)
            else:
                for name, t in _tensors(layer):
                    t.data = host_state[name]

    def _bring(self, index: int) -> tuple[dict[str, torch.Tensor] | None, torch.cuda.Event | None]:
        layer = self._layers[index]
        if self._layer_weights is not None:
            self._layer_weights.load(index, layer)
        host_state = None
        if self._layer_weights is None:
            # on the host itself, .to() is a no-op and the searches' in-place scaling would hit these tensors
            same_device = next(layer.parameters()).device == self._device
            host_state = {name: t.data.clone() if same_device else t.data for name, t in _tensors(layer)}
        if self._stream is None:
            layer.to(self._device)
            return host_state, None
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            for _, t in _tensors(layer):  # from page-locked copies: a truly asynchronous transfer
                source = t.data.pin_memory() if t.data.device.type == "cpu" else t.data
                t.data = source.to(self._device, non_blocking=True)
            return host_state, self._stream.record_event()

    def take(self, index: int, prefetch_next: bool) -> dict[str, torch.Tensor] | None:
        pending = self._pending.pop(index, None)
        host_state, copied = pending.result() if pending is not None else self._bring(index)
        if prefetch_next and self._pool is not None:
            self._pending[index + 1] = self._pool.submit(self._bring, index + 1)
        if copied is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(copied)
            for _, t in _tensors(self._layers[index]):
                t.data.record_stream(current)  # freed later: not reused by the side stream before this one is done
        return host_state


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


@contextmanager
def _tf32_on_cuda(device: torch.device):
    """The float32 Gram matrices of the searches hold exact bf16 products: TF32 tensor cores lose nothing
    there and are ~8x faster than IEEE float32 on Hopper. Left alone on the CPU (bit-exact resumes)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
