"""Architecture knowledge as data: where the decoder layers are, how AWQ groups their linears, what stays 16-bit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
class ArchSpec:
    """Everything the engine, the save layer and verify need to know about one architecture."""

    name: str
    model_types: tuple[str, ...]
    decoder_layers: str
    """Dotted path of the ModuleList of decoder layers; also the checkpoint key prefix."""
    language_model: str
    """Dotted path of the causal LM that takes `input_ids` ("" for the model itself)."""
    linears: tuple[str, ...]
    """Every linear of a decoder layer that is quantized, relative to the layer."""
    scaling_groups: tuple[ScalingGroup, ...]
    no_clip: tuple[str, ...]
    """Linears whose weights are not clipped (q/k: their error is amplified by the attention softmax)."""
    keep_16bit: tuple[str, ...]
    """Module prefixes that stay 16-bit (for the record and for verify)."""
    modules_to_not_convert: tuple[str, ...] = ()
    """Written into quantization_config; vLLM matches these as substrings of module prefixes."""
    num_layers_key: str = "num_hidden_layers"
    text_config_key: str | None = None
    """Config attribute holding the LLM's config (None: the top-level config is the LLM's)."""
    multimodal: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    build_model: Callable[[dict[str, Any]], Any] | None = None
    """config.json contents -> the module tree (quantkit's own; the checkpoint's code is never imported).
    None: transformers' native class for the model_type."""
    load_processor: Callable[[Path], Any] | None = None
    """folder -> callable (text, images) -> kwargs for one forward pass through the real vision path."""
    load_tokenizer: Callable[[Path], Any] | None = None
    """folder -> tokenizer, where AutoTokenizer would need the checkpoint's code."""

    def layer_prefix(self, index: int) -> str:
        return f"{self.decoder_layers}.{index}"
