"""Qwen2 / Llama-family decoder layers: the AWQ scaling groups of AutoAWQ's Qwen2 and Llama definitions."""

from quantkit.archs.spec import ArchSpec, ScalingGroup

DECODER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

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


def _decoder_only(name: str, model_types: tuple[str, ...]) -> ArchSpec:
    """A plain causal LM whose decoder layers are Qwen2/Llama layers under model.layers."""
    return ArchSpec(
        name=name,
        model_types=model_types,
        decoder_layers="model.layers",
        language_model="",
        linears=DECODER_LINEARS,
        scaling_groups=DECODER_SCALING_GROUPS,
        no_clip=NO_CLIP,
        keep_16bit=("model.embed_tokens", "lm_head", "model.norm"),
    )


QWEN2 = _decoder_only("qwen2", ("qwen2",))
LLAMA = _decoder_only("llama", ("llama", "mistral"))
