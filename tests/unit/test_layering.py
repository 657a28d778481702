"""The package's imports point one way: each module imports only from its own layer or the layers below it.

Read from the source with `ast` (nothing is imported), so an import inside a function or a TYPE_CHECKING
block counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "quantkit"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("quantkit", "quantkit.errors", "quantkit.torchvision_cpu"),  # the version, the errors users see; an import hook
    ("quantkit.archs",),  # model knowledge as data
    ("quantkit.io", "quantkit.standin", "quantkit.standin_qwen2_5_vl", "quantkit.standin_code"),  # checkpoint files; the stand-in checkpoint
    ("quantkit.awq", "quantkit.calib", "quantkit.hub"),  # the engines (pure torch), calibration sets, downloads
    ("quantkit.quantize", "quantkit.ranks", "quantkit.verify"),  # a quantize run around the engines (on one or
    # several processes); checking a release
    ("quantkit.evaluate", "quantkit.recipe"),
    ("quantkit.card",),
    ("quantkit.upload",),
    ("quantkit.run",),
    ("quantkit.api",),  # the public surface
    ("quantkit.cli", "quantkit.__main__"),  # parses, calls api, prints
    ("quantkit.testing",),  # for tests and scripts only: nothing in the package imports it
)
"""Lowest first. `quantkit` alone is the package's __init__; every other entry covers its submodules too."""

CLI_MAY_IMPORT = {"quantkit.api", "quantkit.errors"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    matches = [(len(entry), index) for index, entries in enumerate(LAYERS) for entry in entries
               if module == entry or (entry != "quantkit" and module.startswith(entry + "."))]
    assert matches, f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return max(matches)[1]


def quantkit_imports(module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import of a quantkit module in `module`'s file."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.split(".")[0] == "quantkit"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "quantkit":
            for alias in node.names:  # `from quantkit import api` imports the module quantkit.api
                submodule = f"{node.module}.{alias.name}"
                found.append((node.lineno, submodule, []) if submodule in MODULES
                             else (node.lineno, node.module, [alias.name]))
    return found


def test_every_module_is_read_and_placed():
    assert len(MODULES) > 40 and "quantkit.awq.engine" in MODULES and "quantkit.cli" in MODULES
    for module in MODULES:
        layer_of(module)


def test_imports_never_run_up_the_layers():
    upward = [
        f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {imported} "
        f"(layer {layer_of(imported)} above {module}'s {layer_of(module)})"
        for module in MODULES
        for line, imported, _ in quantkit_imports(module)
        if layer_of(imported) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_the_cli_goes_through_the_api():
    imported = {name for _, name, _ in quantkit_imports("quantkit.cli")}
    assert imported <= CLI_MAY_IMPORT, f"quantkit/cli.py imports {sorted(imported - CLI_MAY_IMPORT)}"


def test_no_private_name_crosses_modules():
    crossing = [
        f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {name} from {imported}"
        for module in MODULES
        for line, imported, names in quantkit_imports(module)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not crossing, "\n".join(crossing)


def test_the_checker_sees_an_upward_import():
    """The rule itself: io (layer 2) importing awq (layer 3) is refused, awq importing io is not."""
    assert layer_of("quantkit.awq.settings") > layer_of("quantkit.io.release")
    assert layer_of("quantkit.io.shards") < layer_of("quantkit.awq.rtn")
    assert layer_of("quantkit.testing.smollm2") > layer_of("quantkit.run")
