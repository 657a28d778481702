"""MiniCPM-V 2.6 model of the stand-in (remote code): the transformers `AutoModel` face of quantkit's own
module tree (quantkit.archs.minicpmv26.modeling), so `AutoModel.from_pretrained(..., trust_remote_code=True)`
works on the stand-in as on the real checkpoint. quantkit itself never imports this file."""

from __future__ import annotations

from typing import ClassVar

from transformers import PreTrainedModel

from quantkit.archs.minicpmv26.modeling import MiniCPMV26

from .configuration_minicpm import MiniCPMVConfig


class MiniCPMV(PreTrainedModel):
    config_class = MiniCPMVConfig
    _no_split_modules: ClassVar[list[str]] = ["Qwen2DecoderLayer", "VisionLayer"]
    _supports_sdpa = True

    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__(config)
        tree = MiniCPMV26(config.to_dict())
        for name, child in tree.named_children():
            self.add_module(name, child)
        self.vision_batch_size = tree.vision_batch_size
        self.post_init()

    vision_embeddings = MiniCPMV26.vision_embeddings
    embed = MiniCPMV26.embed
    forward = MiniCPMV26.forward

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.llm.lm_head
