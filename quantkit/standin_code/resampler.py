"""Perceiver resampler of the stand-in: quantkit's own (quantkit.archs.minicpmv26.modeling)."""

from quantkit.archs.minicpmv26.modeling import Resampler, sincos_table_2d

__all__ = ["Resampler", "sincos_table_2d"]
