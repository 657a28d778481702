"""eval's token blocks: without a count, the first DEFAULT_BLOCKS (fewer for a shorter text); a count must fit.
The saved report, published with a release, names local folders and files by their names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.errors import InputError
from quantkit.evaluate import DEFAULT_BLOCKS, EvalReport, token_blocks


def words(text: str, **kwargs) -> dict[str, list[int]]:
    """A tokenizer stand-in: one token per word, its position."""
    return {"input_ids": list(range(len(text.split())))}


def test_default_count_and_a_shorter_text():
    assert DEFAULT_BLOCKS == 4
    long_text = ["w " * 100 * 10]  # 10 blocks of 100
    assert token_blocks(long_text, words, 100, None, "long").shape == (4, 100)
    assert token_blocks(["w " * 100 * 3], words, 100, None, "short").shape == (3, 100)
    assert token_blocks(long_text, words, 100, 10, "long").shape == (10, 100)
    with pytest.raises(InputError, match="holds 10 blocks of 100 tokens; ask for 1 to 10"):
        token_blocks(long_text, words, 100, 11, "long")


def test_help_states_the_default():
    output = " ".join(CliRunner().invoke(app, ["eval", "--help"]).output.split())
    assert f"(default: {DEFAULT_BLOCKS}, fewer if the text is shorter" in output


def test_saved_report_names_folders_and_files_by_their_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "releases" / "demo").mkdir(parents=True)
    report = EvalReport(model="releases/demo", reference=str(tmp_path / "models" / "src"),
                        text_source=str(tmp_path / "held-out.txt"), seq_len=8, n_blocks=2, perplexity=3.0)
    saved = report.save("releases/demo")
    data = json.loads(saved.read_text())
    assert (data["model"], data["reference"], data["text_source"]) == ("demo", "src", "held-out.txt")
    assert str(tmp_path) not in saved.read_text()
