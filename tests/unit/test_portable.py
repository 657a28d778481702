"""Local folders in published files: named by their names, whole path components only."""

from __future__ import annotations

from pathlib import Path

from quantkit.io.portable import portable


def test_folders_become_their_names_in_nested_values(tmp_path: Path):
    release, source = tmp_path / "releases" / "demo", tmp_path / "models" / "src"
    value = {"folder": str(release), "reasons": [f"{release}/config.json: bad", f"reference {source} failed"],
             "sibling": f"{release}-2/x", "inside": f"/elsewhere{release}", "count": 3}
    assert portable(value, [release, source]) == {
        "folder": "demo", "reasons": ["demo/config.json: bad", "reference src failed"],
        "sibling": f"{release}-2/x", "inside": f"/elsewhere{release}", "count": 3}


def test_relative_and_resolved_forms_and_home(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = f"wrote {tmp_path / 'out'}/a.json; cache {tmp_path / 'home'}/.cache/hf; given out"
    assert portable(text, ["out", None]) == "wrote out/a.json; cache ~/.cache/hf; given out"
