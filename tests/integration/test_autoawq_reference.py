"""The native engine checked against upstream AutoAWQ 0.2.9 (run by quantkit's adapter from the same arch spec).

Both backends get the same calibration token blocks and settings, on the MiniCPM-V stand-in's LLM and on a
small plain Qwen2; per decoder layer their choices must agree, or the native choice must be as good by a loss
both candidates are measured with. Both run in float32 on the CPU here (AutoAWQ's final quantization step casts
each linear to fp16, as it does on a GPU). Native runs with `inputs_from_quantized=False`, AutoAWQ's
propagation of 16-bit outputs, for the per-layer comparison.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("awq", reason="AutoAWQ 0.2.9 is not installed: pip install 'quantkit[autoawq]'")

from quantkit.api import quantize, verify_static
from quantkit.archs import MINICPMV26, QWEN2, ArchSpec
from quantkit.awq.autoawq_backend import (
    capture_for_autoawq,
    import_autoawq,
    model_definition,
    quantize_with_autoawq,
)
from quantkit.awq.engine import (
    LayerResult,
    _apply_scales,
    _group_applies,
    capture_layer_inputs,
    quantize_layers,
)
from quantkit.awq.quant import dequantize_gemm, fake_quantize, unpack_gemm
from quantkit.awq.search import candidate_scales, channel_mean_abs, strided_tokens, weight_channel_mean
from quantkit.awq.settings import QuantSettings
from quantkit.calib import CalibSample, build_calibration_set, load_calibration, pydoc_topics
from quantkit.io.model_loading import load_model
from quantkit.quantize import calibration_forwards

N_BLOCKS, SEQ_LEN = 4, 64
# AutoAWQ feeds 16-bit inputs and scores clips on 512 strided tokens (here: all 256 calibration tokens either way)
SETTINGS = QuantSettings(method="awq", inputs_from_quantized=False, clip_tokens=512)
# Where the two searches pick differently, the native pick's loss may exceed AutoAWQ's pick's by at most this.
LOSS_SLACK = 1.01
# Integer weights of linears whose choices agree: AutoAWQ rounds w / s in fp16 (its `_apply_quant` casts to
# half), native in float32, so a few q land on the other side of a .5 boundary: at most one step, rarely.
MAX_Q_MISMATCH = 0.03
# The final output error on held-out text may exceed AutoAWQ's by this factor. Native scores clip candidates
# with the fp16-rounded quantization scales the checkpoint stores, AutoAWQ with unrounded ones, so 6-14 % of
# the (row, group) clip steps differ where the scale ratios agree. Measured here: native 0.2 % (stand-in) and
# 5.6 % (Qwen2) below AutoAWQ; at 8 or 16 calibration blocks -9.0 % to +1.6 %. Scoring with unrounded scales
# instead (tried) made every choice agree but native 2.3 % and 7.9 % worse than AutoAWQ here: this bound fails
# that (docs/algorithm.md).
OUTPUT_SLACK = 1.02
HELD_OUT_BLOCKS = 16


def _logits(model: nn.Module, spec: ArchSpec, ids: torch.Tensor) -> torch.Tensor:
    lm = model.get_submodule(spec.language_model) if spec.language_model else model
    with torch.no_grad():
        return lm(input_ids=ids, use_cache=False).logits.float()


def _rel_mse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).pow(2).sum() / ref.pow(2).sum()).item()


def _with_layers(model: nn.Module, spec: ArchSpec, results: list[LayerResult]) -> nn.Module:
    """A copy of `model` computing with each result's dequantized int4 weights (and its scaled norms)."""
    quantized = copy.deepcopy(model)
    layers = quantized.get_submodule(spec.decoder_layers)
    for result in results:
        layer = layers[result.report.index]
        params = dict(layer.named_parameters())
        for name in spec.linears:
            lin = layer.get_submodule(name)
            packed = [result.tensors[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales")]
            lin.weight.data = dequantize_gemm(*packed).to(lin.weight.dtype)
        for name, tensor in result.tensors.items():
            if name in params:
                params[name].data = tensor.to(params[name].dtype)
    return quantized


@dataclass
class Comparison:
    spec: ArchSpec
    model: nn.Module
    layer_inputs: list[tuple[list[torch.Tensor], list[dict]]]
    native: list[LayerResult]
    autoawq: list[LayerResult]
    native_default: list[LayerResult]
    """Native with its default propagation of the quantized layers' outputs, for the output error only."""
    held_out: torch.Tensor


def _compare(folder: Path) -> Comparison:
    """Quantize the model in `folder` with both backends on the same token blocks (float32, CPU)."""
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    spec = MINICPMV26 if config["model_type"] == "minicpmv" else QWEN2
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    calib = load_calibration("builtin:pydoc", tokenizer, n_samples=N_BLOCKS, seq_len=SEQ_LEN)
    held_out = build_calibration_set([CalibSample(text) for text in pydoc_topics("eval")], tokenizer,
                                     HELD_OUT_BLOCKS, SEQ_LEN).blocks
    model = load_model(folder, spec, torch.float32)
    cpu = torch.device("cpu")
    # Each backend works on its own copy: on the CPU both leave the layers they process scaled in place.
    pristine, reference, default = (copy.deepcopy(model) for _ in range(3))

    inputs = capture_layer_inputs(model, spec, calibration_forwards(model, spec, folder, calib, SETTINGS, cpu,
                                                                    torch.float32), cpu)
    layer_inputs = [(inputs.hidden, inputs.kwargs)]
    native = quantize_layers(model, spec, SETTINGS, inputs, cpu,
                             on_layer_done=lambda r, h: layer_inputs.append((h, inputs.kwargs)))

    default_inputs = capture_layer_inputs(
        default, spec, calibration_forwards(default, spec, folder, calib, SETTINGS, cpu, torch.float32), cpu)
    native_default = quantize_layers(default, spec, QuantSettings(method="awq"), default_inputs, cpu)

    if spec.language_model:  # MiniCPM-V: AutoAWQ cannot capture through MiniCPMV.forward(data=...)
        forwards = calibration_forwards(reference, spec, folder, calib, SETTINGS, cpu, torch.float32)
        capture = capture_for_autoawq(reference, spec, forwards, SEQ_LEN, cpu)
        autoawq = quantize_with_autoawq(reference, spec, SETTINGS, capture=capture)
    else:
        autoawq = quantize_with_autoawq(reference, spec, SETTINGS, blocks=calib.blocks)
    return Comparison(spec, pristine, layer_inputs[:-1], native, autoawq, native_default, held_out)


def _features(layer: nn.Module, name: str, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The inputs of `layer.name` over the calibration micro-batches, from the 16-bit layer."""
    seen: list[torch.Tensor] = []
    handle = layer.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            for h, kw in zip(hidden, kwargs):
                layer(h, **kw)
    finally:
        handle.remove()
    return seen


def _block_loss(layer: nn.Module, group, ratio: float, x: list[torch.Tensor], kwargs: list[dict]) -> float:
    """AutoAWQ's scale-search loss for one candidate ratio, in float64: mean squared change of the inspected
    block's output when the group's linears compute with Q(W s) / s."""
    block = copy.deepcopy(layer.get_submodule(group.inspect or group.linears[0]))
    root = group.inspect + "." if group.inspect else None
    linears = [block.get_submodule(n[len(root):]) if root else block for n in group.linears]
    s = candidate_scales(channel_mean_abs(x), weight_channel_mean([lin.weight for lin in linears], 128), ratio,
                         SETTINGS.duo_scaling)

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            outs = [block(xi, **(kw if group.inspect_takes_layer_kwargs else {})) for xi, kw in zip(x, kwargs)]
        return [(o[0] if isinstance(o, tuple) else o).double() for o in outs]

    reference = run()
    for lin in linears:
        lin.weight.data = fake_quantize(lin.weight * s, 4, 128) / s
    quantized = run()
    err = sum((q - r).pow(2).sum() for q, r in zip(quantized, reference))
    return (err / sum(r.numel() for r in reference)).item()


def _scaled(layer: nn.Module, spec: ArchSpec, scales: dict[str, torch.Tensor]) -> nn.Module:
    scaled = copy.deepcopy(layer)
    for group in spec.scaling_groups:
        if group.prev in scales:
            _apply_scales(scaled, group, scales[group.prev])
    return scaled


def _clip_loss(weight: torch.Tensor, tokens: torch.Tensor, shrink_steps: torch.Tensor) -> float:
    """Sum over (row, group) of the mean squared partial-output error of clipping at max|w| (1 - k / 20)."""
    out_features = weight.shape[0]
    w = weight.double().reshape(out_features, -1, 128)
    bound = (w.abs().amax(dim=-1) * (1 - shrink_steps.double() / 20)).unsqueeze(-1)
    q = fake_quantize(torch.maximum(torch.minimum(w, bound), -bound).reshape(weight.shape), 4, 128).double()
    x = tokens.double().reshape(tokens.shape[0], -1, 128)
    partial = torch.einsum("ngk,ogk->nog", x, (q - weight.double()).reshape(out_features, -1, 128))
    return partial.pow(2).mean(dim=0).sum().item()


def _shrink_steps(weight: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    org = weight.float().abs().reshape(weight.shape[0], -1, 128).amax(dim=-1)
    return torch.round((1 - clip.float() / org) * 20).clamp(0, 9)


def _check_layers(cmp: Comparison) -> list[str]:
    """Per layer: ratios, clips, integer weights. Returns one summary line per layer (printed with -s)."""
    spec, lines = cmp.spec, []
    layers = cmp.model.get_submodule(spec.decoder_layers)
    for (hidden, kwargs), native, ref in zip(cmp.layer_inputs, cmp.native, cmp.autoawq, strict=True):
        layer = layers[native.report.index]
        groups = [g for g in spec.scaling_groups if _group_applies(layer, g)]
        assert set(native.report.ratios) == set(ref.report.ratios) == {g.prev for g in groups}
        agreed = {}
        for group in groups:
            ours, theirs = native.report.ratios[group.prev], ref.report.ratios[group.prev]
            agreed[group.prev] = ours == theirs
            if ours != theirs:
                x = _features(layer, group.linears[0], hidden, kwargs)
                loss_ours, loss_theirs = (_block_loss(layer, group, r, x, kwargs) for r in (ours, theirs))
                lines.append(f"  {group.prev}: native {ours:.2f} loss {loss_ours:.4e}, autoawq {theirs:.2f} "
                             f"loss {loss_theirs:.4e} ({loss_ours / loss_theirs - 1:+.2%})")
                assert loss_ours <= loss_theirs * LOSS_SLACK, lines[-1]

        ours_scaled, theirs_scaled = _scaled(layer, spec, native.scales), _scaled(layer, spec, ref.scales)
        clip_agree, q_mismatch = [], []
        for name in spec.linears:
            if name in spec.no_clip:
                assert name not in native.clips and name not in ref.clips
            else:
                steps_ours = _shrink_steps(ours_scaled.get_submodule(name).weight, native.clips[name])
                steps_theirs = _shrink_steps(theirs_scaled.get_submodule(name).weight, ref.clips[name])
                clip_agree.append((steps_ours == steps_theirs).float().mean().item())
                # both choices of shrink steps, measured on the native layer's scaled weights and inputs
                tokens = strided_tokens(_features(ours_scaled, name, hidden, kwargs), SETTINGS.clip_tokens)
                weight = ours_scaled.get_submodule(name).weight
                loss_ours, loss_theirs = (_clip_loss(weight, tokens, s) for s in (steps_ours, steps_theirs))
                assert loss_ours <= loss_theirs * LOSS_SLACK, (name, loss_ours, loss_theirs)
            feeding = [g.prev for g in groups if g.prev == name or name in g.linears]
            same_choices = all(agreed[p] for p in feeding) and (name in spec.no_clip or clip_agree[-1] == 1.0)
            if same_choices:
                ours_q = unpack_gemm(*(native.tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")))
                theirs_q = unpack_gemm(*(ref.tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")))
                differs = (ours_q.q - ours_q.zeros.repeat_interleave(128, dim=1)) \
                    != (theirs_q.q - theirs_q.zeros.repeat_interleave(128, dim=1))
                q_mismatch.append(differs.float().mean().item())
                assert differs.float().mean() <= MAX_Q_MISMATCH, (name, differs.float().mean())
                assert torch.allclose(ours_q.scales.float(), theirs_q.scales.float(), rtol=2e-3, atol=1e-6), name
                deq_ours = dequantize_gemm(*(native.tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")))
                deq_theirs = dequantize_gemm(*(ref.tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")))
                step = ours_q.scales.float().repeat_interleave(128, dim=1)
                assert ((deq_ours - deq_theirs).abs() <= step * 1.01 + 1e-6).all(), name
        ratios = " ".join(f"{p}={native.report.ratios[p]:.2f}/{ref.report.ratios[p]:.2f}" for p in agreed)
        lines.append(f"layer {native.report.index}: ratios native/autoawq {ratios}; clip steps equal "
                     f"{min(clip_agree):.1%}-{max(clip_agree):.1%} of (row, group); integer weights differ in "
                     f"{max(q_mismatch, default=0):.2%} max ({len(q_mismatch)}/{len(spec.linears)} linears "
                     "with identical choices compared)")
    return lines


def _check_output_error(cmp: Comparison) -> str:
    reference = _logits(cmp.model, cmp.spec, cmp.held_out)
    ours = _rel_mse(_logits(_with_layers(cmp.model, cmp.spec, cmp.native), cmp.spec, cmp.held_out), reference)
    theirs = _rel_mse(_logits(_with_layers(cmp.model, cmp.spec, cmp.autoawq), cmp.spec, cmp.held_out), reference)
    default = _rel_mse(_logits(_with_layers(cmp.model, cmp.spec, cmp.native_default), cmp.spec, cmp.held_out),
                       reference)
    line = (f"held-out logits rel. MSE vs 16-bit: native {ours:.4e}, autoawq {theirs:.4e}; native with "
            f"quantized-input propagation (its default) {default:.4e}")
    assert ours <= theirs * OUTPUT_SLACK, line
    return line


def test_autoawq_transform_alone_keeps_the_model(qwen2_dir: Path):
    """AutoAWQ's scale + clip transform (export_compatible: no quantization) barely changes the model's outputs
    with quantkit's CPU fix; AutoAWQ's own quantizer on the CPU, scales alone, wrecks them (the aliasing bug)."""
    tokenizer_blocks = load_calibration("builtin:pydoc", _tokenizer(qwen2_dir), n_samples=N_BLOCKS + 2,
                                        seq_len=SEQ_LEN).blocks
    blocks, held_out = tokenizer_blocks[:N_BLOCKS], tokenizer_blocks[N_BLOCKS:]
    model = load_model(qwen2_dir, QWEN2, torch.float32)
    reference = _logits(model, QWEN2, held_out)

    fixed = copy.deepcopy(model)
    assert quantize_with_autoawq(fixed, QWEN2, SETTINGS, blocks=blocks, export_compatible=True) == []
    fixed_err = _rel_mse(_logits(fixed, QWEN2, held_out), reference)

    stock = copy.deepcopy(model)
    awq = import_autoawq()
    wrapper = model_definition(QWEN2)(stock, "qwen2", False, stock.config, awq.AwqConfig(), None)
    stock.config.use_cache = False
    wrapper.quantize(None, {"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"},
                     calib_data=blocks.tolist(), export_compatible=True, apply_clip=False,
                     max_calib_samples=N_BLOCKS, max_calib_seq_len=SEQ_LEN)
    stock_err = _rel_mse(_logits(stock, QWEN2, held_out), reference)
    print(f"\ntransform alone, held-out logits rel. MSE: fixed (scale + clip) {fixed_err:.3e}, "
          f"AutoAWQ stock (scales only) {stock_err:.3e}")
    assert fixed_err < 1e-2
    assert stock_err > 0.1 and stock_err > 10 * fixed_err


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


@pytest.mark.parametrize("model_kind", ["standin", "qwen2"])
def test_native_matches_autoawq_per_layer(model_kind: str, standin_dir: Path, qwen2_dir: Path):
    cmp = _compare(standin_dir if model_kind == "standin" else qwen2_dir)
    lines = _check_layers(cmp)
    print(f"\n{model_kind}:\n" + "\n".join(lines))
    print(_check_output_error(cmp))


def test_cli_autoawq_backend_release_passes_static_verify(standin_dir: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from quantkit.cli import app

    out = tmp_path / "release-autoawq"
    result = CliRunner().invoke(app, ["quantize", str(standin_dir), str(out), "--backend", "autoawq",
                                      "--n-samples", "2", "--seq-len", "128", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = verify_static(out, source=standin_dir)
    assert report.ok, [c.message for c in report.checks if not c.ok]
    manifest = json.loads((out / "quantkit-manifest.json").read_text())
    assert manifest["quantization"]["backend"] == "autoawq"
    assert [layer["index"] for layer in manifest["quantization"]["layers"]] == [0, 1]


def test_autoawq_backend_refuses_what_it_cannot_do(standin_dir: Path, tmp_path: Path):
    from quantkit.errors import InputError

    with pytest.raises(InputError, match="scale_grid"):
        quantize(standin_dir, tmp_path / "out", backend="autoawq", n_samples=2, seq_len=64, device="cpu",
                 settings=QuantSettings(method="awq", scale_grid=10))
    with pytest.raises(InputError, match="backend 'gptq'"):
        quantize(standin_dir, tmp_path / "out", backend="gptq", device="cpu")


def test_image_samples_reach_autoawq_through_the_vision_path(standin_dir: Path, tmp_path: Path):
    """Text blocks stay whole; an image sample's layer-0 activations (vision features in the <unk> slots) are
    cut into seq_len windows appended after them, with kwargs that broadcast over every window."""
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(image)
    tokenizer = _tokenizer(standin_dir)
    calib = build_calibration_set([CalibSample("Describe the picture.", (image,)),
                                   *(CalibSample(text) for text in pydoc_topics("calib")[:20])],
                                  tokenizer, n_samples=3, seq_len=SEQ_LEN)
    model = load_model(standin_dir, MINICPMV26, torch.float32)
    cpu = torch.device("cpu")
    forwards = calibration_forwards(model, MINICPMV26, standin_dir, calib, SETTINGS, cpu, torch.float32)
    capture = capture_for_autoawq(model, MINICPMV26, forwards, SEQ_LEN, cpu)
    assert capture.hidden.shape[1:] == (SEQ_LEN, model.config.hidden_size)
    assert capture.hidden.shape[0] >= 2 + 1  # two text blocks, at least one image window
    unk = model.llm.get_input_embeddings().weight[tokenizer.unk_token_id]
    image_windows = capture.hidden[2:].reshape(-1, capture.hidden.shape[-1])
    assert not ((image_windows - unk).abs().sum(dim=-1) < 1e-6).any(), "image slots hold <unk>, not vision"
    assert capture.kwargs["position_embeddings"][0].shape[:2] == (1, SEQ_LEN)
