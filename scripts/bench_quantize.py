"""Benchmark the AWQ engine on MiniCPM-V 2.6's LLM at its real shapes (random weights), on one GPU.

Measures the calibration wall time (layer-0 capture + every decoder layer; as in `quantkit quantize`, the model
starts on the host and the fused kernels compile while it is built), peak GPU memory, the ratio to
the arithmetic floor (brute-force search FLOPs / measured bf16 matmul rate), and the end-to-end output error
of the quantized layers vs the 16-bit ones on held-out tokens. Prints a markdown table; --json writes details.
`--backend both` runs the native engine and upstream AutoAWQ 0.2.9 (quantkit's adapter, same arch spec) on
the same weights, calibration token ids and held-out tokens, in bf16, one after the other, and prints the
speed ratio. AutoAWQ takes ~25 s per layer on an H100: compare a few layers. `--method both` runs the native
engine twice on the same weights and data, awq then awq-gptq (GPTQ rounding), and prints the time ratio.
`--device cpu --tiny` checks the script itself on a small model (hidden 256) without a GPU.

    python scripts/bench_quantize.py                       # 28 layers, 128 x 512 tokens
    python scripts/bench_quantize.py --method both --json gptq28.json
    PYTHONPATH=$PWD:$PWD/.stage_awq python3 scripts/bench_quantize.py --layers 4 --backend both

.stage_awq/ (git-ignored) carries AutoAWQ to a GPU machine that lacks it; it is pure Python, made with
`pip install --no-deps --target .stage_awq autoawq==0.2.9`. AutoAWQ's other imports (accelerate, triton,
transformers, huggingface_hub) are in the GPU image; `datasets` is not needed (see autoawq_backend.py).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.archs import MINICPMV26_LLM_SHAPES, QWEN2
from quantkit.awq import engine
from quantkit.awq.engine import (
    LayerInputs,
    capture_layer_inputs,
    compile_kernels_ahead,
    outside_layers_on,
    quantize_layers,
)
from quantkit.awq.quant import dequantize_gemm, fake_quantize
from quantkit.awq.settings import QuantSettings

TINY_SHAPES = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 1024}
"""--tiny: a CPU-sized model for checking the script, not for timing."""


def build_llm(layers: int, device: str, dtype: torch.dtype, seed: int, shapes: dict):
    """Qwen2ForCausalLM with `shapes` (MiniCPM-V 2.6's LLM), random weights (initialised on `device`), all left
    on the CPU as `quantkit quantize` loads them."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**shapes, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    return model.to("cpu")


def search_flops(hidden: int, intermediate: int, kv_dim: int, tokens: int, seq_len: int, grid: int) -> float:
    """Brute-force AWQ FLOPs per layer: every grid point re-runs its inspected block over every token."""
    attn_params = 2 * hidden * hidden + 2 * hidden * kv_dim
    attn_scores = 2 * 2 * tokens * seq_len * hidden  # QK^T and PV
    mlp_params = 3 * hidden * intermediate
    down_params = hidden * intermediate
    per_forward = 2 * tokens * (attn_params + mlp_params) + attn_scores
    search = grid * (2 * tokens * attn_params + attn_scores) + grid * 2 * tokens * (mlp_params + down_params)
    return search + 2 * per_forward


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_quantized_state(layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give `layer` the weights its packed int4 tensors dequantize to (and its scaled norms)."""
    for name in QWEN2.linears:
        lin = layer.get_submodule(name)
        packed = {key: tensors[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales")}
        lin.weight.data = dequantize_gemm(**packed).to(lin.weight.dtype)
    params = dict(layer.named_parameters())
    for name, value in tensors.items():
        if name in params:
            params[name].data = value.to(params[name].dtype)


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - start)


@torch.no_grad()
def run_layers(model, hidden: list[torch.Tensor], kwargs: list[dict], device: str,
               round_to_nearest: bool = False) -> list[torch.Tensor]:
    """Run every decoder layer on `hidden`; with round_to_nearest, on RTN int4 weights (the baseline)."""
    for layer in model.model.layers:
        host = {name: p.data for name, p in layer.named_parameters()}
        layer.to(device)
        if round_to_nearest:
            for name in QWEN2.linears:
                lin = layer.get_submodule(name)
                lin.weight.data = fake_quantize(lin.weight, 4, 128)
        hidden = [layer(h, **kw) for h, kw in zip(hidden, kwargs)]
        hidden = [h[0] if isinstance(h, tuple) else h for h in hidden]
        for name, p in layer.named_parameters():
            p.data = host[name]
    return hidden


def peak_gpu_gib(results, device: str) -> float:
    """Peak GPU memory of a run that started with torch.cuda.reset_peak_memory_stats(): the largest of the
    per-layer peaks its reports give (each backend resets the counter per layer) and the counter's reading now.
    0 on the CPU."""
    if device != "cuda":
        return 0.0
    torch.cuda.synchronize()
    reported = [r.report.peak_gpu_bytes or 0 for r in results]
    return max(torch.cuda.max_memory_allocated(), *reported) / 2**30


def relative_mse(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    err = sum((o.float() - r.float()).pow(2).sum() for o, r in zip(outputs, reference))
    return (err / sum(r.float().pow(2).sum() for r in reference)).item()


@dataclass
class HeldOut:
    """What every backend is measured on: the calibration ids, and held-out layer-0 inputs with the 16-bit and
    round-to-nearest outputs of the decoder layers on them."""

    ids: torch.Tensor
    hidden: list[torch.Tensor]
    kwargs: list[dict]
    reference: list[torch.Tensor]
    rtn: list[torch.Tensor]


def prepare(args, model, device: str) -> HeldOut:
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seq_len), generator=gen)
    held_out = torch.randint(0, model.config.vocab_size, (8, args.seq_len), generator=gen)
    with outside_layers_on(model, QWEN2, device):
        held = capture_layer_inputs(model, QWEN2, [lambda: model(input_ids=held_out.to(device), use_cache=False)],
                                    device)
    reference = [h.cpu() for h in run_layers(model, held.hidden, held.kwargs, device)]
    rtn = [h.cpu() for h in run_layers(model, held.hidden, held.kwargs, device, round_to_nearest=True)]
    return HeldOut(ids, held.hidden, held.kwargs, reference, rtn)


def output_errors(model, results, held: HeldOut, device: str) -> dict:
    """Relative MSE of the int4 layers' outputs (and of round-to-nearest's) vs the 16-bit ones."""
    for result, layer in zip(results, model.model.layers):
        load_quantized_state(layer, result.tensors)
    quantized = [h.cpu() for h in run_layers(model, held.hidden, held.kwargs, device)]
    return {"output_rel_mse": relative_mse(quantized, held.reference),
            "rtn_output_rel_mse": relative_mse(held.rtn, held.reference)}


METHODS = {
    "awq": {"method": "awq"},
    "awq-no-screen": {"method": "awq", "scale_screen_tokens": None},
    "awq-screen4096": {"method": "awq", "scale_screen_tokens": 4096},
    "awq-finalists2": {"method": "awq", "scale_finalists": 2},
    "awq-screen4096-finalists2": {"method": "awq", "scale_screen_tokens": 4096, "scale_finalists": 2},
    "awq-screen16384-finalists4": {"method": "awq", "scale_screen_tokens": 16384, "scale_finalists": 4},
    "awq-gptq": {"method": "awq-gptq"},
    "awq-gptq-input-order": {"method": "awq-gptq", "gptq_act_order": False},
}
"""--method choices: the native engine's settings changes."""


def bench_native(args, model, held: HeldOut, device: str, method: str) -> dict:
    ids = held.ids
    settings = QuantSettings(**METHODS[method])
    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    rows = max(1, settings.max_batch_tokens // args.seq_len)
    with outside_layers_on(model, QWEN2, device):
        inputs = capture_layer_inputs(
            model, QWEN2, [lambda c=c: model(input_ids=c.to(device), use_cache=False) for c in ids.split(rows)],
            device)
    sync(device)
    captured = time.perf_counter()
    if args.profile:
        profile_layers(model, settings, inputs, device)
        results = []
    else:
        results = quantize_layers(model, QWEN2, settings, inputs, device)
    sync(device)
    wall = time.perf_counter() - started
    if not results:
        return {"backend": f"native {method} (profiled)", "wall_s": wall}
    peak = peak_gpu_gib(results, device)
    return {
        "backend": f"native {method}",
        "wall_s": wall,
        "capture_s": captured - started,
        "per_layer_s": [r.report.seconds for r in results],
        "peak_gpu_gib": peak,
        **output_errors(model, results, held, device),
        "ratios": [r.report.ratios for r in results],
        "scale_losses": [r.report.scale_losses for r in results],
    }


PROFILED_STEPS = ("channel_mean_abs", "gram", "search_scales_linear", "search_scales_block", "clip_grams",
                  "search_clip", "apply_clip", "gptq_round_shared", "quantize", "pack_gemm")
"""quantkit.awq.engine's calls that --profile times as steps of their own."""


def profile_layers(model, settings: QuantSettings, inputs: LayerInputs, device: str) -> None:
    """quantize_layers under torch.profiler, each engine step and decoder-layer forward labelled: prints the
    steps' host time (which waits on the GPU at every host sync) and the top CUDA kernels."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(name, fn):
        def call(*args, **kwargs):
            with record_function(f"step.{name}"):
                return fn(*args, **kwargs)
        return call

    saved = {name: getattr(engine, name) for name in PROFILED_STEPS}
    layer_class = type(model.model.layers[0])
    forward = layer_class.forward
    for name, fn in saved.items():
        setattr(engine, name, labelled(name, fn))
    layer_class.forward = labelled("decoder_layer_forward", forward)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            quantize_layers(model, QWEN2, settings, inputs, device)
            sync(device)
    finally:
        for name, fn in saved.items():
            setattr(engine, name, fn)
        layer_class.forward = forward
    events = prof.key_averages()
    print("\n| step | calls | host total (ms) |\n|---|---|---|")
    for event in sorted(events, key=lambda e: -e.cpu_time_total):
        if event.key.startswith("step.") and event.cpu_time_total > 0:  # not the GPU-side copy of the range
            print(f"| {event.key[5:]} | {event.count} | {event.cpu_time_total / 1e3:.0f} |")
    print(events.table(sort_by="cuda_time_total" if device == "cuda" else "cpu_time_total", row_limit=40))


def same_choices(first: dict, second: dict) -> str:
    """How many (layer, scaling group) ratios two runs share, and the first layer where they part."""
    pairs = [(layer, group) for layer, ratios in enumerate(first["ratios"]) for group in ratios]
    same = sum(first["ratios"][layer][group] == second["ratios"][layer].get(group) for layer, group in pairs)
    differ = [layer for layer, group in pairs if first["ratios"][layer][group] != second["ratios"][layer].get(group)]
    where = f", first difference at layer {differ[0]}" if differ else ""
    return f"{same}/{len(pairs)} scale ratios the same{where}"


@torch.no_grad()
def compare_screening(args, model, held: HeldOut, device: str) -> dict:
    """Per layer, on the same inputs: the full scale search (every grid point on every token) and the screened
    one (the default); the ratios each chose and the full-set loss of each choice. The next layer gets the full
    search's outputs, so every layer is compared on identical inputs."""
    from quantkit.awq.engine import quantize_layer

    rows = max(1, QuantSettings().max_batch_tokens // args.seq_len)
    with outside_layers_on(model, QWEN2, device):
        inputs = capture_layer_inputs(
            model, QWEN2, [lambda c=c: model(input_ids=c.to(device), use_cache=False) for c in held.ids.split(rows)],
            device)
    layers = []
    for index, layer in enumerate(model.model.layers):
        host = {name: p.data for name, p in layer.named_parameters()}
        layer.to(device)
        original = {k: v.clone() for k, v in layer.state_dict().items()}
        full, next_hidden = quantize_layer(layer, inputs, QWEN2, QuantSettings(method="awq", scale_screen_tokens=None), index)
        layer.load_state_dict(original)
        screened, _ = quantize_layer(layer, inputs, QWEN2, QuantSettings(method="awq"), index)
        for name, p in layer.named_parameters():
            p.data = host[name]
        inputs = LayerInputs(hidden=next_hidden, kwargs=inputs.kwargs)
        for group, ratio in full.report.ratios.items():
            layers.append({"layer": index, "group": group, "full_ratio": ratio,
                           "screened_ratio": screened.report.ratios[group],
                           "full_loss": full.report.scale_losses[group],
                           "screened_loss": screened.report.scale_losses[group],
                           "full_s": full.report.seconds, "screened_s": screened.report.seconds})
    same = sum(r["full_ratio"] == r["screened_ratio"] for r in layers)
    excess = [r["screened_loss"] / r["full_loss"] - 1 for r in layers if r["full_ratio"] != r["screened_ratio"]]
    print(f"\nscreened vs full scale search, same inputs per layer: {same}/{len(layers)} ratios the same"
          + (f"; where they differ, the screened choice's full-set loss is {min(excess):+.3%} .. {max(excess):+.3%} "
             f"above the full search's best" if excess else ""))
    return {"groups": layers, "same": same, "total": len(layers), "loss_excess": excess}


def bench_autoawq(args, held: HeldOut, device: str, dtype: torch.dtype) -> dict:
    """AutoAWQ's own capture and layer loop on a fresh copy of the same weights (same seed), all outside-layer
    modules starting on the host as AutoAWQ loads them; measured like the native run."""
    from quantkit.awq.autoawq_backend import quantize_with_autoawq

    model = build_llm(args.layers, device, dtype, args.seed, MINICPMV26_LLM_SHAPES)
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    results = quantize_with_autoawq(model, QWEN2, QuantSettings(method="awq"), blocks=held.ids)
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    peak = peak_gpu_gib(results, device)
    del model
    torch.cuda.empty_cache()
    # AutoAWQ replaced its linears by packed modules
    fresh = build_llm(args.layers, device, dtype, args.seed, MINICPMV26_LLM_SHAPES)
    return {
        "backend": "autoawq",
        "wall_s": wall,
        "per_layer_s": [r.report.seconds for r in results],
        "peak_gpu_gib": peak,
        **output_errors(fresh, results, held, device),
        "ratios": [r.report.ratios for r in results],
    }


def bench_llmcompressor(args, held: HeldOut, device: str, dtype: torch.dtype) -> dict:
    """llm-compressor 0.14's AWQModifier (W4A16 asymmetric, g128, its sequential pipeline: the same 20-point
    scale grid, no clip search) on a fresh copy of the same weights and calibration ids: wall time and peak GPU
    memory (its output error is not measured: it keeps its own quantized modules)."""
    import tempfile

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = build_llm(args.layers, device, dtype, args.seed, MINICPMV26_LLM_SHAPES)
    config_dir = tempfile.mkdtemp()
    model.config.save_pretrained(config_dir)  # llm-compressor reads the config again from the model's path
    model.config._name_or_path = model.name_or_path = config_dir
    ids = held.ids.tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})
    tokenizer = PreTrainedTokenizerFast(  # the data is token ids already; oneshot wants a processor
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>",
        pad_token="<unk>")
    recipe = [AWQModifier(ignore=["lm_head"], scheme="W4A16_ASYM", targets=["Linear"])]
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=data, recipe=recipe, max_seq_length=args.seq_len,
            num_calibration_samples=len(ids))
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    return {"backend": "llm-compressor 0.14 (no clip search)", "wall_s": wall, "per_layer_s": [],
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30, "output_rel_mse": float("nan"),
            "rtn_output_rel_mse": relative_mse(held.rtn, held.reference), "ratios": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["native", "autoawq", "both", "llmcompressor", "all"], default="native",
                        help="both: native and AutoAWQ 0.2.9; all: and llm-compressor 0.14 (each on the same "
                             "weights and ids, one after the other)")
    parser.add_argument("--method", nargs="+", choices=[*METHODS, "both"], default=["awq"],
                        help="native engine's methods, run one after the other on the same weights and data; "
                             "both: awq then awq-gptq")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="hidden 256 instead of MiniCPM-V 2.6's shapes (CPU check)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--compare-screening", action="store_true",
                        help="also run the full and the screened scale search layer by layer on the same inputs "
                             "and compare their choices and losses")
    parser.add_argument("--profile", action="store_true",
                        help="profile the first native method instead: its steps' times and top CUDA ops")
    parser.add_argument("--no-compile-ahead", action="store_true",
                        help="leave Triton's compilation to the first layer (quantize compiles while loading)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_quantize.py measures GPU speed: no CUDA device is visible (--device cpu --tiny "
                         "checks the script).")
    if args.backend != "native" and (args.device != "cuda" or args.tiny):
        raise SystemExit("--backend autoawq/both compares at MiniCPM-V 2.6's shapes on the GPU.")
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = TINY_SHAPES if args.tiny else MINICPMV26_LLM_SHAPES
    methods = ["awq", "awq-gptq"] if args.method == ["both"] else args.method
    if not args.no_compile_ahead:  # as `quantkit quantize` does while it loads the model
        widest = max((QuantSettings(**METHODS[m]) for m in methods), key=lambda s: s.method == "awq-gptq")
        compile_kernels_ahead(device, dtype, widest)
    rate = None
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        rate = matmul_rate(device, dtype)
    kv_dim = shapes["hidden_size"] // shapes["num_attention_heads"] * shapes["num_key_value_heads"]
    flops = args.layers * search_flops(shapes["hidden_size"], shapes["intermediate_size"], kv_dim,
                                       args.n_samples * args.seq_len, args.seq_len, QuantSettings().scale_grid)
    floor = flops / rate if rate else float("nan")
    model = build_llm(args.layers, device, dtype, args.seed, shapes)
    held = prepare(args, model, device)
    if args.profile:
        bench_native(args, model, held, device, methods[0])
        return
    results = []
    if args.backend in ("native", "both", "all"):
        for i, method in enumerate(methods):
            if i:  # output_errors() left the previous run's int4 weights in the model
                del model
                model = build_llm(args.layers, device, dtype, args.seed, shapes)
            results.append(bench_native(args, model, held, device, method))
    if args.compare_screening:
        del model
        model = build_llm(args.layers, device, dtype, args.seed, shapes)
        results[0]["screening"] = compare_screening(args, model, held, device)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    if args.backend in ("autoawq", "both", "all"):
        results.append(bench_autoawq(args, held, device, dtype))
    if args.backend in ("llmcompressor", "all"):
        results.append(bench_llmcompressor(args, held, device, dtype))
    if rate:
        print(f"\nGPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    print("| backend | layers | samples x seq | wall | per layer | est. 28 layers | peak GPU | floor | wall/floor "
          "| output rel. MSE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        per_layer = result["wall_s"] / args.layers
        print(f"| {result['backend']} | {args.layers} | {args.n_samples} x {args.seq_len} | {result['wall_s']:.1f} s "
              f"| {per_layer:.2f} s | {per_layer * 28:.0f} s | {result['peak_gpu_gib']:.1f} GiB | {floor:.1f} s "
              f"| {result['wall_s'] / floor:.2f} | {result['output_rel_mse']:.3e} "
              f"({result['rtn_output_rel_mse']:.3e}) |")
    for result in results:
        if "capture_s" in result:
            layer_s = result["per_layer_s"]
            rest = sum(layer_s[1:]) / max(1, len(layer_s) - 1)
            print(f"{result['backend']}: capture {result['capture_s']:.2f} s, first layer {layer_s[0]:.2f} s, "
                  f"later layers {rest:.3f} s each, between layers {result['wall_s'] - result['capture_s'] - sum(layer_s):.2f} s")
    speed = {}
    if args.backend in ("native", "both", "all") and len(methods) > 1:
        speed["time_ratios"] = {r["backend"]: r["wall_s"] / results[0]["wall_s"] for r in results[1:len(methods)]}
        for name, ratio in speed["time_ratios"].items():
            print(f"\n{name} takes {ratio:.2f}x {results[0]['backend']}'s time ({args.layers} layers, same data)")
        speed["same_choices"] = {r["backend"]: same_choices(results[0], r) for r in results[1:len(methods)]}
        for name, agreement in speed["same_choices"].items():
            print(f"{name} vs {results[0]['backend']}: {agreement}")
    if args.backend in ("both", "all"):
        speed["peer_ratios"] = {r["backend"]: r["wall_s"] / results[0]["wall_s"] for r in results[len(methods):]}
        for name, ratio in speed["peer_ratios"].items():
            print(f"\n{results[0]['backend']} is {ratio:.1f}x faster than {name} ({args.layers} layers, same data)")
        print("output rel. MSE in parentheses: round-to-nearest")
    if args.json:
        args.json.write_text(json.dumps({"matmul_tflops": rate / 1e12 if rate else None, "floor_s": floor, "flops": flops,
                                         **results[0], "backends": results, **speed}, indent=1))


if __name__ == "__main__":
    main()
