"""Two of issue 18's candidates, measured on their own on the largest step of the scale search: the MLP group's
screen (20 grid points, each a fake-quantized gate/up pair run through the MLP on the screen's tokens and scored
against the 16-bit output), at MiniCPM-V 2.6's shapes on one GPU.

- loop: one grid point after the other, as quantkit.awq.search.search_scales_block runs them;
- batched: the grid points of a chunk stacked, one bmm per linear (one larger matmul instead of 20);
- graph: the loop captured once in a CUDA graph and replayed (no kernel launches or Python between kernels).

Same weights, tokens and scales for all three; prints the time per screen (CUDA events, median), the rate of
the matmuls inside it, and whether each variant ranks the grid points as the loop does.

    python scripts/bench_search_batching.py --json batching.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from quantkit.archs import MINICPMV26_LLM_SHAPES
from quantkit.awq.search import candidate_scales, scaled_fake_quant, weight_channel_mean
from quantkit.awq.settings import QuantSettings


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of `fn()` over `repeats` runs after one warm-up, and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="screen tokens (the default scale_screen_tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_search_batching.py measures GPU speed: no CUDA device is visible.")
    settings = QuantSettings()
    hidden, inter = MINICPMV26_LLM_SHAPES["hidden_size"], MINICPMV26_LLM_SHAPES["intermediate_size"]
    torch.manual_seed(0)
    device, dtype = "cuda", torch.bfloat16
    gate, up = (torch.randn(inter, hidden, device=device).mul_(0.02).to(dtype) for _ in range(2))
    down = torch.randn(hidden, inter, device=device).mul_(0.02).to(dtype)
    x = torch.randn(args.tokens, hidden, device=device).to(dtype)
    x[:, ::97] *= 10  # outlier channels give the grid something to choose
    x_mean = x.abs().float().mean(dim=0)
    w_mean = weight_channel_mean([gate, up], settings.group_size)
    scales = [candidate_scales(x_mean, w_mean, i / settings.scale_grid, settings.duo_scaling)
              for i in range(settings.scale_grid)]
    reference = mlp(x, gate, up, down)

    def loop() -> torch.Tensor:
        losses = []
        for s in scales:
            diff = mlp(x, scaled_fake_quant(gate, s, settings), scaled_fake_quant(up, s, settings), down)
            diff = diff.float().sub_(reference).view(-1)
            losses.append(torch.dot(diff, diff))
        return torch.stack(losses)

    def batched(chunk: int) -> torch.Tensor:
        losses = []
        for first in range(0, len(scales), chunk):
            part = scales[first : first + chunk]
            gates = torch.stack([scaled_fake_quant(gate, s, settings) for s in part])
            ups = torch.stack([scaled_fake_quant(up, s, settings) for s in part])
            xs = x.expand(len(part), -1, -1)
            hidden_act = F.silu(torch.bmm(xs, gates.transpose(1, 2))) * torch.bmm(xs, ups.transpose(1, 2))
            out = torch.bmm(hidden_act, down.t().expand(len(part), -1, -1))
            losses.append(out.float().sub_(reference).pow_(2).sum(dim=(1, 2)))
        return torch.cat(losses)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop()  # compiles the kernels and fills the allocator's pools outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_losses = loop()

    def replay() -> torch.Tensor:
        graph.replay()
        return graph_losses

    flops = len(scales) * 2 * args.tokens * 3 * hidden * inter
    loop_s, loop_losses = timed(loop, args.repeats)
    rows = [("loop (the engine's)", loop_s, loop_losses)]
    for chunk in (5, 20):
        seconds, losses = timed(lambda chunk=chunk: batched(chunk), args.repeats)
        rows.append((f"batched, {chunk} grid points per bmm", seconds, losses.clone()))
    seconds, losses = timed(replay, args.repeats)
    rows.append(("loop replayed from a CUDA graph", seconds, losses.clone()))

    top3 = loop_losses.argsort()[:3].tolist()
    print(f"\nGPU: {torch.cuda.get_device_name()}  torch {torch.__version__}; MLP screen: {len(scales)} grid points x "
          f"{args.tokens} tokens, hidden {hidden}, intermediate {inter}, {flops / 1e12:.1f} TFLOP of matmuls\n")
    print("| variant | time per screen | vs loop | matmul rate | same 3 finalists as the loop | max rel. loss diff |")
    print("|---|---|---|---|---|---|")
    results = []
    for name, seconds, losses in rows:
        diff = ((losses - loop_losses).abs() / loop_losses).max().item()
        same = losses.argsort()[:3].tolist() == top3
        print(f"| {name} | {seconds * 1e3:.1f} ms | {seconds / loop_s:.3f}x | {flops / seconds / 1e12:.0f} TFLOP/s "
              f"| {'yes' if same else 'no'} | {diff:.1e} |")
        results.append({"variant": name, "seconds": seconds, "ratio_to_loop": seconds / loop_s,
                        "tflops": flops / seconds / 1e12, "same_finalists": same, "max_rel_loss_diff": diff})
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "flops": flops, "variants": results}, indent=1))


if __name__ == "__main__":
    main()
