"""The resumable work folder of a quantize run: each finished layer's tensors and the next layer's inputs.

Files are written by one background thread (the GPU goes on with the next layer meanwhile), each to a
temporary name renamed into place, and `state.json` is updated last, so a run killed at any moment resumes
from the last layer whose files are complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantkit.io.chores import read_json, replacing, write_text_atomically
from quantkit.io.shards import TensorsOnDisk

STATE_FILE = "state.json"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with replacing(path) as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary))


class LayerCheckpoints:
    """Work folder keyed by a fingerprint of (source, settings, calibration): a different job starts afresh."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantkit-checkpoint")
        self._pending: list[Future] = []
        state = self._read_state()
        if state.get("fingerprint") != fingerprint:
            shutil.rmtree(self.folder, ignore_errors=True)
            state = {"fingerprint": fingerprint, "completed_layers": 0}
        self.folder.mkdir(parents=True, exist_ok=True)
        self._state = state
        self._write_state()

    def _read_state(self) -> dict[str, Any]:
        return read_json(self.folder / STATE_FILE) or {}

    def _write_state(self) -> None:
        write_text_atomically(self.folder / STATE_FILE, json.dumps(self._state, indent=1))

    @property
    def completed_layers(self) -> int:
        return int(self._state.get("completed_layers", 0))

    def save_kwargs(self, kwargs: list[dict[str, Any]]) -> None:
        torch.save(kwargs, self.folder / "layer_kwargs.pt")

    def load_kwargs(self) -> list[dict[str, Any]]:
        return torch.load(self.folder / "layer_kwargs.pt", weights_only=True)

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], next_hidden: list[torch.Tensor],
                   report: dict[str, Any]) -> None:
        """Queue layer `index`'s result; `next_hidden` is copied to CPU now, written in the background."""
        hidden_cpu = {f"batch.{i}": h.detach().to("cpu") for i, h in enumerate(next_hidden)}
        self._pending.append(self._writer.submit(self._write_layer, index, tensors, hidden_cpu, report))

    def _write_layer(self, index: int, tensors: dict[str, torch.Tensor], hidden: dict[str, torch.Tensor],
                     report: dict[str, Any]) -> None:
        _atomic_save(tensors, self.folder / f"layer-{index:04d}.safetensors")
        _atomic_save(hidden, self.folder / f"inputs-{index + 1:04d}.safetensors")
        self._state["completed_layers"] = index + 1
        self._state.setdefault("reports", {})[str(index)] = report
        self._write_state()
        previous = self.folder / f"inputs-{index:04d}.safetensors"
        previous.unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait for queued writes; re-raises a failed write."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def saved_layers(self, layer_prefix: Callable[[int], str], n_layers: int) -> TensorsOnDisk:
        """Layers 0..n_layers-1's saved tensors under their full names (`{layer_prefix(i)}.{name}`), each read
        from its layer file only when looked up."""
        locations: dict[str, tuple[Path, str]] = {}
        for index in range(n_layers):
            path = self.folder / f"layer-{index:04d}.safetensors"
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                    locations[f"{layer_prefix(index)}.{key}"] = (path, key)
        return TensorsOnDisk(locations)

    def load_inputs(self, index: int) -> list[torch.Tensor]:
        data = load_file(str(self.folder / f"inputs-{index:04d}.safetensors"))
        return [data[f"batch.{i}"] for i in range(len(data))]

    def reports(self) -> dict[str, Any]:
        return dict(self._state.get("reports", {}))

    def close(self, remove: bool = False) -> None:
        self.flush()
        self._writer.shutdown()
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
