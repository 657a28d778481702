"""`upload()`: publish a verified release folder to the Hub as one commit, with its model card.

The gate comes first: a folder whose static checks fail, or whose verify report is missing or failed, is not
published (unless forced), because a release that vLLM cannot load or that drifted from its 16-bit model is
worse than none. The transfer itself is huggingface_hub's (create_repo, preupload, commit); the token is
handed to it and never printed, logged or written: error messages are scrubbed of it as well.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id

from quantkit.card import CARD_NAME, render_card, write_card
from quantkit.errors import HubError, InputError, VerifyError
from quantkit.io.manifest import MANIFEST_NAME, listed_files, read_manifest
from quantkit.recipe import read_lock
from quantkit.verify.report import REPORT_JSON
from quantkit.verify.static import verify_static

NO_TOKEN_HINT = "set HF_TOKEN to a token with write access, or run `hf auth login`"


@dataclass(frozen=True)
class UploadResult:
    """What was (or, with dry_run, would be) published."""

    repo_id: str
    revision: str
    files: list[str]
    total_bytes: int
    commit_message: str
    dry_run: bool
    commit_oid: str | None = None
    commit_url: str | None = None
    warnings: list[str] = field(default_factory=list)


def commit_message(folder: Path) -> str:
    """Names the recipe (and its hash) that made the release, so the Hub history says where each file came
    from; a folder made without a recipe says so."""
    lock = read_lock(folder) or {}
    recipe = lock.get("recipe") or (read_manifest(folder) or {}).get("recipe") or {}
    if recipe.get("name"):
        return f"quantkit release from recipe {recipe['name']} (sha256 {str(recipe.get('sha256', '?'))[:12]})"
    return f"quantkit release of {folder.name} (no recipe: made with quantkit quantize/verify)"


def check_publishable(folder: Path) -> list[str]:
    """Why `folder` must not be published (empty when it may): failed static checks, a missing or failed
    verify report."""
    problems = []
    static = verify_static(folder)
    problems += [f"static check {check.name}: {check.message}" for check in static.failed()]
    report_path = folder / REPORT_JSON
    if not report_path.is_file():
        problems.append(f"{report_path} is missing: run `quantkit verify {folder} --reference SOURCE` first")
    else:
        try:
            verdict = json.loads(report_path.read_text()).get("verdict")
        except ValueError:
            verdict = "unreadable"
        if verdict != "PASS":
            problems.append(f"{report_path} says {verdict}: the release failed verification")
    return problems


def card_change(written: str | None, card: str, repo_id: str) -> str | None:
    """Why the upload would rewrite the folder's README.md (None when it would not): the card names another
    repo in its usage snippet (`quantkit run` without an upload section writes `path/to/FOLDER`), and/or the
    folder's manifest or reports changed since it was written (an eval report saved, a new verify run)."""
    if written == card:
        return None
    if written is None:
        return f"{CARD_NAME} is missing; the upload writes the model card first"
    named = re.search(r'LLM\(model="([^"]+)"', written)
    renamed = written.replace(named.group(1), repo_id) if named else written
    reasons = [f"its usage snippet names {named.group(1)}, not {repo_id}"] if renamed != written else []
    if renamed != card:
        first = next(line for line, old in zip_longest(card.splitlines(), renamed.splitlines(), fillvalue="")
                     if line != old)
        reasons.append(f"the folder's manifest or reports changed since it was written (first new line: {first!r})")
    return f"the upload rewrites {CARD_NAME}: " + "; ".join(reasons)


def _scrub(text: str, token: str | None) -> str:
    """huggingface_hub's messages do not carry the token; this makes sure ours never do either."""
    return text.replace(token, "***") if token else text


def upload(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    revision: str = "main",
    dry_run: bool = False,
    force: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> UploadResult:
    """Publish the release `folder` to `repo_id` (created when missing) on branch `revision`, in one commit.

    Refuses (VerifyError) a folder that fails its static checks or has no passing verify report, unless
    `force`. Writes/refreshes the model card first (README.md, listed in the manifest). `dry_run` checks and
    describes the upload without writing anything or sending any request. `token`/`endpoint` default to
    HF_TOKEN (or the stored login) and HF_ENDPOINT. Raises HubError with the next step on Hub refusals.
    """
    root = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InputError(f"'{repo_id}' is not a Hub repo id ({err}); write it as ORG/NAME") from err
    if not (root / "config.json").is_file() or read_manifest(root) is None:
        raise InputError(f"{root} is not a quantkit release folder (no config.json or {MANIFEST_NAME})")
    warnings: list[str] = []
    problems = check_publishable(root)
    if problems and not force:
        raise VerifyError(f"{root} is not published: " + "; ".join(problems)
                          + ". Fix and re-verify, or pass --force to publish anyway")
    if problems:
        warnings += [f"published despite: {problem}" for problem in problems]

    message = commit_message(root)
    if dry_run:
        card = render_card(root, repo_id=repo_id)
        files = sorted(set(listed_files(root)) | {MANIFEST_NAME, CARD_NAME})
        sizes = sum((root / name).stat().st_size for name in files if (root / name).is_file())
        written = (root / CARD_NAME).read_text(encoding="utf-8") if (root / CARD_NAME).is_file() else None
        total = sizes - ((root / CARD_NAME).stat().st_size if written is not None else 0) + len(card.encode())
        change = card_change(written, card, repo_id)
        if change:
            warnings.append(change)
        if (token or get_token()) is None:
            warnings.append(f"no Hub token is set; the real upload needs one: {NO_TOKEN_HINT}")
        return UploadResult(repo_id, revision, files, total, message, dry_run=True, warnings=warnings)

    token = token or get_token()
    if token is None:
        raise HubError(f"no Hub token: uploading to {repo_id} needs one; {NO_TOKEN_HINT}")
    write_card(root, repo_id=repo_id)
    files = sorted(set(listed_files(root)) | {MANIFEST_NAME})
    total = sum((root / name).stat().st_size for name in files)
    api = HfApi(endpoint=endpoint, token=token)
    step = "create the repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != "main":
            step = f"create branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "commit the files"
        info = api.create_commit(
            repo_id,
            [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(root / name)) for name in files],
            commit_message=message,
            commit_description=_description(root),
            revision=revision,
        )
    except HfHubHTTPError as err:
        raise _refused(err, api.endpoint, repo_id, step, token) from None
    except HTTPError as err:
        raise HubError(f"cannot reach {api.endpoint} to {step} for {repo_id}: "
                       f"{_scrub(' '.join(str(err).split()), token)}. Check the network and HF_ENDPOINT") from None
    return UploadResult(repo_id, revision, files, total, message, dry_run=False, commit_oid=info.oid,
                        commit_url=info.commit_url, warnings=warnings)


def _refused(err: HfHubHTTPError, endpoint: str, repo_id: str, step: str, token: str) -> HubError:
    status = err.response.status_code if err.response is not None else None
    if status in (401, 403):
        return HubError(f"{endpoint} refused the token when asked to {step} for {repo_id} (HTTP {status}): "
                        f"the token is invalid, expired, or has no write access to that namespace; {NO_TOKEN_HINT}")
    detail = _scrub(" ".join(str(err).split()), token)
    return HubError(f"{endpoint} refused to {step} for {repo_id} (HTTP {status}): {detail}")


def _description(folder: Path) -> str:
    """The commit's description: verify verdict and the tools that made the release."""
    lines: list[str] = []
    try:
        report: dict[str, Any] = json.loads((folder / REPORT_JSON).read_text())
        lines.append(f"verify: {report.get('verdict')} ({(report.get('settings') or {}).get('parity', 'parity')})")
    except (OSError, ValueError):
        lines.append("verify: no report")
    tools = (read_manifest(folder) or {}).get("tools") or {}
    lines.append("tools: " + ", ".join(f"{k} {v}" for k, v in tools.items() if v))
    return "\n".join(lines)
