"""Qwen2 / Llama-family decoder layers: the AWQ scaling groups of AutoAWQ's Qwen2 and Llama definitions, the
linears' shapes and biases, and the plain causal-LM specs built on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quantkit.archs.spec import ArchSpec, CardText, ChatFormat, ScalingGroup

ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DECODER_LINEARS = ATTENTION_LINEARS + MLP_LINEARS

DECODER_SCALING_GROUPS = (
    ScalingGroup(
        prev="input_layernorm",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        inspect="self_attn",
        inspect_takes_layer_kwargs=True,
    ),
    ScalingGroup(prev="self_attn.v_proj", linears=("self_attn.o_proj",), only_if_shapes_match=True),
    ScalingGroup(prev="post_attention_layernorm", linears=("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
    ScalingGroup(prev="mlp.up_proj", linears=("mlp.down_proj",)),
)

NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")

CHATML = ChatFormat(stop_tokens=("<|im_end|>", "<|endoftext|>"))
"""ChatML (Qwen2's chat markup): a turn ends with <|im_end|>, a document with <|endoftext|>."""


def decoder_linear_shapes(llm: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each decoder linear from the LLM config (grouped-query attention:
    k and v have num_key_value_heads heads)."""
    hidden, intermediate = int(llm["hidden_size"]), int(llm["intermediate_size"])
    heads = int(llm["num_attention_heads"])
    kv_heads = int(llm.get("num_key_value_heads") or heads)
    head_dim = int(llm.get("head_dim") or hidden // heads)
    return {
        "self_attn.q_proj": (hidden, heads * head_dim), "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim), "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, intermediate), "mlp.up_proj": (hidden, intermediate),
        "mlp.down_proj": (intermediate, hidden),
    }


def qwen2_biases(llm: dict[str, Any]) -> frozenset[str]:
    """Qwen2 always has q/k/v biases."""
    return frozenset(ATTENTION_LINEARS[:3])


def llama_biases(llm: dict[str, Any]) -> frozenset[str]:
    """Llama-family models have biases where `attention_bias` / `mlp_bias` say so."""
    return frozenset((ATTENTION_LINEARS if llm.get("attention_bias") else ())
                     + (MLP_LINEARS if llm.get("mlp_bias") else ()))


TEXT_USAGE = """```python
from vllm import LLM, SamplingParams

llm = LLM(model="{repo}", max_model_len=4096)
messages = [{"role": "user", "content": "Write a haiku about the sea."}]
outputs = llm.chat(messages, SamplingParams(max_tokens=128, temperature=0))
```

or `vllm serve {repo}`."""
"""The card's vLLM usage for a text-only model."""


def _decoder_only(name: str, model_types: tuple[str, ...], display_name: str,
                  biases: Callable[[dict[str, Any]], frozenset[str]]) -> ArchSpec:
    """A plain causal LM whose decoder layers are Qwen2/Llama layers under model.layers."""
    return ArchSpec(
        name=name,
        model_types=model_types,
        decoder_layers="model.layers",
        language_model="",
        output_head="lm_head",
        rotary_embedding="model.rotary_emb",
        linears=DECODER_LINEARS,
        scaling_groups=DECODER_SCALING_GROUPS,
        no_clip=NO_CLIP,
        keep_16bit=("model.embed_tokens", "lm_head", "model.norm"),
        linear_shapes=decoder_linear_shapes,
        biased_linears=biases,
        chat=CHATML,
        card=CardText(
            display_name=display_name,
            pipeline_tag="text-generation",
            kept_16bit="The embeddings, norms and lm_head stay 16-bit; the decoder linears are 4-bit.",
            kept_16bit_parts="embeddings, lm_head, norms",
            vllm_usage=TEXT_USAGE,
        ),
    )


QWEN2 = _decoder_only("qwen2", ("qwen2",), "Qwen2", qwen2_biases)
LLAMA = _decoder_only("llama", ("llama", "mistral"), "Llama", llama_biases)
"""Stops at ChatML's tokens, as the Llama-family model quantkit is tested on (SmolLM2) chats in ChatML; vLLM
also stops at the tokenizer's eos."""
