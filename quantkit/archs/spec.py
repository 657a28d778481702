"""Architecture knowledge as data: where the decoder layers are, how AWQ groups their linears, what stays 16-bit,
how the model is built and talked to, and how a release of it is described."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_KINDS = ("text", "image", "multi_image", "video")
"""The prompt kinds of verify's suite; a spec lists the ones its model takes."""


@dataclass(frozen=True)
class ScalingGroup:
    """One AWQ smoothing step inside a decoder layer (names are relative to the layer).

    The output of `prev` is divided by a per-channel scale s and the input columns of every module in
    `linears` are multiplied by s, so the float model is unchanged while salient channels quantize better.
    `inspect` is the submodule whose output measures the error of a candidate s (the single linear when None);
    `inspect_takes_layer_kwargs` passes the decoder layer's kwargs (rotary embeddings, mask) to it.
    `only_if_shapes_match` skips the group when prev's and the linears' weights differ in shape (v -> o under GQA).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    inspect_takes_layer_kwargs: bool = False
    only_if_shapes_match: bool = False

    def applies(self, weight_shape: Callable[[str], Sequence[int]]) -> bool:
        """Whether AWQ scales this group in a layer whose linear `name` has weight shape `weight_shape(name)`
        (a module tree or a checkpoint's headers answer it alike)."""
        if not self.only_if_shapes_match:
            return True
        shape = tuple(weight_shape(self.prev))
        return all(tuple(weight_shape(name)) == shape for name in self.linears)


@dataclass(frozen=True)
class ChatFormat:
    """What verify adds around the tokenizer's own chat template to pass prompts as token ids."""

    stop_tokens: tuple[str, ...]
    """Tokens that end a reply (greedy decoding stops at the first)."""
    image_placeholder: str | None = None
    """The text standing for one image in a user turn, one line per image (None: the model takes no images)."""
    video_placeholder: str | None = None
    """The text standing for a whole video in a user turn, its frames given to vLLM as one video (None: a video
    prompt's frames go as images, one image placeholder each, which is how MiniCPM-V 2.6 reads a video)."""


@dataclass(frozen=True)
class CardText:
    """How the model card names the architecture and shows its use."""

    display_name: str
    """The model family as people write it, e.g. in "the quantkit <display_name> stand-in"."""
    pipeline_tag: str
    """The Hub's task tag."""
    kept_16bit: str
    """One sentence: what stays 16-bit and what becomes 4-bit."""
    kept_16bit_parts: str
    """The 16-bit parts as a comma-separated list, for verify's size and bit-identity messages."""
    vllm_usage: str
    """Markdown usage with vLLM (a code block, then how to serve it); `{repo}` is replaced by the repo id."""


def _no_vision(config: dict[str, Any]) -> int:
    return 0


@dataclass(frozen=True)
class ArchSpec:
    """Everything the engine, the save layer, verify and the card need to know about one architecture."""

    name: str
    model_types: tuple[str, ...]
    """config.json `model_type` values this spec reads."""
    decoder_layers: str
    """Dotted path of the ModuleList of decoder layers in the loaded model."""
    language_model: str
    """Dotted path of the causal LM that takes `input_ids` ("" for the model itself)."""
    output_head: str
    """Dotted path of the output projection (the LM head); a checkpoint with tie_word_embeddings stores none."""
    rotary_embedding: str
    """Dotted path of the rotary-table module that the decoder layers share (outside them)."""
    linears: tuple[str, ...]
    """Every linear of a decoder layer that is quantized, relative to the layer."""
    scaling_groups: tuple[ScalingGroup, ...]
    no_clip: tuple[str, ...]
    """Linears whose weights are not clipped (q/k: their error is amplified by the attention softmax)."""
    keep_16bit: tuple[str, ...]
    """Module prefixes that stay 16-bit (for the record and for verify)."""
    linear_shapes: Callable[[dict[str, Any]], dict[str, tuple[int, int]]]
    """LLM config -> (in_features, out_features) of every linear in `linears`."""
    biased_linears: Callable[[dict[str, Any]], frozenset[str]]
    """LLM config -> the linears of `linears` that carry a bias."""
    chat: ChatFormat
    card: CardText
    prompt_kinds: tuple[str, ...] = ("text",)
    """The kinds of PROMPT_KINDS the model takes (verify drops the others from its default suite)."""
    config_requires: tuple[tuple[str, str], ...] = ()
    """(config key, value as text) pairs a checkpoint needs besides its model_type: the version this spec is for."""
    modules_to_not_convert: tuple[str, ...] = ()
    """Written into quantization_config; vLLM matches these as substrings of module prefixes."""
    num_layers_key: str = "num_hidden_layers"
    text_config_key: str | None = None
    """Config attribute holding the LLM's config (None: the top-level config is the LLM's)."""
    vision_params: Callable[[dict[str, Any]], int] = _no_vision
    """Full config -> parameter count of the vision side (for the quantize memory estimate)."""
    auto_class: str = "AutoModelForCausalLM"
    """transformers' auto class that loads the checkpoint natively (here when `build_model` is None; AutoAWQ)."""
    build_model: Callable[[dict[str, Any]], Any] | None = None
    """config.json contents -> the module tree (quantkit's own; the checkpoint's code is never imported).
    None: transformers' native class through `auto_class`."""
    load_processor: Callable[[Path], Any] | None = None
    """folder -> callable (text, images) -> kwargs for one forward pass through the real vision path."""
    load_tokenizer: Callable[[Path], Any] | None = None
    """folder -> tokenizer, where AutoTokenizer would need the checkpoint's code."""
    checkpoint_layers: str | None = None
    """Key prefix of the decoder layers in the checkpoint's safetensors, where it differs from `decoder_layers`
    (transformers' class renames the Hub keys on load); None: the same."""
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    """(checkpoint key prefix, module name prefix) pairs for every key transformers' class renames on load, the
    decoder layers' included (quantkit loads the shards itself); empty: the same names."""
    remote_code: bool = False
    """Whether vLLM must run the checkpoint's own Python files (trust_remote_code) to load it."""
    autoawq_unsupported: str | None = None
    """Why the AutoAWQ backend cannot quantize this architecture faithfully (None: it can)."""

    @property
    def checkpoint_prefix(self) -> str:
        """Key prefix of the decoder layers in the checkpoint (and in a release)."""
        return self.checkpoint_layers or self.decoder_layers

    def module_name(self, key: str) -> str:
        """The model's name for checkpoint tensor `key`."""
        for checkpoint, module in self.checkpoint_renames:
            if key.startswith(checkpoint):
                return module + key.removeprefix(checkpoint)
        return key

    def layer_prefix(self, index: int) -> str:
        """Checkpoint key prefix of decoder layer `index`."""
        return f"{self.checkpoint_prefix}.{index}"

    def matches(self, config: dict[str, Any]) -> bool:
        """Whether this spec reads the checkpoint with config.json contents `config` (type and version)."""
        return config.get("model_type") in self.model_types and all(
            str(config.get(key)) == value for key, value in self.config_requires)

    def text_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The LLM's part of config.json contents (hidden size, heads, layers, vocabulary)."""
        return (config.get(self.text_config_key) or {}) if self.text_config_key else config

    def native_class(self) -> Any:
        """transformers' class for `auto_class` (imported only when a model is loaded this way)."""
        import transformers

        return getattr(transformers, self.auto_class)
