"""`quantkit-manifest.json`: the record every folder quantkit writes carries (download, release, verify).

The manifest is one JSON object: `schema_version`, `created` (UTC, ISO 8601), free-form sections chosen by
the writer (`source`, `quantization`, ...) and `files`, a list of {path, size, sha256} sorted by path, with
sizes in bytes and POSIX relative paths. Readers check files against it; writers never edit it in place.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from quantkit.errors import InputError
from quantkit.io.chores import write_text_atomically

MANIFEST_NAME = "quantkit-manifest.json"
SCHEMA_VERSION = 1
_RESERVED_KEYS = ("schema_version", "created", "files")


def hash_file(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks so multi-GB shards never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def listed_files(folder: str | Path) -> list[str]:
    """Relative paths of the files a manifest of `folder` describes: everything but the manifest itself and
    hidden entries (`.cache/` of huggingface_hub, `.git/`), which are bookkeeping, not part of the model."""
    root = Path(folder)
    paths = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if relative.as_posix() == MANIFEST_NAME or any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            paths.append(relative.as_posix())
    return sorted(paths)


def file_entries(folder: str | Path, paths: list[str] | None = None) -> list[dict[str, Any]]:
    """{path, size, sha256} for `paths` (relative to `folder`; default: `listed_files(folder)`), sorted."""
    root = Path(folder)
    chosen = listed_files(root) if paths is None else sorted(paths)
    return [
        {"path": rel, "size": (root / rel).stat().st_size, "sha256": hash_file(root / rel)} for rel in chosen
    ]


def write_manifest(
    folder: str | Path, extra: dict[str, Any], files: list[dict[str, Any]] | None = None
) -> Path:
    """Write the manifest of `folder` with the sections in `extra`; returns its path.

    `files` takes entries already computed by `file_entries` (callers that checked the hashes against
    something else pass them to avoid hashing twice); by default every listed file is hashed now. Written
    to a temporary name and renamed, so a reader never sees half a manifest.
    """
    clash = [key for key in _RESERVED_KEYS if key in extra]
    if clash:
        raise ValueError(
            f"manifest sections may not be named {clash}: those keys are written by write_manifest"
        )
    root = Path(folder)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
        "files": sorted(files, key=lambda entry: entry["path"]) if files is not None else file_entries(root),
    }
    return write_text_atomically(root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of `folder`, or None when it has none. A manifest that is not a JSON object with a
    `files` list is refused: something else wrote that file and nothing in it can be trusted."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(
            f"{path} is not valid JSON ({err}); delete it or restore it from the release"
        ) from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise InputError(f"{path} is not a quantkit manifest (no `files` list); delete it or restore it")
    return manifest


def record_files(folder: Path, names: list[str], sections: dict[str, Any] | None = None) -> None:
    """List `names` in the folder's manifest with fresh {size, sha256}, keeping every other entry as it was
    (not re-hashed), and set `sections` (e.g. `verify`) over the manifest's own. A folder without a manifest
    is left without one (there is nothing to keep consistent)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    fresh = file_entries(folder, names)
    unchanged = all(manifest.get(key) == value for key, value in (sections or {}).items())
    if unchanged and all(entry in manifest["files"] for entry in fresh):
        return
    kept = [entry for entry in manifest["files"] if entry.get("path") not in names]
    write_manifest(folder, {**manifest_sections(manifest), **(sections or {})}, kept + fresh)


def manifest_sections(manifest: dict[str, Any]) -> dict[str, Any]:
    """The writer's sections of a manifest: everything but the keys `write_manifest` fills in itself."""
    return {key: value for key, value in manifest.items() if key not in _RESERVED_KEYS}
