"""MiniCPM-V 2.6 configuration (quantkit's own stand-in code, same interface as openbmb/MiniCPM-V-2_6).

The LLM keys sit at the top level (a Qwen2 config, as vLLM's MiniCPMV expects); the SigLIP tower's keys sit
under `vision_config`, the slicing keys under `slice_config`.
"""

from __future__ import annotations

from transformers import Qwen2Config
from transformers.models.siglip.configuration_siglip import SiglipVisionConfig


class MiniCPMVSliceConfig:
    """How images are cut into slices; kept as a plain object so it serialises back to the same dict."""

    def __init__(self, patch_size: int = 14, max_slice_nums: int = 9, scale_resolution: int = 448,
                 model_type: str = "minicpmv", **kwargs) -> None:
        self.patch_size = patch_size
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.model_type = model_type
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class MiniCPMVConfig(Qwen2Config):
    model_type = "minicpmv"

    def __init__(
        self,
        use_cache: bool = True,
        query_num: int = 64,
        image_size: int = 448,
        drop_vision_last_layer: bool = False,
        batch_vision_input: bool = True,
        slice_config: dict | None = None,
        vision_config: dict | SiglipVisionConfig | None = None,
        use_image_id: bool = True,
        vision_batch_size: int = 16,
        **kwargs,
    ) -> None:
        self.use_cache = use_cache
        self.query_num = query_num
        self.image_size = image_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        self.use_image_id = use_image_id
        self.vision_batch_size = vision_batch_size
        if isinstance(slice_config, MiniCPMVSliceConfig):
            slice_config = slice_config.to_dict()
        self.slice_config = MiniCPMVSliceConfig(**(slice_config or {"max_slice_nums": 1}))
        if vision_config is None:
            vision_config = {}
        if isinstance(vision_config, dict):
            vision_config = {k: v for k, v in vision_config.items() if k != "model_type"}
            vision_config = SiglipVisionConfig(**vision_config)
        self.vision_config = vision_config
        kwargs["use_cache"] = use_cache
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        if isinstance(output.get("slice_config"), MiniCPMVSliceConfig):
            output["slice_config"] = output["slice_config"].to_dict()
        if isinstance(output.get("vision_config"), SiglipVisionConfig):
            output["vision_config"] = output["vision_config"].to_dict()
        return output
