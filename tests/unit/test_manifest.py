"""quantkit-manifest.json: the generic record other layers (save, verify, recipes) reuse."""

from __future__ import annotations

import hashlib

import pytest

from quantkit.errors import InputError
from quantkit.io.manifest import MANIFEST_NAME, hash_file, read_manifest, write_manifest


def test_write_lists_every_model_file_with_size_and_sha256(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 3000)
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / ".cache").mkdir()  # huggingface_hub's bookkeeping, not part of the model
    (tmp_path / ".cache" / "x.metadata").write_text("etag")

    path = write_manifest(tmp_path, {"source": {"repo_id": "org/name"}})
    write_manifest(tmp_path, {"source": {"repo_id": "org/name"}})  # the manifest never lists itself

    manifest = read_manifest(tmp_path)
    assert path == tmp_path / MANIFEST_NAME
    assert manifest["schema_version"] == 1 and manifest["source"] == {"repo_id": "org/name"}
    assert manifest["files"] == [
        {"path": "a.json", "size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
        {"path": "sub/b.bin", "size": 3000, "sha256": hash_file(tmp_path / "sub" / "b.bin")},
    ]
    assert not list(tmp_path.glob("*.tmp"))


def test_sections_may_not_shadow_the_keys_write_manifest_owns(tmp_path):
    with pytest.raises(ValueError, match="files"):
        write_manifest(tmp_path, {"files": []})


def test_read_tells_absent_from_unusable(tmp_path):
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"source": {}}')
    with pytest.raises(InputError, match="no `files` list"):
        read_manifest(tmp_path)
