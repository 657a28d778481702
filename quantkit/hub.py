"""Hub downloads pinned to a commit and recorded in `quantkit-manifest.json`.

Everything network-side is huggingface_hub's: it reads HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE
itself and resumes interrupted transfers. quantkit adds what a reproducible release needs on top: the
branch or tag resolved to one commit before any byte moves, refusals that say what to do next, a free-space
check up front, and a manifest whose sha256s are computed here and checked against the Hub's own hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, get_token, is_offline_mode, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    HTTPError,
    RevisionResolutionError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from quantkit.errors import HubError, InputError
from quantkit.io.chores import format_size
from quantkit.io.manifest import (
    MANIFEST_NAME,
    file_entries,
    listed_files,
    manifest_sections,
    read_manifest,
    write_manifest,
)

FREE_SPACE_ENV = "QUANTKIT_FREE_SPACE_BYTES"
"""Overrides the free bytes the pre-download check sees: for quota'd or network filesystems whose statvfs
figure is not what can really be written, and for tests that cannot fill a disk."""

_NETWORK_HINT = (
    "Check the network, point HF_ENDPOINT at a reachable Hub or mirror, or set HF_HUB_OFFLINE=1 to use a "
    "snapshot already in the HF cache or in --out."
)


@dataclass(frozen=True)
class DownloadResult:
    """A model folder on disk at one commit, as recorded in its manifest."""

    repo_id: str
    revision: str
    commit: str
    folder: Path
    manifest_path: Path
    files: list[dict[str, Any]]
    already_present: bool
    """True when the folder already held this commit and nothing was fetched."""
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(entry["size"] for entry in self.files)


@dataclass(frozen=True)
class _RemoteFile:
    """What the Hub's tree listing says about one file; any of it may be missing on a mirror."""

    size: int | None
    blob_id: str | None
    lfs_sha256: str | None


def download(
    repo_id: str,
    revision: str = "main",
    out_dir: str | Path | None = None,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    force: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
) -> DownloadResult:
    """Download `repo_id` at `revision` into `out_dir` (default: the HF cache) and write its manifest.

    `force` accepts a folder that holds another model (its files are left in place but not listed) and
    fetches every file again. `endpoint`, `token` and `cache_dir` default to what huggingface_hub reads
    from HF_ENDPOINT, HF_TOKEN (or the stored login) and HF_HOME / HF_HUB_CACHE. Raises HubError /
    InputError with the next step in the message.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InputError(f"'{repo_id}' is not a Hub repo id ({err}); write it as ORG/NAME") from err
    patterns = {"allow_patterns": allow_patterns, "ignore_patterns": ignore_patterns}
    target = Path(out_dir).expanduser().resolve() if out_dir is not None else None
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()
    if is_offline_mode():
        return _from_local_copy(repo_id, revision, target, patterns, cache)

    api = HfApi(endpoint=endpoint, token=token)
    endpoint_url = api.endpoint
    with hub_errors(api, repo_id, revision, token):
        # model_info fails at once when the endpoint is unreachable (resolve_revision would fall back on a
        # cached ref and the listing below would then retry for ~20 s). resolve_revision pins every later
        # request to one commit and records branch -> commit in the cache's refs/ for HF_HUB_OFFLINE=1.
        api.model_info(repo_id, revision=revision)
        pinned = api.resolve_revision(repo_id, revision=revision, cache_dir=cache, token=token)
        commit = pinned.resolved
        remote = {
            entry.path: _RemoteFile(entry.size, entry.blob_id, entry.lfs.sha256 if entry.lfs else None)
            for entry in api.list_repo_tree(repo_id, recursive=True, revision=commit)
            if isinstance(entry, RepoFile)
        }
    wanted = sorted(
        filter_repo_objects(list(remote), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    )
    if not wanted:
        raise InputError(
            f"no file of {repo_id}@{commit[:12]} matches {_describe(patterns)}; "
            f"its files are: {', '.join(sorted(remote)[:10])}"
        )

    folder = target or cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit
    existing = read_manifest(folder) if folder.is_dir() else None
    source = {
        "repo_id": repo_id,
        "revision": revision,
        "commit": commit,
        "endpoint": endpoint_url,
        **patterns,
    }
    if existing is not None and not force and _same_download(existing, source, folder):
        return _result(source, folder, existing, already_present=True)
    leftovers: list[str] = []
    if target is not None and target.is_dir():
        leftovers = _check_target(target, existing, repo_id, commit, set(remote), force)
    if existing is not None:
        (folder / MANIFEST_NAME).unlink()  # it describes files about to change; never leave it stale
    warnings = _check_free_space(folder, remote, wanted, repo_id, commit)

    try:
        snapshot_download(
            repo_id,
            revision=pinned,
            local_dir=target,
            cache_dir=cache,
            token=token,
            endpoint=endpoint,
            force_download=force,
            **patterns,
        )
    except (HTTPError, OSError) as err:
        raise HubError(
            f"download of {repo_id}@{commit[:12]} into {folder} stopped: {_one_line(err)}. Files "
            "already complete are kept; run the same command again to fetch the rest"
        ) from err

    partials = target / ".cache" / "huggingface" / "download" if target else folder.parent.parent / "blobs"
    warnings += _remove_stale_partials(partials)
    wanted = [path for path in wanted if path != MANIFEST_NAME]
    entries = file_entries(folder, wanted)
    warnings += _check_against_hub(entries, remote, folder, repo_id, commit)
    if leftovers:
        warnings.append(
            f"{len(leftovers)} files in {folder} are not part of {repo_id}@{commit[:12]} and were "
            f"left in place, unlisted in the manifest: {', '.join(leftovers[:5])}"
        )
    extra = _manifest_sections(folder, source, _remote_code(folder, entries, wanted))
    write_manifest(folder, extra, files=entries)
    return _result(source, folder, {**extra, "files": entries}, already_present=False, warnings=warnings)


@contextmanager
def hub_errors(api: HfApi, repo_id: str, revision: str, token: str | None) -> Iterator[None]:
    """Turn huggingface_hub's refusals into one-line errors that name the next step. A mirror such as olah
    answers 401 both for an unknown repo and for an unknown revision (the real Hub raises
    RevisionNotFoundError for the latter), so on any refusal the repo's refs are asked for: if they come
    back, the repo exists and the revision is what is wrong."""
    try:
        yield
    except GatedRepoError as err:
        raise _gated(repo_id, api.endpoint, token) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise _revision_or_repo_missing(api, repo_id, revision, token, status) from err
    except (HTTPError, RevisionResolutionError) as err:
        raise HubError(
            f"cannot reach {api.endpoint} to look up {repo_id}@{revision} ({_one_line(err)}). {_NETWORK_HINT}"
        ) from err


def _revision_or_repo_missing(
    api: HfApi, repo_id: str, revision: str, token: str | None, status: int | str
) -> HubError:
    try:
        try:
            refs = api.list_repo_refs(repo_id)
        except HTTPError as err:
            if isinstance(err, HfHubHTTPError):
                raise
            refs = api.list_repo_refs(repo_id)  # once more: olah drops the kept-alive connection after a 500
    except GatedRepoError:
        return _gated(repo_id, api.endpoint, token)
    except HfHubHTTPError:
        if _has_token(token):
            access = "or your token (HF_TOKEN / `hf auth login`) has no access to it"
        else:
            access = "or it is private or gated and no token is set: set HF_TOKEN or run `hf auth login`"
        return HubError(
            f"repository '{repo_id}' not found at {api.endpoint} ({access}). Check the name: "
            "it is ORG/NAME as in the model page's URL"
        )
    except HTTPError as err:
        return HubError(
            f"cannot reach {api.endpoint} to look up {repo_id} ({_one_line(err)}). {_NETWORK_HINT}"
        )
    branches = ", ".join(ref.name for ref in refs.branches) or "none"
    tags = ", ".join(ref.name for ref in refs.tags) or "none"
    return HubError(
        f"revision '{revision}' not found in {repo_id} (the endpoint answered HTTP {status}); "
        f"branches: {branches}; tags: {tags}. Pass one of these or a full commit sha as --revision"
    )


def _gated(repo_id: str, endpoint: str, token: str | None) -> HubError:
    if _has_token(token):
        step = "your token has no access yet: accept the terms on the model page with that account"
    else:
        step = "no token is set: accept the terms on the model page, then set HF_TOKEN or run `hf auth login`"
    return HubError(f"'{repo_id}' is gated at {endpoint}/{repo_id} and {step}")


def _has_token(token: str | None) -> bool:
    return bool(token) or get_token() is not None


def download_record(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """Which Hub download a folder's manifest records. A downloaded quantkit release keeps the manifest it
    shipped with (whose `source` is the base model it was made from) and gets the download as `download`."""
    manifest = manifest or {}
    return manifest.get("download") or manifest.get("source") or {}


def _manifest_sections(folder: Path, source: dict[str, Any], remote_code: dict[str, Any]) -> dict[str, Any]:
    """The sections of the manifest written after a download: a repo that ships its own quantkit manifest (a
    release) keeps every section of it, so `quantkit verify --static` still reads what made the release."""
    shipped = read_manifest(folder) if (folder / MANIFEST_NAME).is_file() else None
    if shipped is None or "quantization" not in shipped:
        return {"source": source, "remote_code": remote_code}
    return {**manifest_sections(shipped), "download": source, "remote_code": remote_code}


def _same_download(manifest: dict[str, Any], source: dict[str, Any], folder: Path) -> bool:
    """Whether `folder` already holds exactly this download: same repo, commit and patterns, and every
    listed file still there at its recorded size (a full rehash is `quantkit verify`'s job, not a
    re-run's)."""
    recorded = download_record(manifest)
    keys = ("repo_id", "commit", "allow_patterns", "ignore_patterns")
    if any(recorded.get(key) != source[key] for key in keys):
        return False
    return all(
        (folder / entry["path"]).is_file() and (folder / entry["path"]).stat().st_size == entry["size"]
        for entry in manifest["files"]
    )


def _check_target(
    folder: Path,
    manifest: dict[str, Any] | None,
    repo_id: str,
    commit: str,
    repo_files: set[str],
    force: bool,
) -> list[str]:
    """Refuse (without force) a folder whose manifest names another repo or commit, or that holds files
    this repo does not have; files of this repo alone (an interrupted earlier run) are resumed. Returns
    the foreign files that force lets stay."""
    if manifest is not None and not force:
        recorded = download_record(manifest)
        if (recorded.get("repo_id"), recorded.get("commit")) != (repo_id, commit):
            held = (
                f"{recorded['repo_id']}@{str(recorded.get('commit'))[:12]}"
                if recorded.get("repo_id")
                else "another model (its manifest names no Hub repo)"
            )
            raise InputError(
                f"{folder} already holds {held}, not {repo_id}@{commit[:12]}; pick another --out, "
                "or pass --force to download over it"
            )
    foreign = [path for path in listed_files(folder) if path not in repo_files]
    if foreign and not force:
        raise InputError(
            f"{folder} holds {len(foreign)} files that are not part of {repo_id} "
            f"(e.g. {', '.join(foreign[:3])}); pick an empty --out, or pass --force to download "
            "next to them"
        )
    return foreign


def _check_free_space(
    folder: Path, remote: dict[str, _RemoteFile], wanted: list[str], repo_id: str, commit: str
) -> list[str]:
    """Refuse before any byte moves when the files still missing from `folder` do not fit on its disk."""
    needed = 0
    unknown = []
    for path in wanted:
        size = remote[path].size
        local = folder / path
        if size is None:
            unknown.append(path)
        elif not (local.is_file() and local.stat().st_size == size):
            needed += size
    override = os.environ.get(FREE_SPACE_ENV)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = int(override) if override else shutil.disk_usage(probe).free
    if needed > free:
        raise HubError(
            f"{repo_id}@{commit[:12]} needs {format_size(needed)} more in {folder} but only {format_size(free)} is "
            "free there; free some space, choose another --out, or narrow the files with "
            "--include / --exclude"
        )
    if unknown:
        note = (
            f"the Hub gave no size for {len(unknown)} files ({', '.join(unknown[:3])}); the free-space check"
        )
        return [note + " counted only the others"]
    return []


def _remove_stale_partials(partials_dir: Path) -> list[str]:
    """huggingface_hub (2.x) downloads into a per-process `*.incomplete` file and cannot reuse one left by a
    killed process; once the download is complete such files are only lost disk space (GBs for a shard)."""
    stale = sorted(partials_dir.rglob("*.incomplete")) if partials_dir.is_dir() else []
    freed = sum(path.stat().st_size for path in stale)
    for path in stale:
        path.unlink(missing_ok=True)
    if not stale:
        return []
    return [
        f"removed {len(stale)} partial files ({format_size(freed)}) an interrupted download left in {partials_dir}"
    ]


def _check_against_hub(
    entries: list[dict[str, Any]], remote: dict[str, _RemoteFile], folder: Path, repo_id: str, commit: str
) -> list[str]:
    """Compare each local file with the Hub's hash: LFS sha256 when given, else the git blob id (sha1 of
    'blob <size>\\0' + content), which every git-backed endpoint, mirrors included, reports."""
    unchecked = []
    for entry in entries:
        expected = remote[entry["path"]]
        if expected.lfs_sha256 is not None:
            matches = entry["sha256"] == expected.lfs_sha256
        elif expected.blob_id is not None:
            matches = _git_blob_id(folder / entry["path"], entry["size"]) == expected.blob_id
        else:
            unchecked.append(entry["path"])
            continue
        if not matches:
            raise HubError(
                f"{entry['path']} in {folder} does not match the hash {repo_id}@{commit[:12]} has on "
                "the Hub (corrupted or changed on disk); run again with --force to fetch it afresh"
            )
    if unchecked:
        return [
            f"the Hub gave no hash for {len(unchecked)} files; their sha256 in the manifest is quantkit's own"
        ]
    return []


def _git_blob_id(path: Path, size: int) -> str:
    digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _remote_code(folder: Path, entries: list[dict[str, Any]], wanted: list[str]) -> dict[str, Any]:
    """Python files (by sha256) and config.json `auto_map`: the code transformers would run with
    trust_remote_code=True. Empty when the repo has none."""
    code = {entry["path"]: entry["sha256"] for entry in entries if entry["path"].endswith(".py")}
    auto_map: dict[str, Any] = {}
    if "config.json" in wanted:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        auto_map = config.get("auto_map") or {}
    return {"files": code, "auto_map": auto_map} if code or auto_map else {}


def _remote_code_warning(section: dict[str, Any]) -> list[str]:
    """The warning the CLI prints so the user sees exactly which code a trust_remote_code load would run."""
    if not section:
        return []
    lines = [f"  {path}  sha256={digest}" for path, digest in section["files"].items()]
    if section["auto_map"]:
        lines.append(f"  config.json auto_map: {json.dumps(section['auto_map'])}")
    return [
        "this repo ships remote code, which transformers runs only with trust_remote_code=True; review "
        "it before loading:\n" + "\n".join(lines)
    ]


def _from_local_copy(
    repo_id: str, revision: str, target: Path | None, patterns: dict[str, list[str] | None], cache: Path
) -> DownloadResult:
    """HF_HUB_OFFLINE=1: serve the download from what is on disk: a manifest in --out, or the HF cache
    (huggingface_hub maps the branch to its cached commit)."""
    if target is not None:
        manifest = read_manifest(target) if target.is_dir() else None
        recorded = download_record(manifest)
        if (
            manifest is None
            or recorded.get("repo_id") != repo_id
            or revision not in (recorded.get("revision"), recorded.get("commit"))
            or not _same_download(manifest, {**recorded, **patterns}, target)
        ):
            raise HubError(
                f"HF_HUB_OFFLINE is set and {target} holds no complete download of {repo_id}@{revision}"
                " with these --include/--exclude patterns; unset HF_HUB_OFFLINE to download it, or "
                "drop --out to use the HF cache"
            )
        return _result({**recorded, "revision": revision}, target, manifest, already_present=True)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, **patterns))
    except OSError as err:  # LocalEntryNotFoundError / IncompleteSnapshotError
        raise HubError(
            f"HF_HUB_OFFLINE is set and the HF cache ({cache}) has no complete "
            f"snapshot of {repo_id}@{revision}: {_one_line(err)}. Unset HF_HUB_OFFLINE to download "
            "it"
        ) from err
    source = {
        "repo_id": repo_id,
        "revision": revision,
        "commit": folder.name,
        "endpoint": constants.ENDPOINT,
        **patterns,
    }
    manifest = read_manifest(folder)
    if manifest is not None and _same_download(manifest, source, folder):
        return _result(source, folder, manifest, already_present=True)
    wanted = sorted(filter_repo_objects(listed_files(folder), **patterns))
    entries = file_entries(folder, wanted)
    extra = _manifest_sections(folder, source, _remote_code(folder, entries, wanted))
    write_manifest(folder, extra, files=entries)
    return _result(
        source,
        folder,
        {**extra, "files": entries},
        already_present=True,
        warnings=["offline: the hashes were computed from the cache, not checked against the Hub"],
    )


def _result(
    source: dict[str, Any],
    folder: Path,
    manifest: dict[str, Any],
    already_present: bool,
    warnings: list[str] | None = None,
) -> DownloadResult:
    warnings = _remote_code_warning(manifest.get("remote_code") or {}) + (warnings or [])
    return DownloadResult(
        repo_id=source["repo_id"],
        revision=source["revision"],
        commit=source["commit"],
        folder=folder,
        manifest_path=folder / MANIFEST_NAME,
        files=manifest["files"],
        already_present=already_present,
        warnings=warnings,
    )


def _describe(patterns: dict[str, list[str] | None]) -> str:
    return "; ".join(f"{key} {' '.join(value)}" for key, value in patterns.items() if value) or "no pattern"


def _one_line(err: BaseException) -> str:
    """huggingface_hub's messages span several lines; the CLI prints errors as one."""
    return " ".join(str(err).split())
