"""Time the fused Triton kernels against the torch code they replace, at MiniCPM-V 2.6's LLM shapes, on one GPU.

Per linear shape: the scale candidates' fake quantization (scaled_fake_quant), the clip search, and GPTQ's
rounding (column loop and inverse-Hessian factor); each with the kernels (quantkit.awq.kernels) and without
(QUANTKIT_TRITON=0's code path), on the same random weights, with their agreement. Also the inverse-Hessian
factor's triangular inversion, by halves vs one solve against the identity, at the two Hessian sizes.
Prints a markdown table; --json writes it.

    python3 scripts/bench_kernels.py --json kernels.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantkit.archs import MINICPMV26_LLM_SHAPES
from quantkit.awq import gptq, kernels, search
from quantkit.awq.quant import fake_quantize, quantize
from quantkit.awq.settings import QuantSettings


def timed(fn, repeats: int = 5) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up (CUDA events)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


class TorchOnly:
    """Within this block the quantkit functions take their torch path."""

    def __enter__(self):
        self.saved, kernels.triton = kernels.triton, None

    def __exit__(self, *exc):
        kernels.triton = self.saved


def linear_shapes() -> dict[str, tuple[int, int]]:
    hidden, inter = MINICPMV26_LLM_SHAPES["hidden_size"], MINICPMV26_LLM_SHAPES["intermediate_size"]
    kv = hidden // MINICPMV26_LLM_SHAPES["num_attention_heads"] * MINICPMV26_LLM_SHAPES["num_key_value_heads"]
    return {"q_proj": (hidden, hidden), "k_proj/v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj/up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def clip_loss_float64(w: torch.Tensor, bounds: torch.Tensor, grams: torch.Tensor, settings: QuantSettings) -> float:
    """The clip search's loss of `bounds` [out, groups], its products in float64 (neither search's TF32)."""
    out_f = w.shape[0]
    clipped = search.apply_clip(w.float(), bounds, settings.group_size)
    delta = (fake_quantize(clipped, settings.bits, settings.group_size) - w.float()).double()
    delta = delta.reshape(out_f, -1, settings.group_size).transpose(0, 1)  # [groups, out, gs]
    return (torch.bmm(delta, grams.double()) * delta).sum().item()


def bench_linear(name: str, shape: tuple[int, int], settings: QuantSettings, tokens: int,
                 gen: torch.Generator) -> dict:
    out_f, in_f = shape
    w = (torch.randn(out_f, in_f, device="cuda", generator=gen) * 0.02).bfloat16()
    x = torch.randn(tokens, in_f, device="cuda", generator=gen).bfloat16()
    x[:, ::97] *= 10
    scales = search.candidate_scales(search.channel_mean_abs([x]), search.weight_channel_mean([w], 128), 0.5, True)
    row = {"linear": name, "shape": [out_f, in_f]}
    fused = search.scaled_fake_quant(w, scales, settings)
    row["fake_quant_fused_s"] = timed(lambda: search.scaled_fake_quant(w, scales, settings))
    with TorchOnly():
        row["fake_quant_torch_s"] = timed(lambda: search.scaled_fake_quant(w, scales, settings))
        row["fake_quant_identical"] = bool(torch.equal(fused, search.scaled_fake_quant(w, scales, settings)))
    grams = search.group_grams([x], settings.group_size)
    fused_max, fused_loss = search.search_clip(w, [x], settings, grams)
    row["clip_fused_s"] = timed(lambda: search.search_clip(w, [x], settings, grams))
    with TorchOnly():
        row["clip_torch_s"] = timed(lambda: search.search_clip(w, [x], settings, grams))
        torch_max, torch_loss = search.search_clip(w, [x], settings, grams)
    row["clip_same_bounds"] = (fused_max == torch_max).float().mean().item()
    row["clip_loss_fused_over_torch"] = fused_loss / torch_loss
    row["clip_exact_loss_fused_over_torch"] = (clip_loss_float64(w, fused_max, grams, settings)
                                               / clip_loss_float64(w, torch_max, grams, settings))
    h = search.gram([x])[0]
    grid = quantize(w, settings.bits, settings.group_size)

    def rounding():
        return gptq.gptq_round(w, h, grid, settings.gptq_damp, settings.gptq_block_size, settings.bits)

    fused_q = rounding().q
    row["gptq_fused_s"] = timed(rounding, repeats=3)
    with TorchOnly():
        row["gptq_torch_s"] = timed(rounding, repeats=3)
        row["gptq_integers_differ"] = (fused_q != rounding().q).float().mean().item()
    print(json.dumps(row), flush=True)
    torch.cuda.empty_cache()
    return row


def bench_inversion(n: int, gen: torch.Generator) -> dict:
    """The inverse-Hessian factor's steps at size n: Cholesky, and R^-1 by one solve vs by halves."""
    x = torch.randn(2 * n, n, device="cuda", generator=gen)
    h = x.t() @ x
    h.diagonal().add_(0.01 * h.diagonal().mean())
    r = torch.linalg.cholesky(h.double().flip(0, 1)).flip(0, 1)
    exact = torch.linalg.solve_triangular(r, torch.eye(n, dtype=torch.float64, device="cuda"), upper=True)
    rf, eye = r.float(), torch.eye(n, device="cuda")

    def rel(m: torch.Tensor) -> float:
        return ((m.double() - exact).norm() / exact.norm()).item()

    entry = {"n": n, "solve_s": timed(lambda: torch.linalg.solve_triangular(rf, eye, upper=True)),
             "halves_s": timed(lambda: gptq.upper_triangular_inverse(rf)),
             "cholesky_s": timed(lambda: torch.linalg.cholesky_ex(h.flip(0, 1))),
             "solve_rel_err": rel(torch.linalg.solve_triangular(rf, eye, upper=True)),
             "halves_rel_err": rel(gptq.upper_triangular_inverse(rf))}
    print(json.dumps(entry), flush=True)
    torch.cuda.empty_cache()
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="inputs for the Gram matrices")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available() or not kernels.available(torch.empty(0, device="cuda")):
        raise SystemExit("bench_kernels.py needs a CUDA GPU and Triton")
    torch.set_float32_matmul_precision("high")  # as the engine runs (TF32)
    settings = QuantSettings()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [bench_linear(name, shape, settings, args.tokens, gen) for name, shape in linear_shapes().items()]
    inversions = [bench_inversion(n, gen) for n in sorted({in_f for _, in_f in linear_shapes().values()})]
    print(f"\nGPU: {torch.cuda.get_device_name()}  torch {torch.__version__}\n")
    print("| linear | fake quant torch / fused (ms) | identical | clip search torch / fused (ms) | same bounds "
          "| clip loss fused / torch (float64) | GPTQ rounding torch / fused (ms) | integers differing |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['linear']} {r['shape'][0]} x {r['shape'][1]} | {r['fake_quant_torch_s'] * 1e3:.2f} / "
              f"{r['fake_quant_fused_s'] * 1e3:.2f} | {r['fake_quant_identical']} | {r['clip_torch_s'] * 1e3:.1f} / "
              f"{r['clip_fused_s'] * 1e3:.1f} | {r['clip_same_bounds']:.4f} | {r['clip_loss_fused_over_torch']:.5f} "
              f"({r['clip_exact_loss_fused_over_torch']:.5f}) "
              f"| {r['gptq_torch_s'] * 1e3:.0f} / {r['gptq_fused_s'] * 1e3:.0f} | {r['gptq_integers_differ']:.2e} |")
    print("\n| n | Cholesky (ms) | inverse: solve / halves (ms) | rel. error vs float64: solve / halves |")
    print("|---|---|---|---|")
    for e in inversions:
        print(f"| {e['n']} | {e['cholesky_s'] * 1e3:.1f} | {e['solve_s'] * 1e3:.1f} / {e['halves_s'] * 1e3:.1f} "
              f"| {e['solve_rel_err']:.2e} / {e['halves_rel_err']:.2e} |")
    if args.json:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "linears": rows, "inversions": inversions}, indent=1))


if __name__ == "__main__":
    main()
