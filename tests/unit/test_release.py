"""The save layer: an RTN release of the stand-in round-trips through verify, loads with transformers, splits
into shards, and is written atomically (never a half release, never a left-over temporary folder)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import quantkit.io.release as release_module
from quantkit.archs import MINICPMV26, spec_for_config
from quantkit.awq.rtn import rtn_layer_tensors
from quantkit.awq.settings import QuantSettings
from quantkit.errors import InputError
from quantkit.io.manifest import MANIFEST_NAME, read_manifest
from quantkit.io.release import release_tensor, write_release
from quantkit.io.shards import WEIGHT_INDEX
from quantkit.verify.static import verify_static

SETTINGS = QuantSettings()


@pytest.fixture(scope="module")
def layer_tensors(standin_dir: Path) -> dict[str, torch.Tensor]:
    return rtn_layer_tensors(standin_dir, MINICPMV26, SETTINGS)


def test_round_trip_passes_every_static_check_with_source(rtn_release: Path, standin_dir: Path):
    report = verify_static(rtn_release, source=standin_dir)
    assert report.ok, [(c.name, c.message) for c in report.failed()]
    assert not any(c.skipped for c in report.checks)
    assert 0.05 < report.summary["rel_error_max"] < 0.2  # int4 g128 RTN on Gaussian weights: ~0.1
    assert report.summary["size_ratio"] < 1
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


def test_release_loads_with_transformers_and_keeps_the_source_files(rtn_release: Path, standin_dir: Path):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(rtn_release, trust_remote_code=True)
    assert config.quantization_config == SETTINGS.quantization_config(("vpm", "resampler"))
    processor = AutoProcessor.from_pretrained(rtn_release, trust_remote_code=True)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 151646

    source_config = json.loads((standin_dir / "config.json").read_text())
    written = json.loads((rtn_release / "config.json").read_text())
    assert written == {**source_config, "quantization_config": written["quantization_config"],
                       "torch_dtype": "float16"}
    copied = [p.name for p in standin_dir.iterdir()
              if not p.name.endswith((".safetensors", ".index.json")) and p.name != "config.json"]
    assert {"tokenizer.json", "preprocessor_config.json", "modeling_minicpmv.py"} <= set(copied)
    for name in copied:
        assert (rtn_release / name).read_bytes() == (standin_dir / name).read_bytes(), name


def test_shards_split_at_max_shard_bytes_with_a_consistent_index(rtn_release: Path):
    shards = sorted(p.name for p in rtn_release.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((rtn_release / WEIGHT_INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "llm.model.layers.0.self_attn.q_proj.qweight" in index["weight_map"]
    assert not any(n.startswith("llm.model.layers.") and n.endswith("_proj.weight") for n in index["weight_map"])
    tensor_bytes = sum((rtn_release / s).stat().st_size for s in shards)
    assert 0 < tensor_bytes - index["metadata"]["total_size"] < 3 * 20_000  # only the headers on top


def test_size_check_says_how_much_of_the_model_stays_16_bit(rtn_release: Path, standin_dir: Path):
    """The tiny stand-in is mostly embeddings: its release is barely smaller than the source, and the size check
    says why, with the share counted here from the source's own tensors."""
    from quantkit.io.shards import ShardReader, weight_map

    numel = {}
    with ShardReader(standin_dir) as reader:
        for name in weight_map(standin_dir):
            shape, _ = reader.shape_dtype(name)
            numel[name] = math.prod(shape)
    decoder_linear = re.compile(r"llm\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
    linears = sum(n for name, n in numel.items() if decoder_linear.fullmatch(name))
    kept = 1 - linears / sum(numel.values())
    assert kept > 0.9
    check = next(c for c in verify_static(rtn_release, source=standin_dir).checks if c.name == "size")
    assert check.details["kept_16bit_share"] == pytest.approx(kept)
    assert (f"{kept:.1%} of the 16-bit model's bytes are in tensors that stay 16-bit (embeddings, lm_head, vision "
            f"tower, resampler, norms); only the quantized linears ({1 - kept:.1%}) shrink, ~4x") in check.message


def test_every_file_gets_the_mode_a_new_file_gets(rtn_release: Path, tmp_path: Path):
    """safetensors creates its files 0600: published shards would be unreadable to the other users of a shared
    machine while every file beside them is not."""
    (tmp_path / "new").write_text("")
    expected = (tmp_path / "new").stat().st_mode & 0o777
    modes = {p.name: p.stat().st_mode & 0o777 for p in rtn_release.iterdir()}
    assert {name for name in modes if name.endswith(".safetensors")} == {
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}
    assert modes == dict.fromkeys(modes, expected)


def test_manifest_records_source_settings_extra_tools_and_every_file(rtn_release: Path):
    manifest = read_manifest(rtn_release)
    assert manifest["quantization"]["backend"] == "rtn"  # manifest_extra merged into the section
    assert manifest["quantization"]["settings"]["group_size"] == 128
    assert manifest["quantization"]["quantized_layers"] == [0, 1]
    assert set(manifest["tools"]) == {"quantkit", "torch", "transformers", "safetensors"}
    listed = {entry["path"] for entry in manifest["files"]}
    on_disk = {p.name for p in rtn_release.iterdir()} - {MANIFEST_NAME}
    assert listed == on_disk


def test_existing_target_needs_force_and_is_replaced_only_when_complete(
    tmp_path: Path, standin_dir: Path, layer_tensors: dict[str, torch.Tensor]
):
    target = tmp_path / "release"
    target.mkdir()
    (target / "old.txt").write_text("previous release")
    with pytest.raises(InputError, match="already exists; pass --force"):
        write_release(standin_dir, target, layer_tensors, MINICPMV26, SETTINGS)
    assert (target / "old.txt").is_file()

    write_release(standin_dir, target, layer_tensors, MINICPMV26, SETTINGS, force=True)
    assert not (target / "old.txt").exists()
    assert (target / MANIFEST_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_interrupted_save_leaves_no_target_and_no_temporary_folder(
    tmp_path: Path, standin_dir: Path, layer_tensors: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
):
    real_save = release_module.save_file
    calls = []

    def dies_mid_shard(tensors: dict, path: str, metadata: dict) -> None:
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\0" * 1000)  # half a shard, then the process "dies"
            raise KeyboardInterrupt
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(release_module, "save_file", dies_mid_shard)
    with pytest.raises(KeyboardInterrupt):
        write_release(standin_dir, tmp_path / "release", layer_tensors, MINICPMV26, SETTINGS,
                      max_shard_bytes=64 * 2**20)
    assert Path(calls[1]).parent.name.startswith(".release.tmp-")
    assert list(tmp_path.iterdir()) == []

    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "keep.txt").write_text("still here")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        write_release(standin_dir, previous, layer_tensors, MINICPMV26, SETTINGS, force=True,
                      max_shard_bytes=64 * 2**20)
    assert [p.name for p in tmp_path.iterdir()] == ["previous"]
    assert [p.name for p in previous.iterdir()] == ["keep.txt"]


def test_incomplete_layer_tensors_are_refused(tmp_path: Path, standin_dir: Path,
                                              layer_tensors: dict[str, torch.Tensor]):
    partial = {k: v for k, v in layer_tensors.items() if k != "llm.model.layers.1.input_layernorm.weight"}
    with pytest.raises(InputError, match=r"layer 1 .*missing \['llm.model.layers.1.input_layernorm.weight'\]"):
        write_release(standin_dir, tmp_path / "release", partial, MINICPMV26, SETTINGS)
    with_weight = {**layer_tensors, "llm.model.layers.0.mlp.up_proj.weight": torch.zeros(512, 256)}
    with pytest.raises(InputError, match=r"unexpected \['llm.model.layers.0.mlp.up_proj.weight'\]"):
        write_release(standin_dir, tmp_path / "release", with_weight, MINICPMV26, SETTINGS)
    assert list(tmp_path.iterdir()) == []


def test_only_the_given_layers_are_replaced(tmp_path: Path, standin_dir: Path,
                                            layer_tensors: dict[str, torch.Tensor]):
    """A layer absent from layer_tensors is streamed from the source like any other 16-bit tensor."""
    only_first = {k: v for k, v in layer_tensors.items() if k.startswith("llm.model.layers.0.")}
    out = write_release(standin_dir, tmp_path / "release", only_first, MINICPMV26, SETTINGS)
    names = json.loads((out / WEIGHT_INDEX).read_text())["weight_map"]
    assert "llm.model.layers.0.mlp.down_proj.qweight" in names
    assert "llm.model.layers.1.mlp.down_proj.weight" in names
    assert read_manifest(out)["quantization"]["quantized_layers"] == [0]


def test_fp16_overflow_is_refused_and_integers_are_untouched():
    with pytest.raises(InputError, match=r"vpm.x: 1 value\(s\) up to 9.98\d*e\+04 overflow float16.*bfloat16"):
        release_tensor("vpm.x", torch.tensor([1.0, 1e5], dtype=torch.bfloat16), torch.float16)
    kept = release_tensor("vpm.y", torch.tensor([float("inf"), 2.0], dtype=torch.bfloat16), torch.float16)
    assert kept.dtype == torch.float16 and kept[0].isinf()  # already infinite in the source: not an overflow
    ids = torch.tensor([3, 4], dtype=torch.int64)
    assert release_tensor("ids", ids, torch.float16).dtype == torch.int64


def test_rtn_layer_tensors_pack_every_linear(layer_tensors: dict[str, torch.Tensor], standin_dir: Path):
    config = json.loads((standin_dir / "config.json").read_text())
    assert spec_for_config(config) is MINICPMV26
    q = layer_tensors["llm.model.layers.0.self_attn.k_proj.qweight"]
    assert q.dtype == torch.int32 and list(q.shape) == [256, 128 // 8]
    assert layer_tensors["llm.model.layers.0.self_attn.k_proj.scales"].dtype == torch.float16
    assert "llm.model.layers.0.self_attn.k_proj.bias" in layer_tensors
    assert not any(k.endswith("_proj.weight") for k in layer_tensors)
