"""What fits on a GPU of a given size: KV-cache tokens, longest request and largest batch, from weight size and
KV bytes per token. Arithmetic, not a measurement: it answers "int4 or fp16 on a 24 GB card?" before renting one.

vLLM's budget on a GPU is `gpu_memory_utilization` x memory; the weights, the profiled activation peak and CUDA
graphs / context come off it, and the rest becomes KV cache. The activation + context reserve depends on
max_num_batched_tokens and the vision encoder's profile; `reserve_gib` is a typical value for a 7B VLM, not a
law: set it from a measured run (total - weights - KV) for a precise answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from quantkit.errors import InputError

GIB = 2**30


@dataclass(frozen=True)
class MemoryFit:
    gpu_memory_gib: float
    utilization: float
    reserve_gib: float
    weights_gib: float
    kv_bytes_per_token: int
    kv_cache_gib: float
    kv_cache_tokens: int
    request_len: int
    max_len: int
    """Longest single request: the KV-cache tokens, capped by the model's max_position_embeddings."""
    max_batch: int
    """Requests of `request_len` tokens that fit at once."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_bytes_per_token(llm: dict[str, Any], kv_dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token: 2 x layers x kv_heads x head_dim x bytes (16-bit KV by default).

    `llm` is the LLM's config (the spec's `text_config` of config.json).
    """
    try:
        layers = int(llm["num_hidden_layers"])
        heads = int(llm["num_attention_heads"])
        kv_heads = int(llm.get("num_key_value_heads") or heads)
        head_dim = int(llm.get("head_dim") or int(llm["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"config.json lacks the LLM shape keys needed for the KV size ({err}).") from err
    return 2 * layers * kv_heads * head_dim * kv_dtype_bytes


def fit_in_memory(
    gpu_memory_gib: float,
    weights_bytes: int,
    kv_bytes: int,
    max_position: int,
    *,
    request_len: int = 2048,
    utilization: float = 0.9,
    reserve_gib: float = 2.0,
) -> MemoryFit:
    """KV-cache tokens left on a `gpu_memory_gib` GPU once the weights and the reserve are placed, and what
    they allow: the longest request (<= max_position) and the number of `request_len`-token requests at once
    (0 when the weights alone do not fit)."""
    if gpu_memory_gib <= 0 or not 0 < utilization <= 1:
        raise InputError(f"--gpu-memory-gb {gpu_memory_gib} / utilization {utilization}: must be positive / in (0, 1].")
    kv_cache_bytes = max(0.0, gpu_memory_gib * utilization * GIB - weights_bytes - reserve_gib * GIB)
    tokens = int(kv_cache_bytes // kv_bytes)
    return MemoryFit(
        gpu_memory_gib=gpu_memory_gib,
        utilization=utilization,
        reserve_gib=reserve_gib,
        weights_gib=weights_bytes / GIB,
        kv_bytes_per_token=kv_bytes,
        kv_cache_gib=kv_cache_bytes / GIB,
        kv_cache_tokens=tokens,
        request_len=request_len,
        max_len=min(tokens, max_position),
        max_batch=tokens // request_len,
    )
