"""NaViT-style SigLIP vision tower of the stand-in: quantkit's own (quantkit.archs.minicpmv26.modeling)."""

from quantkit.archs.minicpmv26.modeling import NavitSiglip as SiglipVisionTransformer

__all__ = ["SiglipVisionTransformer"]
