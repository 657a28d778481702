"""The `quantkit` command line: parses options, calls quantkit.api, prints. No logic of its own."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from quantkit import api
from quantkit.errors import InputError, QuantkitError

app = typer.Typer(
    name="quantkit",
    help=(
        "Turn a vision-language model (MiniCPM-V 2.6 first) into a verified int4 AWQ release that vLLM "
        "loads as is.\n\nExample: quantkit run recipes/demo-tiny.yaml"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help, as click formats it: rich markup would eat bracketed text such as 'quantkit[autoawq]', keep
    # the docstrings' line breaks mid-sentence and tag every flag `<bool>`.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},  # click's default 80 splits the examples' command lines
)
console = Console(stderr=True)


def main() -> None:
    try:
        app()
    except QuantkitError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(1)


@app.callback()
def _commands() -> None:
    """Keeps `quantkit COMMAND ...` a command group even while a single command is registered (Typer would
    otherwise run that command as the program itself)."""


# Commands are registered below this line, one section per command.


# --- download -------------------------------------------------------------------------------------------


@app.command("download")
def download_command(
    model: Annotated[str, typer.Argument(help="Hub repo id, ORG/NAME.")],
    revision: Annotated[str, typer.Option("--revision", "-r", help="Branch, tag or commit.")] = "main",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Target folder (default HF cache).")] = None,
    include: Annotated[list[str] | None, typer.Option(help="Only files matching this glob (repeat).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Skip files matching this glob (repeat).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Download over another model's folder.")] = False,
) -> None:
    """Download a model from the Hub (HF_ENDPOINT, HF_TOKEN honoured) pinned to one commit, with a sha256
    manifest.

    Example: quantkit download openbmb/MiniCPM-V-2_6 --out models/minicpmv26 --exclude '*.md'
    """
    result = api.download(model, revision=revision, out_dir=out, allow_patterns=include or None,
                          ignore_patterns=exclude or None, force=force)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    state = "already present" if result.already_present else "downloaded"
    typer.echo(f"{result.repo_id}@{result.revision} -> commit {result.commit}")
    typer.echo(f"{state}: {len(result.files)} files, {result.total_bytes / 2**20:.1f} MiB in {result.folder}")
    typer.echo(f"manifest: {result.manifest_path}")


# --- quantize -------------------------------------------------------------------------------------------


@contextmanager
def _layer_progress(transient: bool = False) -> Iterator[Callable]:
    """A bar over the decoder layers with elapsed time, the last layer's seconds and peak GPU memory; yields
    the `on_layer_done(report, n_layers)` callback for api.quantize / api.run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]quantize"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[detail]}"), console=console, transient=transient) as progress:
        task = progress.add_task("layers", total=None, detail="", visible=False)  # shown from the first layer

        def layer_done(report, n_layers: int) -> None:
            peak = f", peak GPU {report.peak_gpu_bytes / 2**30:.1f} GiB" if report.peak_gpu_bytes else ""
            progress.update(task, total=n_layers, completed=report.index + 1, visible=True,
                            detail=f"layer {report.index}: {report.seconds:.1f} s{peak}")

        yield layer_done


@app.command("quantize")
def quantize_command(
    source: Annotated[Path, typer.Argument(help="16-bit model folder (e.g. from `quantkit download`).")],
    out: Annotated[Path, typer.Argument(help="Release folder to create (int4 AWQ, vLLM-ready).")],
    calib: Annotated[str, typer.Option(
        help="Calibration data: a .txt/.jsonl/.parquet file, a folder of them, a `datasets` id ORG/NAME[:CONFIG], "
        "or builtin:pydoc (English prose shipped with Python). jsonl rows with `image`/`images` go through "
        "the model's vision path.")] = "builtin:pydoc",
    calib_revision: Annotated[str | None, typer.Option(help="Dataset revision (commit) for a `datasets` id.")] = None,
    calib_split: Annotated[str, typer.Option(help="Dataset split for a `datasets` id.")] = "train",
    text_field: Annotated[str, typer.Option(help="Text column / JSON field of the calibration rows.")] = "text",
    n_samples: Annotated[int, typer.Option(help="Calibration samples (text blocks of --seq-len tokens).")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration block.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sampling.")] = 0,
    group_size: Annotated[int, typer.Option(help="Weights per quantization group (input channels).")] = 128,
    no_clip: Annotated[bool, typer.Option("--no-clip", help="Skip the clip search (faster, less accurate).")] = False,
    method: Annotated[str | None, typer.Option(
        help="awq-gptq (AWQ searches, then error-compensated GPTQ rounding on the same groups; default with the "
        "native backend) or awq (the same searches, then round to nearest, as AutoAWQ; default and only "
        "choice with --backend autoawq). Same release format.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto (GPU when visible), cuda, cuda:N or cpu.")] = "auto",
    backend: Annotated[str, typer.Option(
        help="native (quantkit's engine; reads one decoder layer at a time) or autoawq (upstream AutoAWQ 0.2.9 "
        "from the same arch spec, the reference; holds the whole 16-bit model in host memory; "
        "needs pip install 'quantkit[autoawq]').")] = "native",
    shard_size_gb: Annotated[float, typer.Option(help="Largest safetensors shard, GiB.")] = 4.0,
    gpus: Annotated[int, typer.Option(
        "--gpus", help="Data-parallel calibration on N GPUs (cuda:0 .. cuda:N-1, one process each, NCCL): each "
        "takes every N-th calibration micro-batch and the searches' sums are added up across them, so the "
        "release is the one a single process makes (text micro-batches hold at most n-samples/N blocks). "
        "Native backend; not resumable. Refused before any work with fewer visible GPUs.", min=1)] = 1,
    cpu_ranks: Annotated[int, typer.Option(
        "--cpu-ranks", help="The same on the CPU: N processes joined with gloo (for tests and machines "
        "without a GPU; implies --device cpu).", min=1)] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """AWQ int4 (4 bit, group 128, zero point, GEMM layout) of the LLM's decoder layers, layer by layer on the
    GPU; the vision side, embeddings and output head stay 16-bit. A killed run resumes when re-run.

    Example: quantkit quantize models/minicpmv26 releases/minicpmv26-awq --calib data/calib.jsonl

    Example: quantkit quantize models/minicpmv26 releases/minicpmv26-awq --gpus 4
    """
    if gpus > 1 and cpu_ranks > 1:
        raise InputError("--gpus and --cpu-ranks: give one of them (GPU processes or CPU processes).")
    if gpus > 1 and device == "cpu":
        raise InputError(f"--gpus {gpus} with --device cpu: use --cpu-ranks {gpus} for CPU processes.")
    if cpu_ranks > 1:
        device = "cpu"
    elif gpus > 1:
        device = "cuda"
    config = api.QuantizeConfig(
        calib=calib, calib_revision=calib_revision, calib_split=calib_split, text_field=text_field,
        n_samples=n_samples, seq_len=seq_len, seed=seed,
        settings=api.QuantSettings(group_size=group_size, clip=not no_clip,
                                   method=method or api.default_method(backend)),
        device=device, backend=backend, max_shard_bytes=int(shard_size_gb * 2**30), ranks=max(gpus, cpu_ranks))
    with _layer_progress() as layer_done:
        result = api.quantize(source, out, config, force=force, on_layer_done=layer_done)
    seconds = result.seconds
    resumed = f" (resumed at layer {result.resumed_from_layer})" if result.resumed_from_layer else ""
    ranks = f" x {max(gpus, cpu_ranks)} ranks" if max(gpus, cpu_ranks) > 1 else ""
    typer.echo(f"quantized {len(result.layers)} layers on {result.device}{ranks} in {seconds.get('layers_s', 0):.1f} s"
               f"{resumed}; calibration {result.calibration['text_blocks']} x {result.calibration['seq_len']} "
               f"tokens + {result.calibration['multimodal_samples']} image samples")
    typer.echo(f"release: {result.out_dir}")


# --- verify ---------------------------------------------------------------------------------------------


def _print_static_report(report: api.StaticReport) -> None:
    """One row per check (✓ passed, ✗ failed, – skipped), then the size ratio and dequantization error."""
    table = Table(title=f"static checks: {report.folder}", title_justify="left")
    table.add_column("", width=1)
    table.add_column("check", no_wrap=True)
    table.add_column("result", overflow="fold")
    for check in report.checks:
        mark = Text("–", style="dim") if check.skipped else Text("✓", style="green") if check.ok \
            else Text("✗", style="bold red")
        table.add_row(mark, check.name, Text(check.message))
    out = Console(soft_wrap=False)
    out.print(table)
    summary = report.summary
    if summary.get("size_ratio") is not None:
        out.print(Text(f"size: {summary['release_bytes'] / 2**20:.1f} MiB = {summary['size_ratio']:.3f} x the "
                       f"{summary['size_basis']} ({summary['reference_bytes'] / 2**20:.1f} MiB): "
                       f"{api.size_reason(summary['kept_16bit_share'], summary['kept_16bit_parts'])}"))
    if summary.get("rel_error_max") is not None:
        out.print(Text(f"dequantization error: max {summary['rel_error_max']:.4f} "
                       f"({summary['rel_error_worst']}), mean {summary['rel_error_mean']:.4f}"))
    verdict = "all checks passed" if report.ok else f"{summary['failed']} check(s) failed"
    out.print(Text(verdict, style="green" if report.ok else "bold red"))


def _progress_line(line: str) -> None:
    """A timestamped stage line on stderr: vLLM runs take minutes each and print nothing until they end."""
    console.print(Text(f"{time.strftime('%H:%M:%S')} {line}", style="dim"))


def _print_table(out: Console, title: str, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*("–" if value is None else f"{value:,.1f}" if isinstance(value, float) else str(value)
                        for value in row))
    out.print(table)


def _print_verify_report(report: api.VerifyReport) -> None:
    """Static summary, one row per prompt, the side-by-side speed/memory rows, the verdict and its reasons."""
    out = Console(soft_wrap=False)
    if report.static:
        summary = report.static["summary"]
        out.print(Text(f"static checks: {summary['passed']} passed, {summary['failed']} failed, "
                       f"{summary['skipped']} skipped"))
    if any("metrics" in p for p in report.prompts):
        table = Table(title="parity: 16-bit vs int4", title_justify="left")
        for column in ("prompt", "kind", "tokens", "mean KL", "top-1", "diverges at", "text sim", ""):
            table.add_column(column)
        for prompt in report.prompts:
            m = prompt["metrics"]
            table.add_row(prompt["id"], prompt["kind"], str(m["positions"]), f"{m['mean_kl']:.3g}",
                          api.top1_cell(m), "–" if m["first_divergence"] is None
                          else str(m["first_divergence"]), f"{m['text_similarity']:.3f}",
                          Text("pass", style="green") if m["passed"] else Text("FAIL", style="bold red"))
        out.print(table)
        note = api.no_decisive_note(report.prompts, report.thresholds)
        if note:
            out.print(Text(note, style="dim"))
    if report.variants.get("int4", {}).get("ok"):
        table = Table(title="vLLM", title_justify="left")
        for column in ("", "16-bit", "int4"):
            table.add_column(column)
        for what, ref, quant in api.speed_memory_rows(report.variants):
            table.add_row(what, *(f"{v:,.2f}" if isinstance(v, float) else str(v) for v in (ref, quant)))
        out.print(table)
    if report.speed_trials:
        header, rows = api.speed_trial_rows(report.speed_trials)
        _print_table(out, "vLLM setups (decode: median of repeated runs)", header, rows)
    if report.speed_recommendation:
        _print_table(out, "fastest setup per batch size", api.RECOMMENDATION_HEADER,
                     api.recommendation_rows(report.speed_recommendation))
        advice = api.serve_advice(report.speed_recommendation, report.folder)
        for line in [api.floors_note(report.speed_recommendation), *advice]:
            if line and not line.startswith("```"):
                out.print(Text(line))
    for label, variant in report.variants.items():
        if variant.get("kernel_warning"):
            out.print(Text(f"warning ({label}): {variant['kernel_warning']}", style="yellow"))
    for reason in report.reasons:
        out.print(Text(f"- {reason}", style="red"))
    out.print(Text(f"verdict: {report.verdict}; report: {Path(report.folder) / report.files.get('markdown', '')}",
                   style="green" if report.passed else "bold red"))


@app.command("verify")
def verify_command(
    folder: Annotated[Path, typer.Argument(help="The release folder to check.")],
    static: Annotated[bool, typer.Option(
        "--static", help="Run only the static checks: files, headers, index, layout, values, config, manifest; "
        "no model code, no GPU.")] = False,
    source: Annotated[Path | None, typer.Option(
        "--source", help="The 16-bit folder the release was made from: adds bit-identity of the 16-bit tensors "
        "and the per-linear dequantization error.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of a table.")] = False,
    max_rel_error: Annotated[float, typer.Option(
        "--max-rel-error", help="Fail a quantized linear whose relative error ||dequant(W) - W|| / ||W|| "
        "(AWQ scaling undone) exceeds this.")] = 0.2,
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="The 16-bit folder vLLM compares the release with (default: --source).")] = None,
    prompts: Annotated[Path | None, typer.Option(
        "--prompts", help="A jsonl prompt suite ({id, kind, text, images}) replacing the shipped one.")] = None,
    gpu_memory_gb: Annotated[float | None, typer.Option(
        "--gpu-memory-gb", help="Also calculate the longest request and largest batch on a GPU of this size "
        "(GiB).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Greedy tokens per prompt.")] = 64,
    max_kl: Annotated[float, typer.Option(
        "--max-kl", help="Fail a prompt whose mean KL(16-bit || int4) per token exceeds this (nats).",
    )] = api.ParityThresholds.max_mean_kl,
    min_top1: Annotated[float, typer.Option(
        "--min-top1", help="Fail a prompt whose top-1 agreement is below this.",
    )] = api.ParityThresholds.min_top1_agreement,
    speed_trials: Annotated[int, typer.Option(
        "--speed-trials", help="Engine starts for the vLLM setup trial after the two parity runs, in this order: "
        "int4 with vLLM's kernel choice disabled (Machete -> Marlin), the tiny stand-in (per-step floor), int4 "
        "with cudagraph_mode FULL_DECODE_ONLY, 16-bit with it. Kernel and CUDA-graph runs happen on a GPU only. "
        "0: none.", min=0)] = api.DEFAULT_SPEED_TRIALS,
    tensor_parallel_size: Annotated[int, typer.Option(
        "--tensor-parallel-size", help="GPUs each vLLM engine is split across (vLLM's tensor parallelism), for "
        "the 16-bit reference, the int4 release and the setup trials alike; recorded in the report. More than 1 "
        "needs that many visible GPUs (refused before any engine starts).", min=1, metavar="N")] = 1,
) -> None:
    """Check a release folder before it is served or uploaded; exit 0 when every check passes, 1 otherwise.

    Without --static: the static checks, then vLLM loads the 16-bit reference and the int4 release, runs the
    prompt suite (text, image, several images, video frames) through both, and compares them (KL, top-1
    agreement, greedy texts), speed and memory; verify-report.json / .md are written into FOLDER.

    Example: quantkit verify releases/minicpmv26-awq --static --source models/minicpmv26

    Example: quantkit verify releases/minicpmv26-awq --reference models/minicpmv26 --gpu-memory-gb 24
    """
    if not static:
        report = api.verify(folder, reference=reference or source, prompts=prompts,
                            thresholds=api.ParityThresholds(max_mean_kl=max_kl, min_top1_agreement=min_top1),
                            gpu_memory_gb=gpu_memory_gb, max_tokens=max_tokens, max_rel_error=max_rel_error,
                            speed_trials=speed_trials, progress=_progress_line, source=source,
                            tensor_parallel_size=tensor_parallel_size)
        if as_json:
            typer.echo(json.dumps(report.as_dict(), indent=2, default=str))
        else:
            _print_verify_report(report)
        raise typer.Exit(0 if report.passed else 1)
    reports = {"static": api.verify_static(folder, source=source, max_rel_error=max_rel_error)}
    ok = all(report.ok for report in reports.values())
    if as_json:
        document = {"folder": str(folder), "ok": ok, **{part: report.to_dict() for part, report in reports.items()}}
        typer.echo(json.dumps(document, indent=2, default=str))
    else:
        _print_static_report(reports["static"])
    raise typer.Exit(0 if ok else 1)


# --- eval -----------------------------------------------------------------------------------------------


def _print_eval_report(report: api.EvalReport) -> None:
    """Perplexity (and the reference's), then KL / agreement and the per-layer output errors."""
    out = Console(soft_wrap=False)
    table = Table(title=f"eval: {report.model}", title_justify="left")
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right")
    table.add_row("perplexity", f"{report.perplexity:.4f}")
    if report.reference is not None:
        table.add_row("reference perplexity", f"{report.reference_perplexity:.4f}")
        table.add_row("mean KL(reference || model), nats/token", f"{report.kl_mean:.5f}")
        table.add_row("top-1 agreement", f"{report.top1_agreement:.4f}")
        worst = max(range(len(report.layer_errors)), key=report.layer_errors.__getitem__)
        table.add_row("layer output error, last layer", f"{report.layer_errors[-1]:.4f}")
        table.add_row(f"layer output error, worst (layer {worst})", f"{report.layer_errors[worst]:.4f}")
    out.print(table)
    if report.reference is not None:
        errors = " ".join(f"{e:.3f}" for e in report.layer_errors)
        out.print(Text(f"per-layer output error ||h - h_ref|| / ||h_ref||: {errors}"))
    weights = "int4 weights dequantized to" if report.int4 else "computed in"
    out.print(Text(f"{report.n_blocks} x {report.seq_len} tokens of {report.text_source}; {weights} "
                   f"{report.dtype} on {report.device}; {report.seconds:.1f} s"))


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Argument(help="Model folder: 16-bit, or a quantkit int4 AWQ release.")],
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="The 16-bit folder to compare with: adds KL, top-1 agreement, per-layer error.")] = None,
    text: Annotated[str, typer.Option(
        "--text", help="A UTF-8 text file, or builtin:pydoc (the held-out half of Python's pydoc topics; "
        "calibration uses the other half).")] = "builtin:pydoc",
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="A `datasets` id ORG/NAME[:CONFIG] to evaluate on instead of --text.")] = None,
    split: Annotated[str, typer.Option(help="Split of --dataset.")] = "test",
    text_field: Annotated[str, typer.Option(help="Text column of --dataset.")] = "text",
    seq_len: Annotated[int, typer.Option(help="Tokens per block (blocks do not overlap).")] = 512,
    n_samples: Annotated[int | None, typer.Option(
        help="Blocks to evaluate, from the start of the text (default: 4, fewer if the text is shorter; under a "
        "minute on a CPU for the tiny stand-in). An error says how many the text holds.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    save: Annotated[bool, typer.Option(
        "--save", help="Also write eval-report.json into MODEL: `quantkit verify` and the model card include "
        "it.")] = False,
) -> None:
    """Perplexity on held-out text; with --reference, how far the model is from it on the same tokens.

    Int4 releases are dequantized in torch (no GPU kernel needed); MiniCPM-V is evaluated on its LLM.

    Example: quantkit eval releases/minicpmv26-awq --reference models/minicpmv26 --n-samples 40
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:  # gone once the report (or an error) prints
        task = progress.add_task("blocks", total=None)

        def block_done(done: int, total: int) -> None:
            progress.update(task, total=total, completed=done)
            if not console.is_terminal:  # a log or pipe: rich draws no bar there, so one line per block
                _progress_line(f"eval: block {done}/{total}")

        report = api.evaluate(model, reference, text=text, dataset=dataset, split=split, text_field=text_field,
                              seq_len=seq_len, n_samples=n_samples, device=device, on_block_done=block_done)
    if as_json:
        typer.echo(report.to_json())
    else:
        _print_eval_report(report)
    if save:
        console.print(Text(f"saved {report.save(model)}"))


# --- run ------------------------------------------------------------------------------------------------


def _print_plan(result: api.RunResult) -> None:
    """One row per stage: what it will do and why, then its details (sizes, memory estimate)."""
    out = Console(soft_wrap=False)
    table = Table(title=f"plan: {result.recipe.recipe.name} ({result.recipe.path})", title_justify="left")
    for column in ("stage", "action", "why / details"):
        table.add_column(column, overflow="fold")
    for item in result.plan:
        style = {"run": "bold", "skip": "green", "check": "yellow"}.get(item.action, "dim")
        table.add_row(item.stage, Text(item.action, style=style), Text("\n".join([item.reason, *item.details])))
    out.print(table)
    out.print(Text(f"source: {result.source}\nrelease: {result.release}"))


@app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe file (YAML), e.g. recipes/demo-tiny.yaml.")],
    from_stage: Annotated[str | None, typer.Option(
        "--from", help="First stage to run: download, quantize, verify, card or upload.")] = None,
    until_stage: Annotated[str | None, typer.Option("--until", help="Last stage to run.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate the recipe and what it references, print the plan, run nothing.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Redo the selected stages even when their outputs are complete.")] = False,
) -> None:
    """Make a release from a recipe: download -> quantize -> verify -> card -> (upload).

    Each stage is skipped when its output is already complete and made from the same inputs, so re-running after
    a failure resumes (quantize resumes per layer). quantkit-lock.json in the release folder records the
    recipe, resolved revisions, the package versions that made the files, machine, seeds and output hashes.

    Example: quantkit run recipes/demo-tiny.yaml
    """
    def event(line: str) -> None:
        console.print(Text(line), highlight=False, soft_wrap=True)

    with _layer_progress(transient=True) as layer_done:
        result = api.run(recipe, from_stage=from_stage, until_stage=until_stage, dry_run=dry_run, force=force,
                         on_event=event, on_layer_done=layer_done)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if dry_run:
        _print_plan(result)
        return
    for record in result.stages:
        typer.echo(f"{record.name:<9} {record.status:<8} {record.reason}")
    typer.echo(f"release: {result.release}")
    typer.echo(f"lock: {result.lock_path}")


# --- upload ---------------------------------------------------------------------------------------------


@app.command("upload")
def upload_command(
    folder: Annotated[Path, typer.Argument(help="A verified release folder.")],
    repo: Annotated[str, typer.Argument(help="Hub repo id, ORG/NAME (created when missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str, typer.Option("--revision", help="Branch to commit to (created when missing).")] = "main",
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check the folder and print what would be uploaded; send nothing.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Upload even when static verify fails or the verify report is missing/failed.")] = False,
) -> None:
    """Publish a release folder to the Hub (HF_ENDPOINT, HF_TOKEN honoured) in one commit, with a model card.

    Refuses a folder whose static checks fail or whose verify report is missing or failed, unless --force.

    Example: quantkit upload releases/minicpmv26-awq myorg/MiniCPM-V-2_6-AWQ --private
    """
    result = api.upload(folder, repo, private=private, revision=revision, dry_run=dry_run, force=force)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    head = "would upload" if result.dry_run else "uploaded"
    typer.echo(f"{head} {len(result.files)} files ({result.total_bytes / 2**20:.1f} MiB) to "
               f"{result.repo_id}@{result.revision}: {result.commit_message!r}")
    if result.commit_url:
        typer.echo(f"commit: {result.commit_url}")
