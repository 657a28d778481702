"""More calibration data must not make the native AWQ engine worse (issue 20).

With AutoAWQ's clip-token sample (every (total // 512)-th token from token 0), position 0 of each 512-token block,
the attention sink, was in the sample once per block: n / 512 of the clip tokens for n blocks. In SmolLM2's
layer-1 down_proj input that token carries outsized activations, so the clip bounds were fitted more and more to
it as n grew, and SmolLM2's perplexity rose from 16.604 (8 blocks) to 16.985 (64 blocks). The engine now scores
clip candidates on every token. This test runs the engine's clip search on the real layer-1 inputs of 8 and of
64 calibration blocks and scores each choice on held-out text: more data must not be worse, while the old sample
must still show the regression on the same data (so the comparison keeps its power to fail).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantkit.archs import LLAMA
from quantkit.awq.engine import _first, capture_layer_inputs
from quantkit.awq.quant import fake_quantize
from quantkit.awq.search import apply_clip, search_clip
from quantkit.awq.settings import QuantSettings
from quantkit.calib import BUILTIN_PYDOC, load_calibration, pydoc_topics
from quantkit.evaluate import token_blocks

GROUP = 64
LAYER, LINEAR = 1, "mlp.down_proj"
# Held-out error relative to round-to-nearest, measured with calibration seeds 0 / 1 / 2 and 4 held-out blocks:
# every token 0.813 / 0.807 / 0.800 (8 blocks) -> 0.799 / 0.799 / 0.799 (64 blocks); AutoAWQ's sample
# 0.857 / 0.853 / 0.839 -> 0.979 / 0.986 / 0.991 (+14 %, +16 %, +18 %). The test uses seed 0: its 64 blocks must
# not be worse than its 8 (-1.8 % measured; BLAS order moves these by ~1e-6), and the old sample must stay at
# least 5 % worse with 64 blocks, a third of what it measures.
OLD_REGRESSION = 1.05


def _layer_inputs(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """Inputs [n, 512, in] of layer LAYER's LINEAR in the float model."""
    inputs = capture_layer_inputs(model, LLAMA, [lambda c=c: model(input_ids=c, use_cache=False)
                                                for c in blocks.split(16)], "cpu")
    layers = model.model.layers
    seen: list[torch.Tensor] = []
    handle = layers[LAYER].get_submodule(LINEAR).register_forward_hook(lambda m, a, o: seen.append(a[0]))
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            for layer in layers[: LAYER + 1]:
                hidden = _first(layer(hidden, **kwargs))
    finally:
        handle.remove()
    return torch.cat(seen)


@pytest.mark.slow
@torch.no_grad()
def test_clip_search_is_no_worse_with_more_calibration_blocks(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    calib = _layer_inputs(model, load_calibration(BUILTIN_PYDOC, tokenizer, n_samples=64, seq_len=512).blocks)
    held = _layer_inputs(model, token_blocks(pydoc_topics("eval"), tokenizer, 512, 4, "pydoc eval"))
    weight = model.model.layers[LAYER].get_submodule(LINEAR).weight
    x = held.reshape(-1, weight.shape[1])
    rtn = (x @ (fake_quantize(weight, 4, GROUP) - weight).t()).pow(2).sum()

    def held_out_error(n_blocks: int, settings: QuantSettings) -> float:
        """Held-out output error of the clipped int4 weight chosen on the first n_blocks, relative to no clip."""
        bound, _ = search_clip(weight, [calib[:n_blocks]], settings)
        q = fake_quantize(apply_clip(weight, bound, GROUP), 4, GROUP)
        return ((x @ (q - weight).t()).pow(2).sum() / rtn).item()

    every_token = QuantSettings(method="awq", group_size=GROUP)
    assert every_token.clip_tokens is None  # the engine's default
    err8, err64 = held_out_error(8, every_token), held_out_error(64, every_token)
    assert err64 <= err8, f"64 blocks {err64:.4f} vs 8 blocks {err8:.4f} (every token)"

    strided = QuantSettings(method="awq", group_size=GROUP, clip_tokens=512)
    old8, old64 = held_out_error(8, strided), held_out_error(64, strided)
    assert old64 > old8 * OLD_REGRESSION, f"AutoAWQ's sample: 64 blocks {old64:.4f} vs 8 blocks {old8:.4f}"
