"""The `quantkit` command line: parses options, calls quantkit.api, prints. No logic of its own."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from quantkit.errors import QuantkitError

app = typer.Typer(
    name="quantkit",
    help=(
        "Turn a vision-language model (MiniCPM-V 2.6 first) into a verified int4 AWQ release that vLLM "
        "loads as is.\n\nExample: quantkit run recipes/demo-tiny.yaml"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def main() -> None:
    try:
        app()
    except QuantkitError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(1)


# Commands are registered below this line, one section per command.
