"""Time the setups of a verify report independently of verify, with plain `vllm.LLM.generate`, and print both.

This cross-checks verify's decode figures (issue 13): it shares no code with quantkit. It reads from the report
only what to time: the folders (report `reference` and `folder`), the engine settings verify used (dtype,
max_model_len, max_logprobs) and each setup (VLLM_DISABLED_KERNELS, compilation_config). Each setup gets its own
engine in a fresh process (this script run with --one). Per batch size: one warm-up at the same batch size and
shape (a 1-token and a full generation), then `--repeats` timed 1-token generations (the prefill) and
`decode_tokens + 1`-token generations on fresh random prompts; decode tok/s = batch x decode_tokens / (median
full - median 1-token). Defaults: batch 1 and 8, 512-token prompts, 256 decode tokens.

    python scripts/speed_crosscheck.py RELEASE/verify-report.json [--setups recommended|all] [--json out.json]

`recommended` (default, 2 engine starts) times the fastest 16-bit and int4 setups at the smallest batch size;
`all` every measured 16-bit and int4 setup. The table lists every setup verify measured: verify's figure, this
script's where it timed the setup, their ratio (the GPU acceptance: verify's batch-1 figures within 10% of these),
int4 / 16-bit by each method, and verify's untimed first long run at that batch size (its warm-up) taken as a
timing: what verify's method before issue 13 measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

MARK = "CROSSCHECK_RESULT "
VARIANTS = {"reference": "16-bit", "int4": "int4"}


def cell(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def time_setup(spec: dict) -> dict:
    """One engine, the timed runs of every batch size; returns {batch: {decode_tok_s, ms_per_step}}."""
    import torch
    from vllm import LLM, SamplingParams

    gpu = torch.cuda.is_available()
    options = {"compilation_config": spec["compilation_config"]} if spec["compilation_config"] else {}
    llm = LLM(model=spec["model"], trust_remote_code=True, dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              max_logprobs=spec["max_logprobs"], seed=0, gpu_memory_utilization=0.9 if gpu else 0.3,
              enforce_eager=not gpu, **options)
    rng = random.Random(1)
    decode = spec["decode_tokens"]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=decode + 1, ignore_eos=True)

    def wall(batch: int, params: SamplingParams) -> float:
        prompts = [{"prompt_token_ids": [rng.randrange(1000, 30000) for _ in range(spec["prompt_len"])]}
                   for _ in range(batch)]
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - started

    figures = {}
    for batch in spec["batches"]:
        wall(batch, one)
        wall(batch, full)
        prefill = statistics.median(wall(batch, one) for _ in range(spec["repeats"]))
        total = statistics.median(wall(batch, full) for _ in range(spec["repeats"]))
        figures[batch] = {"decode_tok_s": batch * decode / (total - prefill),
                          "ms_per_step": 1000 * (total - prefill) / decode}
    return figures


def model_folders(report_path: Path, report: dict, int4: Path | None, reference: Path | None) -> dict[str, str]:
    """The two folders to time. A report names them by name only (it is published, so it holds no local path):
    the int4 folder is the one holding the report, the reference is looked for beside it unless given."""
    int4 = int4 or report_path.resolve().parent
    reference = reference or int4.parent / Path(report["reference"]).name
    for folder in (int4, reference):
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder} is not a model folder: pass --int4 / --reference")
    return {"reference": str(reference), "int4": str(int4)}


def setups_to_time(report: dict, which: str, models: dict[str, str]) -> list[dict]:
    """(variant, setup) pairs from the report: the batch-1 recommendation, or every measured trial."""
    if which == "recommended":
        first = report["speed_recommendation"]["rows"][0]
        chosen = [(variant, first[variant]["setup"]) for variant in ("reference", "int4") if variant in first]
    else:
        chosen = [(t["variant"], t["setup"]) for t in report["speed_trials"] if t["ok"] and t["variant"] in models]
    unique = {(variant, setup["name"]): (variant, setup) for variant, setup in chosen}
    return [{"variant": variant, "setup": setup, "model": models[variant]} for variant, setup in unique.values()]


def verify_figure(report: dict, variant: str, setup_name: str, batch: int, key: str = "decode_tok_s") -> float | None:
    for trial in report["speed_trials"]:
        if trial["ok"] and trial["variant"] == variant and trial["setup"]["name"] == setup_name:
            return next((row.get(key) for row in trial["speed"] if row["batch"] == batch), None)
    return None


def run_one(spec: dict) -> dict:
    """`spec` timed in a child process with the setup's environment; vLLM's log goes to a file beside it."""
    env = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn", **spec["setup"]["env"]}
    if not spec["gpu"]:  # as quantkit's workers on the CPU: one process, no second import of vLLM
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    log = Path(spec["log"])
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], stdout=subprocess.PIPE,
                              stderr=handle, text=True, env=env, check=False)
    found = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not found:
        return {"error": f"exit code {proc.returncode}; see {log}"}
    return {int(batch): row for batch, row in json.loads(found[-1]).items()}


def print_table(report: dict, results: list[dict], args: argparse.Namespace) -> None:
    """Every setup verify measured (16-bit and int4), verify's decode figure beside this script's where it timed
    the setup, and int4 / 16-bit by each method (over the fastest 16-bit setup of that method and batch)."""
    measured = {(r["variant"], r["setup"]): r["measured"] for r in results}
    trials = [t for t in report["speed_trials"] if t["ok"] and t["variant"] in ("reference", "int4")]

    def fastest_16bit(figures: list[float | None]) -> float | None:
        return max((f for f in figures if f), default=None)

    print(f"\ndecode tok/s: verify vs independent LLM.generate ({args.prompt_len}-token prompts, "
          f"{args.decode_tokens} decode tokens; verify's own plan is in its report)")
    print("| variant | setup | batch | verify | independent | verify / independent | int4 / 16-bit, verify "
          "| int4 / 16-bit, independent | verify's untimed first run (the old method) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        ours = {(t["variant"], t["setup"]["name"]): verify_figure(report, t["variant"], t["setup"]["name"], batch)
                for t in trials}
        theirs = {key: (m.get(batch) or {}).get("decode_tok_s") if "error" not in m else None
                  for key, m in measured.items()}
        ref_ours = fastest_16bit([v for (variant, _), v in ours.items() if variant == "reference"])
        ref_theirs = fastest_16bit([v for (variant, _), v in theirs.items() if variant == "reference"])
        for (variant, setup), mine in ours.items():
            other = theirs.get((variant, setup))
            failed = measured.get((variant, setup), {}).get("error")
            ratio = [f"{a / b:.2f}x" if variant == "int4" and a and b else "" for a, b in
                     ((mine, ref_ours), (other, ref_theirs))]
            print(f"| {VARIANTS[variant]} | {setup} | {batch} | {cell(mine)} | "
                  f"{'failed: ' + failed if failed else cell(other)} | "
                  f"{f'{mine / other:.3f}' if mine and other else '–'} | {ratio[0]} | {ratio[1]} | "
                  f"{cell(verify_figure(report, variant, setup, batch, 'first_run_decode_tok_s'))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", nargs="?", help="verify-report.json of the int4 release")
    parser.add_argument("--setups", choices=("recommended", "all"), default="recommended")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the measured and verify's figures here")
    parser.add_argument("--log-dir", type=Path, default=Path("."))
    parser.add_argument("--int4", type=Path, help="the int4 folder (default: the one holding the report)")
    parser.add_argument("--reference", type=Path, help="the 16-bit folder (default: its name, beside the int4 one)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(MARK + json.dumps(time_setup(json.loads(args.one))), flush=True)
        return

    import torch

    gpu = torch.cuda.is_available()
    report = json.loads(Path(args.report).read_text())
    models = model_folders(Path(args.report), report, args.int4, args.reference)
    settings = report["settings"]
    results = []
    for index, item in enumerate(setups_to_time(report, args.setups, models)):
        spec = {**item, "dtype": report["variants"][item["variant"]]["dtype"],
                "max_model_len": settings["max_model_len"], "max_logprobs": settings["top_k"],
                "compilation_config": item["setup"]["compilation_config"], "batches": args.batches,
                "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
                "gpu": gpu, "log": str(args.log_dir / f"crosscheck-{index}-{item['variant']}.log")}
        print(f"timing {item['variant']} with {item['setup']['name']} ({item['model']})", flush=True)
        measured = run_one(spec)
        results.append({"variant": item["variant"], "setup": item["setup"]["name"], "measured": measured,
                        "verify": {b: verify_figure(report, item["variant"], item["setup"]["name"], b)
                                   for b in args.batches}})

    print_table(report, results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
