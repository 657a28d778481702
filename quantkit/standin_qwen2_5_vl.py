"""The faithful Qwen2.5-VL stand-in: a random-weight Qwen/Qwen2.5-VL-7B-Instruct folder with the real file set.

config.json has the real checkpoint's key set (flat: the LLM keys at the top level, plus `vision_config` and
`rope_scaling` with M-RoPE's `mrope_section`), the real special-token ids, the Hub weight names (`model.layers.*`,
`visual.*`, `lm_head.weight`) in shards with an index, the real tokenizer side files, chat template, generation
and preprocessor configs. The tensor names and shapes are those of transformers' own
`Qwen2_5_VLForConditionalGeneration` built from this config on the meta device, renamed to the Hub layout, so
the folder loads in transformers and vLLM natively (no remote code). `TINY` builds in seconds; `REAL` has the
real shapes (~16.6 GB bf16) and is written one shard at a time.

    python -m quantkit.standin OUT_DIR --arch qwen2_5_vl [--size real] [--seed 0]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import InputError
from quantkit.standin import (
    UNK_TOKEN,
    WeightSpec,
    bpe_vocab_and_merges,
    qwen2_bpe_tokenizer,
    write_sharded,
)

REAL_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
SHARDS = 5
"""The real checkpoint's model-0000i-of-00005.safetensors."""

# The key set of Qwen/Qwen2.5-VL-7B-Instruct's config.json (flat, as published; written from the published file
# as remembered, not from a copy read here: no Hub access). transformers 5 reads it into text_config on load.
REAL_CONFIG_KEYS: tuple[str, ...] = (
    "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "vision_start_token_id",
    "vision_end_token_id", "vision_token_id", "image_token_id", "video_token_id", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "max_position_embeddings", "max_window_layers", "model_type",
    "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "rope_theta",
    "sliding_window", "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache",
    "use_sliding_window", "vision_config", "rope_scaling", "vocab_size",
)
REAL_VISION_KEYS: tuple[str, ...] = (
    "depth", "hidden_act", "hidden_size", "intermediate_size", "num_heads", "in_chans", "out_hidden_size",
    "patch_size", "spatial_merge_size", "spatial_patch_size", "window_size", "fullatt_block_indexes",
    "tokens_per_second", "temporal_patch_size",
)

# Added tokens at the real ids 151643..151664 (Qwen2.5's tokenizer); <tool_call> and </tool_call> are not special.
ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
NOT_SPECIAL = ("<tool_call>", "</tool_call>")
FIRST_ADDED_ID = 151643
ENDOFTEXT_ID, IM_END_ID = 151643, 151645
VISION_START_ID, VISION_END_ID, VISION_PAD_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = 151652, 151653, 151654, 151655, 151656

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
"""The checkpoint's chat template (tokenizer_config.json and chat_template.json)."""


@dataclass(frozen=True)
class Qwen25VLSize:
    """Shapes of a stand-in. head_dim / 2 is split by `mrope_section` into temporal, height and width parts."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    fullatt_block_indexes: tuple[int, ...]
    vocab_size: int = 152064

    def __post_init__(self) -> None:
        if sum(self.mrope_section) * 2 != self.hidden // self.heads:
            raise ValueError(f"mrope_section {self.mrope_section} must cover head_dim / 2")


# Decoder linears' in_features are multiples of 128 (AWQ group 128); GQA 4/2 makes v_proj and o_proj differ in
# shape, so the v -> o scaling group is skipped as in the real model; 2 vision blocks, the second full-attention.
TINY = Qwen25VLSize(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, mrope_section=(8, 12, 12),
                    vision_depth=2, vision_hidden=64, vision_intermediate=128, vision_heads=2,
                    fullatt_block_indexes=(1,))
REAL = Qwen25VLSize(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, mrope_section=(16, 24, 24),
                    vision_depth=32, vision_hidden=1280, vision_intermediate=3420, vision_heads=16,
                    fullatt_block_indexes=(7, 15, 23, 31))
SIZES = {"tiny": TINY, "real": REAL}


def real_config(size: Qwen25VLSize, dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json: the real keys and values, with this stand-in's sizes."""
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "vision_token_id": VISION_PAD_ID,
        "image_token_id": IMAGE_PAD_ID,
        "video_token_id": VIDEO_PAD_ID,
        "hidden_act": "silu",
        "hidden_size": size.hidden,
        "initializer_range": 0.02,
        "intermediate_size": size.intermediate,
        "max_position_embeddings": 128000,
        "max_window_layers": size.layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": size.heads,
        "num_hidden_layers": size.layers,
        "num_key_value_heads": size.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": size.vision_depth,
            "hidden_act": "silu",
            "hidden_size": size.vision_hidden,
            "intermediate_size": size.vision_intermediate,
            "num_heads": size.vision_heads,
            "in_chans": 3,
            "out_hidden_size": size.hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": list(size.fullatt_block_indexes),
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(size.mrope_section)},
        "vocab_size": size.vocab_size,
    }
    assert tuple(config) == REAL_CONFIG_KEYS and tuple(config["vision_config"]) == REAL_VISION_KEYS
    return config


HUB_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))
"""transformers 5 in-memory prefix -> the Hub checkpoint's (lm_head.* is the same in both)."""


def hub_name(name: str) -> str:
    for memory, hub in HUB_PREFIXES:
        if name.startswith(memory):
            return hub + name[len(memory):]
    return name


def _is_norm(name: str) -> bool:
    return name.endswith(".weight") and any(part in name for part in ("norm", "ln_q"))


def weight_specs(size: Qwen25VLSize) -> list[WeightSpec]:
    """Every tensor of the checkpoint under its Hub name, in the order the real index lists them (sorted), with
    the shapes of transformers' class on this config (built on the meta device: no memory)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(**real_config(size))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    specs = []
    for name, tensor in model.state_dict().items():
        hub = hub_name(name)
        specs.append(WeightSpec(hub, tuple(tensor.shape), 0.05 if _is_norm(hub) else 0.02,
                                1.0 if _is_norm(hub) else 0.0))
    return sorted(specs, key=lambda s: s.name)


def write_weights(out_dir: Path, size: Qwen25VLSize, seed: int, dtype: torch.dtype,
                  max_shard_bytes: int | None) -> None:
    """model-0000i-of-0000n.safetensors + model.safetensors.index.json; one shard in memory at a time
    (`max_shard_bytes` None: 5 shards, as the real checkpoint)."""
    write_sharded(out_dir, weight_specs(size), seed, dtype, max_shard_bytes, shard_count=SHARDS)


def write_tokenizer(out_dir: Path) -> None:
    """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and chat_template.json with the real added
    tokens at their real ids (a small byte-level BPE below them, padded with unreachable fillers)."""
    from tokenizers import AddedToken

    vocab, merges = bpe_vocab_and_merges()
    vocab = {(f"<|filler_{i}|>" if token == UNK_TOKEN else token): i
             for token, i in vocab.items()}  # the MiniCPM-V helper's <unk> is not in Qwen2.5's vocabulary
    tokenizer = qwen2_bpe_tokenizer(vocab, merges)
    for token in ADDED_TOKENS:  # one at a time, so each gets the next id
        if token in NOT_SPECIAL:
            tokenizer.add_tokens([AddedToken(token, normalized=False, special=False)])
        else:
            tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)])
    ids = {t: tokenizer.token_to_id(t) for t in ADDED_TOKENS}
    expected = {t: FIRST_ADDED_ID + i for i, t in enumerate(ADDED_TOKENS)}
    if ids != expected:
        raise RuntimeError(f"added token ids drifted: {ids}")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": t not in NOT_SPECIAL} for t, i in ids.items()}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(ADDED_TOKENS[1:14]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }, indent=2) + "\n")
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")


def write_processor_configs(out_dir: Path) -> None:
    """preprocessor_config.json (images, and videos by fallback) and generation_config.json as published."""
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ENDOFTEXT_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "do_sample": True,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.37.0",
    }, indent=2) + "\n")


def build_standin(out_dir: str | Path, size: Qwen25VLSize | str = TINY, seed: int = 0,
                  dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int | None = None) -> Path:
    """Write a random-weight Qwen2.5-VL-7B-Instruct folder into `out_dir` (new or empty) and return it.
    Same seed -> byte-identical safetensors."""
    size = SIZES[size] if isinstance(size, str) else size
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty; the stand-in builder writes a fresh checkpoint folder. "
                         "Pass a new or empty directory.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(real_config(size, dtype), indent=2) + "\n")
    write_processor_configs(out)
    write_tokenizer(out)
    write_weights(out, size, seed, dtype, max_shard_bytes)
    return out
