"""`verify --static`: a sound release passes; each kind of damage fails its own check, and the failing check
names the file and the tensor (or config key) involved."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantkit.archs import MINICPMV26
from quantkit.awq.quant import pack_gemm, quantize
from quantkit.awq.settings import QuantSettings
from quantkit.cli import app
from quantkit.io.manifest import MANIFEST_NAME
from quantkit.io.release import write_release
from quantkit.io.shards import WEIGHT_INDEX, ShardReader, weight_map
from quantkit.verify.static import verify_static

LAYER0 = "llm.model.layers.0"
VISION = "vpm.encoder.layers.0.mlp.fc1.weight"


def linked_copy(release: Path, dest: Path) -> Path:
    """A copy of the shared release that costs no disk: files are hard links, so call `own` before editing."""
    return Path(shutil.copytree(release, dest, copy_function=os.link))


def own(path: Path) -> Path:
    """Replace a hard link by a private copy, so editing it leaves the shared release untouched."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / json.loads((folder / WEIGHT_INDEX).read_text())["weight_map"][tensor]


def read_header(path: Path) -> tuple[dict, int]:
    """(header JSON, absolute offset of the data region)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length)), 8 + length


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, start = read_header(path)
    data = path.read_bytes()[start:]
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.unlink()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def overwrite_tensor_bytes(folder: Path, tensor: str, edit: Callable[[bytearray], None]) -> Path:
    path = own(shard_of(folder, tensor))
    header, start = read_header(path)
    begin, end = header[tensor]["data_offsets"]
    data = bytearray(path.read_bytes())
    region = data[start + begin:start + end]
    edit(region)
    data[start + begin:start + end] = region
    path.write_bytes(bytes(data))
    return path


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    document = json.loads(own(path).read_text())
    edit(document)
    path.write_text(json.dumps(document, indent=2))


# --- each corruption: (damage the copy, return (file, tensor) the message must name) --------------------------


def truncated_shard(folder: Path) -> tuple[str, str]:
    path = own(folder / "model-00003-of-00003.safetensors")
    header, _ = read_header(path)
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 64)
    return path.name, last


def header_garbage(folder: Path) -> tuple[str, str]:
    path = own(folder / "model-00003-of-00003.safetensors")
    with open(path, "r+b") as handle:
        handle.seek(8)
        handle.write(b"garbage!")
    names = sorted(n for n, s in json.loads((folder / WEIGHT_INDEX).read_text())["weight_map"].items()
                   if s == path.name)
    return path.name, names[0]


def overlapping_offsets(folder: Path) -> tuple[str, str]:
    path = shard_of(folder, f"{LAYER0}.mlp.up_proj.qweight")
    victim = f"{LAYER0}.mlp.up_proj.qweight"

    def shift_back(header: dict) -> None:
        header[victim]["data_offsets"] = [o - 4 for o in header[victim]["data_offsets"]]

    own(path)
    rewrite_header(path, shift_back)
    return path.name, victim


def missing_from_index(folder: Path) -> tuple[str, str]:
    name = f"{LAYER0}.mlp.gate_proj.scales"
    shard = shard_of(folder, name).name
    edit_json(folder / WEIGHT_INDEX, lambda index: index["weight_map"].pop(name))
    return shard, name


def index_names_missing_shard(folder: Path) -> tuple[str, str]:
    name = f"{LAYER0}.self_attn.o_proj.qzeros"

    def repoint(index: dict) -> None:
        index["weight_map"][name] = "model-00004-of-00004.safetensors"

    edit_json(folder / WEIGHT_INDEX, repoint)
    return "model-00004-of-00004.safetensors", name


def wrong_dtype(folder: Path) -> tuple[str, str]:
    name = "llm.model.layers.1.mlp.down_proj.qweight"
    path = own(shard_of(folder, name))
    rewrite_header(path, lambda header: header[name].update(dtype="F32"))  # same bytes, wrong type
    return path.name, name


def wrong_shape(folder: Path) -> tuple[str, str]:
    name = f"{LAYER0}.self_attn.q_proj.scales"  # [256 / 128, 256] = [2, 256]
    path = own(shard_of(folder, name))
    rewrite_header(path, lambda header: header[name].update(shape=[4, 128]))
    return path.name, name


def nan_in_scales(folder: Path) -> tuple[str, str]:
    name = f"{LAYER0}.self_attn.o_proj.scales"

    def nan_first(region: bytearray) -> None:
        region[0:2] = struct.pack("<H", 0x7E00)  # fp16 quiet NaN

    return overwrite_tensor_bytes(folder, name, nan_first).name, name


def vision_bit_flip(folder: Path) -> tuple[str, str]:
    def flip(region: bytearray) -> None:
        region[0] ^= 0x01

    return overwrite_tensor_bytes(folder, VISION, flip).name, VISION


def manifest_mismatch(folder: Path) -> tuple[str, str]:
    path = own(folder / "resampler.py")
    source = path.read_bytes()
    path.write_bytes(source.replace(b"import", b"imp0rt", 1))  # same size, different content
    return "resampler.py", MANIFEST_NAME


def no_modules_to_not_convert(folder: Path) -> tuple[str, str]:
    edit_json(folder / "config.json", lambda c: c["quantization_config"].pop("modules_to_not_convert"))
    return "config.json", "modules_to_not_convert"


def null_modules_to_not_convert(folder: Path) -> tuple[str, str]:
    edit_json(folder / "config.json", lambda c: c["quantization_config"].update(modules_to_not_convert=None))
    return "config.json", "modules_to_not_convert is None"


def resampler_not_skipped(folder: Path) -> tuple[str, str]:
    edit_json(folder / "config.json", lambda c: c["quantization_config"].update(modules_to_not_convert=["vpm"]))
    return "config.json", "does not cover 'resampler'"


CORRUPTIONS = [
    (truncated_shard, "safetensors_headers", False),
    (header_garbage, "safetensors_headers", False),
    (overlapping_offsets, "safetensors_headers", False),
    (missing_from_index, "index", False),
    (index_names_missing_shard, "index", False),
    (wrong_dtype, "quantized_layout", False),
    (wrong_shape, "quantized_layout", False),
    (nan_in_scales, "scales_positive", False),
    (no_modules_to_not_convert, "modules_to_not_convert", False),
    (null_modules_to_not_convert, "modules_to_not_convert", False),
    (resampler_not_skipped, "modules_to_not_convert", False),
    (vision_bit_flip, "source_identical", True),
    (manifest_mismatch, "manifest", False),
]


@pytest.mark.parametrize(("corrupt", "check", "with_source"), CORRUPTIONS, ids=[c[0].__name__ for c in CORRUPTIONS])
def test_each_corruption_fails_its_check_naming_file_and_tensor(
    corrupt: Callable[[Path], tuple[str, str]], check: str, with_source: bool,
    rtn_release: Path, standin_dir: Path, tmp_path: Path,
):
    folder = linked_copy(rtn_release, tmp_path / "release")
    file, tensor = corrupt(folder)
    report = verify_static(folder, source=standin_dir if with_source else None)
    failed = report.check(check)
    assert not failed.ok, failed
    assert file in failed.message and tensor in failed.message, failed.message
    assert not report.ok and report.summary["failed"] >= 1




def test_sound_release_passes_without_source(rtn_release: Path):
    """Also proves the corruption tests above damaged private copies only."""
    report = verify_static(rtn_release)
    assert report.ok, [(c.name, c.message) for c in report.failed()]
    assert {c.name for c in report.checks if c.skipped} == {"source_identical", "dequant_error"}
    assert report.summary["size_basis"] == "16-bit size implied by shapes"


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_need_no_lm_head_tensor(tied: bool):
    """SmolLM2-style checkpoints tie lm_head to embed_tokens and store no lm_head tensor: only an untied
    model misses it."""
    from quantkit.archs import LLAMA
    from quantkit.verify.static import TensorEntry, _Release, check_expected

    config = {"model_type": "llama", "tie_word_embeddings": tied}
    entry = TensorEntry("model.safetensors", "F16", (8, 8), 0, 128)
    release = _Release(Path("release"), config, LLAMA, config, 0,
                       {"model.embed_tokens.weight": entry, "model.norm.weight": entry}, torch.float16)
    check = check_expected(release, None)
    assert check.ok is tied, check.message
    if not tied:
        assert "lm_head.*: no tensor of this 16-bit module is present" in check.message


def test_wrongly_packed_weight_fails_dequant_error(rtn_release: Path, standin_dir: Path, tmp_path: Path):
    folder = linked_copy(rtn_release, tmp_path / "release")
    name = f"{LAYER0}.mlp.gate_proj.qweight"  # int32 [256, 64]: reverse the input rows

    def reverse_rows(region: bytearray) -> None:
        rows = [region[i:i + 64 * 4] for i in range(0, len(region), 64 * 4)]
        region[:] = b"".join(reversed(rows))

    overwrite_tensor_bytes(folder, name, reverse_rows)
    check = verify_static(folder, source=standin_dir).check("dequant_error")
    assert not check.ok
    assert f"{LAYER0}.mlp.gate_proj: relative error" in check.message
    assert "model-0000" in check.message


def awq_scaled_layers(source: Path, settings: QuantSettings, seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """RTN layer tensors after an AWQ-style rescaling (norm / s with q,k,v or gate,up columns * s; up rows / s
    with down columns * s): the same float function, different raw weights. Also returns the naive relative
    error of layer 0's scaled down_proj against its source weight: what a raw comparison would report."""
    gen = torch.Generator().manual_seed(seed)
    mapping = weight_map(source)
    out: dict[str, torch.Tensor] = {}
    with ShardReader(source, mapping) as reader:
        for index in range(2):
            prefix = f"llm.model.layers.{index}."
            t = {n[len(prefix):]: reader.get(n).float() for n in mapping if n.startswith(prefix)}
            s_attn, s_mlp, s_down = (torch.exp(torch.empty(n).uniform_(-0.7, 0.7, generator=gen))
                                     for n in (256, 256, 512))
            t["input_layernorm.weight"] /= s_attn
            for linear in ("q_proj", "k_proj", "v_proj"):
                t[f"self_attn.{linear}.weight"] *= s_attn
            t["post_attention_layernorm.weight"] /= s_mlp
            t["mlp.gate_proj.weight"] *= s_mlp
            t["mlp.up_proj.weight"] *= s_mlp
            t["mlp.up_proj.weight"] /= s_down.view(-1, 1)
            t["mlp.down_proj.weight"] *= s_down
            if index == 0:
                original = reader.get(f"{prefix}mlp.down_proj.weight").float()
                naive = ((t["mlp.down_proj.weight"] - original).norm() / original.norm()).item()
            for name, tensor in t.items():
                if name.removesuffix(".weight") in MINICPMV26.linears:
                    packed = pack_gemm(quantize(tensor, settings.bits, settings.group_size))
                    out.update({f"{prefix}{name.removesuffix('weight')}{k}": v for k, v in packed.items()})
                else:
                    out[prefix + name] = tensor
    return out, naive


def test_dequant_error_sees_through_awq_scaling(standin_dir: Path, tmp_path: Path):
    settings = QuantSettings()
    layers, naive = awq_scaled_layers(standin_dir, settings, seed=0)
    assert naive > 0.3  # raw weights moved far from the source's although the function did not
    out = write_release(standin_dir, tmp_path / "scaled", layers, MINICPMV26, settings)
    report = verify_static(out, source=standin_dir)
    check = report.check("dequant_error")
    assert check.ok, check.message
    assert report.summary["rel_error_max"] < 0.2


def test_cli_exit_codes_table_and_json(rtn_release: Path, tmp_path: Path):
    runner = CliRunner()
    passed = runner.invoke(app, ["verify", str(rtn_release), "--static"])
    assert passed.exit_code == 0, passed.output
    assert "✓" in passed.output and "modules_to_not_convert" in passed.output and "size:" in passed.output

    folder = linked_copy(rtn_release, tmp_path / "release")
    no_modules_to_not_convert(folder)
    failed = runner.invoke(app, ["verify", str(folder), "--static", "--json"])
    assert failed.exit_code == 1
    document = json.loads(failed.output)
    assert document["ok"] is False
    assert {c["name"] for c in document["static"]["checks"] if not c["ok"]} == {"modules_to_not_convert", "manifest"}
