"""Local paths in the files a release publishes (verify report, lock, eval report, manifest, card): a folder is
named by its name, never by its absolute path, which means nothing on the Hub and shows the maker's machine
(user names, where the clone lives)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _pattern(paths: Iterable[str | Path | None]) -> tuple[re.Pattern[str], dict[str, str]] | None:
    names: dict[str, str] = {}
    for given in paths:
        if given is None or not str(given).strip():
            continue
        path = Path(given).expanduser()
        name = path.resolve().name
        for form in (str(path), str(path.resolve())):
            if os.path.isabs(form) and name:
                names.setdefault(form.rstrip("/"), name)
    home = str(Path.home())
    if home not in ("", "/"):
        names.setdefault(home, "~")
    if not names:
        return None
    # longest first, so a folder inside another is named by its own name; a match must start and end where a
    # path component does (`/x/demo` is in neither `/x/demo-2` nor `/y/x/demo`)
    alternatives = "|".join(re.escape(form) for form in sorted(names, key=len, reverse=True))
    return re.compile(f"(?<![\\w.~-])(?:{alternatives})(?![\\w.-])"), names


def portable(value: Any, paths: Iterable[str | Path | None]) -> Any:
    """`value` (a string, or lists and dicts of them) with each of `paths`, as given and resolved, replaced by
    its last component, and the home folder by `~`; anything else is returned as it is."""
    compiled = _pattern(paths)
    if compiled is None:
        return value
    pattern, names = compiled

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return pattern.sub(lambda match: names[match.group(0)], item)
        if isinstance(item, dict):
            return {key: walk(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(entry) for entry in item]
        return item

    return walk(value)
