"""Quantizing streams the decoder layers: host memory holds the non-decoder parts and a few layers, not the model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.archs import MINICPMV26
from quantkit.io.shards import ShardReader, weight_map
from quantkit.standin import TINY, build_standin

# Decoder layers that dominate the checkpoint: 48 layers of 6.7 MB (bf16) beside 155 MB of embedding and head.
LAYERS_DOMINATE = dataclasses.replace(TINY, llm_intermediate=4096, llm_layers=48)
FLOAT32_BYTES = 4
MARGIN = 256 * 2**20
"""Tokenizer and calibration set, activations, the down_proj Gram matrix (4096^2 floats = 64 MiB) and the
release writer's output shard (128 MiB at most here) with its serialized copy."""

# The child reports its own peak RSS: getrusage(RUSAGE_CHILDREN) in pytest would be the largest of every child
# pytest ever waited for. Calibration and searches are cut to the bone; memory, not quality, is measured.
CHILD = """
import json, resource, sys
from quantkit.api import quantize
from quantkit.awq.settings import QuantSettings
import transformers.models.qwen2.modeling_qwen2  # what quantize imports lazily counts as startup, not model

imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
quantize(sys.argv[1], sys.argv[2], calib="builtin:pydoc", n_samples=2, seq_len=32, device="cpu",
         settings=QuantSettings(method="awq", scale_grid=2, clip=False), max_shard_bytes=2**27)
print(json.dumps({"imported": imported * 1024, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_a_model_larger_than_the_memory_limit_is_quantized_layer_by_layer(tmp_path: Path):
    """The limit is what streaming promises: the non-decoder parts and 4 decoder layers, in the compute dtype
    (float32 on the CPU), plus a margin; the checkpoint loaded whole would exceed it by far (48 layers).

    The limit is checked on the child's peak resident memory rather than enforced with setrlimit: RLIMIT_AS and
    RLIMIT_DATA count address space (thread stacks, allocator arenas, torch's reservations), which varies with
    the machine's core count and would make an enforced limit flaky, while resident memory is what a host runs
    out of. The child's glibc gets a fixed mmap threshold: this stand-in's 13 MB tensors lie under the threshold
    glibc otherwise raises as big blocks are freed (up to 32 MiB), and freed heap blocks stay resident, ~9 MB
    more per layer here; real layers' tensors (hundreds of MB) are always mmap-ed and returned.
    """
    source = build_standin(tmp_path / "source", LAYERS_DOMINATE)
    layer_bytes: dict[str, int] = {}
    with ShardReader(source) as reader:
        for name in weight_map(source):
            shape, _ = reader.shape_dtype(name)
            layer = name.startswith(MINICPMV26.decoder_layers + ".")
            key = name.split(".")[3] if layer else "outside"
            layer_bytes[key] = layer_bytes.get(key, 0) + math.prod(shape) * FLOAT32_BYTES
    outside = layer_bytes.pop("outside")
    largest_layer = max(layer_bytes.values())
    limit = outside + 4 * largest_layer + MARGIN
    whole_model = outside + sum(layer_bytes.values())
    assert whole_model > limit + 150 * 2**20, "the stand-in no longer shows the difference"

    out = tmp_path / "release"
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
           "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out)], check=False, capture_output=True,
                           text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    rss = json.loads(child.stdout.strip().splitlines()[-1])
    used = rss["peak"] - rss["imported"]
    assert used < limit, (f"quantize used {used / 2**20:.0f} MiB over its startup; the limit is {limit / 2**20:.0f} "
                          f"MiB and the whole model {whole_model / 2**20:.0f} MiB")
    manifest = json.loads((out / "quantkit-manifest.json").read_text())
    assert manifest["quantization"]["quantized_layers"] == list(range(LAYERS_DOMINATE.llm_layers))



@pytest.mark.parametrize("folder_fixture", ["qwen2_dir", "qwen25vl_dir"])
def test_transformers_classes_stream_the_same_model_as_from_pretrained(folder_fixture: str, request):
    """Architectures without their own module tree stream too: transformers' class with every parameter on meta,
    buffers (rotary tables) computed as usual, checkpoint keys renamed as the spec says (Qwen2.5-VL's Hub names
    differ from its module names), tied weights tied again. Filled layer by layer, it equals from_pretrained:
    every tensor, every buffer and the logits."""
    import torch

    from quantkit.archs import spec_for_config
    from quantkit.io.model_loading import load_model, load_model_streaming
    from quantkit.io.shards import read_config

    folder = request.getfixturevalue(folder_fixture)
    spec = spec_for_config(read_config(folder))
    assert spec.build_model is None  # transformers' own class
    streamed, layers = load_model_streaming(folder, spec, torch.float32)
    decoder = streamed.get_submodule(spec.decoder_layers)
    assert all(p.is_meta for p in decoder.parameters())
    for index, layer in enumerate(decoder):
        layers.load(index, layer)
    reference = load_model(folder, spec, torch.float32)
    got, want = streamed.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert [name for name in want if not torch.equal(got[name], want[name])] == []
    got_buffers, want_buffers = dict(streamed.named_buffers()), dict(reference.named_buffers())
    assert got_buffers.keys() == want_buffers.keys()
    assert all(torch.equal(got_buffers[name], want_buffers[name]) for name in want_buffers)
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=ids).logits, reference(input_ids=ids).logits)
    tied = read_config(folder).get("tie_word_embeddings", False)
    shares = streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight
    assert shares == bool(tied)
