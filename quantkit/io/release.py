"""Writing a vLLM-ready AWQ release folder: the quantized decoder layers plus everything else of the source.

The release is the source checkpoint with each quantized decoder layer replaced by its AutoAWQ GEMM tensors,
every other tensor streamed from the source shards (one at a time) and cast to the release dtype, config.json
carrying `quantization_config`, the source's tokenizer / processor / remote-code files copied unchanged, and a
`quantkit-manifest.json` with every file's sha256. It is assembled in a temporary folder beside the target and
renamed into place only when complete, so a crash never leaves a half-written release where vLLM would load it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from quantkit.archs import ArchSpec
from quantkit.errors import InputError
from quantkit.io.chores import package_versions
from quantkit.io.manifest import MANIFEST_NAME, hash_file, read_manifest, write_manifest
from quantkit.io.shards import (
    SAFETENSORS_DTYPES,
    WEIGHT_INDEX,
    ShardReader,
    TensorsOnDisk,
    num_layers,
    weight_map,
)

QUANT_SUFFIXES = ("qweight", "qzeros", "scales")
"""The AutoAWQ GEMM tensors that replace a quantized linear's `.weight`, in `dequantize_gemm`'s argument order."""
# Files of the source that the release must not inherit: its 16-bit weights in any format, their indexes.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
TOOLS = ("quantkit", "torch", "transformers", "safetensors")


def layer_index(name: str, spec: ArchSpec) -> int | None:
    """The decoder layer a tensor name belongs to (`{checkpoint_prefix}.{i}.…`), or None outside the layers."""
    prefix = spec.checkpoint_prefix + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def dtype_name(dtype: torch.dtype) -> str:
    """"float16" for torch.float16: the spelling of config.json's torch_dtype."""
    return str(dtype).removeprefix("torch.")


def release_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` as the release stores it: floats cast to `dtype` (refused where a finite value would become
    infinite, e.g. a bf16 activation-sized weight over 65504 in fp16), integers untouched."""
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor.contiguous()
    cast = tensor.to(dtype).contiguous()
    if bool(torch.isfinite(cast.sum(dtype=torch.float32))):  # fast path: no Inf anywhere, so no overflow
        return cast
    overflow = torch.isinf(cast) & torch.isfinite(tensor)
    if overflow.any():
        peak = tensor[overflow].abs().max().item()
        raise InputError(
            f"{name}: {int(overflow.sum())} value(s) up to {peak:.4g} overflow {dtype_name(dtype)} "
            f"(max {torch.finfo(dtype).max:.6g}); write the release with dtype=torch.bfloat16 instead."
        )
    return cast


def _shape_dtype(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """A layer tensor's shape and dtype, from the file header where `tensors` reads lazily (checking and
    planning then read no layer file; only writing does, once)."""
    if isinstance(tensors, TensorsOnDisk):
        return tensors.shape_dtype(name)
    tensor = tensors[name]
    return tuple(tensor.shape), tensor.dtype


def _layer_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """AWQ scales stay fp16 whatever the release dtype (the GEMM layout); other layer floats take `dtype`."""
    return torch.float16 if name.endswith(".scales") else dtype


class ReleaseSettings(Protocol):
    """What the release writer needs of the quantization settings (quantkit.awq.settings.QuantSettings): the
    `quantization_config` block for config.json and the settings for the manifest. A protocol, so that the
    save layer does not import the engine above it."""

    def quantization_config(self, modules_to_not_convert: tuple[str, ...]) -> dict: ...

    def as_dict(self) -> dict: ...


@dataclass(frozen=True)
class _Planned:
    """One output tensor: where it comes from and how many bytes it takes in the release."""

    name: str
    from_layers: bool
    nbytes: int


def _check_layer_tensors(layer_tensors: Mapping[str, torch.Tensor], source_names: list[str],
                         spec: ArchSpec) -> dict[int, list[str]]:
    """Layer index -> its names in `layer_tensors`, after checking each quantized layer is complete: every
    source tensor of the layer is replaced (a linear's weight by qweight/qzeros/scales) and nothing is added."""
    by_layer: dict[int, list[str]] = {}
    for name in layer_tensors:
        index = layer_index(name, spec)
        if index is None:
            raise InputError(f"layer_tensors holds {name!r}, which is not under {spec.checkpoint_prefix}.N.")
        by_layer.setdefault(index, []).append(name)
    source_by_layer: dict[int, list[str]] = {}
    for name in source_names:
        index = layer_index(name, spec)
        if index is not None:
            source_by_layer.setdefault(index, []).append(name)
    for index, names in sorted(by_layer.items()):
        prefix = spec.layer_prefix(index)
        if index not in source_by_layer:
            raise InputError(f"layer_tensors holds layer {index} but the source has no {prefix}.")
        quantized = {f"{prefix}.{linear}.weight": f"{prefix}.{linear}" for linear in spec.linears}
        expected: set[str] = set()
        for name in source_by_layer[index]:
            if name in quantized:
                expected.update(f"{quantized[name]}.{suffix}" for suffix in QUANT_SUFFIXES)
            else:
                expected.add(name)
        missing = sorted(expected - set(names))
        extra = sorted(set(names) - expected)
        if missing or extra:
            raise InputError(
                f"layer_tensors for layer {index} is not the layer's complete quantized state: "
                f"missing {missing[:4]}{' …' if len(missing) > 4 else ''}, "
                f"unexpected {extra[:4]}{' …' if len(extra) > 4 else ''}."
            )
        for linear in quantized.values():
            for suffix, wanted in (("qweight", torch.int32), ("qzeros", torch.int32), ("scales", torch.float16)):
                got = _shape_dtype(layer_tensors, f"{linear}.{suffix}")[1]
                if got != wanted:
                    raise InputError(f"{linear}.{suffix} is {got}; the AutoAWQ GEMM layout stores {wanted}.")
    return by_layer


def _plan(mapping: dict[str, str], reader: ShardReader, layer_tensors: Mapping[str, torch.Tensor],
          by_layer: dict[int, list[str]], spec: ArchSpec, dtype: torch.dtype) -> list[_Planned]:
    """Output tensors in the source's order, each quantized layer's entries where its source tensors were."""
    planned: list[_Planned] = []
    emitted: set[int] = set()
    for name, shard in mapping.items():
        index = layer_index(name, spec)
        if index in by_layer:
            if index not in emitted:
                emitted.add(index)
                for new in sorted(by_layer[index]):
                    shape, stored = _shape_dtype(layer_tensors, new)
                    itemsize = _layer_dtype(new, dtype).itemsize if stored.is_floating_point else stored.itemsize
                    planned.append(_Planned(new, True, math.prod(shape) * itemsize))
            continue
        shape, stored = reader.shape_dtype(name)
        source_dtype = SAFETENSORS_DTYPES.get(stored)
        if source_dtype is None:
            raise InputError(f"{reader.folder / shard}: {name} has dtype {stored}, which quantkit cannot cast.")
        itemsize = dtype.itemsize if source_dtype.is_floating_point else source_dtype.itemsize
        planned.append(_Planned(name, False, itemsize * math.prod(shape)))
    return planned


def _split(planned: list[_Planned], max_shard_bytes: int) -> list[list[_Planned]]:
    """Consecutive runs of at most max_shard_bytes (a single larger tensor gets a shard of its own)."""
    shards: list[list[_Planned]] = [[]]
    size = 0
    for entry in planned:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _is_source_weights(relative: Path) -> bool:
    name = relative.name
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json") or name in (MANIFEST_NAME, "config.json")


def _copied_files(source: Path) -> Iterator[Path]:
    """The source's files the release takes unchanged (tokenizer, processor, remote code, templates...)."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and not any(p.startswith(".") for p in relative.parts) and not _is_source_weights(relative):
            yield relative


def _merge_sections(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Manifest sections of `extra` over `base`; a section both give as objects is merged key by key."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = {**merged[key], **value} if isinstance(merged.get(key), dict) and isinstance(value, dict) \
            else value
    return merged


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _give_default_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; the release should be as readable as any folder the user creates."""
    folder.chmod(0o777 & ~_umask())


def _move_into_place(built: Path, target: Path) -> None:
    """Rename the complete `built` folder to `target`; an existing target is set aside first and removed only
    once the new one is in place (restored if the rename fails)."""
    if not target.exists() and not target.is_symlink():
        os.rename(built, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    aside.rmdir()
    os.rename(target, aside)
    try:
        os.rename(built, target)
    except BaseException:
        os.rename(aside, target)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink()


def write_release(
    source_dir: str | Path,
    out_dir: str | Path,
    layer_tensors: Mapping[str, torch.Tensor],
    spec: ArchSpec,
    settings: ReleaseSettings,
    *,
    dtype: torch.dtype = torch.float16,
    max_shard_bytes: int = 4 * 2**30,
    force: bool = False,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """Write the release folder `out_dir` from the 16-bit `source_dir` and the quantized decoder layers.

    `layer_tensors` (a dict, or `TensorsOnDisk` to read each tensor only when its output shard is written)
    holds, for every quantized layer i, its complete new state under `{spec.checkpoint_prefix}.{i}.`
    (qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out] and any bias per quantized
    linear, plus the layer's other parameters, e.g. AWQ-scaled norms). Everything else is streamed from the
    source and cast to `dtype`. Returns `out_dir`; an existing one is replaced only with `force`, and only once
    the new release is complete.
    """
    source, out = Path(source_dir).resolve(), Path(out_dir).resolve()
    config_path = source / "config.json"
    if not config_path.is_file():
        raise InputError(f"{config_path} is missing: {source} is not a Hugging Face model folder.")
    if out == source or source in out.parents or out in source.parents:
        raise InputError(f"release folder {out} and source folder {source} overlap; choose another --out.")
    if (out.exists() or out.is_symlink()) and not force:
        raise InputError(f"release folder {out} already exists; pass --force (force=True) to replace it.")
    if max_shard_bytes <= 0:
        raise InputError(f"max_shard_bytes={max_shard_bytes}: must be positive.")
    config = json.loads(config_path.read_text())
    n_layers = num_layers(config, spec.num_layers_key, spec.text_config_key)
    mapping = weight_map(source)
    by_layer = _check_layer_tensors(layer_tensors, list(mapping), spec)
    if any(index >= n_layers for index in by_layer):
        raise InputError(f"layer_tensors holds layer {max(by_layer)} but config.json has {n_layers} layers.")

    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _give_default_permissions(building)
        with ShardReader(source, mapping) as reader:
            shards = _split(_plan(mapping, reader, layer_tensors, by_layer, spec, dtype), max_shard_bytes)
            index: dict[str, str] = {}
            for number, entries in enumerate(shards, start=1):
                shard_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                tensors: dict[str, torch.Tensor] = {}
                for entry in entries:
                    if entry.from_layers:
                        tensor, target = layer_tensors[entry.name], _layer_dtype(entry.name, dtype)
                    else:
                        tensor, target = reader.get(entry.name), dtype
                    tensors[entry.name] = release_tensor(entry.name, tensor.detach().cpu(), target)
                    index[entry.name] = shard_name
                save_file(tensors, str(building / shard_name), metadata={"format": "pt"})
                # safetensors creates its files 0600; a shard should be as readable as the files beside it
                (building / shard_name).chmod(0o666 & ~_umask())
                del tensors
        total = sum(entry.nbytes for entries in shards for entry in entries)
        (building / WEIGHT_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2)
            + "\n"
        )

        quantization_config = settings.quantization_config(spec.modules_to_not_convert)
        release_config = {**config, "quantization_config": quantization_config, "torch_dtype": dtype_name(dtype)}
        if "dtype" in config:  # transformers >= 5 writes `dtype`; keep both spellings in agreement
            release_config["dtype"] = dtype_name(dtype)
        (building / "config.json").write_text(json.dumps(release_config, indent=2) + "\n")

        code_files: dict[str, str] = {}
        for relative in _copied_files(source):
            (building / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / relative, building / relative)
            if relative.suffix == ".py":
                code_files[relative.as_posix()] = hash_file(building / relative)

        source_manifest = read_manifest(source) or {}
        sections: dict[str, Any] = {
            "source": {**(source_manifest.get("source") or {"folder_name": source.name}),
                       "had_manifest": bool(source_manifest)},
            "quantization": {"arch": spec.name, "settings": settings.as_dict(),
                             "quantization_config": quantization_config,
                             "quantized_layers": sorted(by_layer), "num_layers": n_layers,
                             "release_dtype": dtype_name(dtype)},
            "tools": package_versions(TOOLS),
            # The checkpoint's own Python files, byte-identical: quantkit never runs them, vLLM runs the
            # configuration and processor code (trust_remote_code), so users should know exactly which code that is.
            "remote_code": code_files,
        }
        write_manifest(building, _merge_sections(sections, manifest_extra or {}))
        _move_into_place(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return out
