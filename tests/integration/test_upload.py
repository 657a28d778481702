"""`quantkit upload` against the Hub write-API TEST DOUBLE (tests/hub_upload_double.py) on 127.0.0.1, with olah
serving what was uploaded: round trip byte for byte, --dry-run sends nothing, an unverified or corrupted
release is refused, a missing or bad token is a clear error, and the token never shows up anywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import LocalHub
from hub_upload_double import FAKE_HUB_TOKEN, HubUploadDouble

from quantkit.api import download, upload, verify, verify_static
from quantkit.card import front_matter, write_card
from quantkit.errors import VerifyError
from quantkit.io.manifest import MANIFEST_NAME, listed_files, record_files


@pytest.fixture(scope="module")
def verified_release(awq_release: Path, standin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's AWQ release with a passing (static) verify report. Shared: copy to modify."""
    folder = tmp_path_factory.mktemp("verified") / "minicpmv26-tiny-awq"
    shutil.copytree(awq_release, folder)
    assert verify(folder, reference=standin_dir, static_only=True).passed
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def cli(args: list[str], tmp_path: Path, endpoint: str, token: str | None) -> subprocess.CompletedProcess[str]:
    """`python -m quantkit ARGS` as a user runs it, with a fresh HF_HOME (no stored login) and HF_TOKEN or none."""
    env = {key: value for key, value in os.environ.items() if key != "HF_TOKEN"}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_DEBUG": "1", **({"HF_TOKEN": token} if token else {})}
    return subprocess.run([sys.executable, "-m", "quantkit", *args], env=env, capture_output=True, text=True, check=False,
                          timeout=300)


def files_containing(folder: Path, needle: str) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and needle.encode() in path.read_bytes()]


def test_round_trip_one_commit_with_card_and_identical_files(verified_release: Path, upload_double: HubUploadDouble,
                                                             local_hub: LocalHub, tmp_path: Path):
    folder = copy_of(verified_release, tmp_path)
    result = upload(folder, "quantkit-tests/round-trip", private=True, token=FAKE_HUB_TOKEN,
                    endpoint=upload_double.url)
    commits = [r for r in upload_double.requests if r.method == "POST" and "/commit/" in r.path]
    assert len(commits) == 1 and upload_double.private["quantkit-tests/round-trip"] is True
    assert result.commit_message.startswith("quantkit release of minicpmv26-tiny-awq")
    assert upload_double.log(result.commit_oid, "quantkit-tests/round-trip").startswith(result.commit_message)

    metadata = front_matter(folder / "README.md")
    assert metadata["library_name"] == "transformers"  # base_model: tests/unit/test_card.py (a Hub source)
    assert metadata["pipeline_tag"] == "image-text-to-text" and {"awq", "int4"} <= set(metadata["tags"])
    assert 'LLM(model="quantkit-tests/round-trip", trust_remote_code=True' in (folder / "README.md").read_text()

    back = download("quantkit-tests/round-trip", revision=result.commit_oid, out_dir=tmp_path / "back",
                    endpoint=local_hub.url, cache_dir=tmp_path / "hf-cache")
    received = {entry["path"]: entry["sha256"] for entry in back.files}
    sent = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    assert {entry["path"]: received[entry["path"]] for entry in sent} == {e["path"]: e["sha256"] for e in sent}
    assert set(listed_files(folder)) | {".gitattributes"} == set(received)  # + the initial commit's file
    # the release's own manifest survives the download (its provenance), with the download recorded beside it
    manifest = json.loads((back.folder / MANIFEST_NAME).read_text())
    assert manifest["quantization"] == json.loads((folder / MANIFEST_NAME).read_text())["quantization"]
    assert manifest["download"]["commit"] == result.commit_oid
    assert verify_static(back.folder).ok


def test_dry_run_sends_nothing_and_writes_nothing(verified_release: Path, upload_double: HubUploadDouble):
    before = {path: path.stat().st_mtime_ns for path in verified_release.rglob("*")}
    result = upload(verified_release, "quantkit-tests/dry", dry_run=True, token=FAKE_HUB_TOKEN,
                    endpoint=upload_double.url)
    assert result.dry_run and result.commit_oid is None and "README.md" in result.files
    assert upload_double.requests == []
    assert {path: path.stat().st_mtime_ns for path in verified_release.rglob("*")} == before


def test_dry_run_says_why_the_card_would_change(verified_release: Path, tmp_path: Path):
    """`quantkit run` without an upload section writes a card whose usage names path/to/FOLDER: the dry run
    says that is what the upload rewrites, says what else changed, and says nothing once the card is current."""
    folder = copy_of(verified_release, tmp_path)
    write_card(folder)
    result = upload(folder, "org/name", dry_run=True, token=FAKE_HUB_TOKEN)
    assert result.warnings == [("the upload rewrites README.md: its usage snippet names path/to/minicpmv26-tiny-awq, "
                               "not org/name")]
    write_card(folder, repo_id="org/name")
    assert upload(folder, "org/name", dry_run=True, token=FAKE_HUB_TOKEN).warnings == []
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace("## Reproduce", "## Reproduce (edited)"))
    record_files(folder, ["README.md"])  # the folder stays publishable; only the card is stale
    assert upload(folder, "org/name", dry_run=True, token=FAKE_HUB_TOKEN).warnings == [
        ("the upload rewrites README.md: the folder's manifest or reports changed since it was written (first new "
        "line: '## Reproduce')")]


def test_corrupted_or_unverified_release_is_refused(verified_release: Path, upload_double: HubUploadDouble,
                                                    tmp_path: Path):
    corrupted = copy_of(verified_release, tmp_path / "corrupted")
    shard = min(corrupted.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100:] = bytes(100)
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=rf"static check manifest: {shard.name}: sha256 differs"):
        upload(corrupted, "quantkit-tests/corrupted", token=FAKE_HUB_TOKEN, endpoint=upload_double.url)
    unverified = copy_of(verified_release, tmp_path / "unverified")
    report = json.loads((unverified / "verify-report.json").read_text())
    (unverified / "verify-report.json").write_text(json.dumps({**report, "verdict": "FAIL"}))
    with pytest.raises(VerifyError, match="says FAIL"):
        upload(unverified, "quantkit-tests/unverified", token=FAKE_HUB_TOKEN, endpoint=upload_double.url)
    assert upload_double.requests == []


def test_missing_token_is_a_clear_error(verified_release: Path, upload_double: HubUploadDouble, tmp_path: Path):
    folder = copy_of(verified_release, tmp_path)
    done = cli(["upload", str(folder), "quantkit-tests/no-token"], tmp_path, upload_double.url, token=None)
    assert done.returncode == 1
    assert "error: no Hub token: uploading to quantkit-tests/no-token needs one; set HF_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr and upload_double.requests == []


def test_bad_token_is_a_clear_error_and_no_token_leaks(verified_release: Path, upload_double: HubUploadDouble,
                                                      local_hub: LocalHub, tmp_path: Path):
    bad = "hf_quantkitWrongToken9876543210abcdef"
    folder = copy_of(verified_release, tmp_path / "bad")
    done = cli(["upload", str(folder), "quantkit-tests/bad-token"], tmp_path, upload_double.url, token=bad)
    assert done.returncode == 1
    assert "refused the token when asked to create the repo for quantkit-tests/bad-token (HTTP 401)" in done.stderr
    assert {r.status for r in upload_double.requests} == {401}
    assert not (upload_double.repo_dir("quantkit-tests/bad-token")).exists()
    assert bad not in done.stdout + done.stderr and files_containing(folder, bad) == []

    good = copy_of(verified_release, tmp_path / "good")
    done = cli(["upload", str(good), "quantkit-tests/token-check", "--private"], tmp_path, upload_double.url,
               token=FAKE_HUB_TOKEN)
    assert done.returncode == 0, done.stderr
    assert "uploaded" in done.stdout and "commit: " in done.stdout
    assert FAKE_HUB_TOKEN not in done.stdout + done.stderr
    assert files_containing(good, FAKE_HUB_TOKEN) == []
    assert files_containing(upload_double.repo_dir("quantkit-tests/token-check"), FAKE_HUB_TOKEN) == []
    assert files_containing(local_hub.server.workdir, FAKE_HUB_TOKEN) == []
