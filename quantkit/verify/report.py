"""The verify report: one `VerifyReport` value, written as `verify-report.json` (for machines) and
`verify-report.md` (for the model card and reviewers) into the int4 folder, and recorded in its manifest."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.io.manifest import file_entries, read_manifest, write_manifest
from quantkit.io.portable import portable

REPORT_JSON = "verify-report.json"
REPORT_MD = "verify-report.md"
EVAL_REPORT = "eval-report.json"
"""`quantkit eval MODEL --save` writes this into MODEL; verify's report and the model card include it."""


@dataclass
class VerifyReport:
    """Everything `quantkit verify` found. `passed` is the verdict; `reasons` says why it failed."""

    folder: str
    reference: str | None
    passed: bool
    reasons: list[str]
    environment: dict[str, Any]
    static: dict[str, Any] | None
    thresholds: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    """Per prompt: id, kind, text, images, both greedy outputs and the parity metrics with their verdict."""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    """"reference" / "int4" -> engine facts (kernel, weights, KV tokens, speed, start time) or the load error."""
    memory_fit: dict[str, dict[str, Any]] | None = None
    kernels: list[dict[str, Any]] = field(default_factory=list)
    """int4 speed per vLLM linear kernel (quantkit.verify.kernels.KernelTrial), vLLM's default choice first."""
    kernel_recommendation: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    """The folder's EVAL_REPORT (`quantkit eval --save`) when it has one: perplexity, KL, top-1 on real text."""
    files: dict[str, str] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, **asdict(self)}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


NO_DECISIVE = "– (no decisive position)"


def top1_cell(metrics: dict[str, Any]) -> str:
    """A prompt's top-1 agreement as the report, card and CLI print it: with no decisive position (random
    weights) the 1.0 the metric returns measures nothing, so it is not printed as a number."""
    if metrics.get("decisive_positions", 1) == 0:
        return NO_DECISIVE
    return _fmt(metrics["top1_agreement"])


def no_decisive_note(prompts: list[dict[str, Any]], thresholds: dict[str, Any] | None) -> str | None:
    """The sentence under a parity table that has prompts without a decisive position, saying what that means."""
    if not any((p.get("metrics") or {}).get("decisive_positions", 1) == 0 for p in prompts):
        return None
    margin = (thresholds or {}).get("top1_min_margin")
    return (f"`{NO_DECISIVE}`: no position of that prompt had the 16-bit model's top-1 probability lead its "
            f"runner-up by at least {_fmt(margin) if margin is not None else 'the decisive margin'} (near-flat "
            "next-token distributions, as random weights give), so top-1 agreement was not measured there and mean "
            "KL carries the verdict.")


def _speed(variant: dict[str, Any], batch_index: int, key: str) -> float | None:
    rows = variant.get("speed") or []
    return rows[batch_index][key] if len(rows) > batch_index else None


def speed_memory_rows(variants: dict[str, dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """(what, 16-bit value, int4 value) rows of the side-by-side table; missing numbers are None."""
    ref, q = variants.get("reference", {}), variants.get("int4", {})
    batch_n = next((v["speed"][1]["batch"] for v in (ref, q) if len(v.get("speed") or []) > 1), None)

    def gib(v: dict[str, Any]) -> float | None:
        return v["weights_bytes"] / 2**30 if v.get("weights_bytes") is not None else None

    rows: list[tuple[str, Any, Any]] = [
        ("weights GiB", gib(ref), gib(q)),
        ("KV-cache tokens", ref.get("kv_cache_tokens"), q.get("kv_cache_tokens")),
        ("prefill tok/s, batch 1", _speed(ref, 0, "prefill_tok_s"), _speed(q, 0, "prefill_tok_s")),
        ("decode tok/s, batch 1", _speed(ref, 0, "decode_tok_s"), _speed(q, 0, "decode_tok_s")),
    ]
    if batch_n:
        rows += [
            (f"prefill tok/s, batch {batch_n}", _speed(ref, 1, "prefill_tok_s"), _speed(q, 1, "prefill_tok_s")),
            (f"decode tok/s, batch {batch_n}", _speed(ref, 1, "decode_tok_s"), _speed(q, 1, "decode_tok_s")),
        ]
    rows += [
        ("engine start s", ref.get("engine_start_s"), q.get("engine_start_s")),
        ("linear kernel", ref.get("kernel"), q.get("kernel")),
        ("compute dtype", ref.get("dtype"), q.get("dtype")),
    ]
    return rows


def kernel_recommendation_line(recommendation: dict[str, Any] | None) -> str | None:
    """One sentence: the fastest measured kernel and the environment that selects it."""
    if not recommendation:
        return None
    if recommendation["is_default"]:
        return (f"Recommended: vLLM's default, `{recommendation['kernel']}` (fastest batch-1 decode measured, "
                f"{recommendation['decode_tok_s_batch1']:.1f} tok/s).")
    env = " ".join(f"{key}={value}" for key, value in recommendation["env"].items())
    return (f"Recommended: `{recommendation['kernel']}`: start vLLM with `{env}` "
            f"({recommendation['speedup_vs_default']:.2f}x vLLM's default choice at batch-1 decode, "
            f"{recommendation['decode_tok_s_batch1']:.1f} tok/s).")


def _code(text: str) -> str:
    return "```text\n" + text.replace("```", "`\u200b``") + "\n```"


def render_markdown(report: VerifyReport) -> str:
    """The human-readable report: verdict first, then why, then the evidence."""
    lines = [f"# quantkit verify: {report.verdict}", "", f"- int4 folder: `{report.folder}`",
             f"- 16-bit reference: `{report.reference}`" if report.reference else "- 16-bit reference: none"]
    if report.reasons:
        lines += ["", "## Why it failed", "", *[f"- {reason}" for reason in report.reasons]]

    lines += ["", "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in report.environment.items()]

    if report.static is not None:
        static = report.static
        summary = static.get("summary", {})
        counts = (f"{summary.get('passed', 0)} passed, {summary.get('failed', 0)} failed, "
                  f"{summary.get('skipped', 0)} skipped")
        lines += ["", "## Static checks", "", f"{'passed' if static.get('ok') else 'FAILED'}: {counts}.", ""]
        lines += [f"- {'skip' if c.get('skipped') else 'ok' if c['ok'] else 'FAIL'} `{c['name']}`: {c['message']}"
                  for c in static.get("checks", [])]

    if report.prompts:
        lines += ["", "## Parity (16-bit vs int4, teacher-forced on the 16-bit greedy continuation)", ""]
        if report.thresholds:
            limits = ", ".join(f"{k} = {_fmt(v)}" for k, v in report.thresholds.items())
            lines += [f"Thresholds: {limits}.", ""]
        header = ("prompt", "kind", "tokens", "mean KL", "max KL", "top-1 agree", "ref consistency",
                  "1st divergence", "text sim", "verdict")
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for prompt in report.prompts:
            m = prompt.get("metrics")
            if not m:
                continue
            lines.append(f"| {prompt['id']} | {prompt['kind']} | {m['positions']} | {_fmt(m['mean_kl'], 4)} | "
                         f"{_fmt(m['max_kl'], 4)} | {top1_cell(m)} | {_fmt(m['reference_consistency'])} | "
                         f"{_fmt(m['first_divergence'])} | "
                         f"{_fmt(m['text_similarity'])} | {'pass' if m['passed'] else 'FAIL: ' + '; '.join(m['failures'])} |")
        note = no_decisive_note(report.prompts, report.thresholds)
        lines += ["", note] if note else []

    if report.variants:
        lines += ["", "## Speed and memory (vLLM)", "", "| | 16-bit | int4 | int4 / 16-bit |", "|---|---|---|---|"]
        for what, ref, q in speed_memory_rows(report.variants):
            ratio = q / ref if isinstance(ref, (int, float)) and isinstance(q, (int, float)) and ref else None
            lines.append(f"| {what} | {_fmt(ref)} | {_fmt(q)} | {_fmt(ratio)} |")
        notes = []
        for label, variant in report.variants.items():
            if variant.get("weights_source"):
                notes.append(f"{label} weights from {variant['weights_source']}")
            if variant.get("kernel_warning"):
                notes.append(f"WARNING ({label}): {variant['kernel_warning']}")
        lines += ["", *[f"- {note}" for note in notes]] if notes else []

    if report.evaluation:
        ev = report.evaluation
        title = f"## Evaluation (`quantkit eval`, {ev.get('n_blocks')} x {ev.get('seq_len')} tokens of {ev.get('text_source')})"
        lines += ["", title, "", "| | value |", "|---|---|"]
        for what, key in (("perplexity (int4)", "perplexity"), ("perplexity (16-bit)", "reference_perplexity"),
                          ("mean KL(16-bit || int4), nats/token", "kl_mean"), ("top-1 agreement", "top1_agreement")):
            lines.append(f"| {what} | {_fmt(ev.get(key), 4)} |")

    if report.kernels:
        lines += ["", "## int4 linear kernels (vLLM)", "",
                  ("| kernel | disabled | engine start s | prefill tok/s, batch 1 | decode tok/s, batch 1 | "
                   "decode tok/s, larger batch |"), "|---|---|---|---|---|---|"]
        for trial in report.kernels:
            speed = trial.get("speed") or []
            larger = f"{_fmt(speed[1]['decode_tok_s'])} (batch {speed[1]['batch']})" if len(speed) > 1 else "–"
            lines.append(f"| {trial['kernel'] or 'failed: ' + str(trial.get('error'))} | "
                         f"{', '.join(trial['disabled']) or 'none (vLLM default)'} | {_fmt(trial['engine_start_s'])} | "
                         f"{_fmt(speed[0]['prefill_tok_s']) if speed else '–'} | "
                         f"{_fmt(speed[0]['decode_tok_s']) if speed else '–'} | {larger} |")
        advice = kernel_recommendation_line(report.kernel_recommendation)
        lines += ["", advice] if advice else []

    if report.memory_fit:
        lines += ["", "## What fits on the GPU (calculated)", "",
                  "| | 16-bit | int4 |", "|---|---|---|"]
        ref, q = report.memory_fit.get("reference", {}), report.memory_fit.get("int4", {})
        for key in ("gpu_memory_gib", "utilization", "reserve_gib", "weights_gib", "kv_bytes_per_token",
                    "kv_cache_tokens", "max_len", "request_len", "max_batch"):
            lines.append(f"| {key} | {_fmt(ref.get(key))} | {_fmt(q.get(key))} |")

    for label, variant in report.variants.items():
        if variant.get("error"):
            lines += ["", f"## {label} failed to run in vLLM", "", f"`{variant['error']}`", "", "Log tail:", "",
                      _code(variant.get("log_tail", ""))]

    if any(p.get("reference") for p in report.prompts):
        lines += ["", "## Outputs (greedy)"]
        for prompt in report.prompts:
            images = ", ".join(prompt.get("images") or []) or "none"
            lines += ["", f"### {prompt['id']} ({prompt['kind']}; images: {images})", "", f"> {prompt['text']}"]
            for label in ("reference", "int4"):
                output = prompt.get(label)
                if output:
                    lines += ["", f"{label} ({output['tokens']} tokens, {output['finish_reason']}):", "",
                              _code(output["text"])]
    return "\n".join(lines) + "\n"


def write_report(report: VerifyReport, folder: str | Path) -> tuple[Path, Path]:
    """Write both report files into `folder` (each to a temporary name, then renamed) and record them in the
    folder's manifest; returns (json path, markdown path)."""
    root = Path(folder)
    report.files = {"json": REPORT_JSON, "markdown": REPORT_MD}
    paths = (root / REPORT_JSON, root / REPORT_MD)
    local = _local_folders(report)
    for path, text in zip(paths, (json.dumps(portable(report.as_dict(), local), indent=2, default=str) + "\n",
                                  portable(render_markdown(report), local)), strict=True):
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    record_in_manifest(root, report)
    return paths


def _local_folders(report: VerifyReport) -> list[str | None]:
    """The local paths a report holds (folders, a prompt suite file), which its files, published with the
    release, name by their names only."""
    return [report.folder, report.reference, (report.static or {}).get("source"), report.settings.get("prompts")]


def record_in_manifest(folder: Path, report: VerifyReport) -> None:
    """Point the manifest at the reports: a `verify` section and the reports' own {path, size, sha256}; the
    other entries are kept as they were (not re-hashed). A folder without a manifest is left without one."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    reports = [REPORT_JSON, REPORT_MD]
    files = [entry for entry in manifest["files"] if entry.get("path") not in reports]
    sections = {k: v for k, v in manifest.items() if k not in ("schema_version", "created", "files")}
    sections["verify"] = {"verdict": report.verdict, "report_json": REPORT_JSON, "report_markdown": REPORT_MD,
                          "reference": portable(report.reference, _local_folders(report))}
    write_manifest(folder, sections, files + file_entries(folder, reports))
