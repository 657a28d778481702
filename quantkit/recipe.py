"""Release recipes: one YAML file that says what `quantkit run` makes (source, calibration, settings, checks,
output, Hub target), validated before any heavy work, and the lock file that records what a run resolved.

A recipe is data with a schema: unknown keys and wrong types are refused with the key's dotted path and its line
in the file, so a typo never silently falls back to a default. Relative paths in a recipe are relative to the
recipe file's folder, so the same recipe makes the same release from any working directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import platform
import re
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic_core import PydanticCustomError

from quantkit.awq.settings import QuantSettings, default_method
from quantkit.calib import BUILTIN_PYDOC, TABLE_SUFFIXES, TEXT_SUFFIXES
from quantkit.errors import InputError
from quantkit.io.chores import read_json, write_text_atomically
from quantkit.io.manifest import hash_file
from quantkit.verify.kernels import DEFAULT_SPEED_TRIALS
from quantkit.verify.parity import ParityThresholds

LOCK_NAME = "quantkit-lock.json"
LOCK_SCHEMA_VERSION = 1
FULL_SHA = re.compile(r"[0-9a-f]{40}")
_PLACEHOLDER = re.compile(r"[<>]|\bFILL\b|\bTODO\b|\bXXX+\b|\.\.\.", re.IGNORECASE)
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def _check_revision(value: str | None) -> str | None:
    """Shared by every `revision` key: a placeholder left in a template is refused wherever it appears."""
    if value is None:
        return None
    if _PLACEHOLDER.search(value):
        raise PydanticCustomError(
            "placeholder", "is still the placeholder '{value}'; replace it with the full 40-character commit sha",
            {"value": value})
    if not _REVISION.fullmatch(value):
        raise PydanticCustomError(
            "revision", "'{value}' is not a branch, tag or commit sha", {"value": value})
    return value


class _Section(BaseModel):
    """Every recipe section: no unknown keys (a typo is an error, not a default), no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StandinSource(_Section):
    """The random-weight MiniCPM-V 2.6 stand-in (quantkit.standin), built instead of downloaded."""

    size: Literal["tiny", "real"] = "tiny"
    seed: int = 0


class SourceSection(_Section):
    """The 16-bit model: a Hub repo at a revision, or the stand-in. `folder` is where it is put (default: beside
    the release, `<output folder>-source`)."""

    repo: str | None = None
    revision: str | None = None
    standin: StandinSource | None = None
    folder: str | None = None

    _revision = field_validator("revision")(_check_revision)


class CalibrationSection(_Section):
    """Calibration data, as `quantkit quantize --calib` takes it, pinned by `revision` (a `datasets` id) or by
    `sha256` (a file; for a folder, the digest `quantkit.recipe.path_digest` computes)."""

    source: str = BUILTIN_PYDOC
    revision: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    split: str = "train"
    text_field: str = "text"
    n_samples: int = Field(default=128, gt=0)
    seq_len: int = Field(default=512, gt=0)
    seed: int = 0

    _revision = field_validator("revision")(_check_revision)


def _fields_of(dataclass_type: type) -> dict[str, Any]:
    """(type, default) of each field of a settings dataclass, so the recipe schema never drifts from it."""
    hints = get_type_hints(dataclass_type)
    return {f.name: (hints[f.name], f.default) for f in fields(dataclass_type)}


QuantizationSection = create_model(
    "QuantizationSection",
    __base__=_Section,
    __doc__="QuantSettings' fields (same names and defaults) plus the engine and the device it runs on.",
    backend=(Literal["native", "autoawq"], "native"),
    device=(str, Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")),
    **_fields_of(QuantSettings),
)

ThresholdsSection = create_model(
    "ThresholdsSection",
    __base__=_Section,
    __doc__="Overrides of the parity thresholds (quantkit.verify.parity.ParityThresholds); unset keys keep "
            "their defaults.",
    **_fields_of(ParityThresholds),
)


class VerifySection(_Section):
    """How the release is checked. `vllm`: `required` (parity through vLLM; the run fails without vLLM),
    `if_installed` (parity when vLLM is importable, otherwise the static checks alone, and the report, lock and
    card say so) or `skip` (static checks only)."""

    vllm: Literal["required", "if_installed", "skip"] = "required"
    prompts: str | None = None
    thresholds: ThresholdsSection = Field(default_factory=ThresholdsSection)  # type: ignore[valid-type]
    gpu_memory_gb: float | None = Field(default=None, gt=0)
    max_tokens: int = Field(default=64, gt=0)
    max_rel_error: float = Field(default=0.2, gt=0)
    speed_trials: int = Field(default=DEFAULT_SPEED_TRIALS, ge=0)
    """Engine starts for verify's vLLM setup trial after the parity runs (quantkit.verify.kernels)."""


class OutputSection(_Section):
    """The release folder. `force` lets a run replace a folder that holds a release of another recipe."""

    folder: str
    shard_size_gb: float = Field(default=4.0, gt=0)
    force: bool = False


class UploadSection(_Section):
    """Where `quantkit run` publishes the release (stage `upload`); the token comes from HF_TOKEN / the login."""

    repo: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    private: bool = False
    revision: str = "main"

    _revision = field_validator("revision")(_check_revision)


class Recipe(_Section):
    """A whole recipe. `release: true` holds it to the release rules: every input pinned by commit or hash and
    the parity check through vLLM required."""

    name: str = Field(pattern=r"^[\w.-]+$")
    description: str | None = None
    release: bool = False
    source: SourceSection
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)  # type: ignore[valid-type]
    verify: VerifySection = Field(default_factory=VerifySection)
    output: OutputSection
    upload: UploadSection | None = None

    def settings(self) -> QuantSettings:
        values = self.quantization.model_dump(exclude={"backend", "device"})
        if "method" not in self.quantization.model_fields_set:
            values["method"] = default_method(self.quantization.backend)
        return QuantSettings(**values)

    def thresholds(self) -> ParityThresholds:
        return ParityThresholds(**self.verify.thresholds.model_dump())


@dataclass(frozen=True)
class CalibrationRef:
    """What the calibration `source` string names once resolved: builtin text, a local path, or a dataset id."""

    kind: Literal["builtin", "path", "dataset"]
    value: str
    """`builtin:pydoc`, an absolute path, or the `datasets` id (ORG/NAME[:CONFIG])."""


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe with what the run needs around it: where it came from, its hash, resolved paths."""

    recipe: Recipe
    path: Path
    text: str
    sha256: str
    lines: dict[str, int]
    """Dotted key path -> line in the file, for messages about a value found wrong later (e.g. on the Hub)."""
    warnings: list[str] = field(default_factory=list)

    def where(self, dotted: str) -> str:
        """`recipe.yaml:12 (source.revision)`: how messages point at a value."""
        return f"{self.path}:{self._line(dotted)} ({dotted})"

    def _line(self, dotted: str) -> int:
        parts = dotted.split(".")
        while parts and ".".join(parts) not in self.lines:
            parts.pop()
        return self.lines.get(".".join(parts), 1)

    def resolve(self, value: str) -> Path:
        """A path from the recipe, relative to the recipe's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.path.parent / path).resolve()

    @property
    def output_folder(self) -> Path:
        return self.resolve(self.recipe.output.folder)

    @property
    def source_folder(self) -> Path:
        folder = self.recipe.source.folder
        return self.resolve(folder) if folder else self.output_folder.with_name(self.output_folder.name + "-source")

    def calibration(self) -> CalibrationRef:
        source = self.recipe.calibration.source
        if source == BUILTIN_PYDOC:
            return CalibrationRef("builtin", source)
        path = self.resolve(source)
        looks_like_path = source.startswith((".", "/", "~")) or Path(source).suffix in TEXT_SUFFIXES | TABLE_SUFFIXES
        if path.exists() or looks_like_path:
            return CalibrationRef("path", str(path))
        return CalibrationRef("dataset", source)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise InputError(f"{self.name}:{key_node.start_mark.line + 1}: key {key!r} appears twice "
                                 f"(first on line {seen[key]}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Dotted path -> line of each key in the composed YAML tree (list items use their index)."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = f"{prefix}.{index}" if prefix else str(index)
            lines[path] = item.start_mark.line + 1
            lines.update(_key_lines(item, path))
    return lines


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the section at `loc` accepts, for "did you mean" hints on an unknown key."""
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        candidates = [a for a in getattr(annotation, "__args__", (annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    given = error.get("input")
    shown = f" (got {type(given).__name__} {given!r})" if kind.endswith("_type") and given is not None else ""
    return f"{error['msg'][0].lower()}{error['msg'][1:]}{shown}"


def _schema_problems(err: ValidationError, lines: dict[str, int], path: Path) -> list[str]:
    problems = []
    for error in err.errors():
        loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-")))
        dotted = ".".join(str(part) for part in loc)
        parts = [str(part) for part in loc]
        while parts and ".".join(parts) not in lines:
            parts.pop()
        line = lines.get(".".join(parts), 1)
        message = _message(error)
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(Recipe, loc), n=1)
            message += f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?)" if close else \
                f"; {'.'.join(map(str, loc[:-1])) or 'the top level'} accepts: {', '.join(_known_keys(Recipe, loc))}"
        problems.append(f"{path}:{line}: {dotted}: {message}")
    return problems


def _rule_problems(loaded: LoadedRecipe) -> tuple[list[str], list[str]]:
    """Rules across keys (schema types are already checked): (errors, warnings), each naming key and line."""
    recipe, errors, warnings = loaded.recipe, [], []
    source, calibration = recipe.source, recipe.calibration
    if (source.repo is None) == (source.standin is None):
        errors.append(f"{loaded.where('source')}: give exactly one of `repo` (a Hub model) or `standin`")
    if source.standin is not None and source.revision is not None:
        errors.append(f"{loaded.where('source.revision')}: a stand-in has no revision; remove the key")
    if source.repo is not None:
        if source.revision is None:
            errors.append(f"{loaded.where('source')}: `revision` is missing; pin the commit sha the release is "
                          "made from (a branch is allowed outside release recipes)")
        elif not FULL_SHA.fullmatch(source.revision):
            what = f"source.revision {source.revision!r} is a branch, tag or short sha, not a full commit sha"
            if recipe.release:
                errors.append(f"{loaded.where('source.revision')}: {what}; a release recipe pins the full "
                              "40-character commit sha (e.g. from `quantkit download` or the model page's history)")
            else:
                warnings.append(f"{loaded.where('source.revision')}: {what}; the run resolves it now and the lock "
                                "file records the commit, but a re-run later may get another model")
    try:
        recipe.settings()
    except InputError as err:
        key = re.match(r"(\w+)=", str(err))
        errors.append(f"{loaded.where('quantization.' + key.group(1) if key else 'quantization')}: {err}")
    try:
        recipe.thresholds()
    except InputError as err:
        key = re.match(r"(\w+)=", str(err))
        errors.append(f"{loaded.where('verify.thresholds.' + key.group(1) if key else 'verify.thresholds')}: {err}")

    ref = loaded.calibration()
    if ref.kind == "path" and not Path(ref.value).exists():
        errors.append(f"{loaded.where('calibration.source')}: calibration file {calibration.source!r} not found "
                      f"(looked at {ref.value}; relative paths are relative to the recipe's folder)")
    elif ref.kind == "path" and calibration.sha256 is not None:
        digest = path_digest(Path(ref.value))
        if digest != calibration.sha256:
            errors.append(f"{loaded.where('calibration.sha256')}: {ref.value} has sha256 {digest}, the recipe pins "
                          f"{calibration.sha256}; the calibration data changed (or pin the new digest)")
    if ref.kind == "dataset" and calibration.sha256 is not None:
        errors.append(f"{loaded.where('calibration.sha256')}: `sha256` pins a local file or folder; a dataset id "
                      "is pinned with `revision`")
    if ref.kind != "dataset" and calibration.revision is not None:
        errors.append(f"{loaded.where('calibration.revision')}: `revision` pins a `datasets` id; "
                      f"{calibration.source!r} is {'built in' if ref.kind == 'builtin' else 'a local path'}")
    if recipe.release:
        if ref.kind == "dataset" and not (calibration.revision and FULL_SHA.fullmatch(calibration.revision)):
            errors.append(f"{loaded.where('calibration.revision' if calibration.revision else 'calibration')}: a "
                          "release recipe pins the calibration dataset to a full commit sha (`revision`)")
        if ref.kind == "path" and calibration.sha256 is None:
            errors.append(f"{loaded.where('calibration')}: a release recipe pins calibration files by `sha256` "
                          f"(this one: {path_digest(Path(ref.value)) if Path(ref.value).exists() else '?'})")
        if recipe.verify.vllm != "required":
            errors.append(f"{loaded.where('verify.vllm')}: a release is verified through vLLM; set `vllm: required`")
    elif recipe.upload is not None:
        warnings.append(f"{loaded.where('upload')}: this recipe is not marked `release: true`, so its inputs may "
                        "not be pinned; the upload will say so in the model card")
    if recipe.verify.prompts is not None and not loaded.resolve(recipe.verify.prompts).is_file():
        errors.append(f"{loaded.where('verify.prompts')}: prompt suite {recipe.verify.prompts!r} not found "
                      f"(looked at {loaded.resolve(recipe.verify.prompts)})")
    if loaded.output_folder == loaded.source_folder:
        errors.append(f"{loaded.where('output.folder')}: the release folder and the source folder are the same")
    return errors, warnings


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a recipe file (schema, then the rules across keys, then local files it names).

    Raises InputError listing every problem as `FILE:LINE: dotted.key: message`. Remote references (the Hub
    repo, a dataset revision) are checked by `quantkit.run` before any heavy work, not here.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"recipe {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        loader = _LineLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe is a YAML mapping of sections (source, calibration, quantization, "
                         "verify, output, upload)")
    lines = _key_lines(node) if node is not None else {}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = _schema_problems(err, lines, path)
        raise InputError(f"recipe {path} is invalid:\n  " + "\n  ".join(problems)) from None
    loaded = LoadedRecipe(recipe, path, text, hashlib.sha256(text.encode()).hexdigest(), lines)
    errors, warnings = _rule_problems(loaded)
    if errors:
        raise InputError(f"recipe {path} is invalid:\n  " + "\n  ".join(errors))
    loaded.warnings.extend(warnings)
    return loaded


def path_digest(path: Path) -> str:
    """sha256 of a calibration file; for a folder, sha256 over `<file sha256>  <relative path>` lines of every
    file in it (sorted), so images referenced by a jsonl are pinned too."""
    if path.is_file():
        return hash_file(path)
    lines = [f"{hash_file(p)}  {p.relative_to(path).as_posix()}\n" for p in sorted(path.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def machine() -> dict[str, Any]:
    """The hardware and platform a run used: GPU names and CUDA version when torch sees a GPU, else the CPU."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "gpus": gpus, "cuda": torch.version.cuda if gpus else None}


def write_lock(folder: Path, document: dict[str, Any]) -> Path:
    """Write `quantkit-lock.json` (temporary name, then rename) with the schema version and time stamp added."""
    lock = {"schema_version": LOCK_SCHEMA_VERSION, "written": datetime.now(UTC).isoformat(timespec="seconds"),
            **document}
    return write_text_atomically(folder / LOCK_NAME, json.dumps(lock, indent=2, default=str) + "\n")


def read_lock(folder: Path) -> dict[str, Any] | None:
    """The lock of a release folder, or None when it has none or it is unreadable (a re-run rewrites it)."""
    return read_json(folder / LOCK_NAME)
