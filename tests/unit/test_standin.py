"""The TINY stand-in is faithful to openbmb/MiniCPM-V-2_6: config keys, weight names and shapes, token ids,
processor output, and a model that loads through the Auto classes and really uses the image."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from quantkit.archs import MINICPMV26
from quantkit.io.model_loading import load_model
from quantkit.testing.standin import REAL, TINY, build_standin, weight_specs, write_weights

# openbmb/MiniCPM-V-2_6 config.json keys (written out here independently of standin.REAL_CONFIG_KEYS).
REAL_2_6_CONFIG_KEYS = {
    "_name_or_path", "architectures", "attention_dropout", "auto_map", "batch_vision_input", "bos_token_id",
    "drop_vision_last_layer", "eos_token_id", "hidden_act", "hidden_size", "image_size", "initializer_range",
    "intermediate_size", "max_position_embeddings", "max_window_layers", "model_type", "num_attention_heads",
    "num_hidden_layers", "num_key_value_heads", "patch_size", "query_num", "rms_norm_eps", "rope_theta",
    "scale_resolution", "slice_config", "slice_mode", "sliding_window", "tie_word_embeddings", "torch_dtype",
    "transformers_version", "use_cache", "use_image_id", "use_sliding_window", "version", "vision_batch_size",
    "vision_config", "vocab_size",
}
REAL_TOKEN_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646, "</image>": 151647,
    "<ref>": 151648, "</ref>": 151649, "<box>": 151650, "</box>": 151651, "<quad>": 151652, "</quad>": 151653,
    "<point>": 151654, "</point>": 151655, "<slice>": 151656, "</slice>": 151657, "<image_id>": 151658,
    "</image_id>": 151659, "<unk>": 128244,
}


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names = f.keys()
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in names})
    return shapes


@pytest.fixture(scope="module")
def loaded(standin_dir: Path):
    """The stand-in through its own remote code (as vLLM and transformers users load it)."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(standin_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(standin_dir, trust_remote_code=True, dtype=torch.float32).eval()
    return model, processor


@pytest.fixture(scope="module")
def quantkit_loaded(standin_dir: Path):
    """The stand-in through quantkit's own module tree and processor (no checkpoint code)."""
    return load_model(standin_dir, MINICPMV26, torch.float32), MINICPMV26.load_processor(standin_dir)


def photo(width: int = 640, height: int = 480) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_config_has_the_real_keys_and_values(standin_dir: Path):
    from transformers import AutoConfig

    config = json.loads((standin_dir / "config.json").read_text())
    assert set(config) == REAL_2_6_CONFIG_KEYS
    assert set(config["vision_config"]) == {"hidden_size", "image_size", "intermediate_size", "model_type",
                                            "num_attention_heads", "num_hidden_layers", "patch_size"}
    assert config["architectures"] == ["MiniCPMV"] and config["model_type"] == "minicpmv"
    assert config["version"] == 2.6 and config["torch_dtype"] == "bfloat16"
    assert config["auto_map"] == {"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                                  "AutoModel": "modeling_minicpmv.MiniCPMV",
                                  "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"}
    assert config["slice_config"] == {"max_slice_nums": 9, "model_type": "minicpmv", "patch_size": 14}
    assert (config["query_num"], config["image_size"], config["patch_size"], config["vocab_size"]) == (
        64, 448, 14, 151666)
    assert (config["bos_token_id"], config["eos_token_id"], config["rope_theta"]) == (151643, 151645, 1e6)
    assert config["tie_word_embeddings"] is False and config["use_sliding_window"] is False
    assert config["vision_config"]["model_type"] == "siglip" and config["vision_config"]["image_size"] == 980

    loaded_config = AutoConfig.from_pretrained(standin_dir, trust_remote_code=True)
    assert type(loaded_config).__name__ == "MiniCPMVConfig"
    assert loaded_config.vision_config.hidden_size == TINY.vision_hidden
    assert loaded_config.slice_config.max_slice_nums == 9


def test_file_set_matches_the_real_checkpoint(standin_dir: Path):
    names = {p.name for p in standin_dir.iterdir()}
    assert {
        "configuration_minicpm.py", "modeling_minicpmv.py", "modeling_navit_siglip.py", "resampler.py",
        "image_processing_minicpmv.py", "processing_minicpmv.py", "tokenization_minicpmv_fast.py", "vocab.json",
        "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
        "preprocessor_config.json", "generation_config.json", "model.safetensors.index.json",
    } <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert shards == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((standin_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(weight_shapes(standin_dir))
    preprocessor = json.loads((standin_dir / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"]["AutoImageProcessor"] == "image_processing_minicpmv.MiniCPMVImageProcessor"


def test_gqa_shapes_and_awq_friendly_dims(standin_dir: Path):
    shapes = weight_shapes(standin_dir)
    attn = "llm.model.layers.0.self_attn"
    assert shapes[f"{attn}.q_proj.weight"] == (256, 256)
    assert shapes[f"{attn}.k_proj.weight"] == shapes[f"{attn}.v_proj.weight"] == (128, 256)
    assert shapes[f"{attn}.o_proj.weight"] == (256, 256)  # v -> o shapes differ: group skipped, as in 2.6
    assert shapes[f"{attn}.q_proj.bias"] == (256,) and shapes[f"{attn}.v_proj.bias"] == (128,)
    for name, shape in shapes.items():
        if name.startswith("llm.model.layers.") and name.endswith("proj.weight"):
            assert all(d % 128 == 0 for d in shape), name
    assert shapes["llm.model.embed_tokens.weight"] == shapes["llm.lm_head.weight"] == (151666, 256)
    assert shapes["vpm.embeddings.position_embedding.weight"] == (4900, 128)
    assert shapes["resampler.kv_proj.weight"] == (256, 128)
    assert shapes["resampler.attn.in_proj_weight"] == (768, 256)
    assert shapes["resampler.query"] == (64, 256) and shapes["resampler.proj"] == (256, 256)


def test_real_size_matches_the_real_checkpoint_bytes():
    # The real model.safetensors.index.json says total_size 16198350304 (bf16).
    assert sum(s.numel for s in weight_specs(REAL)) * 2 == 16198350304
    shapes = {s.name: s.shape for s in weight_specs(REAL)}
    assert shapes["llm.model.layers.27.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["vpm.encoder.layers.26.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["resampler.kv_proj.weight"] == (3584, 1152)


def test_same_seed_same_bytes_other_seed_other_bytes(standin_dir: Path, tmp_path: Path):
    for seed in (0, 1):
        (tmp_path / str(seed)).mkdir()
        write_weights(tmp_path / str(seed), TINY, seed, torch.bfloat16, None)
    reference = shard_hashes(standin_dir)
    assert shard_hashes(tmp_path / "0") == reference
    assert all(a != b for a, b in zip(shard_hashes(tmp_path / "1").values(), reference.values(), strict=True))


def test_build_refuses_a_non_empty_folder(tmp_path: Path):
    from quantkit.errors import InputError

    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        build_standin(tmp_path)


def test_tokenizer_has_the_real_special_ids_and_reads_english(loaded):
    tokenizer = loaded[1].tokenizer
    assert len(tokenizer) == 151666
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in REAL_TOKEN_IDS} == REAL_TOKEN_IDS
    assert tokenizer.unk_token == "<unk>" and tokenizer.unk_token_id == 128244
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (151646, 151647)
    assert (tokenizer.slice_start_id, tokenizer.slice_end_id) == (151656, 151657)
    assert (tokenizer.im_id_start_id, tokenizer.im_id_end_id) == (151658, 151659)
    text = "The return statement leaves the current function call with the expression list."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text and len(ids) < len(text) / 3
    assert tokenizer.encode("<unk>" * 3 + "<|im_end|>", add_special_tokens=False) == [128244] * 3 + [151645]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_image_processor_slices_like_2_6(loaded):
    image_processor = loaded[1].image_processor
    assert image_processor.image_feature_size == 64 and image_processor.max_slice_nums == 9
    assert image_processor.get_sliced_grid((640, 480), 9) == [2, 1]
    assert image_processor.get_sliced_grid((448, 448), 9) is None
    placeholder = image_processor.get_slice_image_placeholder((640, 480), image_idx=1, max_slice_nums=9,
                                                              use_image_id=True)
    assert placeholder.startswith("<image_id>1</image_id><image>")
    assert placeholder.count("<unk>") == 3 * 64 and placeholder.count("<slice>") == 2
    out = image_processor([[photo()]], do_pad=True, return_tensors="pt")
    assert out["image_sizes"] == [[(640, 480)]]
    assert out["tgt_sizes"][0].tolist() == [[28, 37], [39, 26], [39, 26]]
    assert [tuple(p.shape) for p in out["pixel_values"][0]] == [(3, 14, 28 * 37 * 14), (3, 14, 39 * 26 * 14),
                                                                (3, 14, 39 * 26 * 14)]


def test_weights_load_without_missing_or_unexpected_keys(loaded, standin_dir: Path):
    model = loaded[0]
    assert set(model.state_dict()) == set(weight_shapes(standin_dir))
    assert type(model.llm).__name__ == "Qwen2ForCausalLM"
    assert model.resampler.attn.num_heads == 2
    table = model.resampler.positions(70, 70, torch.device("cpu"))
    assert table.shape == (4900, 256) and torch.isfinite(table).all() and table.abs().sum() > 0


def test_forward_with_image_and_text_only(quantkit_loaded):
    model, processor = quantkit_loaded
    with_image = processor("What is in the image?", [photo()])
    text_only = processor("What is in the image?", [])
    data = with_image["data"]
    assert [b.tolist() for b in data["image_bound"]] == [[[7, 71], [73, 137], [139, 203]]]
    with torch.no_grad():
        logits_image = model(**with_image).logits
        logits_text = model(**text_only).logits
    assert logits_image.shape == (1, data["input_ids"].shape[1], 151666)
    assert logits_text.shape == (1, text_only["data"]["input_ids"].shape[1], 151666)
    assert torch.isfinite(logits_image).all() and torch.isfinite(logits_text).all()
    # The prompts end with the same text tokens; only the image can make their last logits differ.
    assert (logits_image[0, -1] - logits_text[0, -1]).abs().max() > 1e-2


def test_image_content_reaches_the_logits(quantkit_loaded):
    model, processor = quantkit_loaded
    outputs = []
    for image in (photo(), Image.new("RGB", (640, 480), (255, 255, 255))):
        with torch.no_grad():
            outputs.append(model(**processor("Describe.", [image])).logits[0, -1])
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


def test_remote_code_and_quantkit_tree_compute_the_same(loaded, quantkit_loaded):
    inputs = quantkit_loaded[1]("Describe.", [photo()])
    with torch.no_grad():
        ours, theirs = quantkit_loaded[0](**inputs).logits, loaded[0](**inputs).logits
    assert torch.equal(ours, theirs)
