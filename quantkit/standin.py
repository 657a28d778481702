"""The faithful stand-in: a random-weight MiniCPM-V 2.6 checkpoint folder with the real file set.

No real weights can be downloaded in CI, so tests, the demo recipe (`source.standin`), verify's speed floor
and GPU scripts run on a folder that has the real
checkpoint's config keys, weight names, shard + index layout, tokenizer ids and remote-code interfaces (the
remote code is quantkit's own, under `standin_code/`). `TINY` builds in seconds; `REAL` has the real shapes
(~16 GB bf16) and is written shard by shard so it never holds more than one shard in memory.

    python -m quantkit.standin OUT_DIR [--size real] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from quantkit.archs import MINICPMV26, QWEN2_5_VL
from quantkit.errors import InputError

REMOTE_CODE_DIR = Path(__file__).parent / "standin_code"
REAL_REPO = "openbmb/MiniCPM-V-2_6"

# The key set of openbmb/MiniCPM-V-2_6's config.json, reconstructed without a primary copy of the file: the
# MiniCPM-V keys and values as the model's Hub files describe them, the Qwen2 keys and values
# (attention_dropout, initializer_range, sliding_window 131072, use_cache, transformers_version) from the LLM
# half of the same checkpoint republished as thanhtantran/MiniCPM-V-2_6-rkllm config.json, whose model.safetensors.index.json also keeps the original
# total_size 16198350304 that weight_specs(REAL) reproduces exactly. `_name_or_path` and `scale_resolution`
# are the least certain entries (no primary copy of the file was readable).
REAL_CONFIG_KEYS: tuple[str, ...] = (
    "_name_or_path", "architectures", "attention_dropout", "auto_map", "batch_vision_input", "bos_token_id",
    "drop_vision_last_layer", "eos_token_id", "hidden_act", "hidden_size", "image_size", "initializer_range",
    "intermediate_size", "max_position_embeddings", "max_window_layers", "model_type", "num_attention_heads",
    "num_hidden_layers", "num_key_value_heads", "patch_size", "query_num", "rms_norm_eps", "rope_theta",
    "scale_resolution", "slice_config", "slice_mode", "sliding_window", "tie_word_embeddings", "torch_dtype",
    "transformers_version", "use_cache", "use_image_id", "use_sliding_window", "version", "vision_batch_size",
    "vision_config", "vocab_size",
)

# Added tokens at the real ids (151643..151665) and the per-image placeholder `<unk>` inside the BPE range.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>",
    "<quad>", "</quad>", "<point>", "</point>", "<slice>", "</slice>", "<image_id>", "</image_id>",
    *(f"<|reserved_special_token_{i}|>" for i in range(6)),
)
FIRST_SPECIAL_ID = 151643
UNK_TOKEN, UNK_ID = "<unk>", 128244
BOS_ID, EOS_ID = 151643, 151645
# Qwen2's pre-tokenizer split (contractions, letters, single digits, punctuation, newlines, spaces).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
BPE_TRAINED_VOCAB = 8192
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class StandinSize:
    """Shapes of a stand-in. The resampler has query_num queries, width llm_hidden, llm_hidden / 128 heads."""

    llm_hidden: int
    llm_intermediate: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    vocab_size: int = 151666
    query_num: int = 64

    @property
    def head_dim(self) -> int:
        return self.llm_hidden // self.llm_heads


# Every LLM linear dim is a multiple of 128 (AWQ group 128, Marlin K) and GQA makes v_proj (128 x 256) and
# o_proj (256 x 256) differ in shape, so the v -> o scaling group is skipped exactly as in the real 2.6.
TINY = StandinSize(llm_hidden=256, llm_intermediate=512, llm_layers=2, llm_heads=4, llm_kv_heads=2,
                   vision_hidden=128, vision_intermediate=256, vision_layers=2, vision_heads=2)
REAL = StandinSize(llm_hidden=3584, llm_intermediate=18944, llm_layers=28, llm_heads=28, llm_kv_heads=4,
                   vision_hidden=1152, vision_intermediate=4304, vision_layers=27, vision_heads=16)

VISION_IMAGE_SIZE, PATCH_SIZE = 980, 14


def real_config(size: StandinSize, dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json: the real 2.6 keys and values, with this stand-in's sizes."""
    config = {
        "_name_or_path": REAL_REPO,
        "architectures": ["MiniCPMV"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
            "AutoModel": "modeling_minicpmv.MiniCPMV",
            "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
        },
        "batch_vision_input": True,
        "bos_token_id": BOS_ID,
        "drop_vision_last_layer": False,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "hidden_size": size.llm_hidden,
        "image_size": 448,
        "initializer_range": 0.02,
        "intermediate_size": size.llm_intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": size.llm_layers,
        "model_type": "minicpmv",
        "num_attention_heads": size.llm_heads,
        "num_hidden_layers": size.llm_layers,
        "num_key_value_heads": size.llm_kv_heads,
        "patch_size": PATCH_SIZE,
        "query_num": size.query_num,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "scale_resolution": 448,
        "slice_config": {"max_slice_nums": 9, "model_type": "minicpmv", "patch_size": PATCH_SIZE},
        "slice_mode": True,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.40.0",
        "use_cache": True,
        "use_image_id": True,
        "use_sliding_window": False,
        "version": 2.6,
        "vision_batch_size": 16,
        "vision_config": {
            "hidden_size": size.vision_hidden,
            "image_size": VISION_IMAGE_SIZE,
            "intermediate_size": size.vision_intermediate,
            "model_type": "siglip",
            "num_attention_heads": size.vision_heads,
            "num_hidden_layers": size.vision_layers,
            "patch_size": PATCH_SIZE,
        },
        "vocab_size": size.vocab_size,
    }
    assert tuple(config) == REAL_CONFIG_KEYS
    return config


@dataclass(frozen=True)
class WeightSpec:
    """One tensor to generate: `std` around `mean` (norm weights ~1, everything else ~0)."""

    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def weight_specs(size: StandinSize) -> list[WeightSpec]:
    """Every tensor of the checkpoint, in file order, with the real names."""
    std, norm_std = 0.02, 0.05
    h, kv = size.llm_hidden, size.llm_kv_heads * size.head_dim
    specs = [WeightSpec("llm.model.embed_tokens.weight", (size.vocab_size, h), std)]
    for i in range(size.llm_layers):
        p = f"llm.model.layers.{i}"
        specs += [
            WeightSpec(f"{p}.input_layernorm.weight", (h,), norm_std, 1.0),
            WeightSpec(f"{p}.self_attn.q_proj.weight", (h, h), std),
            WeightSpec(f"{p}.self_attn.q_proj.bias", (h,), std),
            WeightSpec(f"{p}.self_attn.k_proj.weight", (kv, h), std),
            WeightSpec(f"{p}.self_attn.k_proj.bias", (kv,), std),
            WeightSpec(f"{p}.self_attn.v_proj.weight", (kv, h), std),
            WeightSpec(f"{p}.self_attn.v_proj.bias", (kv,), std),
            WeightSpec(f"{p}.self_attn.o_proj.weight", (h, h), std),
            WeightSpec(f"{p}.post_attention_layernorm.weight", (h,), norm_std, 1.0),
            WeightSpec(f"{p}.mlp.gate_proj.weight", (size.llm_intermediate, h), std),
            WeightSpec(f"{p}.mlp.up_proj.weight", (size.llm_intermediate, h), std),
            WeightSpec(f"{p}.mlp.down_proj.weight", (h, size.llm_intermediate), std),
        ]
    specs += [
        WeightSpec("llm.model.norm.weight", (h,), norm_std, 1.0),
        WeightSpec("llm.lm_head.weight", (size.vocab_size, h), std),
    ]
    v, positions = size.vision_hidden, (VISION_IMAGE_SIZE // PATCH_SIZE) ** 2
    specs += [
        WeightSpec("vpm.embeddings.patch_embedding.weight", (v, 3, PATCH_SIZE, PATCH_SIZE), std),
        WeightSpec("vpm.embeddings.patch_embedding.bias", (v,), std),
        WeightSpec("vpm.embeddings.position_embedding.weight", (positions, v), std),
    ]
    for i in range(size.vision_layers):
        p = f"vpm.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [WeightSpec(f"{p}.self_attn.{proj}.weight", (v, v), std),
                      WeightSpec(f"{p}.self_attn.{proj}.bias", (v,), std)]
        specs += [
            WeightSpec(f"{p}.layer_norm1.weight", (v,), norm_std, 1.0),
            WeightSpec(f"{p}.layer_norm1.bias", (v,), std),
            WeightSpec(f"{p}.mlp.fc1.weight", (size.vision_intermediate, v), std),
            WeightSpec(f"{p}.mlp.fc1.bias", (size.vision_intermediate,), std),
            WeightSpec(f"{p}.mlp.fc2.weight", (v, size.vision_intermediate), std),
            WeightSpec(f"{p}.mlp.fc2.bias", (v,), std),
            WeightSpec(f"{p}.layer_norm2.weight", (v,), norm_std, 1.0),
            WeightSpec(f"{p}.layer_norm2.bias", (v,), std),
        ]
    specs += [WeightSpec("vpm.post_layernorm.weight", (v,), norm_std, 1.0),
              WeightSpec("vpm.post_layernorm.bias", (v,), std)]
    specs += [
        WeightSpec("resampler.query", (size.query_num, h), std),
        WeightSpec("resampler.kv_proj.weight", (h, v), std),
        WeightSpec("resampler.attn.in_proj_weight", (3 * h, h), std),
        WeightSpec("resampler.attn.in_proj_bias", (3 * h,), std),
        WeightSpec("resampler.attn.out_proj.weight", (h, h), std),
        WeightSpec("resampler.attn.out_proj.bias", (h,), std),
    ]
    for norm in ("ln_q", "ln_kv", "ln_post"):
        specs += [WeightSpec(f"resampler.{norm}.weight", (h,), norm_std, 1.0),
                  WeightSpec(f"resampler.{norm}.bias", (h,), std)]
    specs.append(WeightSpec("resampler.proj", (h, h), h**-0.5))
    return specs


def seeded_tensor(spec: WeightSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Seeded by (seed, name) alone, so a tensor's values do not depend on shard layout or order."""
    digest = hashlib.sha256(f"{seed}:{spec.name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    values = torch.randn(spec.shape, generator=generator, dtype=torch.float32)
    values.mul_(spec.std).add_(spec.mean)
    return values.to(dtype)


def plan_shards(specs: list[WeightSpec], bytes_per_value: int, max_shard_bytes: int) -> list[list[WeightSpec]]:
    shards: list[list[WeightSpec]] = [[]]
    used = 0
    for spec in specs:
        nbytes = spec.numel * bytes_per_value
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += nbytes
    return shards


def limit_for_shard_count(specs: list[WeightSpec], bytes_per_value: int, count: int) -> int:
    """The smallest shard size limit at which the in-order packing needs at most `count` shards."""
    low, high = 1, sum(s.numel for s in specs) * bytes_per_value
    while low < high:
        mid = (low + high) // 2
        if len(plan_shards(specs, bytes_per_value, mid)) <= count:
            high = mid
        else:
            low = mid + 1
    return low


def write_weights(out_dir: Path, size: StandinSize, seed: int, dtype: torch.dtype,
                  max_shard_bytes: int | None) -> None:
    """model-0000i-of-0000n.safetensors + model.safetensors.index.json; one shard in memory at a time.

    `max_shard_bytes` None packs into 4 shards, as the real checkpoint is.
    """
    write_sharded(out_dir, weight_specs(size), seed, dtype, max_shard_bytes, shard_count=4)


def write_sharded(out_dir: Path, specs: list[WeightSpec], seed: int, dtype: torch.dtype,
                  max_shard_bytes: int | None, shard_count: int) -> None:
    """Seeded random tensors for `specs` as model-0000i-of-0000n.safetensors + model.safetensors.index.json,
    one shard in memory at a time; `max_shard_bytes` None packs them into `shard_count` shards."""
    bytes_per_value = torch.empty((), dtype=dtype).element_size()
    total = sum(s.numel for s in specs) * bytes_per_value
    limit = max_shard_bytes if max_shard_bytes is not None else limit_for_shard_count(specs, bytes_per_value,
                                                                                       shard_count)
    shards = plan_shards(specs, bytes_per_value, limit)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file({s.name: seeded_tensor(s, seed, dtype) for s in shard}, str(out_dir / filename),
                  metadata={"format": "pt"})
        weight_map.update({s.name: filename for s in shard})
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


def bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE trained on CPython's pydoc topics, padded with unreachable fillers to id 151642."""
    from pydoc_data.topics import topics

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=BPE_TRAINED_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer_tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for token_id in range(len(vocab), FIRST_SPECIAL_ID):
        vocab[UNK_TOKEN if token_id == UNK_ID else f"<|filler_{token_id}|>"] = token_id
    return vocab, merges


def qwen2_bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with Qwen2's normalizer, pre-tokenizer split and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def write_tokenizer(out_dir: Path) -> None:
    """tokenizer.json, vocab.json, merges.txt and the three JSON side files, with the real special-token ids."""
    from tokenizers import AddedToken

    vocab, merges = bpe_vocab_and_merges()
    tokenizer = qwen2_bpe_tokenizer(vocab, merges)
    added = [UNK_TOKEN, *SPECIAL_TOKENS]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in added])
    ids = {t: tokenizer.token_to_id(t) for t in added}
    expected = {UNK_TOKEN: UNK_ID, **{t: FIRST_SPECIAL_ID + i for i, t in enumerate(SPECIAL_TOKENS)}}
    if ids != expected:
        raise RuntimeError(f"special token ids drifted: {ids}")
    tokenizer.save(str(out_dir / "tokenizer.json"))

    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out_dir / "added_tokens.json").write_text(json.dumps(dict(sorted(ids.items(), key=lambda kv: kv[1])),
                                                          indent=2) + "\n")
    markup = list(SPECIAL_TOKENS[3:17])
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": markup,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": UNK_TOKEN,
    }, indent=2) + "\n")
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in sorted(ids.items(), key=lambda kv: kv[1])}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": markup,
        "auto_map": {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]},
        "bos_token": "<|im_start|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "MiniCPMVTokenizerFast",
        "unk_token": UNK_TOKEN,
    }, indent=2) + "\n")


def write_processor_configs(out_dir: Path, size: StandinSize) -> None:
    """preprocessor_config.json (vLLM needs auto_map AutoImageProcessor) and generation_config.json."""
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MiniCPMVImageProcessor",
        "auto_map": {
            "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
            "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
        },
        "processor_class": "MiniCPMVProcessor",
        "max_slice_nums": 9,
        "scale_resolution": 448,
        "patch_size": PATCH_SIZE,
        "use_image_id": True,
        "image_feature_size": size.query_num,
        "im_start": "<image>",
        "im_end": "</image>",
        "slice_start": "<slice>",
        "slice_end": "</slice>",
        "unk": UNK_TOKEN,
        "im_id_start": "<image_id>",
        "im_id_end": "</image_id>",
        "slice_mode": True,
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.5, 0.5, 0.5],
        "version": 2.6,
    }, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, BOS_ID],
        "pad_token_id": BOS_ID,
        "transformers_version": "4.40.0",
    }, indent=2) + "\n")


def build_standin(out_dir: str | Path, size: StandinSize | str = TINY, seed: int = 0,
                  dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int | None = None) -> Path:
    """Write a random-weight MiniCPM-V 2.6 checkpoint folder into `out_dir` (new or empty) and return it.

    Same seed -> byte-identical safetensors. `max_shard_bytes` None splits into 4 shards like the real.
    TINY takes ~5 s; REAL took 93 s and 6 GB peak RSS on a 16-core machine (16.2 GB written).
    `size` may be given by name ("tiny", "real").
    """
    size = {"tiny": TINY, "real": REAL}[size] if isinstance(size, str) else size
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty; build_standin writes a fresh checkpoint folder. "
                         "Pass a new or empty directory.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(real_config(size, dtype), indent=2) + "\n")
    write_processor_configs(out, size)
    write_tokenizer(out)
    for source in sorted(REMOTE_CODE_DIR.glob("*.py")):
        shutil.copyfile(source, out / source.name)
    write_weights(out, size, seed, dtype, max_shard_bytes)
    return out


def build_qwen2_5_vl_standin(out_dir: str | Path, size: str = "tiny", seed: int = 0, **options) -> Path:
    """The Qwen2.5-VL-7B-Instruct stand-in (quantkit.standin_qwen2_5_vl, which builds on this module)."""
    from quantkit.standin_qwen2_5_vl import build_standin as build

    return build(out_dir, size, seed=seed, **options)


STANDIN_BUILDERS: dict[str, Callable[..., Path]] = {
    MINICPMV26.name: build_standin,
    QWEN2_5_VL.name: build_qwen2_5_vl_standin,
}
"""Arch spec name -> the builder of its stand-in: `builder(out_dir)` is the tiny one (verify's per-step speed
floor builds one), `builder(out_dir, "real", seed=0)` the real-shape one, written shard by shard."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a random-weight stand-in checkpoint folder.")
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=sorted(STANDIN_BUILDERS), default=MINICPMV26.name,
                        help="the arch spec whose checkpoint to stand in for (default: MiniCPM-V 2.6)")
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(STANDIN_BUILDERS[args.arch](args.out_dir, args.size, seed=args.seed))


if __name__ == "__main__":
    main()
