"""Qwen2.5-VL (Qwen/Qwen2.5-VL-7B-Instruct): a window-attention ViT `visual` with a patch merger, and a Qwen2
decoder whose rotary positions are 3-D (M-RoPE: temporal, height, width sections of each head). Only the
decoder's linears are quantized; `visual` stays 16-bit and is listed in modules_to_not_convert for vLLM.

The model is transformers' own class (`Qwen2_5_VLForConditionalGeneration`, no remote code): in memory its
decoder is `model.language_model.layers`, while the Hub checkpoint stores `model.layers.*`, `visual.*` and
`lm_head.*` (transformers and vLLM both read that layout), so the spec names both. Calibration runs the whole
model: its forward computes the M-RoPE position ids from `input_ids` and `image_grid_thw` (text tokens get
three equal positions), and layer 0 receives the cos/sin tables made from them.

The Hub config.json is flat (the LLM's keys at the top level, beside `vision_config`), as in this checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.archs.qwen2 import (
    CHATML,
    DECODER_LINEARS,
    DECODER_SCALING_GROUPS,
    NO_CLIP,
    decoder_linear_shapes,
    qwen2_biases,
)
from quantkit.archs.spec import PROMPT_KINDS, ArchSpec, CardText, ChatFormat

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
"""What the chat template writes for one image; the processor repeats <|image_pad|> once per merged patch."""
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def _vit_params(config: dict[str, Any]) -> int:
    """The ViT's parameters from `vision_config`: per block qkv + proj (4 h^2) and a gated MLP (3 h i), the
    patch embedding (3 * temporal * patch^2 * h) and the merger (MLP over merge^2 * h to the LLM width)."""
    vision = config.get("vision_config") or {}
    hidden, intermediate = int(vision.get("hidden_size", 0)), int(vision.get("intermediate_size", 0))
    merged = hidden * int(vision.get("spatial_merge_size", 2)) ** 2
    patch = 3 * int(vision.get("temporal_patch_size", 2)) * int(vision.get("patch_size", 14)) ** 2 * hidden
    out = int(vision.get("out_hidden_size", config.get("hidden_size", 0)))
    return int(vision.get("depth", 0)) * (4 * hidden**2 + 3 * hidden * intermediate) + patch + merged * (merged + out)


class Qwen25VLProcessor:
    """(text, images) -> keyword arguments of one forward of the native model: the checkpoint's chat template
    with one image placeholder per image, each <|image_pad|> repeated once per merged patch as transformers'
    Qwen2_5_VLProcessor does, the image processor's pixel_values + image_grid_thw, and mm_token_type_ids (1 at
    image tokens): without it transformers 5's model cannot build the M-RoPE positions and silently falls back
    to text positions. Built from the tokenizer and the image processor alone: transformers' processor also
    loads the video processor, which needs torchvision, and calibration takes no video."""

    IMAGE_PAD = "<|image_pad|>"

    def __init__(self, tokenizer: Any, image_processor: Any) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_folder(cls, folder: Path) -> Qwen25VLProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False),
                   AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=False))

    def chat_prompt(self, text: str, n_images: int) -> str:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, text: str, images: list[Any]) -> dict[str, Any]:
        prompt = self.chat_prompt(text, len(images))
        kwargs: dict[str, Any] = {}
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            merge = int(self.image_processor.merge_size) ** 2
            pieces = prompt.split(self.IMAGE_PAD)
            if len(pieces) != len(images) + 1:
                raise ValueError(f"the chat template wrote {len(pieces) - 1} image placeholders for "
                                 f"{len(images)} images")
            counts = [int(grid.prod()) // merge for grid in pixels["image_grid_thw"]]
            prompt = pieces[0] + "".join(self.IMAGE_PAD * n + piece for n, piece in zip(counts, pieces[1:]))
            kwargs = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
        encoded = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        ids = encoded["input_ids"]
        image_token = self.tokenizer.convert_tokens_to_ids(self.IMAGE_PAD)
        return {"input_ids": ids, "attention_mask": encoded["attention_mask"],
                "mm_token_type_ids": (ids == image_token).int(), **kwargs, "use_cache": False}


def _processor(folder: Path) -> Any:
    return Qwen25VLProcessor.from_folder(folder)


VLLM_USAGE = """```python
from PIL import Image
from vllm import LLM, SamplingParams

llm = LLM(model="{repo}", max_model_len=8192, limit_mm_per_prompt={{"image": 2, "video": 1}})
image = Image.open("example.jpg").convert("RGB")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
outputs = llm.generate({{"prompt": prompt, "multi_modal_data": {{"image": image}}}},
                       SamplingParams(max_tokens=128, temperature=0))
```

or `vllm serve {repo}`."""
"""The card's vLLM usage (no remote code: vLLM and transformers have the architecture built in)."""

QWEN2_5_VL = ArchSpec(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    decoder_layers="model.language_model.layers",
    checkpoint_layers="model.layers",
    checkpoint_renames=(("model.layers.", "model.language_model.layers."),
                        ("model.embed_tokens.", "model.language_model.embed_tokens."),
                        ("model.norm.", "model.language_model.norm."), ("visual.", "model.visual.")),
    language_model="",
    output_head="lm_head",
    rotary_embedding="model.language_model.rotary_emb",
    linears=DECODER_LINEARS,
    scaling_groups=DECODER_SCALING_GROUPS,
    no_clip=NO_CLIP,
    keep_16bit=("visual", "model.embed_tokens", "lm_head", "model.norm"),
    modules_to_not_convert=("visual",),
    linear_shapes=decoder_linear_shapes,
    biased_linears=qwen2_biases,
    vision_params=_vit_params,
    chat=ChatFormat(stop_tokens=CHATML.stop_tokens, image_placeholder=IMAGE_PLACEHOLDER,
                    video_placeholder=VIDEO_PLACEHOLDER),
    prompt_kinds=PROMPT_KINDS,
    card=CardText(
        display_name="Qwen2.5-VL",
        pipeline_tag="image-text-to-text",
        kept_16bit="The vision transformer (`visual`, with its patch merger) stays 16-bit; the LLM's decoder "
                   "linears are 4-bit.",
        kept_16bit_parts="embeddings, lm_head, vision transformer, norms",
        vllm_usage=VLLM_USAGE,
    ),
    auto_class="AutoModelForImageTextToText",
    load_processor=_processor,
    autoawq_unsupported=(
        "AutoAWQ runs every calibration window with one set of layer kwargs (the rotary tables of a text "
        "block), but Qwen2.5-VL's M-RoPE gives image tokens positions from each image's grid, so image samples "
        "would be calibrated at the wrong positions"),
)

# The LLM of Qwen/Qwen2.5-VL-7B-Instruct: for real-shape stand-ins and benchmarks.
LLM_SHAPES = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
}
