"""KL(16-bit || int4) of text-only releases on a prompt suite, in torch float32, without vLLM or quantkit verify.

The 16-bit model answers each prompt (chat template, greedy, --max-tokens); every release is then scored
teacher-forced on that continuation: mean KL over the full vocabulary and top-1 agreement per prompt. This is
how a release's quality on text outside its calibration set was compared across methods and dampenings
(docs/benchmarks.md, "Dampening and text outside the calibration set"); verify measures the same through vLLM
over its top-20 log-probabilities.

    python scripts/bench_prompt_kl.py FP32_DIR RELEASE [RELEASE ...] --json prompt-kl.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantkit.evaluate import load_for_eval

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "tests" / "integration" / "smollm2_prompts.jsonl"


def answers(reference: torch.nn.Module, tokenizer, prompts: list[dict], max_tokens: int) -> list[tuple[int, torch.Tensor]]:
    """(prompt length, prompt + greedy continuation ids) per prompt."""
    out = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt["text"]}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        out.append((ids.shape[1], reference.generate(ids, max_new_tokens=max_tokens, do_sample=False)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="the 16-bit (or float32) model folder")
    parser.add_argument("releases", type=Path, nargs="+", help="int4 releases of that model")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="jsonl with id and text per row")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cpu = torch.device("cpu")
    loaded = load_for_eval(args.reference, torch.float32, cpu)
    tokenizer, reference = loaded.tokenizer, loaded.lm
    prompts = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    with torch.no_grad():
        sequences = answers(reference, tokenizer, prompts, args.max_tokens)
        reference_logits = [reference(ids).logits[0] for _, ids in sequences]

    results = {}
    for release in args.releases:
        model = load_for_eval(release, torch.float32, cpu).lm  # int4 weights dequantized
        rows = {}
        with torch.no_grad():
            for prompt, (length, ids), ref in zip(prompts, sequences, reference_logits, strict=True):
                scored = slice(length - 1, ids.shape[1] - 1)  # the logits that predict the continuation
                logp, logq = torch.log_softmax(ref[scored], -1), torch.log_softmax(model(ids).logits[0][scored], -1)
                rows[prompt["id"]] = {"kl": (logp.exp() * (logp - logq)).sum(-1).mean().item(),
                                      "top1": (logp.argmax(-1) == logq.argmax(-1)).float().mean().item()}
        results[str(release)] = rows

    names = list(results)
    print("| prompt | " + " | ".join(f"{Path(n).name}: KL / top-1" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for prompt in prompts:
        cells = (f"{results[n][prompt['id']]['kl']:.3f} / {results[n][prompt['id']]['top1']:.2f}" for n in names)
        print(f"| {prompt['id']} | " + " | ".join(cells) + " |")
    means = (f"{sum(r['kl'] for r in results[n].values()) / len(prompts):.3f} / "
             f"{sum(r['top1'] for r in results[n].values()) / len(prompts):.2f}" for n in names)
    print("| **mean** | " + " | ".join(means) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
