"""Calibration sets: text and image+text samples from files, folders, `datasets` ids or built-in text,
turned into fixed-length token blocks (text) and chat turns with images (multimodal)."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import DependencyError, InputError

BUILTIN_PYDOC = "builtin:pydoc"
TEXT_SUFFIXES = {".txt", ".md"}
TABLE_SUFFIXES = {".jsonl", ".json", ".parquet"}


@dataclass(frozen=True)
class CalibSample:
    """One raw sample: text, and for multimodal samples the image files that precede it in the user turn."""

    text: str
    images: tuple[Path, ...] = ()


@dataclass
class CalibrationSet:
    """What the engine consumes: `blocks` [n, seq_len] token ids and `multimodal` samples (each one forward)."""

    blocks: torch.Tensor
    multimodal: list[CalibSample] = field(default_factory=list)
    source: str = ""
    fingerprint: str = ""
    seq_len: int = 0
    """The requested block length (also when an image-only set has no text blocks)."""

    def describe(self) -> dict[str, Any]:
        """What the release manifest records (published with it: a local file is named by its name only)."""
        return {
            "source": Path(self.source).name if Path(self.source).is_absolute() else self.source,
            "fingerprint": self.fingerprint,
            "text_blocks": int(self.blocks.shape[0]),
            "seq_len": self.seq_len,
            "multimodal_samples": len(self.multimodal),
        }


def pydoc_topics(split: str = "calib") -> list[str]:
    """English technical prose that ships with every CPython: even topics calibrate, odd topics evaluate."""
    from pydoc_data.topics import topics

    if split not in ("calib", "eval"):
        raise InputError(f"pydoc split {split!r}: use 'calib' or 'eval'.")
    keys = sorted(topics)
    evaluation = [topics[k] for k in keys[1::2]]
    if split == "eval":
        return evaluation
    held_out = set(evaluation)
    return [topics[k] for k in keys[::2] if topics[k] not in held_out]  # two topics share one text


def _rows_from_table(path: Path, text_field: str) -> list[CalibSample]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise InputError(f"{path}: no column {text_field!r} (columns: {table.column_names}); use --text-field.")
        return [CalibSample(text=str(t)) for t in table.column(text_field).to_pylist() if t]
    samples = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not valid JSON ({err.msg}); each line must be one JSON object.")
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise InputError(f"{path}:{number}: missing string field {text_field!r}.")
        images = row.get("images", row.get("image", []))
        images = [images] if isinstance(images, str) else list(images)
        resolved = []
        for image in images:
            image_path = (path.parent / image) if not Path(image).is_absolute() else Path(image)
            if not image_path.is_file():
                raise InputError(f"{path}:{number}: image {image!r} not found (looked at {image_path}).")
            resolved.append(image_path)
        samples.append(CalibSample(text=row[text_field], images=tuple(resolved)))
    return samples


def _samples_from_path(path: Path, text_field: str) -> list[CalibSample]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES | TABLE_SUFFIXES)
        if not files:
            raise InputError(f"{path}: no .txt/.md/.jsonl/.parquet files to calibrate on.")
        return [s for f in files for s in _samples_from_path(f, text_field)]
    if path.suffix in TEXT_SUFFIXES:
        paragraphs = path.read_text(encoding="utf-8").split("\n\n")
        return [CalibSample(text=p.strip()) for p in paragraphs if p.strip()]
    if path.suffix in TABLE_SUFFIXES:
        return _rows_from_table(path, text_field)
    raise InputError(f"{path}: unsupported calibration file type {path.suffix!r} (use .txt, .jsonl or .parquet).")


def _samples_from_dataset(name: str, revision: str | None, split: str, text_field: str) -> list[CalibSample]:
    try:
        import datasets
    except ImportError as err:
        raise DependencyError("calibrating on a Hub dataset needs `datasets`: pip install datasets") from err
    dataset_id, _, config = name.partition(":")
    try:
        data = datasets.load_dataset(dataset_id, config or None, split=split, revision=revision)
    except Exception as err:  # datasets raises many types for network/name problems
        raise InputError(
            f"calibration dataset {name!r} (revision {revision or 'default'}, split {split!r}) could not be "
            f"loaded: {err}. Give a local file/folder with --calib, or check the id and HF_ENDPOINT."
        ) from err
    if text_field not in data.column_names:
        raise InputError(f"dataset {name!r} has no column {text_field!r} (columns: {data.column_names}).")
    return [CalibSample(text=t) for t in data[text_field] if isinstance(t, str) and t.strip()]


def read_samples(
    source: str, revision: str | None = None, split: str = "train", text_field: str = "text"
) -> list[CalibSample]:
    """Raw samples from a file, a folder, `builtin:pydoc`, or a `datasets` id (`org/name[:config]`)."""
    if source == BUILTIN_PYDOC:
        return [CalibSample(text=t) for t in pydoc_topics("calib")]
    path = Path(source)
    if path.exists():
        return _samples_from_path(path, text_field)
    if source.startswith((".", "/", "~")) or path.suffix in TEXT_SUFFIXES | TABLE_SUFFIXES:
        raise InputError(f"calibration file {source!r} does not exist.")
    return _samples_from_dataset(source, revision, split, text_field)


def build_calibration_set(
    samples: list[CalibSample], tokenizer: Any, n_samples: int, seq_len: int, seed: int = 0, source: str = ""
) -> CalibrationSet:
    """Shuffle text samples with `seed`, concatenate their tokens (EOS between documents) and cut exactly
    `n_samples - len(multimodal)` blocks of `seq_len` tokens; multimodal samples are kept whole.

    Refuses a set too small for the request instead of shrinking it silently.
    """
    if n_samples <= 0 or seq_len <= 0:
        raise InputError(f"n_samples={n_samples}, seq_len={seq_len}: both must be positive.")
    if not any(s.images or s.text.strip() for s in samples):
        raise InputError(f"calibration data {source or '(given samples)'} has no usable sample: every text is "
                         "empty and no sample has an image. Give text, or image rows with a prompt.")
    multimodal = [s for s in samples if s.images][:n_samples]
    texts = [s.text for s in samples if not s.images]
    random.Random(seed).shuffle(texts)
    n_blocks = n_samples - len(multimodal)
    needed = n_blocks * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        if len(ids) >= needed:
            break
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    if len(ids) < needed:
        images = f" besides its {len(multimodal)} image sample(s)" if multimodal else ""
        raise InputError(
            f"calibration data {source or '(given samples)'} has {len(ids)} text tokens{images}, but {n_blocks} "
            f"blocks x {seq_len} tokens = {needed} are needed. Give more text or lower --n-samples / --seq-len"
            f"{f' (to {len(multimodal)} for images only)' if multimodal else ''}."
        )
    blocks = torch.tensor(ids[:needed], dtype=torch.long).reshape(n_blocks, seq_len)
    digest = hashlib.sha256(blocks.numpy().tobytes())
    for sample in multimodal:
        digest.update(sample.text.encode())
        for image in sample.images:
            digest.update(image.read_bytes())
    return CalibrationSet(blocks=blocks, multimodal=multimodal, source=source, fingerprint=digest.hexdigest(),
                          seq_len=seq_len)


def load_calibration(
    source: str,
    tokenizer: Any,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    revision: str | None = None,
    split: str = "train",
    text_field: str = "text",
) -> CalibrationSet:
    samples = read_samples(source, revision=revision, split=split, text_field=text_field)
    return build_calibration_set(samples, tokenizer, n_samples, seq_len, seed, source=source)


def micro_batches(blocks: torch.Tensor, max_batch_tokens: int) -> Iterable[torch.Tensor]:
    """Split [n, seq_len] blocks into row chunks of at most max_batch_tokens tokens (at least one row)."""
    if blocks.shape[0] == 0:  # an image-only calibration set has no text blocks
        return []
    rows = max(1, max_batch_tokens // max(1, blocks.shape[1]))
    return blocks.split(rows)
