"""Registry of architecture specs, looked up by the checkpoint's `model_type`."""

from __future__ import annotations

from quantkit.archs.minicpmv26 import LLM_SHAPES as MINICPMV26_LLM_SHAPES
from quantkit.archs.minicpmv26 import MINICPMV26
from quantkit.archs.qwen2 import LLAMA, QWEN2
from quantkit.archs.spec import ArchSpec, ScalingGroup
from quantkit.errors import InputError

ARCHS: tuple[ArchSpec, ...] = (MINICPMV26, QWEN2, LLAMA)


def spec_for_config(config: dict, source: str = "config.json") -> ArchSpec:
    """The spec for a checkpoint's config.json contents; refuses unknown types and other MiniCPM-V versions."""
    model_type = config.get("model_type")
    for spec in ARCHS:
        if model_type in spec.model_types:
            wanted = spec.extra.get("version")
            if wanted is not None and str(config.get("version")) != wanted:
                raise InputError(
                    f"{source}: model_type {model_type!r} version {config.get('version')!r} is not supported; "
                    f"quantkit's {spec.name} spec needs version {wanted} (e.g. openbmb/MiniCPM-V-2_6)."
                )
            return spec
    known = ", ".join(t for s in ARCHS for t in s.model_types)
    raise InputError(
        f"{source}: model_type {model_type!r} is not supported (known: {known}). "
        "quantkit quantizes MiniCPM-V 2.6 and Qwen2/Llama-family LLMs."
    )


__all__ = ["ARCHS", "MINICPMV26_LLM_SHAPES", "ArchSpec", "ScalingGroup", "spec_for_config"]
