"""The verify report: one `VerifyReport` value, written as `verify-report.json` (for machines) and
`verify-report.md` (for the model card and reviewers) into the int4 folder, and recorded in its manifest."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.io.chores import write_text_atomically
from quantkit.io.manifest import record_files
from quantkit.io.portable import portable
from quantkit.verify.kernels import VARIANT_NAMES, serve_command

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
    speed_trials: list[dict[str, Any]] = field(default_factory=list)
    """Speed per variant and vLLM setup (quantkit.verify.kernels.SpeedTrial): the parity runs first, then the
    trial's speed-only runs, skipped ones with the reason."""
    speed_recommendation: dict[str, Any] | None = None
    """quantkit.verify.kernels.recommend: the fastest setup per batch size, ratios and floors."""
    evaluation: dict[str, Any] | None = None
    """The folder's EVAL_REPORT (`quantkit eval --save`) when it has one: perplexity, KL, top-1 on real text."""
    files: dict[str, str] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, **asdict(self)}


def format_value(value: Any, digits: int = 3) -> str:
    """A value as the report, the card and the CLI print it: `digits` significant digits, thousands grouped."""
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
    return format_value(metrics["top1_agreement"])


def no_decisive_note(prompts: list[dict[str, Any]], thresholds: dict[str, Any] | None) -> str | None:
    """The sentence under a parity table that has prompts without a decisive position, saying what that means."""
    if not any((p.get("metrics") or {}).get("decisive_positions", 1) == 0 for p in prompts):
        return None
    margin = (thresholds or {}).get("top1_min_margin")
    return (f"`{NO_DECISIVE}`: no position of that prompt had the 16-bit model's top-1 probability lead its "
            f"runner-up by at least {format_value(margin) if margin is not None else 'the decisive margin'} (near-flat "
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


def _setup_cell(variant: dict[str, Any]) -> str:
    """The setup's name, with the int4 kernel it gave (16-bit linears have none to name)."""
    kernel = variant.get("kernel") or ""
    return variant["setup"]["name"] + (f" ({kernel})" if kernel and not kernel.startswith("none") else "")


def speed_trial_rows(trials: list[dict[str, Any]]) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """(header, rows) of the trial table: per variant and setup, decode tok/s and ms/step per batch size."""
    batches = list(dict.fromkeys(row["batch"] for trial in trials for row in trial.get("speed") or []))
    header = ("variant", "setup", "kernel", "engine start s",
              *(f"decode tok/s (ms/step), batch {batch}" for batch in batches), "prefill tok/s, batch 1")
    rows = []
    for trial in trials:
        by_batch = {row["batch"]: row for row in trial.get("speed") or []}
        if not trial["ok"]:
            status = ("skipped: " if trial.get("skipped") else "failed: ") + str(trial.get("error"))
            rows.append((VARIANT_NAMES[trial["variant"]], trial["setup"]["name"], status, None,
                         *(None for _ in batches), None))
            continue
        rows.append((VARIANT_NAMES[trial["variant"]], trial["setup"]["name"], trial.get("kernel"),
                     trial.get("engine_start_s"),
                     *(f"{by_batch[b]['decode_tok_s']:,.1f} ({by_batch[b]['ms_per_step']:.2f})" if b in by_batch
                       else None for b in batches),
                     by_batch[batches[0]]["prefill_tok_s"] if batches[0] in by_batch else None))
    return header, rows


RECOMMENDATION_HEADER = ("batch", "16-bit: fastest setup", "16-bit tok/s (ms/step)", "int4: fastest setup",
                         "int4 tok/s (ms/step)", "int4 / 16-bit", "per-step floor ms (tiny stand-in)",
                         "bandwidth floor ms, 16-bit / int4")


def recommendation_rows(recommendation: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Per batch size: each variant's fastest setup and speed, their ratio, and the two floors beside them."""

    def speed(variant: dict[str, Any] | None) -> str | None:
        return f"{variant['decode_tok_s']:,.1f} ({variant['ms_per_step']:.2f})" if variant else None

    def floor(variant: dict[str, Any] | None) -> str:
        value = (variant or {}).get("bandwidth_floor_ms")
        return "–" if value is None else f"{value:.2f}"

    rows = []
    for row in recommendation["rows"]:
        ref, q = row.get("reference"), row["int4"]
        ratio = row.get("int4_vs_16bit")
        rows.append((row["batch"], _setup_cell(ref) if ref else None, speed(ref), _setup_cell(q), speed(q),
                     f"{ratio:.2f}x" if ratio is not None else None,
                     f"{row['floor_ms_per_step']:.2f}" if row.get("floor_ms_per_step") is not None else None,
                     f"{floor(ref)} / {floor(q)}"))
    return rows


def serve_advice(recommendation: dict[str, Any] | None, model: str) -> list[str]:
    """Markdown lines: the `vllm serve` command of the int4 setup fastest at the smallest batch, then any other
    batch size whose fastest setup differs."""
    if not recommendation:
        return []
    rows = recommendation["rows"]
    first = rows[0]
    gain = (f"{first['int4']['vs_default']:.2f}x vLLM's defaults" if first["int4"]["setup"]["name"] != "vLLM defaults"
            else "vLLM's defaults are the fastest measured")
    versus = f"{first['int4_vs_16bit']:.2f}x the 16-bit model, " if first.get("int4_vs_16bit") else ""
    head = f"Fastest int4 setup at batch {first['batch']} ({first['int4']['decode_tok_s']:,.1f} tok/s, {versus}{gain}):"
    lines = [head, "", "```bash", serve_command(model, recommendation), "```"]
    for index, row in enumerate(rows[1:], start=1):
        if row["int4"]["setup"] != first["int4"]["setup"]:
            lines += ["", (f"At batch {row['batch']} the fastest was {row['int4']['setup']['name']} "
                           f"({row['int4']['vs_default']:.2f}x vLLM's defaults): "
                           f"`{serve_command(model, recommendation, batch_index=index)}`")]
    return lines


def floors_note(recommendation: dict[str, Any]) -> str:
    """Where the two floors beside the ratios come from."""
    rate = recommendation.get("hbm_bytes_per_s")
    bandwidth = (f"the weights as loaded (vision tower included, which decode does not read) read once per step at "
                 f"{rate / 1e12:.2f} TB/s (quantkit.verify.speed.HBM_BYTES_PER_S for {recommendation['device']})"
                 if rate else f"none: no memory bandwidth is known for device {recommendation.get('device')}")
    return ("Per-step floor: one decode step of the tiny stand-in (random weights, same vocabulary and layer types) "
            f"in the same run. Bandwidth floor: {bandwidth}.")


def _code(text: str) -> str:
    return "```text\n" + text.replace("```", "`\u200b``") + "\n```"


def render_markdown(report: VerifyReport) -> str:
    """The human-readable report: verdict first, then why, then the evidence."""
    lines = [f"# quantkit verify: {report.verdict}", "", f"- int4 folder: `{report.folder}`",
             f"- 16-bit reference: `{report.reference}`" if report.reference else "- 16-bit reference: none"]
    if report.settings:
        lines.append(f"- vLLM tensor parallel size: {report.settings.get('tensor_parallel_size', 1)} (both variants)")
    if report.reasons:
        lines += ["", "## Why it failed", "", *[f"- {reason}" for reason in report.reasons]]

    lines += ["", "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {format_value(value)} |" for key, value in report.environment.items()]

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
            limits = ", ".join(f"{k} = {format_value(v)}" for k, v in report.thresholds.items())
            lines += [f"Thresholds: {limits}.", ""]
        header = ("prompt", "kind", "tokens", "mean KL", "max KL", "top-1 agree", "ref consistency",
                  "1st divergence", "text sim", "verdict")
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for prompt in report.prompts:
            m = prompt.get("metrics")
            if not m:
                continue
            lines.append(f"| {prompt['id']} | {prompt['kind']} | {m['positions']} | {format_value(m['mean_kl'], 4)} | "
                         f"{format_value(m['max_kl'], 4)} | {top1_cell(m)} | {format_value(m['reference_consistency'])} | "
                         f"{format_value(m['first_divergence'])} | "
                         f"{format_value(m['text_similarity'])} | {'pass' if m['passed'] else 'FAIL: ' + '; '.join(m['failures'])} |")
        note = no_decisive_note(report.prompts, report.thresholds)
        lines += ["", note] if note else []

    if report.variants:
        lines += ["", "## Speed and memory (vLLM)", "", "| | 16-bit | int4 | int4 / 16-bit |", "|---|---|---|---|"]
        for what, ref, q in speed_memory_rows(report.variants):
            ratio = q / ref if isinstance(ref, (int, float)) and isinstance(q, (int, float)) and ref else None
            lines.append(f"| {what} | {format_value(ref)} | {format_value(q)} | {format_value(ratio)} |")
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
            lines.append(f"| {what} | {format_value(ev.get(key), 4)} |")

    if report.speed_trials:
        header, rows = speed_trial_rows(report.speed_trials)
        lines += ["", "## Serving setups (vLLM; each figure the median of repeated runs, quantkit.verify.speed)", "",
                  "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(format_value(value) for value in row) + " |" for row in rows]
        if report.speed_recommendation:
            lines += ["", "Fastest measured setup per batch size:", "",
                      "| " + " | ".join(RECOMMENDATION_HEADER) + " |", "|---" * len(RECOMMENDATION_HEADER) + "|"]
            lines += ["| " + " | ".join(format_value(value) for value in row) + " |"
                      for row in recommendation_rows(report.speed_recommendation)]
            lines += ["", floors_note(report.speed_recommendation), "",
                      *serve_advice(report.speed_recommendation, report.folder)]

    if report.memory_fit:
        lines += ["", "## What fits on the GPU (calculated)", "",
                  "| | 16-bit | int4 |", "|---|---|---|"]
        ref, q = report.memory_fit.get("reference", {}), report.memory_fit.get("int4", {})
        for key in ("gpu_memory_gib", "utilization", "reserve_gib", "weights_gib", "kv_bytes_per_token",
                    "kv_cache_tokens", "max_len", "request_len", "max_batch"):
            lines.append(f"| {key} | {format_value(ref.get(key))} | {format_value(q.get(key))} |")

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
    """Write both report files into `folder` (each to a temporary name, then renamed) and point the folder's
    manifest at them (a `verify` section and their {path, size, sha256}); returns (json path, markdown path)."""
    root = Path(folder)
    report.files = {"json": REPORT_JSON, "markdown": REPORT_MD}
    paths = (root / REPORT_JSON, root / REPORT_MD)
    local = _local_folders(report)
    for path, text in zip(paths, (json.dumps(portable(report.as_dict(), local), indent=2, default=str) + "\n",
                                  portable(render_markdown(report), local)), strict=True):
        write_text_atomically(path, text)
    record_files(root, [REPORT_JSON, REPORT_MD],
                 {"verify": {"verdict": report.verdict, "report_json": REPORT_JSON, "report_markdown": REPORT_MD,
                             "reference": portable(report.reference, _local_folders(report))}})
    return paths


def _local_folders(report: VerifyReport) -> list[str | None]:
    """The local paths a report holds (folders, a prompt suite file), which its files, published with the
    release, name by their names only."""
    return [report.folder, report.reference, (report.static or {}).get("source"), report.settings.get("prompts")]

