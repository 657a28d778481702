"""The Qwen2.5-VL spec is chosen for its checkpoint's config.json and agrees with transformers' own class on
the real shapes (built on the meta device: no memory, no weights)."""

from __future__ import annotations

import math

from quantkit.archs import MINICPMV26, QWEN2_5_VL, spec_for_config
from quantkit.standin import TINY as MINICPMV26_TINY
from quantkit.standin import real_config as minicpmv_config
from quantkit.testing.qwen2_5_vl import REAL, TINY, real_config, weight_specs


def test_spec_for_config_picks_qwen2_5_vl_for_the_real_key_set():
    for size in (TINY, REAL):
        assert spec_for_config(real_config(size)) is QWEN2_5_VL
    assert spec_for_config(minicpmv_config(MINICPMV26_TINY)) is MINICPMV26
    config = real_config(REAL)
    assert QWEN2_5_VL.text_config(config)["hidden_size"] == 3584  # the Hub config.json is flat
    assert config["image_token_id"] == 151655 and config["video_token_id"] == 151656
    assert config["vision_start_token_id"] == 151652 and config["rope_scaling"]["mrope_section"] == [16, 24, 24]


def test_real_shapes_agree_with_transformers_class():
    config = real_config(REAL)
    specs = {s.name: s for s in weight_specs(REAL)}
    prefix = QWEN2_5_VL.layer_prefix(27)
    assert prefix == "model.layers.27"
    for linear, (fan_in, fan_out) in QWEN2_5_VL.linear_shapes(QWEN2_5_VL.text_config(config)).items():
        assert specs[f"{prefix}.{linear}.weight"].shape == (fan_out, fan_in)
    biased = {name.removeprefix(prefix + ".").removesuffix(".bias") for name in specs
              if name.startswith(prefix + ".") and name.endswith("proj.bias")}
    assert biased == QWEN2_5_VL.biased_linears(config)
    visual = sum(s.numel for name, s in specs.items() if name.startswith("visual.") and not name.endswith("bias")
                 and "norm" not in name and "ln_q" not in name)
    assert abs(QWEN2_5_VL.vision_params(config) - visual) / visual < 0.01
    assert sum(s.numel for s in specs.values()) == 8_292_166_656
    assert not any(math.prod(s.shape) == 0 for s in specs.values())
