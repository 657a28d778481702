"""MiniCPM-V 2.6: SigLIP `vpm` + perceiver `resampler` + a Qwen2-7B `llm`. Only the LLM's decoder layers are
quantized; the vision side stays 16-bit (and must be listed in modules_to_not_convert for vLLM).

quantkit builds the module tree (`modeling`) and the input side (`processing`) itself from the checkpoint's
JSON files: the snapshot's own Python files were written for transformers 4.40 and no longer import on
today's stack, and quantizing should not need to run a checkpoint's code at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.archs.qwen2 import DECODER_LINEARS, DECODER_SCALING_GROUPS, NO_CLIP
from quantkit.archs.spec import ArchSpec


def _build(config: dict[str, Any]) -> Any:
    from quantkit.archs.minicpmv26.modeling import MiniCPMV26

    return MiniCPMV26(config)


def _processor(folder: Path) -> Any:
    from quantkit.archs.minicpmv26.processing import MiniCPMV26Processor

    return MiniCPMV26Processor.from_folder(folder)


def _tokenizer(folder: Path) -> Any:
    from quantkit.archs.minicpmv26.processing import load_tokenizer

    return load_tokenizer(folder)


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
    build_model=_build,
    load_processor=_processor,
    load_tokenizer=_tokenizer,
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
