"""The Qwen2.5-VL stand-in under the name tests and scripts use; its home is `quantkit.standin_qwen2_5_vl`
(`quantkit.standin` builds it too, so it is not test-only code)."""

from quantkit.standin_qwen2_5_vl import REAL, TINY, Qwen25VLSize, build_standin, real_config, weight_specs

__all__ = ["REAL", "TINY", "Qwen25VLSize", "build_standin", "real_config", "weight_specs"]
