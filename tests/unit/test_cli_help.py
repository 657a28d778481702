"""`quantkit COMMAND --help` shows every option's help text whole: no markup eaten, no type tag on flags, the
docstrings' paragraphs re-wrapped instead of broken where the source lines end."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from quantkit.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def _words(text: str) -> str:
    return " ".join(text.split())


def test_every_command_is_covered():
    assert COMMANDS == ["download", "eval", "quantize", "run", "upload", "verify"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_parameter_help_is_shown_whole_without_type_tags_on_flags(command: str):
    output = _help(command)
    click_command = typer.main.get_command(app).commands[command]
    helps = [param.help for param in click_command.params if getattr(param, "help", None)]
    assert helps
    for text in helps:
        assert _words(text) in _words(output), text
    assert "<bool>" not in output


def test_bracketed_text_survives():
    assert "needs pip install 'quantkit[autoawq]')." in _words(_help("quantize"))
    assert "ORG/NAME[:CONFIG]" in _words(_help("eval"))


def test_docstring_paragraphs_are_rewrapped():
    """The `run` docstring breaks its source line after "so re-running after"; on a wide terminal the help must
    not break there."""
    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    assert any("so re-running after a failure resumes" in line for line in result.output.splitlines())
