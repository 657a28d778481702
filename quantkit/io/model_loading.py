"""Loading a checkpoint into a module tree quantkit builds itself, so no Python file of the checkpoint runs.

The tree comes from the arch spec's `build_model(config)` on the meta device (no memory, no random init);
every tensor is then assigned by name from the safetensors shards, one shard at a time, cast to the compute
dtype. A tensor the tree does not have, or a parameter no shard provides, is an error that names it: a
look-alike tree that silently skipped weights would calibrate a different model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.errors import InputError
from quantkit.io.shards import ShardReader, weight_map

ASSIGN_BATCH = 256


def shard_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the folder's safetensors shards, shard by shard."""
    mapping = weight_map(folder)
    by_shard: dict[str, list[str]] = {}
    for name, shard in mapping.items():
        by_shard.setdefault(shard, []).append(name)
    with ShardReader(folder, mapping) as reader:
        for names in by_shard.values():
            for name in names:
                yield name, reader.get(name)


def build_and_load(build: Any, config: dict[str, Any], tensors: Iterable[tuple[str, torch.Tensor]],
                   dtype: torch.dtype, source: str) -> nn.Module:
    """`build(config)` on the meta device, then every tensor assigned by name in `dtype` (floats only)."""
    with torch.device("meta"):
        model = build(config)
    expected = model.state_dict()
    unexpected: list[str] = []
    pending: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise InputError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, but config.json makes it "
                             f"{tuple(expected[name].shape)}; the weights and config.json do not belong together.")
        pending[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if len(pending) >= ASSIGN_BATCH:  # each load_state_dict call walks every module: batch them
            model.load_state_dict(pending, strict=False, assign=True)
            pending = {}
    model.load_state_dict(pending, strict=False, assign=True)
    if unexpected:
        raise InputError(f"{source}: {len(unexpected)} tensor(s) that the model has no place for, e.g. "
                         f"{', '.join(sorted(unexpected)[:3])}; is config.json from another model or version?")
    missing = sorted(name for name, param in model.named_parameters() if param.is_meta)
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
        from quantkit.io.shards import read_config

        return build_and_load(spec.build_model, read_config(folder), shard_tensors(folder), dtype, str(folder))
    return spec.native_class().from_pretrained(str(folder), dtype=dtype, trust_remote_code=False).eval()


def load_tokenizer(folder: Path, spec: Any) -> Any:
    """The checkpoint's tokenizer, without its remote code."""
    if spec.load_tokenizer is not None:
        return spec.load_tokenizer(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
