"""Recipe schema and rules: every broken recipe is refused with the key's dotted path and its line, before any
heavy work; the shipped recipes load (the real one only once its placeholder is filled)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from quantkit.errors import InputError
from quantkit.recipe import Recipe, load_recipe, path_digest
from quantkit.run import estimate_quantize_memory, selected_stages

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHA = "0123456789abcdef0123456789abcdef01234567"

BASE = """\
name: test
source:
  standin: {size: tiny, seed: 0}
calibration:
  source: builtin:pydoc
  n_samples: 8
  seq_len: 128
verify:
  vllm: skip
output:
  folder: out/release
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(InputError) as caught:
        load_recipe(path)
    return str(caught.value)


def line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_demo_recipe_loads_with_paths_relative_to_the_recipe():
    loaded = load_recipe(RECIPES / "demo-tiny.yaml")
    assert loaded.recipe.source.standin is not None and loaded.warnings == []
    assert loaded.output_folder == (RECIPES / ".." / "releases" / "demo-tiny").resolve()
    assert loaded.calibration().kind == "builtin"
    assert loaded.recipe.settings().group_size == 128


def test_real_recipe_loads_pinned_and_a_placeholder_in_it_is_refused_with_the_line(tmp_path: Path):
    path = RECIPES / "minicpm-v-2_6-awq-int4.yaml"
    loaded = load_recipe(path)
    assert loaded.recipe.release and loaded.recipe.source.revision == "3f7a8da1b7a8b928b5ee229fae33cf43fd64cf31"
    assert loaded.recipe.calibration.revision == "2f5e46ae6a69cf0dce4b12f78241c408936ca0e4"
    assert loaded.calibration().kind == "dataset" and loaded.recipe.upload is not None
    assert loaded.recipe.verify.speed_trials == 3 and loaded.warnings == []
    unfilled = write(tmp_path, path.read_text().replace("2f5e46ae6a69cf0dce4b12f78241c408936ca0e4",
                                                        "<commit sha of mit-han-lab/pile-val-backup>"))
    assert (f"{unfilled}:{line_of(unfilled, 'revision: <')}: calibration.revision: is still the placeholder"
            in refusal(unfilled))


def test_qwen2_5_vl_recipe_loads_pinned():
    loaded = load_recipe(RECIPES / "qwen2.5-vl-7b-awq-int4.yaml")
    assert loaded.recipe.release and loaded.warnings == []
    assert loaded.recipe.source.repo == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert loaded.recipe.source.revision == "cc594898137f460bfe9f0759e9844b3ce807cfb5"
    assert loaded.calibration().kind == "dataset" and loaded.recipe.quantization.backend == "native"


def test_typo_key_is_refused_with_its_line_and_a_suggestion(tmp_path: Path):
    path = write(tmp_path, BASE.replace("  n_samples: 8", "  n_sample: 8"))
    message = refusal(path)
    assert f"{path}:{line_of(path, 'n_sample:')}: calibration.n_sample: unknown key (did you mean " \
           "calibration.n_samples?)" in message


def test_unknown_top_level_section_lists_the_accepted_ones(tmp_path: Path):
    path = write(tmp_path, BASE + "extras: {a: 1}\n")
    message = refusal(path)
    assert f"{path}:{line_of(path, 'extras')}: extras: unknown key" in message and "calibration" in message


def test_wrong_types_are_refused_not_coerced(tmp_path: Path):
    path = write(tmp_path, BASE.replace("seq_len: 128", 'seq_len: "128"').replace("vllm: skip", "vllm: maybe"))
    message = refusal(path)
    assert f"{path}:{line_of(path, 'seq_len')}: calibration.seq_len: input should be a valid integer " \
           "(got str '128')" in message
    assert f"{path}:{line_of(path, 'vllm')}: verify.vllm: input should be 'required', 'if_installed' or " \
           "'skip'" in message


def test_out_of_range_and_settings_errors_name_their_key(tmp_path: Path):
    path = write(tmp_path, BASE.replace("n_samples: 8", "n_samples: 0") + "quantization:\n  group_size: 100\n")
    message = refusal(path)
    assert f"{path}:{line_of(path, 'n_samples')}: calibration.n_samples: input should be greater than 0" in message
    path = write(tmp_path, BASE + "quantization:\n  group_size: 100\n")
    assert f"{path}:{line_of(path, 'group_size')} (quantization.group_size): group_size=100" in refusal(path)


def test_quantization_method_and_its_settings(tmp_path: Path):
    path = write(tmp_path, BASE + "quantization:\n  method: awq-gptq\n  gptq_damp: 0.05\n")
    settings = load_recipe(path).recipe.settings()
    assert (settings.method, settings.gptq_damp, settings.gptq_block_size) == ("awq-gptq", 0.05, 128)
    path = write(tmp_path, BASE + "quantization:\n  method: gptq\n")
    assert "quantization.method: input should be 'awq' or 'awq-gptq'" in refusal(path)
    path = write(tmp_path, BASE + "quantization:\n  method: awq-gptq\n  gptq_damp: 0\n")
    assert "gptq_damp=0" in refusal(path)


@pytest.mark.parametrize("quantization, method", [
    ("", "awq-gptq"),  # the default
    ("quantization:\n  backend: autoawq\n", "awq"),  # the only method AutoAWQ runs
    ("quantization:\n  backend: native\n  method: awq\n", "awq"),
])
def test_default_method_follows_the_backend(tmp_path: Path, quantization: str, method: str):
    assert load_recipe(write(tmp_path, BASE + quantization)).recipe.settings().method == method


def test_api_config_default_method_follows_the_backend():
    from quantkit.api import QuantizeConfig, QuantSettings
    from quantkit.awq.autoawq_backend import check_settings

    assert QuantizeConfig().settings.method == "awq-gptq"
    assert QuantizeConfig(backend="autoawq").settings.method == "awq"
    assert QuantizeConfig(backend="autoawq", settings=QuantSettings(group_size=64)).settings.method == "awq-gptq"
    with pytest.raises(InputError, match="Set method awq"):
        check_settings(QuantSettings())


def test_duplicate_keys_are_refused(tmp_path: Path):
    path = write(tmp_path, BASE + "calibration:\n  seed: 1\n")
    assert re.search(r"recipe.yaml:12: key 'calibration' appears twice \(first on line 4\)", refusal(path))


@pytest.mark.parametrize(("revision", "expected"), [
    ("main", "a release recipe pins the full 40-character commit sha"),
    ("<fill in the sha>", "source.revision: is still the placeholder"),
    ("TODO", "source.revision: is still the placeholder"),
    ("not a revision!", "source.revision: 'not a revision!' is not a branch, tag or commit sha"),
])
def test_release_revisions_must_be_full_commit_shas(tmp_path: Path, revision: str, expected: str):
    text = BASE.replace("  standin: {size: tiny, seed: 0}", f"  repo: org/model\n  revision: '{revision}'")
    path = write(tmp_path, "release: true\n" + text.replace("vllm: skip", "vllm: required"))
    message = refusal(path)
    assert expected in message and f":{line_of(path, 'revision:')}" in message


def test_a_branch_is_a_warning_outside_release_recipes(tmp_path: Path):
    path = write(tmp_path, BASE.replace("  standin: {size: tiny, seed: 0}", "  repo: org/model\n  revision: main"))
    loaded = load_recipe(path)
    assert len(loaded.warnings) == 1 and "not a full commit sha" in loaded.warnings[0]


def test_release_recipes_require_vllm_and_pinned_calibration(tmp_path: Path):
    (tmp_path / "calib.txt").write_text("some calibration text\n")
    text = BASE.replace("  standin: {size: tiny, seed: 0}", f"  repo: org/model\n  revision: {SHA}")
    path = write(tmp_path, "release: true\n" + text.replace("source: builtin:pydoc", "source: calib.txt"))
    message = refusal(path)
    assert "verify.vllm): a release is verified through vLLM" in message
    assert f"a release recipe pins calibration files by `sha256` (this one: {path_digest(tmp_path / 'calib.txt')})" \
        in message


def test_missing_calibration_file_and_changed_hash(tmp_path: Path):
    path = write(tmp_path, BASE.replace("source: builtin:pydoc", "source: data/calib.jsonl"))
    message = refusal(path)
    assert f"{path}:{line_of(path, 'data/calib')} (calibration.source): calibration file 'data/calib.jsonl' " \
           f"not found (looked at {tmp_path / 'data' / 'calib.jsonl'}" in message
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "calib.jsonl").write_text('{"text": "hello"}\n')
    path = write(tmp_path, BASE.replace("source: builtin:pydoc", f"source: data/calib.jsonl\n  sha256: {'a' * 64}"))
    assert "(calibration.sha256): " in refusal(path) and "the calibration data changed" in refusal(path)
    path = write(tmp_path, BASE.replace("source: builtin:pydoc",
                                        f"source: data\n  sha256: {path_digest(tmp_path / 'data')}"))
    assert load_recipe(path).calibration().kind == "path"


def test_source_needs_exactly_one_of_repo_and_standin(tmp_path: Path):
    path = write(tmp_path, BASE.replace("  standin: {size: tiny, seed: 0}", "  folder: x"))
    assert "(source): give exactly one of `repo` (a Hub model) or `standin`" in refusal(path)


def test_stage_selection():
    assert selected_stages(None, None, has_upload=False) == ["download", "quantize", "verify", "card"]
    assert selected_stages("verify", None, has_upload=True) == ["verify", "card", "upload"]
    for args, message in ((("quantise", None), "--from 'quantise'"), (("card", "quantize"), "comes after"),
                          ((None, "upload"), "no upload section")):
        with pytest.raises(InputError, match=message):
            selected_stages(*args, has_upload=False)


def test_memory_estimate_meets_the_measured_peak_at_real_shapes():
    """docs/benchmarks.md: 9.4 GiB peak on an H100 for MiniCPM-V 2.6's LLM, 128 x 512 tokens."""
    from quantkit.testing.standin import REAL, real_config

    estimate = estimate_quantize_memory(real_config(REAL), 128, 512, 16384)
    assert estimate["peak"] / 2**30 == pytest.approx(9.4, rel=0.05)
    assert estimate_quantize_memory(real_config(REAL), 32, 512, 16384)["peak"] < estimate["peak"]


def test_schema_mirrors_quant_settings():
    """The quantization section is generated from QuantSettings, so a new setting is a recipe key at once."""
    from dataclasses import fields

    from quantkit.awq.settings import QuantSettings

    section = Recipe.model_fields["quantization"].annotation
    assert {f.name for f in fields(QuantSettings)} | {"backend", "device"} == set(section.model_fields)
