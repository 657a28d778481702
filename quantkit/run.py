"""`run()`: a recipe's stages, download -> quantize -> verify -> card -> (upload), each skipped when its output
is already complete and made from the same inputs, so a re-run after a failure picks up where it stopped.

What "same inputs" means per stage, all read from files the stages themselves write:
  download  the source folder's manifest names the recipe's repo and commit (or stand-in size and seed) and its
            files are there at their recorded sizes;
  quantize  the release manifest's `recipe.quantize` fingerprint (source identity and file hashes, calibration,
            settings, shard size) equals the recipe's; a killed quantize resumes per layer from its work folder;
  verify    the lock's verify fingerprint (verify settings, parity mode, release file hashes) matches and the
            report says PASS;
  card      README.md already has the text the card would get;
  upload    the lock records an upload of the same files to the same repo and revision, still its head there.
Everything that can be checked cheaply (recipe schema, local files and hashes, the Hub repo and revision, vLLM
and GPU presence, the token for an upload) is checked before the first stage starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.archs import spec_for_config
from quantkit.errors import DependencyError, HubError, InputError, QuantkitError, VerifyError
from quantkit.io.chores import format_size, read_json
from quantkit.io.manifest import MANIFEST_NAME, read_manifest, record_files, write_manifest
from quantkit.io.portable import portable
from quantkit.recipe import (
    FULL_SHA,
    LOCK_NAME,
    LoadedRecipe,
    load_recipe,
    machine,
    path_digest,
    read_lock,
    write_lock,
)

_GENERATED = {LOCK_NAME, MANIFEST_NAME, "README.md", "verify-report.json", "verify-report.md", "eval-report.json"}
"""Files of a release written after quantize: not part of what verify checks against its fingerprint."""
QUANTIZE_OVERHEAD = 1.32
"""Allocator and search temporaries on top of the tensors `estimate_quantize_memory` counts: fitted so the
estimate meets the measured 9.4 GiB peak at MiniCPM-V 2.6's real shapes, 128 x 512 tokens (docs/benchmarks.md)."""


@dataclass
class StageRecord:
    """One stage in one run: `status` is ran / skipped / failed / not selected, `reason` says why."""

    name: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "seconds": round(self.seconds, 2), **self.details}


@dataclass
class PlanItem:
    """What a stage will do: `action` is run / skip / check (decided when it runs) / not selected."""

    stage: str
    action: str
    reason: str
    details: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    recipe: LoadedRecipe
    plan: list[PlanItem]
    stages: list[StageRecord]
    release: Path
    source: Path
    lock_path: Path | None
    dry_run: bool
    warnings: list[str] = field(default_factory=list)


# --- fingerprints -----------------------------------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _files_digest(entries: list[dict[str, Any]], skip: set[str] = frozenset()) -> str:
    return _digest(sorted((e["path"], e["sha256"]) for e in entries if e["path"] not in skip))


def source_identity(loaded: LoadedRecipe) -> dict[str, Any]:
    """What the recipe asks the source to be: repo and revision, or the stand-in's size and seed."""
    source = loaded.recipe.source
    if source.standin is not None:
        return {"standin": source.standin.model_dump()}
    return {"repo_id": source.repo, "revision": source.revision}


def _source_matches(loaded: LoadedRecipe, manifest: dict[str, Any] | None) -> bool:
    """The source folder's manifest holds what the recipe asks for, by commit (a branch revision is compared
    by name here; `download` then asks the Hub whether the branch moved)."""
    recorded = (manifest or {}).get("source") or {}
    wanted = source_identity(loaded)
    if "standin" in wanted:
        return recorded.get("standin") == wanted["standin"]
    revision = wanted["revision"]
    return recorded.get("repo_id") == wanted["repo_id"] and revision in (recorded.get("commit"),
                                                                        recorded.get("revision"))


def _files_present(folder: Path, manifest: dict[str, Any]) -> bool:
    return all((folder / e["path"]).is_file() and (folder / e["path"]).stat().st_size == e["size"]
               for e in manifest["files"])


def _calibration_pin(loaded: LoadedRecipe) -> dict[str, Any]:
    """The calibration section plus what pins its content: the data's digest (a file or folder), the dataset
    revision, or the Python version (builtin:pydoc is the running CPython's own text)."""
    ref = loaded.calibration()
    section = loaded.recipe.calibration.model_dump()
    if ref.kind == "path":
        return {**section, "digest": path_digest(Path(ref.value))}
    if ref.kind == "builtin":
        return {**section, "python": ".".join(platform.python_version_tuple()[:2])}
    return section


def quantize_fingerprint(loaded: LoadedRecipe, source_manifest: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides the release's bytes (devices aside: `auto` stays `auto`)."""
    recorded = source_manifest.get("source") or {}
    identity = {"standin": recorded["standin"]} if "standin" in recorded else \
        {"repo_id": recorded.get("repo_id"), "commit": recorded.get("commit")}
    return {"source": identity, "source_files": _files_digest(source_manifest["files"]),
            "calibration": _calibration_pin(loaded), "quantization": loaded.recipe.quantization.model_dump(),
            "shard_size_gb": loaded.recipe.output.shard_size_gb}


def _parity_mode(loaded: LoadedRecipe) -> tuple[bool, str]:
    """(run vLLM?, the sentence the report, lock and card carry about it)."""
    mode = loaded.recipe.verify.vllm
    if mode == "skip":
        return False, "static checks only: the recipe sets verify.vllm: skip"
    if importlib.util.find_spec("vllm") is not None:
        return True, "vLLM parity run: 16-bit reference and int4 release through vLLM"
    return False, "static checks only: vLLM is not installed (the recipe sets verify.vllm: if_installed)"


def verify_fingerprint(loaded: LoadedRecipe, release_manifest: dict[str, Any], use_vllm: bool) -> str:
    return _digest({"verify": loaded.recipe.verify.model_dump(), "vllm": use_vllm,
                    "release_files": _files_digest(release_manifest["files"], _GENERATED)})


# --- estimates ---------------------------------------------------------------------------------------------


def estimate_quantize_memory(config: dict[str, Any], n_samples: int, seq_len: int, max_batch_tokens: int,
                             bytes_per_value: int = 2) -> dict[str, float]:
    """Peak device memory (bytes) of the quantize stage from the config's shapes (read through the arch spec):
    the larger of the capture phase (every module outside the decoder layers + the captured hidden states) and
    the layer phase (one decoder layer and its working copy, layer inputs and outputs for all n_samples x
    seq_len tokens, the captured input of every scaling group, one micro-batch of the widest activation, in the
    MLP: gate, up and their product), times QUANTIZE_OVERHEAD."""
    spec = spec_for_config(config)
    llm = spec.text_config(config)
    hidden = int(llm["hidden_size"])
    shapes = spec.linear_shapes(llm)
    tokens = n_samples * seq_len
    layer = sum(fan_in * fan_out for fan_in, fan_out in shapes.values()) * bytes_per_value
    captured_width = sum(shapes[group.linears[0]][0] for group in spec.scaling_groups)
    widest = max(fan_in for fan_in, _ in shapes.values())
    layer_phase = (2 * layer + 2 * tokens * hidden * bytes_per_value
                   + tokens * captured_width * bytes_per_value
                   + 3 * min(max_batch_tokens, tokens) * widest * bytes_per_value)
    outside = (2 * int(llm.get("vocab_size", 0)) * hidden + spec.vision_params(config)) * bytes_per_value
    capture_phase = outside + tokens * hidden * bytes_per_value
    return {"layer_phase": layer_phase * QUANTIZE_OVERHEAD, "capture_phase": capture_phase * QUANTIZE_OVERHEAD,
            "peak": max(layer_phase, capture_phase) * QUANTIZE_OVERHEAD}


# --- the run ------------------------------------------------------------------------------------------------


class _Run:
    """State shared by the stages of one run."""

    def __init__(self, loaded: LoadedRecipe, force: bool, token: str | None, endpoint: str | None,
                 on_event: Callable[[str], None], on_layer_done: Callable[[Any, int], None] | None) -> None:
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.force = force
        self.token = token
        self.endpoint = endpoint
        self.event = on_event
        self.on_layer_done = on_layer_done
        self.source = loaded.source_folder
        self.release = loaded.output_folder
        self.previous = read_lock(self.release) or {}
        self.records: dict[str, StageRecord] = {}
        self.resolved: dict[str, Any] = {}
        self.remote_sizes: int | None = None
        self.use_vllm, self.parity_note = _parity_mode(loaded)

    # -- checks before any heavy work

    def preflight(self, selected: list[str], dry_run: bool) -> list[str]:
        """Every cheap check, in the order a user would fix them; returns warnings."""
        recipe, loaded, warnings = self.recipe, self.loaded, list(self.loaded.warnings)
        if "quantize" in selected and not dry_run:
            from quantkit.quantize import BACKENDS, resolve_device

            try:
                device = resolve_device(recipe.quantization.device)
            except QuantkitError as err:
                raise type(err)(f"{loaded.where('quantization.device')}: {err}") from None
            try:
                BACKENDS[recipe.quantization.backend].check(device, recipe.settings())
            except QuantkitError as err:
                raise type(err)(f"{loaded.where('quantization.backend')}: {err}") from None
        if "verify" in selected and recipe.verify.vllm == "required" and not self.use_vllm:
            from quantkit.verify.pipeline import VLLM_INSTALL_HINT

            raise DependencyError(f"{loaded.where('verify.vllm')}: the recipe requires the vLLM parity check but "
                                  f"vLLM is not installed: {VLLM_INSTALL_HINT}")
        if "verify" in selected and recipe.verify.prompts is not None:
            from quantkit.verify.prompts import load_prompts

            load_prompts(loaded.resolve(recipe.verify.prompts))
        if "download" in selected and recipe.source.repo is not None:
            self._check_remote_source()
        if "quantize" in selected and loaded.calibration().kind == "dataset":
            self._check_calibration_dataset()
        first = selected[0] if selected else "upload"
        if STAGES.index(first) > 0 and not self._source_ready():
            raise InputError(f"--from {first}: the source folder {self.source} holds no complete "
                             f"{self._wanted()}; run from the download stage")
        if STAGES.index(first) > 1 and read_manifest(self.release) is None:
            raise InputError(f"--from {first}: {self.release} holds no release yet; run from the quantize stage")
        if "quantize" in selected and self.release.exists() and self._source_ready():
            differs = self._release_differences()
            if differs and not (self.force or recipe.output.force):
                raise InputError(f"{loaded.where('output.folder')}: {self.release} already holds a release made "
                                 f"from other inputs ({differs}); set output.force: true or pass --force to "
                                 "replace it, or choose another folder")
        if "upload" in selected and not dry_run:
            from huggingface_hub import get_token

            from quantkit.upload import NO_TOKEN_HINT

            if (self.token or get_token()) is None:
                raise HubError(f"{loaded.where('upload')}: no Hub token for the upload stage; {NO_TOKEN_HINT}")
        return warnings

    def _wanted(self) -> str:
        identity = source_identity(self.loaded)
        if "standin" in identity:
            return f"stand-in {identity['standin']}"
        return f"{identity['repo_id']}@{identity['revision']}"

    def _source_ready(self) -> bool:
        manifest = read_manifest(self.source) if self.source.is_dir() else None
        return manifest is not None and _source_matches(self.loaded, manifest) and _files_present(self.source,
                                                                                                   manifest)

    def _check_remote_source(self) -> None:
        """model_info on the recipe's repo and revision: a typo in either fails here, in a second. Skipped when
        the folder already holds that exact commit (offline re-runs) or HF_HUB_OFFLINE is set."""
        from huggingface_hub import HfApi, is_offline_mode

        from quantkit.hub import hub_errors

        source = self.recipe.source
        assert source.repo is not None and source.revision is not None
        if is_offline_mode() or (FULL_SHA.fullmatch(source.revision) and self._source_ready()):
            return
        api = HfApi(endpoint=self.endpoint, token=self.token)
        try:
            with hub_errors(api, source.repo, source.revision, self.token):
                info = api.model_info(source.repo, revision=source.revision, files_metadata=True)
        except HubError as err:
            raise HubError(f"{self.loaded.where('source.revision')}: {err}") from None
        sizes = [sibling.size for sibling in info.siblings or []]
        self.remote_sizes = sum(sizes) if sizes and None not in sizes else None
        self.resolved["source_commit"] = info.sha

    def _check_calibration_dataset(self) -> None:
        from huggingface_hub import HfApi, is_offline_mode
        from huggingface_hub.errors import HfHubHTTPError, HTTPError

        if is_offline_mode():
            return
        calibration = self.recipe.calibration
        dataset_id = calibration.source.partition(":")[0]
        try:
            info = HfApi(endpoint=self.endpoint, token=self.token).dataset_info(dataset_id,
                                                                                revision=calibration.revision)
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else "?"
            raise InputError(f"{self.loaded.where('calibration.source')}: dataset {dataset_id!r} at revision "
                             f"{calibration.revision or 'main'} not found (HTTP {status}); check the id and "
                             "revision, or calibrate on a local file") from None
        except HTTPError as err:
            raise HubError(f"{self.loaded.where('calibration.source')}: cannot reach the Hub to look up dataset "
                           f"{dataset_id!r} ({' '.join(str(err).split())})") from None
        self.resolved["calibration_commit"] = info.sha

    def _release_differences(self) -> str:
        """Empty when the release folder was made from this recipe's inputs, else which of them differ."""
        manifest = read_manifest(self.release)
        recorded = ((manifest or {}).get("recipe") or {}).get("quantize")
        if manifest is None or recorded is None:
            return "it was not made by `quantkit run`"
        wanted = quantize_fingerprint(self.loaded, read_manifest(self.source) or {"files": []})
        keys = [key for key in wanted if recorded.get(key) != wanted[key]]
        return ", ".join(f"{key} differs" for key in keys)

    # -- planning

    def plan(self, selected: list[str]) -> list[PlanItem]:
        items = []
        for stage in STAGES:
            if stage == "upload" and self.recipe.upload is None:
                items.append(PlanItem(stage, "not selected", "the recipe has no upload section"))
            elif stage not in selected:
                items.append(PlanItem(stage, "not selected", "outside --from/--until"))
            else:
                items.append(STAGE_STEPS[stage].plan(self))
        return items

    def _plan_download(self) -> PlanItem:
        if self._source_ready() and not self.force:
            return PlanItem("download", "skip", f"{self.source} already holds {self._wanted()}")
        details = [f"into {self.source}"]
        if self.recipe.source.standin is not None:
            from quantkit.standin import REAL, TINY, weight_specs

            size = TINY if self.recipe.source.standin.size == "tiny" else REAL
            details.append(f"weights {format_size(sum(spec.numel for spec in weight_specs(size)) * 2)} (bf16)")
            return PlanItem("download", "run", "build the stand-in", details)
        if self.remote_sizes is not None:
            details.append(f"{format_size(self.remote_sizes)} to fetch at most")
        return PlanItem("download", "run", f"fetch {self._wanted()}", details)

    def _source_config(self) -> dict[str, Any] | None:
        """The source's config.json, or the stand-in's before it is built; None for a model not downloaded yet."""
        if (self.source / "config.json").is_file():
            return json.loads((self.source / "config.json").read_text())
        if self.recipe.source.standin is not None:
            from quantkit.standin import REAL, TINY, real_config

            return real_config(TINY if self.recipe.source.standin.size == "tiny" else REAL)
        return None

    def _plan_quantize(self) -> PlanItem:
        calibration = self.recipe.calibration
        details = [(f"calibration {calibration.source}: {calibration.n_samples} x {calibration.seq_len} tokens, "
                   f"seed {calibration.seed}"), (f"device {self.recipe.quantization.device}, backend "
                   f"{self.recipe.quantization.backend}")]
        config = self._source_config()
        if config is not None:
            memory = estimate_quantize_memory(config, calibration.n_samples, calibration.seq_len,
                                              self.recipe.quantization.max_batch_tokens)
            details.append(f"estimated peak GPU memory {format_size(memory['peak'])} (layer phase "
                           f"{format_size(memory['layer_phase'])}, capture phase {format_size(memory['capture_phase'])}; "
                           "on a CPU this is host memory)")
        else:
            details.append("GPU memory estimate: unknown until config.json is downloaded")
        if not self.force and self._source_ready() and read_manifest(self.release) is not None \
                and not self._release_differences():
            return PlanItem("quantize", "skip", f"{self.release} already holds this release", details)
        from quantkit.quantize import work_folder

        state = work_folder(self.release) / "state.json"
        if state.is_file():
            done = json.loads(state.read_text()).get("completed_layers", 0)
            details.append(f"a work folder holds {done} finished layer(s); quantize resumes there if the "
                           "inputs are the same")
        return PlanItem("quantize", "run" if self._source_ready() else "check",
                        "quantize and write the release", details)

    def _plan_verify(self) -> PlanItem:
        details = [self.parity_note]
        if self._verify_done():
            return PlanItem("verify", "skip", "the verify report of these files and settings says PASS", details)
        return PlanItem("verify", "run", "verify the release", details)

    def _plan_card(self) -> PlanItem:
        return PlanItem("card", "check", "write README.md unless it already has this text")

    def _plan_upload(self) -> PlanItem:
        upload = self.recipe.upload
        assert upload is not None
        return PlanItem("upload", "check", f"publish to {upload.repo}@{upload.revision} "
                        f"({'private' if upload.private else 'public'}) unless that commit is already there")

    # -- stages

    def _verify_done(self) -> bool:
        manifest = read_manifest(self.release) if self.release.is_dir() else None
        record = (self.previous.get("stages") or {}).get("verify") or {}
        if manifest is None or self.force or record.get("fingerprint") != verify_fingerprint(
                self.loaded, manifest, self.use_vllm):
            return False
        report = read_json(self.release / "verify-report.json") or {}
        return report.get("verdict") == "PASS" and (manifest.get("verify") or {}).get("verdict") == "PASS"

    def stage_download(self) -> StageRecord:
        if self._source_ready() and not self.force and (
                self.recipe.source.standin is not None or FULL_SHA.fullmatch(self.recipe.source.revision or "")):
            return StageRecord("download", "skipped", f"{self.source} already holds {self._wanted()}")
        if self.recipe.source.standin is not None:
            return self._build_standin()
        from quantkit.hub import download

        source = self.recipe.source
        assert source.repo is not None and source.revision is not None
        result = download(source.repo, revision=source.revision, out_dir=self.source, force=self.force,
                          token=self.token, endpoint=self.endpoint)
        for warning in result.warnings:
            self.event(f"warning: {warning}")
        status = "skipped" if result.already_present else "ran"
        reason = f"{'already held' if result.already_present else 'downloaded'} {source.repo}@{result.commit}"
        return StageRecord("download", status, reason, details={"commit": result.commit})

    def _build_standin(self) -> StageRecord:
        """Build the stand-in next to its final place and rename it in, with a manifest naming size and seed."""
        from quantkit.standin import REAL, TINY, build_standin

        standin = self.recipe.source.standin
        assert standin is not None
        if self.source.exists() and any(self.source.iterdir()) and not (self.force or self.recipe.output.force):
            raise InputError(f"{self.source} holds something other than stand-in {standin.model_dump()}; remove "
                             "it, set source.folder elsewhere, or pass --force to replace it")
        self.source.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{self.source.name}.tmp-", dir=self.source.parent))
        try:
            build_standin(building, TINY if standin.size == "tiny" else REAL, seed=standin.seed)
            write_manifest(building, {"source": {"standin": standin.model_dump(),
                                                 "builder": "quantkit.standin"}})
            if self.source.exists():
                shutil.rmtree(self.source)
            building.rename(self.source)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return StageRecord("download", "ran", f"built stand-in {standin.model_dump()}")

    def stage_quantize(self) -> StageRecord:
        from quantkit.quantize import QuantizeConfig, quantize

        source_manifest = read_manifest(self.source)
        assert source_manifest is not None
        fingerprint = quantize_fingerprint(self.loaded, source_manifest)
        differs = self._release_differences() if self.release.exists() else "no release yet"
        if not differs and not self.force:
            return StageRecord("quantize", "skipped", f"{self.release} already holds this release")
        recipe, calibration = self.recipe, self.recipe.calibration
        ref = self.loaded.calibration()
        config = QuantizeConfig(
            calib=ref.value, calib_revision=calibration.revision, calib_split=calibration.split,
            text_field=calibration.text_field, n_samples=calibration.n_samples, seq_len=calibration.seq_len,
            seed=calibration.seed, settings=recipe.settings(), device=recipe.quantization.device,
            backend=recipe.quantization.backend, max_shard_bytes=int(recipe.output.shard_size_gb * 2**30))
        result = quantize(
            self.source, self.release, config, force=self.release.exists(), on_layer_done=self.on_layer_done,
            manifest_extra={"recipe": {"name": recipe.name, "sha256": self.loaded.sha256,
                                       "release": recipe.release, "quantize": fingerprint}},
        )
        resumed = result.resumed_from_layer
        return StageRecord("quantize", "ran", f"{len(result.layers)} layers on {result.device}"
                           + (f", resumed from layer {resumed}" if resumed else ""),
                           details={"resumed_from_layer": resumed, "device": result.device,
                                    "peak_gpu_gib": result.peak_gpu_gib,
                                    "seconds_by_step": {k: round(v, 2) for k, v in result.seconds.items()}})

    def stage_verify(self) -> StageRecord:
        from quantkit.verify.pipeline import verify
        from quantkit.verify.report import write_report

        manifest = read_manifest(self.release)
        assert manifest is not None
        fingerprint = verify_fingerprint(self.loaded, manifest, self.use_vllm)
        if self._verify_done():
            return StageRecord("verify", "skipped", "the report of these files and settings says PASS",
                               details={"fingerprint": fingerprint, "verdict": "PASS", "parity": self.parity_note})
        settings = self.recipe.verify
        report = verify(self.release, reference=self.source, source=self.source, static_only=not self.use_vllm,
                        prompts=self.loaded.resolve(settings.prompts) if settings.prompts else None,
                        thresholds=self.recipe.thresholds(), gpu_memory_gb=settings.gpu_memory_gb,
                        max_tokens=settings.max_tokens, max_rel_error=settings.max_rel_error,
                        speed_trials=settings.speed_trials)
        report.settings["parity"] = self.parity_note
        if not self.use_vllm:
            report.environment["vllm_parity"] = self.parity_note
        write_report(report, self.release)
        details = {"fingerprint": fingerprint, "verdict": report.verdict, "parity": self.parity_note}
        if not report.passed:
            record = StageRecord("verify", "failed", "; ".join(report.reasons) or "verdict FAIL", details=details)
            self.records["verify"] = record
            raise VerifyError(f"verify failed ({self.release / 'verify-report.md'}): "
                              + "; ".join(report.reasons[:5]))
        return StageRecord("verify", "ran", f"PASS ({self.parity_note})", details=details)

    def stage_card(self) -> StageRecord:
        from quantkit.card import write_card

        upload = self.recipe.upload
        _, changed = write_card(self.release, self.source, repo_id=upload.repo if upload else None)
        return StageRecord("card", "ran" if changed else "skipped",
                           "README.md written" if changed else "README.md already up to date")

    def stage_upload(self) -> StageRecord:
        from quantkit.upload import upload

        target = self.recipe.upload
        assert target is not None
        manifest = read_manifest(self.release)
        assert manifest is not None
        files = _files_digest(manifest["files"], {LOCK_NAME})
        record = (self.previous.get("stages") or {}).get("upload") or {}
        if not self.force and record.get("files") == files and record.get("repo") == target.repo \
                and record.get("revision") == target.revision and self._remote_head(target) == record.get("commit"):
            return StageRecord("upload", "skipped", f"{target.repo}@{target.revision} already holds these files",
                               details={k: record[k] for k in ("repo", "revision", "commit", "files")})
        result = upload(self.release, target.repo, private=target.private, revision=target.revision,
                        token=self.token, endpoint=self.endpoint)
        manifest = read_manifest(self.release) or manifest
        return StageRecord("upload", "ran", f"commit {result.commit_oid} on {target.repo}@{target.revision}",
                           details={"repo": target.repo, "revision": target.revision, "commit": result.commit_oid,
                                    "files": _files_digest(manifest["files"], {LOCK_NAME})})

    def _remote_head(self, target: Any) -> str | None:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HTTPError

        try:
            return HfApi(endpoint=self.endpoint, token=self.token).model_info(target.repo,
                                                                              revision=target.revision).sha
        except HTTPError:
            return None

    # -- the lock

    def write_lock(self) -> Path | None:
        """quantkit-lock.json in the release folder (once it exists), listed in its manifest. Stages not run this
        time keep their last record (with `status` saying so), so the verify fingerprint survives a --from."""
        if read_manifest(self.release) is None:
            return None

        from quantkit.card import made_with

        recipe, loaded = self.recipe, self.loaded
        manifest = read_manifest(self.release) or {"files": []}
        source_manifest = read_manifest(self.source) or {}
        previous_stages = self.previous.get("stages") or {}
        stages = {}
        for stage in STAGES:
            if stage in self.records:
                stages[stage] = self.records[stage].as_dict()
            elif stage in previous_stages:
                stages[stage] = {**previous_stages[stage], "status": "not selected"}
        ref = loaded.calibration()
        calibration = {**_calibration_pin(loaded), "kind": ref.kind,
                       "fingerprint": (manifest.get("calibration") or {}).get("fingerprint")}
        if "calibration_commit" in self.resolved:
            calibration["resolved_commit"] = self.resolved["calibration_commit"]
        recorded = {  # published with the release: the run's folders are named by their names only
            "resolved": {"source": {**(source_manifest.get("source") or {}), "folder": str(self.source)},
                         "calibration": calibration, "verify": {"parity": self.parity_note}},
            "seeds": {"calibration": recipe.calibration.seed,
                      **({"standin": recipe.source.standin.seed} if recipe.source.standin else {})},
            "packages": made_with(manifest),
            "machine": machine(),
            "stages": stages,
            "outputs": {"folder": str(self.release),
                        "files": [e for e in manifest["files"] if e["path"] != LOCK_NAME]},
        }
        document = {
            "recipe": {"path": loaded.path.name, "name": recipe.name, "sha256": loaded.sha256,
                       "release": recipe.release, "content": recipe.model_dump(mode="json"), "text": loaded.text},
            **portable(recorded, [self.release, self.source, loaded.path.parent]),
        }
        path = write_lock(self.release, document)
        record_files(self.release, [LOCK_NAME])
        return path


@dataclass(frozen=True)
class Stage:
    """One stage of a run: `plan` says what it will do (the plan, --dry-run), `run` does it or skips it."""

    plan: Callable[[_Run], PlanItem]
    run: Callable[[_Run], StageRecord]


STAGE_STEPS: dict[str, Stage] = {
    "download": Stage(plan=_Run._plan_download, run=_Run.stage_download),
    "quantize": Stage(plan=_Run._plan_quantize, run=_Run.stage_quantize),
    "verify": Stage(plan=_Run._plan_verify, run=_Run.stage_verify),
    "card": Stage(plan=_Run._plan_card, run=_Run.stage_card),
    "upload": Stage(plan=_Run._plan_upload, run=_Run.stage_upload),
}
STAGES = tuple(STAGE_STEPS)
"""The stages in the order a run goes through them."""


def selected_stages(from_stage: str | None, until_stage: str | None, has_upload: bool) -> list[str]:
    """The stages between --from and --until (inclusive); upload only when the recipe has a target."""
    for name, value in (("--from", from_stage), ("--until", until_stage)):
        if value is not None and value not in STAGES:
            raise InputError(f"{name} {value!r}: use one of {', '.join(STAGES)}")
    if until_stage == "upload" and not has_upload:
        raise InputError("--until upload: the recipe has no upload section (add `upload: {repo: ORG/NAME}`)")
    start = STAGES.index(from_stage) if from_stage else 0
    end = STAGES.index(until_stage) if until_stage else len(STAGES) - 1
    if start > end:
        raise InputError(f"--from {from_stage} comes after --until {until_stage}")
    return [stage for stage in STAGES[start:end + 1] if stage != "upload" or has_upload]


def run(
    recipe_path: str | Path,
    *,
    from_stage: str | None = None,
    until_stage: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    on_event: Callable[[str], None] | None = None,
    on_layer_done: Callable[[Any, int], None] | None = None,
) -> RunResult:
    """Run the recipe at `recipe_path`: its selected stages in order, each skipped when already done.

    `dry_run` validates everything and returns the plan without running a stage. `force` redoes the selected
    stages even when their outputs are complete. `on_event(line)` receives one line per stage start and end;
    `on_layer_done(report, n_layers)` is quantize's per-layer progress. The lock file is (re)written after every
    stage once the release folder exists, including after a failure. Raises InputError / HubError /
    DependencyError before any heavy work for a broken recipe, VerifyError when the release fails verification.
    """
    loaded = load_recipe(recipe_path)
    event = on_event or (lambda line: None)
    selected = selected_stages(from_stage, until_stage, loaded.recipe.upload is not None)
    state = _Run(loaded, force, token, endpoint, event, on_layer_done)
    warnings = state.preflight(selected, dry_run)
    plan = state.plan(selected)
    if dry_run:
        return RunResult(loaded, plan, [], state.release, state.source, None, dry_run=True, warnings=warnings)
    stage, started = selected[0], time.perf_counter()
    try:
        for stage in selected:
            event(f"{stage}: starting")
            started = time.perf_counter()
            record = STAGE_STEPS[stage].run(state)
            record.seconds = time.perf_counter() - started
            state.records[stage] = record
            event(f"{stage}: {record.status} ({record.reason}) in {record.seconds:.1f} s")
            state.write_lock()
    except BaseException as err:
        if stage not in state.records:
            state.records[stage] = StageRecord(stage, "failed", " ".join(str(err).split())[:500]
                                               or type(err).__name__)
        state.records[stage].seconds = time.perf_counter() - started
        state.write_lock()
        raise
    lock_path = state.write_lock()
    return RunResult(loaded, plan, [state.records[s] for s in selected], state.release, state.source, lock_path,
                     dry_run=False, warnings=warnings)

