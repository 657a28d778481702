"""`verify --static`: checks a release folder from its files alone, before any GPU or vLLM is involved.

Reads safetensors headers byte by byte (so a corrupt file is described, not crashed on), then tensors one at a
time through safetensors; never imports model code. Each check names the file and tensor it failed on.

Why the dequantization error compares functions rather than raw weights: AWQ divides a norm's weight (or a
preceding linear's output rows) by a per-channel s and multiplies the following linears' input columns by s,
so the float model is unchanged but each raw linear weight is not the source's. The check therefore compares
  * a linear fed by a norm through its function on the normalized input: dequant(W) * gamma_release (per input
    column) against W_src * gamma_src, which AWQ leaves invariant exactly;
  * a linear fed by another linear (up -> down, v -> o when shapes match) after a least-squares per-column
    factor c_j = <Wq_j, W_j> / <W_j, W_j> (the s that AWQ applied, recovered), and the prev linear of such a
    group after the per-row factor 1/s recovered the same way.
A fitted factor takes one degree of freedom per column out of `out` (thousands), so it cannot hide real
damage (a wrong nibble order, swapped zeros, a transposed weight): those stay near or above 1.0, while
round-to-nearest int4 with group 128 sits near 0.1 on Gaussian weights.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantkit.archs import ArchSpec, spec_for_config
from quantkit.awq.quant import dequantize_gemm
from quantkit.errors import InputError
from quantkit.io.manifest import MANIFEST_NAME, hash_file, read_manifest
from quantkit.io.release import QUANT_SUFFIXES, layer_index
from quantkit.io.shards import SAFETENSORS_DTYPES, WEIGHT_INDEX, ShardReader, weight_map

MAX_PROBLEMS = 100
CONFIG_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Check:
    """One verification outcome. `message` names the file and tensor of the first problem when it fails."""

    name: str
    ok: bool
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


@dataclass
class StaticReport:
    folder: str
    source: str | None
    checks: list[Check]
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def check(self, name: str) -> Check:
        return next(check for check in self.checks if check.name == name)

    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "source": self.source, "ok": self.ok, "summary": self.summary,
                "checks": [asdict(check) for check in self.checks]}


@dataclass(frozen=True)
class TensorEntry:
    """A tensor as a safetensors header describes it; offsets are relative to the data region."""

    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


def _outcome(name: str, problems: list[str], ok_message: str, details: dict[str, Any] | None = None) -> Check:
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Check(name, False, problems[0] + more, {"problems": problems[:MAX_PROBLEMS], **(details or {})})
    return Check(name, True, ok_message, details or {})


def _skipped(name: str, why: str) -> Check:
    return Check(name, True, f"skipped: {why}", skipped=True)


# --- safetensors headers ------------------------------------------------------------------------------------


def parse_shard(path: Path) -> tuple[dict[str, TensorEntry] | None, list[str]]:
    """A shard's tensors from its header (8-byte little-endian length + JSON), and every problem found:
    unreadable header, unknown dtype, byte length not matching shape, gaps or overlaps between tensors, a data
    region not exactly covered (truncated file or trailing bytes). Tensors are None when unusable."""
    shard = path.name
    size = path.stat().st_size
    if size < 8:
        return None, [f"{shard}: {size} bytes, too short for a safetensors header"]
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if 8 + length > size:
            return None, [f"{shard}: header length {length} runs past the end of the {size}-byte file"]
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, [f"{shard}: header is not valid JSON ({err})"]
    if not isinstance(header, dict):
        return None, [f"{shard}: header is a JSON {type(header).__name__}, not an object"]
    problems: list[str] = []
    entries: dict[str, TensorEntry] = {}
    usable = True  # False once an entry cannot be read safely (malformed, mis-sized, overlapping, past the end)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            valid = all(isinstance(v, int) and v >= 0 for v in (*shape, start, end))
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            problems.append(f"{shard}: {name}: malformed header entry {info!r}")
            usable = False
            continue
        if dtype not in SAFETENSORS_DTYPES:
            problems.append(f"{shard}: {name}: unknown dtype {dtype!r}")
            usable = False
            continue
        entry = TensorEntry(shard, dtype, shape, start, end)
        expected = math.prod(shape) * entry.torch_dtype.itemsize
        if end - start != expected:
            problems.append(f"{shard}: {name}: data_offsets [{start}, {end}] hold {end - start} bytes, "
                            f"but {dtype} {list(shape)} needs {expected}")
            usable = False
        entries[name] = entry
    data_size = size - 8 - length
    cursor, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start > cursor:
            problems.append(f"{shard}: {name}: gap of {entry.start - cursor} bytes before it (offset {entry.start})")
        elif entry.start < cursor:
            problems.append(f"{shard}: {name}: data_offsets [{entry.start}, {entry.end}] overlap {previous}")
            usable = False
        if entry.end > data_size:
            problems.append(f"{shard}: {name}: ends at data byte {entry.end} but the file's data region has "
                            f"{data_size} bytes (file truncated?)")
            usable = False
        cursor, previous = max(cursor, entry.end), name
    if cursor < data_size:
        problems.append(f"{shard}: {data_size - cursor} trailing bytes after the last tensor ({previous})")
    return (entries if usable else None), problems


def _read_index(folder: Path) -> tuple[dict[str, str] | None, dict[str, Any], list[str]]:
    """(weight_map, metadata, problems) of the index; duplicate names are problems (JSON would drop them)."""
    path = folder / WEIGHT_INDEX
    duplicates: list[str] = []

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        index = json.loads(path.read_text(), object_pairs_hook=no_duplicates)
        mapping = index["weight_map"]
        if not isinstance(mapping, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as err:
        return None, {}, [f"{WEIGHT_INDEX}: unreadable ({type(err).__name__}: {err})"]
    problems = [f"{WEIGHT_INDEX}: {name}: listed more than once" for name in duplicates]
    return mapping, index.get("metadata") or {}, problems


# --- what the architecture expects ---------------------------------------------------------------------------


def linear_shapes(llm: dict[str, Any], spec: ArchSpec) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each quantized linear of a decoder layer, from the LLM config."""
    shapes = spec.linear_shapes(llm)
    missing = [linear for linear in spec.linears if linear not in shapes]
    if missing:
        raise InputError(f"{spec.name}'s spec gives no shape for its linears {missing}")
    return {linear: shapes[linear] for linear in spec.linears}


@dataclass
class _Release:
    """What the checks share: the folder, its parsed config and spec, and the catalog of tensors."""

    folder: Path
    config: dict[str, Any]
    spec: ArchSpec
    llm: dict[str, Any]
    n_layers: int
    tensors: dict[str, TensorEntry]
    dtype: torch.dtype | None

    def quantized_linears(self) -> list[tuple[int, str]]:
        return [(i, linear) for i in range(self.n_layers) for linear in self.spec.linears]

    def linear_name(self, index: int, linear: str) -> str:
        return f"{self.spec.layer_prefix(index)}.{linear}"

    def where(self, name: str) -> str:
        return self.tensors[name].shard if name in self.tensors else WEIGHT_INDEX


def _expected_names(release: _Release, source_names: list[str] | None) -> set[str]:
    spec = release.spec
    linear_weights = {f"{linear}.weight": linear for linear in spec.linears}
    expected: set[str] = set()
    if source_names is not None:
        for name in source_names:
            index = layer_index(name, spec)
            relative = name[len(spec.layer_prefix(index)) + 1:] if index is not None else None
            if relative in linear_weights:
                expected.update(f"{name.removesuffix('.weight')}.{suffix}" for suffix in QUANT_SUFFIXES)
            else:
                expected.add(name)
        return expected
    biased = spec.biased_linears(release.llm)
    norms = [group.prev for group in spec.scaling_groups if group.prev not in spec.linears]
    for i in range(release.n_layers):
        for linear in spec.linears:
            expected.update(f"{release.linear_name(i, linear)}.{s}" for s in QUANT_SUFFIXES)
            if linear in biased:
                expected.add(f"{release.linear_name(i, linear)}.bias")
        expected.update(f"{spec.layer_prefix(i)}.{norm}.weight" for norm in norms)
    expected.update(name for name in release.tensors if layer_index(name, spec) is None)
    return expected


# --- the checks ------------------------------------------------------------------------------------------------


def check_expected(release: _Release, source_names: list[str] | None) -> Check:
    expected = _expected_names(release, source_names)
    found = set(release.tensors)
    problems = [f"{WEIGHT_INDEX}: {name}: expected but no shard holds it" for name in sorted(expected - found)]
    problems += [f"{release.tensors[name].shard}: {name}: stray tensor (not part of the quantized "
                 f"{release.spec.name} layout)" for name in sorted(found - expected)]
    tied = bool(release.llm.get("tie_word_embeddings", release.config.get("tie_word_embeddings")))
    for prefix in release.spec.keep_16bit:
        if tied and prefix == release.spec.output_head:
            continue  # tied embeddings (SmolLM2): the head is the input embedding; no head tensor is stored
        if not any(name == prefix or name.startswith(prefix + ".") for name in found):
            problems.append(f"{WEIGHT_INDEX}: {prefix}.*: no tensor of this 16-bit module is present")
    basis = "the source's names" if source_names is not None else "config.json and the arch spec"
    return _outcome("expected_tensors", problems, f"{len(found)} tensors, exactly those expected from {basis}")


def check_layout(release: _Release) -> Check:
    group_size = (release.config.get("quantization_config") or {}).get("group_size")
    if not isinstance(group_size, int) or group_size <= 0:
        return Check("quantized_layout", False, f"config.json: quantization_config.group_size is {group_size!r}")
    shapes = linear_shapes(release.llm, release.spec)
    problems = []
    for i, linear in release.quantized_linears():
        fan_in, fan_out = shapes[linear]
        name = release.linear_name(i, linear)
        if fan_in % group_size or fan_out % 8:
            problems.append(f"config.json: {name}: [{fan_in} -> {fan_out}] does not fit group {group_size} / 8 "
                            "outputs per int32")
            continue
        wanted = {
            "qweight": ("I32", (fan_in, fan_out // 8)),
            "qzeros": ("I32", (fan_in // group_size, fan_out // 8)),
            "scales": ("F16", (fan_in // group_size, fan_out)),
        }
        if f"{name}.bias" in release.tensors and release.dtype is not None:
            wanted["bias"] = (_safetensors_dtype(release.dtype), (fan_out,))
        for suffix, (dtype, shape) in wanted.items():
            entry = release.tensors.get(f"{name}.{suffix}")
            if entry is None:
                continue  # reported by expected_tensors
            if entry.dtype != dtype:
                problems.append(f"{entry.shard}: {name}.{suffix}: dtype {entry.dtype}, expected {dtype}")
            if entry.shape != shape:
                problems.append(f"{entry.shard}: {name}.{suffix}: shape {list(entry.shape)}, expected {list(shape)} "
                                f"(in {fan_in}, out {fan_out}, group {group_size})")
    return _outcome("quantized_layout", problems,
                    f"{release.n_layers} x {len(release.spec.linears)} linears: qweight/qzeros int32, scales fp16, "
                    f"shapes match config (group {group_size})")


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return next(key for key, value in SAFETENSORS_DTYPES.items() if value == dtype)


def check_dtypes(release: _Release) -> Check:
    """Every float tensor other than AWQ scales is in the release dtype that config.json declares."""
    declared = release.config.get("torch_dtype", release.config.get("dtype"))
    if release.dtype is None:
        return Check("dtypes", False, f"config.json: torch_dtype {declared!r} is not float16/bfloat16/float32")
    wanted = _safetensors_dtype(release.dtype)
    problems = [
        f"{entry.shard}: {name}: dtype {entry.dtype}, but config.json declares {declared}"
        for name, entry in sorted(release.tensors.items())
        if entry.torch_dtype.is_floating_point and not name.endswith(".scales") and entry.dtype != wanted
    ]
    return _outcome("dtypes", problems, f"16-bit tensors are {declared} as config.json declares")


def _count_non_finite(tensor: torch.Tensor) -> int:
    """NaN/Inf count. Any such value makes the sum non-finite, so the (3x slower on CPU) elementwise count
    runs only when the float32 sum is not finite (which a sound bf16 tensor of huge values can also cause)."""
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def check_values(release: _Release, reader: ShardReader) -> list[Check]:
    """No NaN/Inf in any float tensor; every AWQ scale finite and > 0 (a zero scale collapses a group)."""
    non_finite, bad_scales = [], []
    for name, entry in sorted(release.tensors.items(), key=lambda item: (item[1].shard, item[1].start)):
        if not entry.torch_dtype.is_floating_point:
            continue
        tensor = reader.get(name)
        bad = _count_non_finite(tensor)
        if bad:
            non_finite.append(f"{entry.shard}: {name}: {bad} NaN/Inf value(s)")
        if name.endswith(".scales") and not bool((tensor > 0).all()):
            bad_scales.append(f"{entry.shard}: {name}: {int((~(tensor > 0)).sum())} scale(s) not finite and > 0 "
                              f"(min {tensor.float().nan_to_num(nan=-1.0).min().item():.3g})")
    return [_outcome("finite", non_finite, "no NaN/Inf in any floating-point tensor"),
            _outcome("scales_positive", bad_scales, "every AWQ scale is finite and > 0")]


def check_quantization_config(release: _Release) -> list[Check]:
    qc = release.config.get("quantization_config")
    if not isinstance(qc, dict):
        failed = Check("quantization_config", False, "config.json: no quantization_config object")
        return [failed, Check("modules_to_not_convert", False, "config.json: no quantization_config object")]
    wanted = {"quant_method": "awq", "bits": 4, "zero_point": True, "version": "gemm"}
    problems = [f"config.json: quantization_config.{key} is {qc.get(key)!r}, expected {value!r}"
                for key, value in wanted.items()
                if (str(qc.get(key)).lower() if key in ("quant_method", "version") else qc.get(key)) != value]
    if not isinstance(qc.get("group_size"), int) or qc["group_size"] <= 0:
        problems.append(f"config.json: quantization_config.group_size is {qc.get('group_size')!r}")
    coherent = _outcome("quantization_config", problems,
                        f"awq, {qc.get('bits')} bits, group {qc.get('group_size')}, zero point, gemm")

    skip = qc.get("modules_to_not_convert")
    spec = release.spec
    if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
        problems = [(f"config.json: quantization_config.modules_to_not_convert is {skip!r}; vLLM would "
                     f"quantize {', '.join(spec.modules_to_not_convert) or 'nothing'} too (needs e.g. "
                     f"{list(spec.modules_to_not_convert)})")]
    else:
        # vLLM skips a module when an entry is a substring of its prefix.
        problems = [f"config.json: quantization_config.modules_to_not_convert {skip} does not cover {prefix!r}"
                    for prefix in spec.modules_to_not_convert if not any(m and m in prefix for m in skip)]
        problems += [f"config.json: quantization_config.modules_to_not_convert entry {m!r} would also skip the "
                     f"quantized {release.linear_name(0, linear)}"
                     for m in skip for linear in spec.linears if m in release.linear_name(0, linear)]
    covers = _outcome("modules_to_not_convert", problems, f"{skip} keeps the vision modules 16-bit in vLLM")
    return [coherent, covers]


def check_manifest(folder: Path) -> Check:
    try:
        manifest = read_manifest(folder)
    except InputError as err:
        return Check("manifest", False, f"{MANIFEST_NAME}: {err}")
    if manifest is None:
        return Check("manifest", False, f"{MANIFEST_NAME}: missing; a quantkit release records every file's sha256")
    problems, listed = [], set()
    for entry in manifest["files"]:
        path = folder / entry.get("path", "")
        listed.add(entry.get("path"))
        if not path.is_file():
            problems.append(f"{entry.get('path')}: listed in {MANIFEST_NAME} but missing")
        elif path.stat().st_size != entry.get("size"):
            problems.append(f"{entry['path']}: {path.stat().st_size} bytes, {MANIFEST_NAME} says {entry.get('size')}")
        elif hash_file(path) != entry.get("sha256"):
            problems.append(f"{entry['path']}: sha256 differs from {MANIFEST_NAME}")
    unlisted = sorted(p.name for p in folder.iterdir()
                      if p.is_file() and p.name not in listed and p.name != MANIFEST_NAME
                      and not p.name.startswith("."))
    problems += [f"{name}: weights/config not listed in {MANIFEST_NAME}" for name in unlisted
                 if name.endswith(".safetensors") or name in (WEIGHT_INDEX, "config.json")]
    return _outcome("manifest", problems, f"{len(listed)} files present with matching sha256",
                    {"unlisted_files": unlisted})


def check_source_identical(release: _Release, reader: ShardReader, source: ShardReader) -> Check:
    """16-bit tensors outside the quantized layers, and the quantized linears' biases, are bit-identical to
    the source's cast to the release dtype (the save layer must not touch them beyond the cast)."""
    biases = {f"{release.linear_name(i, linear)}.bias" for i, linear in release.quantized_linears()}
    problems, compared = [], 0
    for name, entry in sorted(release.tensors.items()):
        if (layer_index(name, release.spec) is not None and name not in biases) or name not in source.mapping:
            continue
        mine, theirs = reader.get(name), source.get(name)
        if theirs.is_floating_point():
            theirs = theirs.to(mine.dtype)
        compared += 1
        if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
            problems.append(f"{entry.shard}: {name}: {mine.dtype} {list(mine.shape)} vs the source's "
                            f"{theirs.dtype} {list(theirs.shape)}")
        elif not torch.equal(mine.reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8)):
            differ = (mine != theirs).sum().item()
            problems.append(f"{entry.shard}: {name}: {differ} of {mine.numel()} values differ from the source cast "
                            f"to {str(mine.dtype).removeprefix('torch.')}")
    return _outcome("source_identical", problems,
                    f"{compared} 16-bit tensors ({release.spec.card.kept_16bit_parts}, biases) bit-identical "
                    "to the source")


def _function_pair(release: _Release, reader: ShardReader, source: ShardReader, index: int,
                   linear: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight, source weight) of one linear in a form AWQ's scaling leaves comparable: see the
    module docstring. Both float32 [out, in]."""
    spec, prefix = release.spec, release.spec.layer_prefix(index)
    name = release.linear_name(index, linear)
    approx = dequantize_gemm(*(reader.get(f"{name}.{s}") for s in QUANT_SUFFIXES))
    exact = source.get(f"{name}.weight").float()
    for group in spec.scaling_groups:
        prev = f"{prefix}.{group.prev}"
        if group.prev not in spec.linears and linear in group.linears:  # a norm feeds this linear
            approx = approx * reader.get(f"{prev}.weight").float()
            exact = exact * source.get(f"{prev}.weight").float()
        elif group.prev in spec.linears and group.applies(lambda lin: source.shape_dtype(f"{prefix}.{lin}.weight")[0]):
            if linear in group.linears:  # input columns scaled by s
                exact = exact * _least_squares_factor(approx, exact, dim=0)
            elif linear == group.prev:  # output rows scaled by 1/s
                exact = exact * _least_squares_factor(approx, exact, dim=1)
    return approx, exact


def _least_squares_factor(approx: torch.Tensor, exact: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-column (dim=0) or per-row (dim=1) c minimising ||approx - c * exact||, shaped to broadcast."""
    c = (approx * exact).sum(dim) / (exact * exact).sum(dim).clamp_min(1e-30)
    return c.unsqueeze(dim)


def check_dequant_error(release: _Release, reader: ShardReader, source: ShardReader,
                        max_rel_error: float) -> Check:
    errors: dict[str, float] = {}
    for i, linear in release.quantized_linears():
        name = release.linear_name(i, linear)
        if any(f"{name}.{s}" not in release.tensors for s in QUANT_SUFFIXES) or f"{name}.weight" not in source.mapping:
            continue  # reported by expected_tensors
        approx, exact = _function_pair(release, reader, source, i, linear)
        if approx.shape != exact.shape:
            errors[name] = math.inf
            continue
        errors[name] = ((approx - exact).norm() / exact.norm().clamp_min(1e-30)).item()
    worst = max(errors, key=lambda n: errors[n]) if errors else None
    summary = {"rel_error_max": errors[worst] if worst else None,
               "rel_error_mean": sum(errors.values()) / len(errors) if errors else None,
               "rel_error_worst": worst, "max_rel_error": max_rel_error}
    problems = [f"{release.where(name + '.qweight')}: {name}: relative error {err:.3g} > {max_rel_error}"
                for name, err in sorted(errors.items(), key=lambda item: -item[1]) if not err <= max_rel_error]
    ok_message = (f"{len(errors)} linears, relative error max {summary['rel_error_max']:.3g} "
                  f"({worst}), mean {summary['rel_error_mean']:.3g} <= {max_rel_error}") if errors else \
        "no quantized linear to compare"
    return _outcome("dequant_error", problems, ok_message, {**summary, "per_linear": errors})


def size_reason(kept_share: float, kept_parts: str) -> str:
    """Why the release is the size it is: only the quantized linears shrink (~4x), the rest (`kept_parts`, the
    spec's wording) stays 16-bit."""
    return (f"{kept_share:.1%} of the 16-bit model's bytes are in tensors that stay 16-bit ({kept_parts}); "
            f"only the quantized linears ({1 - kept_share:.1%}) shrink, ~4x")


def check_size(release: _Release, shard_files: list[Path], source_folder: Path | None) -> Check:
    """The release must be smaller than the 16-bit model (vs the source's shards, or vs the size implied by
    the shapes: a quantized linear counts in * out * 2 bytes)."""
    release_bytes = sum(p.stat().st_size for p in shard_files if p.is_file())
    implied = quantized = 0
    for name, entry in release.tensors.items():
        if name.endswith(".qweight"):
            quantized += entry.shape[0] * entry.shape[1] * 8 * 2
            implied += entry.shape[0] * entry.shape[1] * 8 * 2
        elif name.endswith((".qzeros", ".scales")):
            continue
        else:
            implied += math.prod(entry.shape) * (2 if entry.torch_dtype.is_floating_point else entry.torch_dtype.itemsize)
    if source_folder is not None:
        reference = sum((source_folder / shard).stat().st_size for shard in set(weight_map(source_folder).values()))
        basis = "source shards"
    else:
        reference, basis = implied, "16-bit size implied by shapes"
    ratio = release_bytes / reference if reference else math.inf
    kept = 1 - quantized / implied if implied else 0.0
    summary = {"release_bytes": release_bytes, "reference_bytes": reference, "size_basis": basis,
               "size_ratio": ratio, "implied_16bit_bytes": implied, "kept_16bit_share": kept,
               "kept_16bit_parts": release.spec.card.kept_16bit_parts}
    message = (f"{release_bytes / 2**20:.1f} MiB = {ratio:.3f} x the {basis} ({reference / 2**20:.1f} MiB); "
               f"{size_reason(kept, release.spec.card.kept_16bit_parts)}")
    return Check("size", ratio < 1, message if ratio < 1 else f"release did not shrink: {message}", summary)


# --- driver ----------------------------------------------------------------------------------------------------


def _guarded(names: tuple[str, ...], run: Callable[[], Check | list[Check]]) -> list[Check]:
    """Run a tensor-reading check; an unexpected error on corrupt data becomes a failed check, not a crash."""
    try:
        outcome = run()
    except Exception as err:  # noqa: BLE001 - reported as the checks' failure with its type and message
        return [Check(name, False, f"could not complete: {type(err).__name__}: {err}") for name in names]
    return outcome if isinstance(outcome, list) else [outcome]


def verify_static(folder: str | Path, source: str | Path | None = None, max_rel_error: float = 0.2) -> StaticReport:
    """Check the release folder `folder` from its files (see the module docstring); `source` is the 16-bit
    folder it was made from, enabling the bit-identity and dequantization-error checks."""
    root = Path(folder)
    source_root = Path(source) if source is not None else None
    if not root.is_dir():
        raise InputError(f"release folder {root} does not exist.")
    if source_root is not None and not (source_root / "config.json").is_file():
        raise InputError(f"--source {source_root} is not a model folder (no config.json).")
    tensors, shard_names, checks = _check_files(root)
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as err:
        checks.append(Check("config", False, f"config.json: unreadable ({err})"))
        return StaticReport(str(root), str(source_root) if source_root else None, checks, {"ok": False})
    spec = spec_for_config(config, source=str(root / "config.json"))
    llm = spec.text_config(config)
    release = _Release(root, config, spec, llm, int(llm.get(spec.num_layers_key, 0)), tensors,
                       CONFIG_DTYPES.get(str(config.get("torch_dtype", config.get("dtype")))))

    with ShardReader(root, {name: entry.shard for name, entry in tensors.items()}) as reader:
        source_reader = ShardReader(source_root) if source_root is not None else None
        source_names = list(source_reader.mapping) if source_reader else None
        checks += _guarded(("expected_tensors",), lambda: check_expected(release, source_names))
        checks += _guarded(("quantized_layout",), lambda: check_layout(release))
        checks.append(check_dtypes(release))
        checks += _guarded(("finite", "scales_positive"), lambda: check_values(release, reader))
        checks += check_quantization_config(release)
        if source_reader is None:
            checks += [_skipped("source_identical", "no --source"), _skipped("dequant_error", "no --source")]
        else:
            with source_reader:
                checks += _guarded(("source_identical",),
                                   lambda: check_source_identical(release, reader, source_reader))
                checks += _guarded(("dequant_error",),
                                   lambda: check_dequant_error(release, reader, source_reader, max_rel_error))
    checks.append(check_manifest(root))
    checks += _guarded(("size",), lambda: check_size(release, [root / s for s in shard_names], source_root))

    summary: dict[str, Any] = {"ok": all(c.ok for c in checks), "passed": sum(c.ok and not c.skipped for c in checks),
                               "failed": sum(not c.ok for c in checks), "skipped": sum(c.skipped for c in checks)}
    for check in checks:
        if check.name in ("size", "dequant_error"):
            summary.update({k: v for k, v in check.details.items() if k not in ("per_linear", "problems")})
    return StaticReport(str(root), str(source_root) if source_root else None, checks, summary)


def _check_files(root: Path) -> tuple[dict[str, TensorEntry], list[str], list[Check]]:
    """The safetensors_headers and index checks, and the catalog of readable tensors they leave (name ->
    entry, from the shards whose headers are sound) with the shard file names considered."""
    index_path = root / WEIGHT_INDEX
    on_disk = sorted(p.name for p in root.glob("*.safetensors"))
    index_problems: list[str] = []
    if index_path.is_file():
        mapping, index_meta, index_problems = _read_index(root)
        shard_names = sorted(set((mapping or {}).values()) | set(on_disk))
    else:
        mapping, index_meta, shard_names = None, {}, on_disk
        if len(on_disk) != 1:
            index_problems.append(f"{WEIGHT_INDEX}: missing, and {len(on_disk)} *.safetensors files are present")

    tensors: dict[str, TensorEntry] = {}
    header_problems: list[str] = []
    held: dict[str, set[str]] = {}
    for shard in shard_names:
        if not (root / shard).is_file():
            continue
        entries, problems = parse_shard(root / shard)
        lost = sorted(n for n, s in (mapping or {}).items() if s == shard) if entries is None else []
        if lost:  # the header cannot be trusted: name what is lost, from the index
            problems[0] += f"; {len(lost)} tensor(s) unreadable, e.g. {lost[0]}"
        header_problems += problems
        if entries is not None:
            held[shard] = set(entries)
            for name, entry in entries.items():
                if name in tensors:
                    index_problems.append(f"{shard}: {name}: also held by {tensors[name].shard}")
                tensors.setdefault(name, entry)

    if mapping is not None:
        for shard in sorted(set(mapping.values())):
            if not (root / shard).is_file():
                names = sorted(n for n, s in mapping.items() if s == shard)
                index_problems.append(f"{shard}: missing, but {WEIGHT_INDEX} maps {len(names)} tensor(s) to it "
                                      f"({names[0]}{', …' if len(names) > 1 else ''})")
        for shard, names in sorted(held.items()):
            listed = {n for n, s in mapping.items() if s == shard}
            index_problems += [f"{shard}: {n}: held by the shard but {WEIGHT_INDEX} does not map it here"
                               for n in sorted(names - listed)]
            index_problems += [f"{shard}: {n}: {WEIGHT_INDEX} maps it here but the shard does not hold it"
                               for n in sorted(listed - names)]
        index_problems += [f"{shard}: not referenced by {WEIGHT_INDEX}" for shard in on_disk
                           if shard not in set(mapping.values())]
        total = index_meta.get("total_size")
        actual = sum(e.end - e.start for e in tensors.values())
        if total is not None and total != actual and not index_problems and not header_problems:
            index_problems.append(f"{WEIGHT_INDEX}: metadata.total_size {total} but the tensors hold {actual} bytes")
    return tensors, shard_names, [
        _outcome("safetensors_headers", header_problems,
                 f"{len(held)} shard(s): headers parse, offsets tile the data exactly"),
        _outcome("index", index_problems,
                 f"{len(tensors)} tensors, each named once, in {len(held)} shard(s) as the index says"),
    ]
