"""Reading a checkpoint folder's safetensors one tensor at a time: the save layer, RTN and verify never hold a
whole model in memory, only the tensor (or output shard) they are working on."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self

import torch
from safetensors import safe_open

from quantkit.errors import InputError

WEIGHT_INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def weight_map(folder: str | Path) -> dict[str, str]:
    """tensor name -> shard file name (relative to `folder`), in the checkpoint's own order.

    From `model.safetensors.index.json` when present (as transformers and vLLM read it), else from every
    `*.safetensors` file's header (single-file checkpoints).
    """
    root = Path(folder)
    index = root / WEIGHT_INDEX
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"{index} is not a safetensors index ({err}); re-download the model.") from err
        return dict(mapping)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise InputError(f"{root} holds no *.safetensors weights; run `quantkit download MODEL` first.")
    mapping: dict[str, str] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                mapping[name] = path.name
    return mapping


def num_layers(config: dict[str, Any], key: str = "num_hidden_layers", text_config_key: str | None = None) -> int:
    """The decoder layer count from config.json contents (the LLM's sub-config when the spec names one)."""
    llm = config.get(text_config_key, {}) if text_config_key else config
    if not isinstance(llm.get(key), int):
        raise InputError(f"config.json has no integer {key!r}{f' in {text_config_key}' if text_config_key else ''}")
    return llm[key]


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder, with errors that say which folder and what to do."""
    if not folder.is_dir():
        raise InputError(f"model folder {folder} does not exist; give a local folder (`quantkit download` first).")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(f"{config_path} is missing: {folder} is not a Hugging Face model folder.")
    try:
        return json.loads(config_path.read_text())
    except ValueError as err:
        raise InputError(f"{config_path} is not valid JSON ({err}).") from err


class ShardReader:
    """Reads tensors by name from a folder's shards, keeping each shard's handle open (memory-mapped: a tensor
    is only read when asked for). Use as a context manager."""

    def __init__(self, folder: str | Path, mapping: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.mapping = weight_map(self.folder) if mapping is None else mapping
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._handles.clear()

    def _handle(self, name: str) -> Any:
        try:
            shard = self.mapping[name]
        except KeyError:
            raise InputError(f"{self.folder} has no tensor {name!r}") from None
        if shard not in self._handles:
            path = self.folder / shard
            if not path.is_file():
                raise InputError(f"{path} (named in {WEIGHT_INDEX} for {name}) is missing; re-download the model.")
            self._handles[shard] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape_dtype(self, name: str) -> tuple[list[int], str]:
        """(shape, safetensors dtype string such as "BF16") read from the header only."""
        view = self._handle(name).get_slice(name)
        return list(view.get_shape()), view.get_dtype()


class TensorsOnDisk(Mapping[str, torch.Tensor]):
    """Tensors by name, each read from its safetensors file only when looked up, and their shapes and dtypes
    from the file headers alone: the release writer takes a whole model's quantized layers this way while
    holding one output shard in memory."""

    def __init__(self, locations: dict[str, tuple[Path, str]]) -> None:
        """`locations`: name -> (safetensors file, the tensor's key inside it)."""
        self._locations = locations

    def __getitem__(self, name: str) -> torch.Tensor:
        path, key = self._locations[name]
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def __len__(self) -> int:
        return len(self._locations)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        path, key = self._locations[name]
        with safe_open(str(path), framework="pt") as handle:
            view = handle.get_slice(key)
            return tuple(view.get_shape()), SAFETENSORS_DTYPES[view.get_dtype()]
