"""`quantkit download` against a local Hub (olah on 127.0.0.1, see tests/hub_server.py); nothing mocked.

In-process calls pass `endpoint=` because huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE once, at
import; the CLI tests run `python -m quantkit` in a subprocess with those variables set, as a user would.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubProxy, LocalHub, wait_for
from huggingface_hub import get_token

from quantkit.api import download
from quantkit.errors import HubError, InputError
from quantkit.hub import FREE_SPACE_ENV
from quantkit.io.manifest import MANIFEST_NAME, read_manifest


@pytest.fixture
def fetch(tmp_path: Path):
    """`download` with the HF cache (where huggingface_hub records branch -> commit) inside tmp_path."""
    return functools.partial(download, cache_dir=tmp_path / "hf-cache")


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def file_requests(hub: LocalHub) -> int:
    """File transfers olah has served so far (its access log has one line per request)."""
    return sum(1 for line in hub.server.log_text().splitlines() if '"GET /' in line and "/resolve/" in line)


def start_cli(args: list[str], tmp_path: Path, endpoint: str, **env: str) -> subprocess.Popen[str]:
    """`python -m quantkit download ARGS` as a user runs it; started, not awaited, so that several can run
    at once."""
    environment = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "quantkit", "download", *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a `start_cli` process."""
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


def test_branch_and_sha_give_identical_files_and_a_manifest_of_the_served_bytes(local_hub, fetch, tmp_path):
    tiny = local_hub.tiny
    by_branch = fetch(tiny.repo_id, "main", tmp_path / "by-branch", endpoint=local_hub.url)
    by_sha = fetch(tiny.repo_id, tiny.commit, tmp_path / "by-sha", endpoint=local_hub.url)

    assert by_branch.commit == by_sha.commit == tiny.commit
    for name, content in tiny.files.items():
        assert (by_branch.folder / name).read_bytes() == content == (by_sha.folder / name).read_bytes()
    manifest = read_manifest(by_branch.folder)
    assert manifest["schema_version"] == 1 and manifest["created"]
    assert manifest["source"] == {
        "repo_id": tiny.repo_id,
        "revision": "main",
        "commit": tiny.commit,
        "endpoint": local_hub.url,
        "allow_patterns": None,
        "ignore_patterns": None,
    }
    served = {name: (len(content), sha256(content)) for name, content in tiny.files.items()}
    assert {entry["path"]: (entry["size"], entry["sha256"]) for entry in manifest["files"]} == served
    assert read_manifest(by_sha.folder)["source"]["revision"] == tiny.commit
    code_hash = sha256(tiny.files["modeling_tiny.py"])
    assert manifest["remote_code"] == {
        "files": {"modeling_tiny.py": code_hash},
        "auto_map": {"AutoModel": "modeling_tiny.TinyModel"},
    }
    assert any(
        "trust_remote_code" in w and f"modeling_tiny.py  sha256={code_hash}" in w for w in by_branch.warnings
    )


def test_download_into_the_hf_cache_records_the_branch(local_hub, fetch, tmp_path):
    result = fetch(local_hub.other.repo_id, endpoint=local_hub.url)
    storage = tmp_path / "hf-cache" / "models--org--other"
    assert result.folder == storage / "snapshots" / local_hub.other.commit
    assert (storage / "refs" / "main").read_text() == local_hub.other.commit  # what HF_HUB_OFFLINE=1 reads
    assert (result.folder / MANIFEST_NAME).is_file()


def test_include_pattern_downloads_only_matching_files(local_hub, fetch, tmp_path):
    out = tmp_path / "out"
    result = fetch(local_hub.tiny.repo_id, out_dir=out, allow_patterns=["*.json"], endpoint=local_hub.url)
    assert [entry["path"] for entry in result.files] == ["config.json"]
    assert not (out / "big.bin").exists()
    # auto_map still warns: it names code this download left out
    assert any("auto_map" in w for w in result.warnings)


def test_same_commit_into_the_same_folder_is_a_noop(local_hub, fetch, tmp_path):
    out = tmp_path / "out"
    first = fetch(local_hub.tiny.repo_id, out_dir=out, endpoint=local_hub.url)
    manifest_bytes = (out / MANIFEST_NAME).read_bytes()
    served_before = file_requests(local_hub)

    second = fetch(local_hub.tiny.repo_id, out_dir=out, endpoint=local_hub.url)

    assert not first.already_present and second.already_present
    assert second.commit == first.commit and second.files == first.files
    assert (out / MANIFEST_NAME).read_bytes() == manifest_bytes
    assert file_requests(local_hub) == served_before


def test_folder_holding_another_model_is_refused_unless_forced(local_hub, fetch, tmp_path):
    tiny, other, out = local_hub.tiny, local_hub.other, tmp_path / "out"
    fetch(other.repo_id, out_dir=out, endpoint=local_hub.url)

    with pytest.raises(InputError, match=rf"already holds {other.repo_id}@{other.commit[:12]}.*--force"):
        fetch(tiny.repo_id, out_dir=out, endpoint=local_hub.url)
    forced = fetch(tiny.repo_id, out_dir=out, force=True, endpoint=local_hub.url)

    manifest = read_manifest(out)
    assert manifest["source"]["repo_id"] == tiny.repo_id and forced.commit == tiny.commit
    assert sorted(entry["path"] for entry in manifest["files"]) == sorted(tiny.files)
    assert (out / "weights.bin").exists()  # the other model's file is left, unlisted, and reported
    assert any("weights.bin" in w and "left in place" in w for w in forced.warnings)


def test_folder_with_foreign_files_is_refused(local_hub, fetch, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(
        InputError, match=r"1 files that are not part of org/tiny \(e.g. notes.txt\).*--force"
    ):
        fetch(local_hub.tiny.repo_id, out_dir=tmp_path / "out", endpoint=local_hub.url)


def test_unknown_repo_and_unknown_revision_get_distinct_messages(local_hub, fetch, tmp_path):
    # olah answers 401 to both; the real Hub says RevisionNotFound to the second
    out = tmp_path / "out"
    with pytest.raises(HubError) as unknown_repo:
        fetch("org/missing", out_dir=out, endpoint=local_hub.url)
    with pytest.raises(HubError) as unknown_branch:
        fetch(local_hub.tiny.repo_id, "no-such-branch", out, endpoint=local_hub.url)
    with pytest.raises(HubError) as unknown_sha:
        fetch(local_hub.tiny.repo_id, "0" * 40, out, endpoint=local_hub.url)

    assert str(unknown_repo.value).startswith("repository 'org/missing' not found at")
    assert "HF_TOKEN" in str(unknown_repo.value)
    assert str(unknown_branch.value).startswith("revision 'no-such-branch' not found in org/tiny")
    assert "branches: main" in str(unknown_branch.value)
    assert str(unknown_sha.value).startswith(f"revision '{'0' * 40}' not found in org/tiny")
    assert not out.exists()


def test_unreachable_endpoint_names_hf_endpoint_and_offline_mode(closed_port_url, fetch, tmp_path):
    with pytest.raises(HubError, match=r"cannot reach .*HF_ENDPOINT.*HF_HUB_OFFLINE=1"):
        fetch("org/tiny", out_dir=tmp_path / "out", endpoint=closed_port_url)
    assert not (tmp_path / "out").exists()


def test_too_little_disk_space_is_refused_before_any_transfer(local_hub, fetch, tmp_path, monkeypatch):
    monkeypatch.setenv(FREE_SPACE_ENV, str(2**20))
    served_before = file_requests(local_hub)
    with pytest.raises(HubError, match=r"needs 4\.\d MiB more .* only 1\.0 MiB is free"):
        fetch(local_hub.tiny.repo_id, out_dir=tmp_path / "out", endpoint=local_hub.url)
    assert file_requests(local_hub) == served_before
    assert not (tmp_path / "out").exists()


def test_gated_repo_without_token_says_how_to_get_access(hub_proxy: HubProxy, fetch, tmp_path, monkeypatch):
    # olah has no gated repos: the proxy answers as the Hub does (401 + X-Error-Code: GatedRepo)
    hub_proxy.gated.add("org/tiny")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if get_token() is not None:
        pytest.skip("a stored Hugging Face login exists on this machine")
    with pytest.raises(HubError, match=r"gated .*no token is set.*HF_TOKEN"):
        fetch("org/tiny", out_dir=tmp_path / "out", endpoint=hub_proxy.url)
    with pytest.raises(HubError, match=r"gated .*your token has no access"):
        fetch("org/tiny", out_dir=tmp_path / "out", endpoint=hub_proxy.url, token="hf_not_a_real_token")


def test_cut_transfer_resumes_from_the_received_bytes(local_hub, hub_proxy: HubProxy, fetch, tmp_path):
    # The proxy drops shard.bin's connection after 10.5 MiB once and serves Range (olah ignores it, the
    # Hub's CDN honours it). huggingface_hub writes in 10 MiB chunks, so it has 10 MiB to resume from.
    content = local_hub.large.files["shard.bin"]
    chunk = 10 * 2**20
    hub_proxy.cut_after["shard.bin"] = chunk + 2**19

    result = fetch(local_hub.large.repo_id, out_dir=tmp_path / "out", endpoint=hub_proxy.url)

    transfers = hub_proxy.gets("shard.bin")
    assert [(t.range, t.status, t.body_bytes) for t in transfers] == [
        (None, 200, chunk + 2**19),
        (f"bytes={chunk}-", 206, len(content) - chunk),
    ]
    assert (result.folder / "shard.bin").read_bytes() == content
    assert result.files == [{"path": "shard.bin", "size": len(content), "sha256": sha256(content)}]


def test_rerun_after_a_killed_download_fetches_only_the_unfinished_file(
    local_hub, hub_proxy, fetch, tmp_path
):
    # huggingface_hub 2.x keeps no partial file across processes (each process downloads into its own
    # temporary file), so what a re-run reuses is every file the killed run finished
    content = local_hub.tiny.files["big.bin"]
    out = tmp_path / "out"
    metadata = out / ".cache" / "huggingface" / "download"
    finished = [name for name in local_hub.tiny.files if name != "big.bin"]
    hub_proxy.stall_after["big.bin"] = 2**20
    environment = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_ENDPOINT": hub_proxy.url,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "quantkit", "download", "org/tiny", "--out", str(out)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: (
                hub_proxy.stalled.is_set()
                and all((metadata / f"{name}.metadata").exists() for name in finished)
            ),
            60,
            "the other files to finish while big.bin hangs",
        )
    finally:
        process.kill()
        process.wait()
    assert not (out / "big.bin").exists() and list(metadata.glob("*.incomplete"))
    hub_proxy.stall_after.clear()
    requests_before = len(hub_proxy.requests)

    result = fetch("org/tiny", out_dir=out, endpoint=hub_proxy.url)

    fetched = [
        r.path.rsplit("/", 1)[-1]
        for r in hub_proxy.requests[requests_before:]
        if r.method == "GET" and "/resolve/" in r.path
    ]
    assert fetched == ["big.bin"]
    assert (out / "big.bin").read_bytes() == content
    assert not list(metadata.glob("*.incomplete"))  # the killed process's partial file, unusable, is removed
    assert any("removed 1 partial files" in w for w in result.warnings)


def test_cli_downloads_then_serves_the_cache_offline(local_hub, tmp_path, closed_port_url):
    tiny = local_hub.tiny
    code, stdout, stderr = finish(start_cli([tiny.repo_id], tmp_path, local_hub.url))
    assert code == 0, stderr
    assert f"org/tiny@main -> commit {tiny.commit}" in stdout
    assert f"downloaded: {len(tiny.files)} files" in stdout
    assert f"modeling_tiny.py  sha256={sha256(tiny.files['modeling_tiny.py'])}" in stderr

    snapshot = tmp_path / "hf-home" / "hub" / "models--org--tiny" / "snapshots" / tiny.commit
    online_files = read_manifest(snapshot)["files"]
    (snapshot / MANIFEST_NAME).unlink()  # as after a download by another tool: offline mode writes one
    offline = start_cli([tiny.repo_id], tmp_path, closed_port_url, HF_HUB_OFFLINE="1")
    no_copy = start_cli(
        [tiny.repo_id, "--out", str(tmp_path / "empty")], tmp_path, closed_port_url, HF_HUB_OFFLINE="1"
    )
    code, stdout, stderr = finish(offline)
    assert code == 0, stderr
    assert f"commit {tiny.commit}" in stdout and "already present" in stdout
    assert "not checked against the Hub" in stderr
    assert read_manifest(snapshot)["files"] == online_files
    code, _, stderr = finish(no_copy)
    assert code == 1 and "HF_HUB_OFFLINE is set" in stderr


def test_cli_refusals_exit_1_with_one_line(local_hub, fetch, tmp_path, closed_port_url):
    taken = tmp_path / "taken"
    fetch(local_hub.other.repo_id, out_dir=taken, endpoint=local_hub.url)
    cases = {
        "repository 'org/missing' not found": (["org/missing"], local_hub.url, {}),
        "revision 'nope' not found": (["org/tiny", "--revision", "nope"], local_hub.url, {}),
        "HF_HUB_OFFLINE=1": (["org/tiny"], closed_port_url, {}),
        "--force": (["org/tiny", "--out", str(taken)], local_hub.url, {}),
        "is free": (["org/tiny", "--out", str(tmp_path / "small")], local_hub.url, {FREE_SPACE_ENV: "1000"}),
    }
    running = {
        expected: start_cli(args, tmp_path, url, **env) for expected, (args, url, env) in cases.items()
    }
    for expected, process in running.items():
        code, _, stderr = finish(process)
        lines = stderr.strip().splitlines()
        assert code == 1, (expected, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (expected, lines)
