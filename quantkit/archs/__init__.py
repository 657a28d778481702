"""Registry of architecture specs: the one whose `matches` accepts a checkpoint's config.json reads it."""

from __future__ import annotations

from quantkit.archs.minicpmv26 import LLM_SHAPES as MINICPMV26_LLM_SHAPES
from quantkit.archs.minicpmv26 import MINICPMV26
from quantkit.archs.qwen2 import LLAMA, QWEN2
from quantkit.archs.qwen2_5_vl import QWEN2_5_VL
from quantkit.archs.spec import PROMPT_KINDS, ArchSpec, CardText, ChatFormat, ScalingGroup
from quantkit.errors import InputError

ARCHS: tuple[ArchSpec, ...] = (MINICPMV26, QWEN2_5_VL, QWEN2, LLAMA)


def spec_for_config(config: dict, source: str = "config.json") -> ArchSpec:
    """The one spec that matches a checkpoint's config.json contents; refuses unknown types, versions no spec is
    for (another MiniCPM-V), and a config that several specs claim (a registry mistake)."""
    matching = [spec for spec in ARCHS if spec.matches(config)]
    if len(matching) == 1:
        return matching[0]
    model_type = config.get("model_type")
    if matching:
        raise InputError(f"{source}: model_type {model_type!r} matches several specs "
                         f"({', '.join(s.name for s in matching)}); each spec's config_requires must tell them apart.")
    same_type = [spec for spec in ARCHS if model_type in spec.model_types]
    if same_type:
        keys = sorted({key for spec in same_type for key, _ in spec.config_requires})
        found = " ".join(f"{key} {config.get(key)!r}" for key in keys)
        wanted = "; ".join(f"quantkit's {spec.name} spec needs "
                           + ", ".join(f"{key} {value}" for key, value in spec.config_requires)
                           for spec in same_type)
        raise InputError(f"{source}: model_type {model_type!r} {found} is not supported; {wanted}.")
    known = ", ".join(t for s in ARCHS for t in s.model_types)
    supported = ", ".join(s.card.display_name for s in ARCHS)
    raise InputError(f"{source}: model_type {model_type!r} is not supported (known: {known}). "
                     f"quantkit quantizes {supported} models.")


__all__ = ["ARCHS", "LLAMA", "MINICPMV26", "MINICPMV26_LLM_SHAPES", "PROMPT_KINDS", "QWEN2", "QWEN2_5_VL", "ArchSpec", "CardText",
           "ChatFormat", "ScalingGroup", "spec_for_config"]
