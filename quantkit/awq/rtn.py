"""Round-to-nearest (RTN) quantization of a float checkpoint's decoder layers: the int4 baseline AWQ must beat,
and a release that needs no calibration (tests, tools that compare against RTN)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantkit.archs import ArchSpec
from quantkit.awq.quant import pack_gemm, quantize
from quantkit.awq.settings import QuantSettings
from quantkit.errors import InputError
from quantkit.io.shards import ShardReader, num_layers, weight_map


def rtn_layer_tensors(source_dir: str | Path, spec: ArchSpec,
                      settings: QuantSettings | None = None) -> dict[str, torch.Tensor]:
    """Every decoder layer of `source_dir` quantized by min-max RTN, in `write_release`'s `layer_tensors` form.

    Read one tensor at a time from the shards: each quantized linear becomes AutoAWQ GEMM qweight/qzeros/scales
    (+ its bias), every other tensor of the layer (norms) is kept as is. Returns int4-sized data only (plus the
    small 16-bit tensors), about a quarter of the layers' 16-bit size.
    """
    settings = settings or QuantSettings()
    source = Path(source_dir)
    config = json.loads((source / "config.json").read_text())
    mapping = weight_map(source)
    linears = {f"{linear}.weight" for linear in spec.linears}
    out: dict[str, torch.Tensor] = {}
    with ShardReader(source, mapping) as reader:
        for index in range(num_layers(config, spec.num_layers_key, spec.text_config_key)):
            prefix = f"{spec.layer_prefix(index)}."
            names = [name for name in mapping if name.startswith(prefix)]
            if not names:
                raise InputError(f"{source}: config.json promises layer {index} but no tensor starts with {prefix}")
            for name in names:
                relative = name[len(prefix):]
                if relative not in linears:
                    out[name] = reader.get(name)
                    continue
                weight = reader.get(name).float()
                try:
                    packed = pack_gemm(quantize(weight, settings.bits, settings.group_size))
                except ValueError as err:
                    raise InputError(f"{name} {list(weight.shape)} cannot be quantized: {err}") from err
                for suffix, tensor in packed.items():
                    out[f"{name.removesuffix('.weight')}.{suffix}"] = tensor
    return out
