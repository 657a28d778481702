"""MiniCPM-V 2.6: SigLIP `vpm` + perceiver `resampler` + a Qwen2-7B `llm`. Only the LLM's decoder layers are
quantized; the vision side stays 16-bit (and must be listed in modules_to_not_convert for vLLM)."""

from __future__ import annotations

from typing import Any

from quantkit.archs.qwen2 import DECODER_LINEARS, DECODER_SCALING_GROUPS, NO_CLIP
from quantkit.archs.spec import ArchSpec

IMAGE_PLACEHOLDER = "(<image>./</image>)"


def prepare_multimodal(model: Any, processor: Any, text: str, images: list) -> dict[str, Any]:
    """Kwargs for `model(**kwargs)` that run one chat turn with images through the real vision path.

    MiniCPMV.forward takes a single `data` dict (input_ids, pixel_values, tgt_sizes, image_bound,
    position_ids), not the processor's output as keyword arguments: the AutoAWQ fork got this wrong.
    """
    placeholders = "\n".join(IMAGE_PLACEHOLDER for _ in images)
    content = f"{placeholders}\n{text}" if images else text
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=[prompt], images=[images] if images else None, return_tensors="pt")
    import torch

    input_ids = inputs["input_ids"]
    data = {
        "input_ids": input_ids,
        "pixel_values": inputs.get("pixel_values", [[]]),
        "tgt_sizes": inputs.get("tgt_sizes", [[]]),
        "image_bound": inputs.get("image_bound", [[]]),
        "position_ids": torch.arange(input_ids.shape[1], dtype=torch.long).unsqueeze(0),
    }
    return {"data": data}


MINICPMV26 = ArchSpec(
    name="minicpmv26",
    model_types=("minicpmv",),
    decoder_layers="llm.model.layers",
    language_model="llm",
    linears=DECODER_LINEARS,
    scaling_groups=DECODER_SCALING_GROUPS,
    no_clip=NO_CLIP,
    keep_16bit=("vpm", "resampler", "llm.model.embed_tokens", "llm.lm_head", "llm.model.norm"),
    modules_to_not_convert=("vpm", "resampler"),
    multimodal=True,
    extra={"version": "2.6"},
    prepare_multimodal=prepare_multimodal,
)

# The LLM of openbmb/MiniCPM-V-2_6 (Qwen2-7B): for real-shape benchmarks and stand-ins.
LLM_SHAPES = {
    "vocab_size": 151666,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
