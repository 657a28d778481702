"""The AWQ searches and the per-layer engine beat round-to-nearest on data with outlier channels."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from quantkit.archs import QWEN2
from quantkit.awq.engine import capture_layer_inputs, quantize_layer
from quantkit.awq.quant import dequantize_gemm, fake_quantize, unpack_gemm
from quantkit.awq.search import (
    candidate_scales,
    channel_mean_abs,
    gram_scoring_is_cheaper,
    group_grams,
    scaled_fake_quant,
    screening_subset,
    search_clip,
    search_scales_linear,
    weight_channel_mean,
)
from quantkit.awq.settings import QuantSettings
from quantkit.errors import InputError


def outlier_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=gen)
    x[:, :: features // 8] *= 25.0  # a few salient channels, as in real LLM activations
    return x


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x @ (w_hat - w).t()).pow(2).mean().item()


def test_scale_search_beats_round_to_nearest_on_a_linear():
    settings = QuantSettings(method="awq")
    x = outlier_inputs(1024, 256, seed=0)
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    choice = search_scales_linear(w, [x], channel_mean_abs([x]), settings)
    awq_err = output_error(x, w, scaled_fake_quant(w, choice.scales, settings))
    rtn_err = output_error(x, w, fake_quantize(w, 4, 128))
    assert choice.ratio > 0
    assert awq_err < 0.7 * rtn_err
    # the Gram-matrix loss of every grid point equals the brute-force mean squared output error
    w_mean = weight_channel_mean([w], 128)
    for index in (0, 7, 19):
        scales = candidate_scales(channel_mean_abs([x]), w_mean, index / 20, duo=True)
        brute = output_error(x, w, scaled_fake_quant(w, scales, settings))
        assert choice.losses[index] == pytest.approx(brute, rel=1e-3)


def test_clip_search_never_worse_than_no_clip():
    settings = QuantSettings(method="awq")
    x = outlier_inputs(512, 256, seed=3)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    w[0, 5] = 12.0  # one outlier weight: clipping it should help its group
    max_val, _ = search_clip(w, [x], settings)
    assert max_val[0, 0] < w[0, :128].abs().max()
    clipped = torch.maximum(torch.minimum(w.reshape(64, 2, 128), max_val.unsqueeze(-1)), -max_val.unsqueeze(-1))
    err_clip = output_error(x, w, fake_quantize(clipped.reshape(64, 256), 4, 128))
    err_plain = output_error(x, w, fake_quantize(w, 4, 128))
    assert err_clip < err_plain


def test_group_grams_are_the_block_diagonal_of_the_gram_over_all_micro_batches():
    x = outlier_inputs(24, 256, seed=6)
    batches = [x[:10].reshape(2, 5, 256), x[10:]]  # [B, L, in] and [n, in] micro-batches
    grams = group_grams(batches, 64)
    full = (x.double().t() @ x.double()) / 24
    assert grams.shape == (4, 64, 64)
    for g in range(4):
        block = full[g * 64 : (g + 1) * 64, g * 64 : (g + 1) * 64]
        assert torch.allclose(grams[g].double(), block, rtol=1e-5, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, ::32] *= 25.0
    return model


def test_decoder_layer_awq_beats_round_to_nearest(tiny_qwen2):
    model = tiny_qwen2
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(5))
    inputs = capture_layer_inputs(model, QWEN2, [lambda c=c: model(input_ids=c) for c in ids.split(2)], "cpu")
    layer = model.model.layers[0]
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        reference = [layer(h, **kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
        for name in QWEN2.linears:
            lin = layer.get_submodule(name)
            lin.weight.data = fake_quantize(lin.weight, 4, 128)
        rtn = [layer(h, **kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
    layer.load_state_dict(original)
    rtn_err = sum((r - f).pow(2).sum() for r, f in zip(rtn, reference)) / sum(f.pow(2).sum() for f in reference)

    result, next_hidden = quantize_layer(layer, inputs, QWEN2, QuantSettings(method="awq"), index=0)
    layer.load_state_dict(original)
    awq_err = sum((q - f).pow(2).sum() for q, f in zip(next_hidden, reference)) / sum(
        f.pow(2).sum() for f in reference)
    assert result.report.output_rel_mse == pytest.approx(awq_err.item(), rel=1e-4)
    assert awq_err < 0.8 * rtn_err
    # GQA: v_proj (128x256) and o_proj (256x256) differ, so the v -> o group is skipped as in MiniCPM-V 2.6
    assert set(result.report.ratios) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    assert set(result.clips) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                 "mlp.down_proj"}
    assert result.tensors["self_attn.q_proj.qweight"].shape == (256, 256 // 8)
    assert result.tensors["mlp.down_proj.scales"].shape == (512 // 128, 256)
    assert "self_attn.q_proj.bias" in result.tensors and "self_attn.q_proj.weight" not in result.tensors
    # the layer norm carries the chosen scales: its weight changed
    assert not torch.equal(result.tensors["input_layernorm.weight"], original["input_layernorm.weight"])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"bits": 8}, "bits=8"), ({"zero_point": False}, "zero point"), ({"group_size": 100}, "group_size=100"),
     ({"version": "gemv"}, "gemm"), ({"clip_max_shrink": 1.5}, "clip_max_shrink"),
     ({"scale_screen_tokens": 0}, "scale_screen_tokens=0"), ({"scale_finalists": 0}, "scale_finalists=0")],
)
def test_settings_refuse_what_the_gemm_layout_cannot_hold(kwargs, message):
    with pytest.raises(InputError, match=message):
        QuantSettings(**kwargs)


def test_quantize_layers_leaves_the_model_unchanged(tiny_qwen2):
    """The quantized state lives in the results; the model keeps computing the 16-bit function."""
    from quantkit.awq.engine import quantize_layers

    model = tiny_qwen2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(7))
    inputs = capture_layer_inputs(model, QWEN2, [lambda: model(input_ids=ids)], "cpu")
    results = quantize_layers(model, QWEN2, QuantSettings(method="awq"), inputs, "cpu")
    assert len(results) == 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_engine_packs_what_it_computes_with_on_the_awq_grid(tiny_qwen2):
    """awq-gptq keeps awq's searches, scales and zeros (the same release format); only the integers move, and
    the packed tensors unpack to exactly the engine's fake-quantized weights. Lower calibration output error."""
    model = tiny_qwen2
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(5))
    inputs = capture_layer_inputs(model, QWEN2, [lambda c=c: model(input_ids=c) for c in ids.split(4)], "cpu")
    layer = model.model.layers[0]
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    awq, _ = quantize_layer(layer, inputs, QWEN2, QuantSettings(method="awq"), index=0)
    layer.load_state_dict(original)
    gptq, _ = quantize_layer(layer, inputs, QWEN2, QuantSettings(method="awq-gptq"), index=0)
    fake_quantized = {name: layer.get_submodule(name).weight.detach().clone() for name in QWEN2.linears}
    layer.load_state_dict(original)

    assert awq.report.ratios == gptq.report.ratios
    assert all(torch.equal(awq.clips[n], gptq.clips[n]) for n in awq.clips)
    for name in QWEN2.linears:
        packed = [gptq.tensors[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales")]
        assert torch.equal(dequantize_gemm(*packed), fake_quantized[name])
        assert torch.equal(gptq.tensors[f"{name}.scales"], awq.tensors[f"{name}.scales"])
        assert torch.equal(gptq.tensors[f"{name}.qzeros"], awq.tensors[f"{name}.qzeros"])
        q_awq = unpack_gemm(*[awq.tensors[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales")]).q
        assert (unpack_gemm(*packed).q != q_awq).float().mean() > 0.05
    assert gptq.report.output_rel_mse < 0.5 * awq.report.output_rel_mse


def test_screening_subset_spreads_whole_sequences_over_the_micro_batches():
    batches = [torch.full((4, 64, 8), float(i)) for i in range(4)]  # 16 sequences, 1024 tokens
    assert screening_subset(batches, 1024, whole_batches=False) is None
    rows = screening_subset(batches, 256, whole_batches=False)  # every 4th sequence
    assert [(i, tuple(x.shape), x[0, 0, 0].item()) for i, x in rows] == [(i, (1, 64, 8), float(i)) for i in range(4)]
    assert [i for i, _ in screening_subset(batches, 512, whole_batches=True)] == [0, 2]
    assert screening_subset(batches, 1000, whole_batches=True) is None


def first_layer_and_inputs(model, seed: int):
    """Layer 0 of `model`, its inputs for 16 random sequences of 64 tokens (4 micro-batches) and its state."""
    ids = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(seed))
    inputs = capture_layer_inputs(model, QWEN2, [lambda c=c: model(input_ids=c) for c in ids.split(4)], "cpu")
    layer = model.model.layers[0]
    return layer, inputs, {k: v.clone() for k, v in layer.state_dict().items()}


def test_screened_scale_search_keeps_the_full_search_choices_with_fewer_block_runs(tiny_qwen2):
    """Screening on a quarter of the sequences, then 3 finalists on all: the same ratios as scoring every grid
    point on every token, the same losses for them, and the MLP run 20 + 1 times on the screen plus 3 times on
    the full set instead of 20 times on the full set (its reference outputs there come from the layer's own
    float forward)."""
    layer, inputs, original = first_layer_and_inputs(tiny_qwen2, seed=11)
    mlp_rows: list[int] = []
    handle = layer.mlp.register_forward_hook(lambda m, a, o: mlp_rows.append(a[0].shape[0]))
    try:
        runs = {}
        for screen in (None, 256):
            mlp_rows.clear()
            result, _ = quantize_layer(layer, inputs, QWEN2, QuantSettings(method="awq", scale_screen_tokens=screen), index=0)
            layer.load_state_dict(original)
            runs[screen] = (result.report, list(mlp_rows))
    finally:
        handle.remove()
    full, screened = runs[None][0], runs[256][0]
    assert screened.ratios == full.ratios
    assert screened.scale_losses == pytest.approx(full.scale_losses, rel=1e-6)
    # the layer's float and quantized forwards (4 micro-batches each) frame the search's runs
    assert runs[None][1] == [4] * 4 + [4] * 4 * 20 + [4] * 4
    assert runs[256][1] == [4] * 4 + [1] * 4 * 21 + [4] * 4 * 3 + [4] * 4


def test_gram_or_token_runs_for_a_single_linear_by_flops():
    settings = QuantSettings(method="awq")
    assert not gram_scoring_is_cheaper(128 * 512, (3584, 18944), settings)  # MiniCPM-V 2.6's down_proj
    assert gram_scoring_is_cheaper(8 * 512, (576, 1536), settings)  # SmolLM2-135M's, 8 blocks
    assert gram_scoring_is_cheaper(128 * 512, (3584, 3584), settings)  # an o_proj fed by v_proj


def test_single_linear_scored_by_token_runs_matches_its_gram_matrix(tiny_qwen2, monkeypatch):
    """down_proj's scale search re-run over the tokens (as at real shapes, where it costs fewer FLOPs) chooses
    as the Gram-matrix route does, with the same losses up to float rounding."""
    from quantkit.awq import engine

    layer, inputs, original = first_layer_and_inputs(tiny_qwen2, seed=5)
    down_rows: list[int] = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda m, a, o: down_rows.append(a[0].shape[0]))
    try:
        gram_route, _ = quantize_layer(layer, inputs, QWEN2, QuantSettings(method="awq", scale_screen_tokens=None), index=0)
        layer.load_state_dict(original)
        gram_runs = len(down_rows)
        monkeypatch.setattr(engine, "gram_scoring_is_cheaper", lambda *args: False)
        token_route, _ = quantize_layer(layer, inputs, QWEN2, QuantSettings(method="awq", scale_screen_tokens=None), index=0)
        layer.load_state_dict(original)
    finally:
        handle.remove()
    assert token_route.report.ratios == gram_route.report.ratios
    assert token_route.report.scale_losses == pytest.approx(gram_route.report.scale_losses, rel=1e-4)
    assert len(down_rows) - gram_runs == gram_runs + 4 * 20  # + one run per grid point over the 4 micro-batches
