"""Past one GPU: data-parallel calibration with 1/2/4/8 ranks and vLLM verify with tensor parallel 1 and 2.

Needs a machine with 2 or more GPUs (refuses otherwise; --device cpu --tiny checks the script on gloo ranks).

1. Calibration: MiniCPM-V 2.6's LLM at its real shapes with random weights (scripts/bench_quantize.py's
   builder, built identically in every rank from the seed), N-samples x seq-len random tokens; for each rank count
   (1, 2, 4, 8, as many as visible), every rank takes every N-th micro-batch (micro-batches of at most
   ceil(n_samples / N) blocks) and the engine adds the searches' sums up over NCCL (quantkit.awq.reduce). Times
   the layer-0 capture and the decoder layers on rank 0 (the ranks meet in every layer's collectives), and
   checks that every rank count chose the 1-rank scale ratios.
2. Verify (skipped with --no-verify): the MiniCPM-V 2.6 stand-in at real shapes (python -m
   quantkit.testing.standin --size real), quantized with `quantkit quantize --gpus N` (N = the most ranks run),
   then `quantkit verify --tensor-parallel-size T --speed-trials 0` for T = 1 and 2; engine start and decode
   tok/s of the int4 variant from verify-report.json.

Prints the markdown table for docs/benchmarks.md ("Past one GPU"); --json writes the details.

    python scripts/bench_multi_gpu.py                      # 28 layers, 128 x 512 tokens, ranks 1 2 4 8
    python scripts/bench_multi_gpu.py --layers 4 --no-verify
    python scripts/bench_multi_gpu.py --device cpu --tiny --layers 2 --n-samples 8 --seq-len 64 --no-verify
    python scripts/bench_multi_gpu.py --layers 4 --ranks 1 --one-rank-group --no-verify   # one GPU: NCCL path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import TINY_SHAPES, build_llm

from quantkit.archs import MINICPMV26_LLM_SHAPES, QWEN2
from quantkit.awq.engine import capture_layer_inputs, outside_layers_on, quantize_layers
from quantkit.awq.reduce import strided_positions
from quantkit.awq.settings import QuantSettings
from quantkit.ranks import run_ranks


def calibrate(rank, args: argparse.Namespace, world: int) -> dict:
    """One rank: build the model, capture its share of the micro-batches, quantize every layer; rank 0's times."""
    device = rank.device if rank is not None else args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    shapes = TINY_SHAPES if args.tiny else MINICPMV26_LLM_SHAPES
    model = build_llm(args.layers, device, dtype, args.seed, shapes)
    ids = torch.randint(0, shapes["vocab_size"], (args.n_samples, args.seq_len),
                        generator=torch.Generator().manual_seed(args.seed))
    rows = max(1, min(QuantSettings().max_batch_tokens // args.seq_len, math.ceil(args.n_samples / world)))
    batches = list(ids.split(rows))
    positions = strided_positions(len(batches), rank.rank, world) if rank is not None else None
    mine = [batches[i] for i in positions] if positions is not None else batches
    if not mine:
        raise SystemExit(f"{world} ranks but {len(batches)} micro-batches: raise --n-samples")

    def barrier() -> None:
        if rank is not None:
            rank.reducer.sum_(torch.zeros(1, device=device))
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    barrier()
    started = time.perf_counter()
    with outside_layers_on(model, QWEN2, device):
        inputs = capture_layer_inputs(model, QWEN2, [lambda b=b: model(input_ids=b.to(device), use_cache=False)
                                                     for b in mine], device)
    inputs.positions = positions
    barrier()
    capture_s = time.perf_counter() - started
    results = quantize_layers(model, QWEN2, QuantSettings(), inputs, device, reducer=rank.reducer if rank else None)
    barrier()
    total_s = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    return {"ranks": world, "micro_batches": len(batches), "capture_s": capture_s, "layers_s": total_s - capture_s,
            "total_s": total_s, "peak_gpu_gib_rank0": peak,
            "ratios": [r.report.ratios for r in results]}


def run_calibration(args: argparse.Namespace, world: int, spawned: bool = False) -> dict:
    """On the CPU every rank (and the 1-rank baseline) gets one thread: a check, with no oversubscription.
    `spawned`: one rank too goes through run_ranks (a process group of one, its collectives over NCCL/gloo)."""
    cpu = args.device == "cpu"
    if world == 1 and not spawned:
        if cpu:
            torch.set_num_threads(1)
        return calibrate(None, args, 1)
    return run_ranks(calibrate, (args, world), world, "cpu" if cpu else "cuda", timeout_s=args.timeout_s,
                     threads_per_rank=1 if cpu else None)


def run_verify(args: argparse.Namespace, gpus: int, sizes: list[int]) -> list[dict]:
    work = Path(args.work or tempfile.mkdtemp(prefix="quantkit-multi-gpu-"))
    fp16, int4 = work / "minicpmv26-real-bf16", work / "minicpmv26-real-awq"
    if not (fp16 / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "quantkit.testing.standin", "--size", "real", str(fp16)], check=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "quantkit", "quantize", str(fp16), str(int4), "--gpus", str(gpus),
                    "--n-samples", "104", "--seq-len", "512", "--force"], check=True)
    quantize_s = time.perf_counter() - started
    rows = []
    for size in sizes:
        log = work / f"verify-tp{size}.log"
        (int4 / "verify-report.json").unlink(missing_ok=True)
        with open(log, "w") as out:
            code = subprocess.run([sys.executable, "-m", "quantkit", "verify", str(int4), "--reference", str(fp16),
                                   "--speed-trials", "0", "--tensor-parallel-size", str(size)],
                                  check=False, stdout=out, stderr=subprocess.STDOUT).returncode
        row = {"tensor_parallel_size": size, "exit_code": code, "quantize_gpus": gpus, "quantize_cli_s": quantize_s,
               "log": str(log), "verdict": f"no report (exit {code}, see {log})", "engine_start_s": None,
               "decode_tok_s": {}, "kernel": None}
        if (int4 / "verify-report.json").is_file():
            report = json.loads((int4 / "verify-report.json").read_text())
            (work / f"verify-report-tp{size}.json").write_text(json.dumps(report, indent=1))
            int4_run = report.get("variants", {}).get("int4", {})
            row.update(tensor_parallel_size=report["settings"].get("tensor_parallel_size"),
                       verdict="pass" if report.get("passed") else "FAIL",
                       engine_start_s=int4_run.get("engine_start_s"), kernel=int4_run.get("kernel"),
                       decode_tok_s={r["batch"]: round(r["decode_tok_s"]) for r in int4_run.get("speed") or []})
        rows.append(row)
    return rows


def table(calibration: list[dict], verify: list[dict], args: argparse.Namespace, device_name: str) -> str:
    base = calibration[0]
    lines = [(f"Calibration, {args.layers} layers of MiniCPM-V 2.6's LLM "
             f"({'tiny shapes' if args.tiny else 'real shapes'}, random weights), {args.n_samples} x {args.seq_len} "
             f"tokens, {device_name}:"), "",
             ("| ranks | micro-batches | capture s | layers s | total s | speed-up | peak GiB (rank 0) | "
             "ratios = 1 rank's |"), "|---|---|---|---|---|---|---|---|"]
    for row in calibration:
        peak = "–" if row["peak_gpu_gib_rank0"] is None else f"{row['peak_gpu_gib_rank0']:.1f}"
        lines.append(f"| {row['ranks']} | {row['micro_batches']} | {row['capture_s']:.1f} | {row['layers_s']:.1f} | "
                     f"{row['total_s']:.1f} | {base['total_s'] / row['total_s']:.2f}x | {peak} | "
                     f"{'yes' if row['ratios'] == base['ratios'] else 'NO'} |")
    if verify:
        lines += ["", (f"Verify (stand-in at real shapes, quantized with --gpus {verify[0]['quantize_gpus']} in "
                  f"{verify[0]['quantize_cli_s']:.0f} s), int4 variant:"), "",
                  "| tensor parallel | verdict | engine start s | decode tok/s, batch 1 | batch 8 | kernel |",
                  "|---|---|---|---|---|---|"]
        for row in verify:
            speed = row["decode_tok_s"]
            lines.append(f"| {row['tensor_parallel_size']} | {row['verdict']} | {'–' if row['engine_start_s'] is None else round(row['engine_start_s'])} | "
                         f"{speed.get(1, '–')} | {speed.get(8, '–')} | {row['kernel']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (MiniCPM-V 2.6 has 28)")
    parser.add_argument("--n-samples", type=int, default=128, help="calibration blocks")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="rank counts to time (those above the visible GPUs are left out; 1 is the baseline)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: gloo ranks on the CPU, to check the script (with --tiny), not to time it")
    parser.add_argument("--tiny", action="store_true", help="hidden 256 instead of MiniCPM-V 2.6's shapes")
    parser.add_argument("--no-verify", action="store_true", help="calibration only (no vLLM)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="verify's tensor parallel sizes")
    parser.add_argument("--work", type=Path, help="folder for the stand-in, the release and the verify logs")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per collective, before a rank fails")
    parser.add_argument("--json", type=Path, help="write the details here")
    parser.add_argument("--one-rank-group", action="store_true",
                        help="also run 1 rank as a process group of one (NCCL on a GPU): the distributed code path "
                             "on a machine with one GPU; its choices must equal the plain run's")
    args = parser.parse_args()

    if args.device == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < 2 and not args.one_rank_group:
            raise SystemExit(f"bench_multi_gpu.py compares 1 GPU with several: {visible} CUDA GPU(s) visible "
                             "(CUDA_VISIBLE_DEVICES=" + os.environ.get("CUDA_VISIBLE_DEVICES", "unset") +
                             "). Run it on a machine with 2 or more; --device cpu --tiny --no-verify checks the "
                             "script on gloo ranks.")
        device_name = f"{visible} x {torch.cuda.get_device_name(0)}"
    else:
        visible = os.cpu_count() or 1
        device_name = f"CPU, {visible} cores, 1 thread per rank (gloo; a check of the script, not a timing)"
        if not args.no_verify:
            raise SystemExit("--device cpu: verify needs GPUs for tensor parallelism; add --no-verify.")
    ranks = sorted({1, *(r for r in args.ranks if 1 <= r <= visible)})
    calibration = []
    for world in ranks:
        row = run_calibration(args, world)
        print(f"ranks {world}: capture {row['capture_s']:.1f} s, layers {row['layers_s']:.1f} s", flush=True)
        calibration.append(row)
        if world == 1 and args.one_rank_group:
            row = {**run_calibration(args, 1, spawned=True), "ranks": "1 (group)"}
            print(f"ranks 1 as a process group: capture {row['capture_s']:.1f} s, layers {row['layers_s']:.1f} s",
                  flush=True)
            calibration.append(row)
    verify = [] if args.no_verify else run_verify(args, max(ranks), [t for t in args.tp if t <= visible])
    print(table(calibration, verify, args, device_name))
    if args.json:
        args.json.write_text(json.dumps({"calibration": calibration, "verify": verify,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
