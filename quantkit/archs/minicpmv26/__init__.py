"""MiniCPM-V 2.6: SigLIP `vpm` + perceiver `resampler` + a Qwen2-7B `llm`. Only the LLM's decoder layers are
quantized; the vision side stays 16-bit (and must be listed in modules_to_not_convert for vLLM).

quantkit builds the module tree (`modeling`) and the input side (`processing`) itself from the checkpoint's
JSON files: the snapshot's own Python files were written for transformers 4.40 and no longer import on
today's stack, and quantizing should not need to run a checkpoint's code at all.
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


def _build(config: dict[str, Any]) -> Any:
    from quantkit.archs.minicpmv26.modeling import MiniCPMV26

    return MiniCPMV26(config)


def _processor(folder: Path) -> Any:
    from quantkit.archs.minicpmv26.processing import MiniCPMV26Processor

    return MiniCPMV26Processor.from_folder(folder)


def _tokenizer(folder: Path) -> Any:
    from quantkit.archs.minicpmv26.processing import load_tokenizer

    return load_tokenizer(folder)


IMAGE_PLACEHOLDER = "(<image>./</image>)"
"""What a user turn contains for each image; the processor expands it into the image's token markup."""


def _siglip_params(config: dict[str, Any]) -> int:
    """The SigLIP tower's parameters from `vision_config` (attention 4 h^2 + MLP 2 h i per layer)."""
    vision = config.get("vision_config") or {}
    hidden, intermediate = int(vision.get("hidden_size", 0)), int(vision.get("intermediate_size", 0))
    return int(vision.get("num_hidden_layers", 0)) * (4 * hidden**2 + 2 * hidden * intermediate)


VLLM_USAGE = """```python
from PIL import Image
from vllm import LLM, SamplingParams

llm = LLM(model="{repo}", trust_remote_code=True, max_model_len=4096)
image = Image.open("example.jpg").convert("RGB")
messages = [{"role": "user", "content": "(<image>./</image>)\\nWhat is in the image?"}]
prompt = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
outputs = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}},
                       SamplingParams(max_tokens=128, temperature=0))
```

or `vllm serve {repo} --trust-remote-code`."""
"""The card's vLLM usage: one image, its placeholder in the user turn; `{repo}` is the published repo id."""

MINICPMV26 = ArchSpec(
    name="minicpmv26",
    model_types=("minicpmv",),
    config_requires=(("version", "2.6"),),
    decoder_layers="llm.model.layers",
    language_model="llm",
    output_head="llm.lm_head",
    rotary_embedding="llm.model.rotary_emb",
    linears=DECODER_LINEARS,
    scaling_groups=DECODER_SCALING_GROUPS,
    no_clip=NO_CLIP,
    keep_16bit=("vpm", "resampler", "llm.model.embed_tokens", "llm.lm_head", "llm.model.norm"),
    modules_to_not_convert=("vpm", "resampler"),
    linear_shapes=decoder_linear_shapes,
    biased_linears=qwen2_biases,
    vision_params=_siglip_params,
    chat=ChatFormat(stop_tokens=CHATML.stop_tokens, image_placeholder=IMAGE_PLACEHOLDER),
    prompt_kinds=PROMPT_KINDS,
    card=CardText(
        display_name="MiniCPM-V 2.6",
        pipeline_tag="image-text-to-text",
        kept_16bit="The vision tower and resampler stay 16-bit; the LLM's decoder linears are 4-bit.",
        kept_16bit_parts="embeddings, lm_head, vision tower, resampler, norms",
        vllm_usage=VLLM_USAGE,
    ),
    auto_class="AutoModel",
    build_model=_build,
    load_processor=_processor,
    load_tokenizer=_tokenizer,
    remote_code=True,
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
