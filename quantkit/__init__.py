"""quantkit: turn a vision-language model into a verified int4 AWQ release."""

__version__ = "0.1.0"
