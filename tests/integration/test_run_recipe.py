"""`quantkit run` on the demo recipe (the stand-in, CPU): interrupted during quantize, re-run to completion
without redoing finished stages, then a folder that passes `quantkit verify --static` with its lock, report and
model card; broken recipes fail before any heavy work; the upload stage publishes through the Hub test double
and the release comes back through olah byte for byte.

The demo recipe is used as shipped except for its folders (moved into tmp_path) and `verify.vllm`, set to
`skip`: two vLLM engines on 2 CPU cores take minutes (tests/integration/test_standin_vllm.py covers vLLM).
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hub_server import LocalHub
from hub_upload_double import FAKE_HUB_TOKEN, HubUploadDouble
from typer.testing import CliRunner

from quantkit.api import download, run
from quantkit.card import front_matter
from quantkit.cli import app
from quantkit.errors import HubError, InputError
from quantkit.io.manifest import read_manifest
from quantkit.quantize import work_folder
from quantkit.recipe import LOCK_NAME

DEMO = Path(__file__).resolve().parents[2] / "recipes" / "demo-tiny.yaml"


def demo_recipe(folder: Path, **changes: str) -> Path:
    """The shipped demo recipe with its folders under `folder`, vLLM skipped, and textual `changes`."""
    text = DEMO.read_text().replace("../models/", "models/").replace("../releases/", "releases/")
    text = text.replace("vllm: if_installed", "vllm: skip")
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    path = folder / "demo.yaml"
    path.write_text(text)
    return path


@dataclass
class DemoRun:
    recipe: Path
    release: Path
    source: Path
    interrupted_state: dict
    first_lock_existed: bool
    resumed: object
    events: list[str]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The demo recipe, interrupted after quantize checkpointed layer 0 (an injected KeyboardInterrupt, as
    Ctrl-C would raise), then run again to completion."""
    folder = tmp_path_factory.mktemp("demo")
    recipe = demo_recipe(folder)
    release, source = folder / "releases" / "demo-tiny", folder / "models" / "minicpmv26-standin-tiny"

    def interrupt_after_layer_0(report, n_layers):
        if report.index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(recipe, on_layer_done=interrupt_after_layer_0)
    state = json.loads((work_folder(release) / "state.json").read_text())
    events: list[str] = []
    resumed = run(recipe, on_event=events.append)
    return DemoRun(recipe, release, source, state, (release / LOCK_NAME).exists(), resumed, events)


def test_interrupted_run_resumes_without_redoing_finished_stages(demo_run: DemoRun):
    assert demo_run.interrupted_state["completed_layers"] == 1
    statuses = {record.name: record.status for record in demo_run.resumed.stages}
    assert statuses == {"download": "skipped", "quantize": "ran", "verify": "ran", "card": "ran"}
    lock = json.loads((demo_run.release / LOCK_NAME).read_text())
    assert lock["stages"]["download"]["status"] == "skipped"
    assert lock["stages"]["quantize"]["resumed_from_layer"] == 1
    assert "resumed from layer 1" in lock["stages"]["quantize"]["reason"]
    assert any(line.startswith("download: skipped") for line in demo_run.events)
    assert not work_folder(demo_run.release).exists()


def test_finished_release_passes_static_verify_with_lock_report_and_card(demo_run: DemoRun):
    result = CliRunner().invoke(app, ["verify", str(demo_run.release), "--static"])
    assert result.exit_code == 0, result.output
    lock = json.loads((demo_run.release / LOCK_NAME).read_text())
    assert lock["recipe"]["name"] == "minicpm-v-2_6-standin-tiny-awq-int4"
    assert lock["recipe"]["text"] == demo_run.recipe.read_text()
    assert lock["resolved"]["source"]["standin"] == {"size": "tiny", "seed": 0}
    assert lock["seeds"] == {"calibration": 0, "standin": 0}
    assert lock["packages"]["torch"] and lock["packages"]["quantkit"]
    assert lock["machine"]["cpu_count"]
    manifest = read_manifest(demo_run.release)
    listed = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    assert {entry["path"]: entry["sha256"] for entry in lock["outputs"]["files"]}.items() <= listed.items()
    report = json.loads((demo_run.release / "verify-report.json").read_text())
    assert report["verdict"] == "PASS"
    assert report["settings"]["parity"] == "static checks only: the recipe sets verify.vllm: skip"
    card = (demo_run.release / "README.md").read_text()
    metadata = front_matter(demo_run.release / "README.md")
    assert metadata["pipeline_tag"] == "image-text-to-text" and "awq" in metadata["tags"]
    assert "base_model" not in metadata  # the stand-in is no Hub model
    assert "Not a real model" in card and "trust_remote_code=True" in card
    usage = card.split("```python", 1)[1].split("```", 1)[0]
    assert "LLM(model=" in usage and "quantization" not in usage  # vLLM reads quantization_config itself


def test_rerun_skips_every_stage_and_dry_run_says_so(demo_run: DemoRun):
    again = run(demo_run.recipe)
    assert {record.name: record.status for record in again.stages} == dict.fromkeys(
        ("download", "quantize", "verify", "card"), "skipped")
    plan = run(demo_run.recipe, dry_run=True).plan
    assert [(item.stage, item.action) for item in plan] == [
        ("download", "skip"), ("quantize", "skip"), ("verify", "skip"), ("card", "check"), ("upload", "not selected")]
    assert any("estimated peak GPU memory" in detail for detail in plan[1].details)


def test_card_and_lock_name_the_packages_that_made_the_files(demo_run: DemoRun, monkeypatch: pytest.MonkeyPatch):
    """Installs after the release was made (another transformers, autoawq) do not change its provenance: the
    re-run skips quantize, and the card and lock keep the versions the quantize run recorded."""
    made = {name: version for name, version in read_manifest(demo_run.release)["tools"].items() if version}
    assert made["transformers"]
    installed = importlib.metadata.version
    fake = {"transformers": "0.0.1-later", "autoawq": "0.2.9"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake.get(name) or installed(name))
    again = run(demo_run.recipe)
    assert {record.name: record.status for record in again.stages}["quantize"] == "skipped"
    lock = json.loads((demo_run.release / LOCK_NAME).read_text())
    assert lock["packages"] == made
    card = (demo_run.release / "README.md").read_text()
    assert f"transformers {made['transformers']}" in card
    assert "0.0.1-later" not in card and "autoawq" not in card.split("## Reproduce")[1]


def test_published_files_name_no_local_folder(demo_run: DemoRun):
    """Every file `upload` publishes (reports, lock, card, manifest...) names the run's folders by their names:
    the folder holding the recipe, models/ and releases/ appears in none of them."""
    local = str(demo_run.recipe.parent)
    published = [path for path in sorted(demo_run.release.rglob("*")) if path.is_file()]
    assert {"verify-report.md", "verify-report.json", LOCK_NAME, "README.md", "quantkit-manifest.json"} <= {
        path.name for path in published}
    for path in published:
        if path.suffix != ".safetensors":
            assert local not in path.read_text(encoding="utf-8"), path.name
    lock = json.loads((demo_run.release / LOCK_NAME).read_text())
    assert lock["recipe"]["path"] == "demo.yaml" and lock["outputs"]["folder"] == "demo-tiny"
    assert lock["resolved"]["source"]["folder"] == "minicpmv26-standin-tiny"
    assert "- int4 folder: `demo-tiny`" in (demo_run.release / "verify-report.md").read_text()


def test_changed_settings_refuse_to_overwrite_the_release(demo_run: DemoRun, tmp_path: Path):
    changed = demo_run.recipe.with_name("changed.yaml")
    changed.write_text(demo_run.recipe.read_text().replace("seed: 0\n\nquantization", "seed: 1\n\nquantization"))
    with pytest.raises(InputError, match=r"already holds a release made from other inputs \(calibration differs\)"):
        run(changed, dry_run=True)


def test_upload_stage_round_trip_through_the_double_and_olah(demo_run: DemoRun, upload_double: HubUploadDouble,
                                                            local_hub: LocalHub, tmp_path: Path):
    recipe = demo_run.recipe.with_name("with-upload.yaml")
    recipe.write_text(demo_run.recipe.read_text() + "\nupload:\n  repo: quantkit-tests/demo-run\n  private: true\n")
    result = run(recipe, from_stage="card", token=FAKE_HUB_TOKEN, endpoint=upload_double.url)
    record = {r.name: r for r in result.stages}["upload"]
    assert record.status == "ran"
    commit = record.details["commit"]
    posts = [r for r in upload_double.requests if r.method == "POST"]
    assert sum("/commit/" in r.path for r in posts) == 1  # one commit
    assert upload_double.log(commit, "quantkit-tests/demo-run").startswith(
        "quantkit release from recipe minicpm-v-2_6-standin-tiny-awq-int4 (sha256 ")

    back = download("quantkit-tests/demo-run", revision=commit, out_dir=tmp_path / "back",
                    endpoint=local_hub.url, cache_dir=tmp_path / "hf-cache")
    received = {entry["path"]: entry["sha256"] for entry in back.files}
    sent = {entry["path"]: entry["sha256"] for entry in json.loads(
        (demo_run.release / LOCK_NAME).read_text())["outputs"]["files"]}
    # the download rewrites the release's manifest: every section it shipped with, plus the download itself
    sent.pop("quantkit-manifest.json", None)
    assert {path: received[path] for path in sent} == sent
    assert "README.md" in received
    manifest = json.loads((back.folder / "quantkit-manifest.json").read_text())
    assert manifest["download"]["commit"] == commit and "quantization" in manifest


def test_broken_recipes_fail_before_any_heavy_work(tmp_path: Path):
    cases = {
        "typo": ({"  n_samples: 8": "  n_sample: 8"}, "calibration.n_sample: unknown key"),
        "type": ({"seq_len: 128": "seq_len: [128]"}, "calibration.seq_len: input should be a valid integer"),
        "calibration file": ({"source: builtin:pydoc": "source: data/missing.txt"},
                             "calibration file 'data/missing.txt' not found"),
        "device": ({"device: cpu": "device: gpu0"}, "quantization.device: string should match pattern"),
    }
    for name, (changes, expected) in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        result = CliRunner().invoke(app, ["run", str(demo_recipe(folder, **changes))])
        assert result.exit_code == 1, (name, result.output)
        assert expected in str(result.exception), (name, str(result.exception))
        assert not (folder / "models").exists() and not (folder / "releases").exists(), name


def test_bad_revision_and_unknown_repo_fail_fast_against_the_hub(local_hub: LocalHub, tmp_path: Path):
    standin = "  standin: {size: tiny, seed: 0}        # built here instead of downloaded"
    wrong_commit = demo_recipe(tmp_path, **{standin: f"  repo: {local_hub.tiny.repo_id}\n  revision: {'ab' * 20}"})
    with pytest.raises(HubError, match=r"demo.yaml:\d+ \(source.revision\): revision '(ab)+' not found in org/tiny"):
        run(wrong_commit, endpoint=local_hub.url)
    unknown = demo_recipe(tmp_path, **{standin: "  repo: org/no-such-model\n  revision: main"})
    with pytest.raises(HubError, match="repository 'org/no-such-model' not found"):
        run(unknown, endpoint=local_hub.url)
    assert not (tmp_path / "models").exists()


def test_lock_records_the_recipe_as_yaml(demo_run: DemoRun):
    """The lock's copy of the recipe is the file itself (comments included) plus its parsed form."""
    lock = json.loads((demo_run.release / LOCK_NAME).read_text())
    assert yaml.safe_load(lock["recipe"]["text"])["name"] == lock["recipe"]["content"]["name"]
