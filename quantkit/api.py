"""The public Python API: one function per CLI command, same parameters. The CLI is a thin layer over this."""

from __future__ import annotations
