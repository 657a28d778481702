"""Perplexity against calibration size on SmolLM2-135M: native AWQ variants and AutoAWQ 0.2.9 (issue 20).

One process: the float32 model, its held-out logits and the evaluation blocks are loaded once; each run
calibrates on `n` pydoc blocks cut with `seed`, quantizes every decoder layer, and is evaluated in memory
exactly as `quantkit eval` evaluates a release (int4 weights dequantized, every other tensor through fp16,
the first 40 x 512 tokens of the held-out pydoc half, float32). Prints one line per run and a markdown
table of the mean and spread over seeds per (variant, size); --json writes every run.

    python scripts/bench_calib_size.py --sizes 8 32 64 --seeds 0 1 2 --variants native native-strided
    python scripts/bench_calib_size.py --device cuda --sizes 8 32 64 128 --variants autoawq
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from quantkit.archs import LLAMA
from quantkit.awq.engine import capture_layer_inputs, quantize_layers
from quantkit.awq.quant import dequantize_gemm
from quantkit.awq.rtn import rtn_layer_tensors
from quantkit.awq.settings import QuantSettings
from quantkit.calib import BUILTIN_PYDOC, load_calibration, micro_batches, pydoc_topics
from quantkit.evaluate import token_blocks
from quantkit.testing.smollm2 import smollm2_checkpoint

VARIANTS = {
    # name: (backend, settings changes)
    "native": ("native", {}),
    "native-no-screen": ("native", {"scale_screen_tokens": None}),
    "native-16bit-inputs": ("native", {"inputs_from_quantized": False}),
    "native-no-clip": ("native", {"clip": False}),
    "native-16bit-inputs-no-clip": ("native", {"inputs_from_quantized": False, "clip": False}),
    "native-strided": ("native", {"clip_tokens": 512}),
    "native-strided-16bit-inputs": ("native", {"clip_tokens": 512, "inputs_from_quantized": False}),
    "native-gptq": ("native", {"method": "awq-gptq"}),
    "native-gptq-input-order": ("native", {"method": "awq-gptq", "gptq_act_order": False}),
    "native-gptq-damp0.01": ("native", {"method": "awq-gptq", "gptq_damp": 0.01}),
    "native-gptq-input-order-damp0.01": ("native", {"method": "awq-gptq", "gptq_act_order": False,
                                                    "gptq_damp": 0.01}),
    "rtn": ("rtn", {}),
    "native-gptq-damp0.001": ("native", {"method": "awq-gptq", "gptq_damp": 0.001}),
    "autoawq": ("autoawq", {}),
}


def load_fp32(source: Path, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).to(device).eval()


def quantized_state(model: torch.nn.Module, layer_tensors: dict[str, torch.Tensor],
                    device: torch.device) -> dict[str, torch.Tensor]:
    """The state `quantkit eval` loads from the release: int4 linears dequantized, every other tensor via fp16."""
    state = {k: v.half().float() for k, v in model.state_dict().items()}
    for name in {k.rsplit(".", 1)[0] for k in layer_tensors if k.endswith(".qweight")}:
        packed = [layer_tensors[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales")]
        state[f"{name}.weight"] = dequantize_gemm(*packed)
    for key, value in layer_tensors.items():
        if not key.endswith((".qweight", ".qzeros", ".scales")):
            state[key] = value.half().float()
    return {k: v.to(device) for k, v in state.items()}


@torch.no_grad()
def perplexity_and_kl(model: torch.nn.Module, blocks: torch.Tensor, ref_logprobs: list[torch.Tensor]) -> tuple[float, float]:
    nll, kl, count = 0.0, 0.0, 0
    for block, ref in zip(blocks, ref_logprobs):
        logprobs = torch.log_softmax(model(input_ids=block.unsqueeze(0), use_cache=False).logits[0].float(), -1)
        nll -= logprobs[:-1].gather(1, block[1:].unsqueeze(1)).sum().item()
        kl += (ref.exp() * (ref - logprobs)).sum().item()
        count += block.numel() - 1
    return math.exp(nll / count), kl / (blocks.numel())


def run_once(source: Path, model: torch.nn.Module, tokenizer, variant: str, n: int, seed: int,
             base: QuantSettings, device: torch.device) -> list:
    """Every decoder layer's release tensors (full names), as `write_release` takes them."""
    backend, changes = VARIANTS[variant]
    settings = replace(base, **changes)
    if backend == "rtn":
        return rtn_layer_tensors(source, LLAMA, settings)
    calib = load_calibration(BUILTIN_PYDOC, tokenizer, n_samples=n, seq_len=512, seed=seed)
    if backend == "autoawq":
        from quantkit.awq.autoawq_backend import quantize_with_autoawq

        scratch = load_fp32(source, torch.device("cpu"))
        results = quantize_with_autoawq(scratch, LLAMA, settings, blocks=calib.blocks)
    else:
        forwards = [lambda c=c: model(input_ids=c.to(device), use_cache=False)
                    for c in micro_batches(calib.blocks, settings.max_batch_tokens)]
        inputs = capture_layer_inputs(model, LLAMA, forwards, device)
        results = quantize_layers(model, LLAMA, settings, inputs, device)
    return {f"{LLAMA.layer_prefix(r.report.index)}.{name}": t for r in results for name, t in r.tensors.items()}


def parse_setting(item: str) -> tuple[str, object]:
    """'gptq_damp=0.03' -> ('gptq_damp', 0.03): the value read as JSON (numbers, true/false), else as text."""
    key, _, value = item.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["native"], choices=sorted(VARIANTS))
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="change a QuantSettings field for every variant, e.g. --set gptq_damp=0.03")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    device = torch.device(args.device)
    source = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = load_fp32(source, device)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = token_blocks(pydoc_topics("eval"), tokenizer, 512, args.eval_samples, "pydoc eval").to(device)
    with torch.no_grad():
        ref = [torch.log_softmax(model(input_ids=b.unsqueeze(0), use_cache=False).logits[0].float(), -1)
               for b in blocks]
    fp32_ppl, _ = perplexity_and_kl(model, blocks, ref)
    print(f"fp32 perplexity {fp32_ppl:.3f}", flush=True)
    base = QuantSettings(**{"method": "awq", "group_size": args.group_size,  # variants name their method
                            **dict(parse_setting(item) for item in args.set)})
    runs = []
    for variant in args.variants:
        for n in args.sizes:
            for seed in args.seeds:
                started = time.perf_counter()
                layer_tensors = run_once(source, model, tokenizer, variant, n, seed, base, device)
                seconds = time.perf_counter() - started
                model.load_state_dict(quantized_state(model, layer_tensors, device))
                ppl, kl = perplexity_and_kl(model, blocks, ref)
                model.load_state_dict(original)
                runs.append({"variant": variant, "blocks": n, "seed": seed, "perplexity": ppl, "kl": kl,
                             "seconds": seconds})
                print(f"{variant} {n} blocks seed {seed}: perplexity {ppl:.3f} KL {kl:.4f} ({seconds:.0f} s)",
                      flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"fp32": fp32_ppl, "runs": runs}, indent=2))

    print("\n| variant | blocks of 512 | seeds | perplexity mean | min-max | KL mean |\n|---|---|---|---|---|---|")
    for variant in args.variants:
        for n in args.sizes:
            sel = [r for r in runs if r["variant"] == variant and r["blocks"] == n]
            ppls = [r["perplexity"] for r in sel]
            print(f"| {variant} | {n} | {len(sel)} | {statistics.mean(ppls):.3f} | {min(ppls):.3f}-{max(ppls):.3f} "
                  f"| {statistics.mean(r['kl'] for r in sel):.4f} |")


if __name__ == "__main__":
    main()
