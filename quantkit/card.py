"""The model card (README.md) of a release: Hub metadata, vLLM usage, settings and the verify evidence.

Everything on the card is read from the release folder itself (manifest, verify report, lock, an optional
eval report) and from the base model's card for the license, so the card describes exactly the files next to it
and can be regenerated at any time with the same result. No credentials are ever read here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from quantkit.archs import spec_for_config
from quantkit.io.chores import read_json
from quantkit.io.manifest import read_manifest, record_files
from quantkit.recipe import LOCK_NAME, read_lock
from quantkit.verify.report import (
    EVAL_REPORT,
    REPORT_JSON,
    format_value,
    no_decisive_note,
    serve_advice,
    speed_memory_rows,
    top1_cell,
)

CARD_NAME = "README.md"
LICENSE_KEYS = ("license", "license_name", "license_link")
_FAST_AWQ_KERNELS = ("Marlin", "Machete")


def front_matter(path: Path) -> dict[str, Any]:
    """The YAML metadata block of a Markdown card, or {} when there is none or it does not parse."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    block = text[3:].split("\n---", 1)[0]
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_license(folder: Path, source_folder: Path | None = None) -> dict[str, Any]:
    """License keys of the base model: its card (the source folder's README.md, or the one write_release copied
    into the release before the card replaced it: a card written here carries them over), else config.json."""
    for card in ([source_folder / CARD_NAME] if source_folder else []) + [folder / CARD_NAME]:
        found = {key: value for key, value in front_matter(card).items() if key in LICENSE_KEYS}
        if found:
            return found
    for config_dir in ([source_folder] if source_folder else []) + [folder]:
        try:
            config = json.loads((config_dir / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config.get("license"), str):
            return {"license": config["license"]}
    return {}


def _cell(value: Any) -> str:
    """A value in a markdown table cell: the verify report's number format, pipes escaped."""
    return format_value(value).replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)]


def made_with(manifest: dict[str, Any]) -> dict[str, str]:
    """The packages that made the release's files, as its quantize run recorded them in the manifest: not this
    environment's, which a later run that skipped quantize may have changed."""
    packages = {name: version for name, version in (manifest.get("tools") or {}).items() if version}
    quantization = manifest.get("quantization") or {}
    if quantization.get("backend") == "autoawq" and quantization.get("autoawq_version"):
        packages["autoawq"] = quantization["autoawq_version"]
    return packages


def kernel_advice(report: dict[str, Any] | None, repo: str) -> str:
    """What the card tells users about vLLM's int4 kernel, from the kernel verify saw vLLM pick, and the
    `vllm serve` command of the setup verify measured fastest."""
    int4 = ((report or {}).get("variants") or {}).get("int4") or {}
    kernel, warning = int4.get("kernel"), int4.get("kernel_warning")
    if kernel is None:
        return ("vLLM's kernel was not measured for this folder (no vLLM run in its verify report). On an NVIDIA "
                "GPU (compute capability 8.0+), vLLM serves AWQ GEMM checkpoints with its Marlin kernel "
                "(`awq_marlin`) when no `quantization=` argument forces the legacy `awq` path.")
    device = ((report or {}).get("environment") or {}).get("device", "?")
    advice = (f"In verification (device: {device}) vLLM served the int4 linears with `{kernel}`"
              f"{' (a fast kernel)' if any(k in kernel for k in _FAST_AWQ_KERNELS) else ''}.")
    if warning:
        advice += f" Warning from verify: {warning}"
    advice += (" Do not pass `quantization=\"awq\"`: it forces the legacy kernel, several times slower "
               "than Marlin.")
    serve = serve_advice((report or {}).get("speed_recommendation"), repo)
    return "\n".join([advice, "", f"Setups compared by verify on that machine ({device}). " + serve[0], *serve[1:]]) \
        if serve else advice


def render_card(folder: str | Path, source_folder: str | Path | None = None, repo_id: str | None = None) -> str:
    """README.md for the release in `folder` (Markdown with Hub YAML metadata); `repo_id` is where it is (or
    will be) published, for the usage snippet."""
    root = Path(folder)
    manifest = read_manifest(root) or {}
    report = read_json(root / REPORT_JSON)
    lock = read_lock(root) or {}
    source = manifest.get("source") or {}
    quantization = manifest.get("quantization") or {}
    calibration = manifest.get("calibration") or {}
    recipe = (manifest.get("recipe") or {}) | {k: v for k, v in (lock.get("recipe") or {}).items()
                                               if k in ("name", "sha256", "release")}
    base_model = source.get("repo_id")
    standin = source.get("standin")
    name = recipe.get("name") or root.name
    arch_card = spec_for_config(read_json(root / "config.json") or {}, source=str(root / "config.json")).card

    metadata: dict[str, Any] = {}
    if base_model:
        metadata |= {"base_model": base_model, "base_model_relation": "quantized"}
    metadata |= {"library_name": "transformers", "pipeline_tag": arch_card.pipeline_tag}
    metadata |= source_license(root, Path(source_folder) if source_folder else None)
    metadata["tags"] = ["awq", "int4", "4-bit", "quantkit", "vllm", *(["stand-in"] if standin else [])]
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "", f"# {name}", ""]

    origin = f"[{base_model}](https://huggingface.co/{base_model}) at commit `{source.get('commit')}`" \
        if base_model else f"the quantkit {arch_card.display_name} stand-in" + (
            f" (size {standin.get('size')}, seed {standin.get('seed')})" if standin else "")
    lines.append(f"int4 AWQ (GEMM layout) of {origin}, made by quantkit "
                 f"{(manifest.get('tools') or {}).get('quantkit', '?')}"
                 + (f" from recipe `{name}` (sha256 `{recipe['sha256'][:12]}`)" if recipe.get("sha256") else "")
                 + ". " + arch_card.kept_16bit)
    if standin:
        lines += ["", (f"> **Not a real model.** Random weights with {arch_card.display_name}'s file layout, built by "
                  "`quantkit.standin` to test the release pipeline end to end. Its outputs are noise.")]
    if recipe and not recipe.get("release"):
        lines += ["", "> Made from a recipe not marked `release: true`: its inputs may not all be pinned."]

    verdict = (report or {}).get("verdict", "not verified")
    parity = ((report or {}).get("settings") or {}).get("parity")
    lines += ["", f"**Verification: {verdict}**" + (f" ({parity})" if parity else "") + "."]

    repo = repo_id or f"path/to/{root.name}"
    lines += ["", "## Usage with vLLM", "", arch_card.vllm_usage.replace("{repo}", repo)
              + (" No `quantization=` argument is needed: vLLM reads `quantization_config` from config.json and "
                 "picks its AWQ kernel itself."), "", kernel_advice(report, repo)]

    settings = quantization.get("settings") or {}
    qconfig = quantization.get("quantization_config") or {}
    lines += ["", "## Quantization", ""]
    rounding = (", then GPTQ error-compensated rounding on the same groups" if settings.get("method") == "awq-gptq"
                else "")
    rows: list[tuple[Any, ...]] = [("method", (f"AWQ (activation-aware weight quantization){rounding}, "
                                    f"{quantization.get('backend', 'native')} engine"))]
    rows += [(key, settings[key]) for key in settings]
    rows += [("kept 16-bit", ", ".join(qconfig.get("modules_to_not_convert") or []) or "–"),
             ("quantized decoder layers", (f"{len(quantization.get('quantized_layers') or [])} of "
                                          f"{quantization.get('num_layers', '?')}")),
             ("release dtype", quantization.get("release_dtype")),
             ("calibration", (f"{calibration.get('source')}: {calibration.get('text_blocks')} x "
                             f"{calibration.get('seq_len')} tokens + {calibration.get('multimodal_samples', 0)} "
                             f"image samples, seed {quantization.get('seed')}")),
             ("calibration fingerprint", calibration.get("fingerprint")),
             ("compute", f"{quantization.get('device')} ({quantization.get('compute_dtype')})")]
    lines += _table(("setting", "value"), rows)

    code = manifest.get("remote_code") or {}
    if code:
        lines += ["", "## Remote code", "", ("The source checkpoint's own Python files, unchanged (quantkit does not "
                  "run them; vLLM and transformers run them with `trust_remote_code=True`):"), ""]
        lines += _table(("file", "sha256"), [(f"`{name}`", f"`{digest}`") for name, digest in sorted(code.items())])

    lines += ["", "## Verification", ""] + _verification(report)
    evaluation = read_json(root / EVAL_REPORT)
    if evaluation:
        lines += ["", "## Evaluation", "", (f"`quantkit eval` on {evaluation.get('n_blocks')} x "
                  f"{evaluation.get('seq_len')} tokens of {evaluation.get('text_source')}:"), ""]
        lines += _table(("metric", "value"), [
            ("perplexity (int4)", format_value(evaluation.get("perplexity"), 4)),
            ("perplexity (16-bit)", format_value(evaluation.get("reference_perplexity"), 4)),
            ("mean KL(16-bit || int4), nats/token", format_value(evaluation.get("kl_mean"), 4)),
            ("top-1 agreement", format_value(evaluation.get("top1_agreement"), 4))])

    lines += ["", "## Reproduce", ""]
    if recipe.get("name"):
        lines += [(f"`{LOCK_NAME}` holds the recipe that made this release (`recipe.text`), the resolved revisions, "
                  "the package versions that made the files, the machine of its last run, seeds and output hashes: "
                  "save `recipe.text` as `recipe.yaml` and run `quantkit run recipe.yaml`.")]
    packages = made_with(manifest)
    if packages:
        lines += ["", "Made with " + ", ".join(f"{k} {v}" for k, v in packages.items()) + "."]
    lines += ["", "Every file's sha256 is in `quantkit-manifest.json`; `quantkit verify --static DIR` re-checks them."]
    return "\n".join(lines) + "\n"


def _verification(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return ["No verify report in this folder: run `quantkit verify DIR --reference SOURCE`."]
    lines: list[str] = []
    static = (report.get("static") or {}).get("summary") or {}
    if static:
        lines += [(f"Static checks (files, headers, layout, values, config, manifest): {static.get('passed', 0)} "
                  f"passed, {static.get('failed', 0)} failed, {static.get('skipped', 0)} skipped."), ""]
    measured = [p for p in report.get("prompts") or [] if p.get("metrics")]
    if measured:
        thresholds = report.get("thresholds") or {}
        lines += [("Parity through vLLM, int4 teacher-forced on the 16-bit greedy continuation "
                  f"(thresholds: {', '.join(f'{k} {_cell(v)}' for k, v in thresholds.items() if v is not None)}):"), ""]
        lines += _table(("prompt", "kind", "tokens", "mean KL", "top-1 agree", "1st divergence", "verdict"),
                        [(p["id"], p["kind"], p["metrics"]["positions"], format_value(p["metrics"]["mean_kl"], 4),
                          top1_cell(p["metrics"]), p["metrics"]["first_divergence"],
                          "pass" if p["metrics"]["passed"] else "FAIL") for p in measured])
        note = no_decisive_note(measured, thresholds)
        lines += ["", note] if note else []
    else:
        lines += ["No parity numbers: vLLM did not run in this verification."]
    variants = report.get("variants") or {}
    if (variants.get("int4") or {}).get("ok"):
        lines += ["", "Speed and memory in vLLM (same engine settings for both):", ""]
        lines += _table(("", "16-bit", "int4"), speed_memory_rows(variants))
    for reason in report.get("reasons") or []:
        lines.append(f"- {reason}")
    return lines


def write_card(folder: str | Path, source_folder: str | Path | None = None,
               repo_id: str | None = None) -> tuple[Path, bool]:
    """Write README.md into `folder` and list it (and an eval report, if any) in the manifest; returns (path,
    whether the file changed). An unchanged card is not rewritten."""
    root = Path(folder)
    text = render_card(root, source_folder, repo_id)
    path = root / CARD_NAME
    changed = not path.is_file() or path.read_text(encoding="utf-8") != text
    if changed:
        path.write_text(text, encoding="utf-8")
    record_files(root, [CARD_NAME] + ([EVAL_REPORT] if (root / EVAL_REPORT).is_file() else []))
    return path, changed
