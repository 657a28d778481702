"""Loading a checkpoint into a module tree quantkit builds itself, so no Python file of the checkpoint runs.

The tree comes from the arch spec's `build_model(config)` on the meta device (no memory, no random init), or
for an architecture transformers ships, from its class with every parameter on the meta device and the
buffers computed from the config as usual (rotary tables); every tensor is then assigned by name from the
safetensors shards, one shard at a time, cast to the compute dtype. A tensor the tree does not have, or a
parameter no shard provides, is an error that names it: a look-alike tree that silently skipped weights would
calibrate a different model.

For quantizing, the decoder layers can stay on the meta device (`load_model_streaming`): each is read from the
shards when its turn comes and dropped once done, so host memory holds the non-decoder parts and about one
layer, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.errors import InputError
from quantkit.io.shards import ShardReader, read_config, weight_map

ASSIGN_BATCH = 256


def _by_shard(mapping: dict[str, str]) -> list[str]:
    """Tensor names grouped shard by shard (each shard file is then read front to back once)."""
    by_shard: dict[str, list[str]] = {}
    for name, shard in mapping.items():
        by_shard.setdefault(shard, []).append(name)
    return [name for names in by_shard.values() for name in names]


def shard_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the folder's safetensors shards, shard by shard."""
    mapping = weight_map(folder)
    with ShardReader(folder, mapping) as reader:
        for name in _by_shard(mapping):
            yield name, reader.get(name)


def _compute_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get every parameter on the meta device as it is registered (so its initialisation
    runs on meta: no memory, no time), while buffers are computed on the CPU as their module defines them."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def native_builder(spec: Any) -> Callable[[dict[str, Any]], nn.Module]:
    """config.json contents -> transformers' own class for the spec's auto class (its modelling code ships with
    transformers; nothing of the checkpoint runs)."""

    def build(config: dict[str, Any]) -> nn.Module:
        from transformers import AutoConfig

        return spec.native_class().from_config(AutoConfig.for_model(**config))

    return build


def build_and_load(build: Any, config: dict[str, Any], tensors: Iterable[tuple[str, torch.Tensor]],
                   dtype: torch.dtype, source: str, *, later: Mapping[str, Sequence[int]] | None = None,
                   native: bool = False) -> nn.Module:
    """`build(config)` on the meta device, then every tensor assigned by name in `dtype` (floats only).

    `later`: name -> shape of checkpoint tensors left on the meta device for now (decoder layers read when their
    turn comes); their names and shapes are checked against the tree here all the same, so a mismatch fails
    before calibration rather than at layer 20. `native`: a transformers class, built with its parameters on
    meta and its buffers computed as usual, and its tied weights (a shared embedding and LM head) tied again
    after loading."""
    with parameters_on_meta() if native else torch.device("meta"):
        model = build(config)
    expected = model.state_dict()
    unexpected: list[str] = []

    def has_place(name: str, shape: Sequence[int]) -> bool:
        if name not in expected:
            unexpected.append(name)
            return False
        if tuple(shape) != tuple(expected[name].shape):
            raise InputError(f"{source}: tensor {name} has shape {tuple(shape)}, but config.json makes it "
                             f"{tuple(expected[name].shape)}; the weights and config.json do not belong together.")
        return True

    later = later or {}
    for name, shape in later.items():
        has_place(name, shape)
    pending: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if not has_place(name, tensor.shape):
            continue
        pending[name] = _compute_tensor(tensor, dtype)
        if len(pending) >= ASSIGN_BATCH:  # each load_state_dict call walks every module: batch them
            model.load_state_dict(pending, strict=False, assign=True)
            pending = {}
    model.load_state_dict(pending, strict=False, assign=True)
    if native:
        model.tie_weights()  # assigning the embedding replaced the parameter the LM head shared
    if unexpected:
        raise InputError(f"{source}: {len(unexpected)} tensor(s) that the model has no place for, e.g. "
                         f"{', '.join(sorted(unexpected)[:3])}; is config.json from another model or version?")
    missing = sorted(name for name, param in model.named_parameters() if param.is_meta and name not in later)
    if missing:
        raise InputError(f"{source}: {len(missing)} weight(s) missing from the safetensors files, e.g. "
                         f"{', '.join(missing[:3])}; the download is incomplete (run `quantkit download` again).")
    rebuild = getattr(model, "rebuild_buffers", None)
    if rebuild is not None:
        rebuild()
    left = [name for name, buf in model.named_buffers() if buf.is_meta]
    if left:
        raise RuntimeError(f"buffers {left[:3]} were not rebuilt after loading; the arch's module tree must do it")
    return model.eval()


def load_model(folder: Path, spec: Any, dtype: torch.dtype) -> nn.Module:
    """The checkpoint in `folder` as a float model in `dtype` on the CPU, without running any of its code:
    the spec's own module tree where it has one, else transformers' class for the spec's auto class."""
    if spec.build_model is not None:
        return build_and_load(spec.build_model, read_config(folder), shard_tensors(folder), dtype, str(folder))
    return spec.native_class().from_pretrained(str(folder), dtype=dtype, trust_remote_code=False).eval()


class StreamedLayers:
    """The decoder layers of a model loaded by `load_model_streaming`: `load(index, layer)` fills the meta-device
    layer with its checkpoint tensors in the compute dtype, `release(index, layer)` puts it back on the meta
    device, freeing its host memory. The shards are opened per layer: a handle kept open would keep every page
    read so far mapped (resident) until the end of the run."""

    def __init__(self, folder: Path, mapping: dict[str, str], names: dict[int, list[str]], spec: Any,
                 dtype: torch.dtype) -> None:
        self._folder = folder
        self._mapping = mapping
        self._names = names
        self._spec = spec
        self._dtype = dtype

    def load(self, index: int, layer: nn.Module) -> None:
        prefix = self._spec.layer_prefix(index) + "."
        with ShardReader(self._folder, self._mapping) as reader:
            state = {name.removeprefix(prefix): _compute_tensor(reader.get(name), self._dtype)
                     for name in self._names.get(index, [])}
        layer.load_state_dict(state, strict=True, assign=True)

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to("meta")


def load_model_streaming(folder: Path, spec: Any, dtype: torch.dtype) -> tuple[nn.Module, StreamedLayers]:
    """As `load_model`, but the decoder layers stay on the meta device, to be filled one at a time through the
    returned `StreamedLayers`. The spec's own module tree where it has one, else transformers' class (checkpoint
    keys renamed as `spec.checkpoint_renames` says)."""
    native = spec.build_model is None
    build = native_builder(spec) if native else spec.build_model
    mapping = weight_map(folder)
    prefix = spec.checkpoint_prefix + "."
    names: dict[int, list[str]] = {}
    shapes: dict[str, list[int]] = {}
    with ShardReader(folder, mapping) as reader:
        for name in _by_shard(mapping):
            head = name.removeprefix(prefix).split(".", 1)[0]
            if name.startswith(prefix) and head.isdigit():
                names.setdefault(int(head), []).append(name)
                shapes[name] = reader.shape_dtype(name)[0]
        others = ((spec.module_name(name), reader.get(name)) for name in _by_shard(mapping) if name not in shapes)
        model = build_and_load(build, read_config(folder), others, dtype, str(folder),
                               later={spec.module_name(name): shape for name, shape in shapes.items()}, native=native)
    return model, StreamedLayers(folder, mapping, names, spec, dtype)


def load_tokenizer(folder: Path, spec: Any) -> Any:
    """The checkpoint's tokenizer, without its remote code."""
    if spec.load_tokenizer is not None:
        return spec.load_tokenizer(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
