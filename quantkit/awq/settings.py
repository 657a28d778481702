"""The quantization settings: one frozen dataclass whose defaults are the recommended release."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

from quantkit.errors import InputError

Method = Literal["awq", "awq-gptq"]
METHODS: tuple[str, ...] = get_args(Method)


@dataclass(frozen=True)
class QuantSettings:
    """AWQ int4 settings (AutoAWQ's w4, group 128, zero point, GEMM, 20-point grids; GPTQ rounding on top)."""

    method: Method = "awq-gptq"
    """awq-gptq: the AWQ searches, then error-compensated rounding on the same group grid (quantkit/awq/gptq.py);
    the default: on SmolLM2 75-76 % of round-to-nearest's perplexity gap closed (8 and 16 blocks) against awq's
    56-64 %, and a lower KL on chat prompts outside the calibration text, at 1.16-1.18x awq's time
    (docs/benchmarks.md, "Default method").
    awq: round to nearest after the searches, as AutoAWQ (what --backend autoawq runs); same release format."""
    gptq_damp: float = 1.0
    """awq-gptq: dampening added to the Gram matrix's diagonal, as a fraction of its mean diagonal. Larger values
    trust the calibration text less: on SmolLM2-135M (8 x 512 pydoc blocks) 0.01-1.0 give the same perplexity on
    held-out pydoc, but on chat prompts 0.1 is worse than plain awq and 1.0 the best measured (docs/benchmarks.md,
    "Dampening and text outside the calibration set")."""
    gptq_block_size: int = 128
    """awq-gptq: columns per lazy batch update (only how updates are batched, not what is chosen)."""
    gptq_act_order: bool = True
    """awq-gptq: round columns in order of falling input energy, each on its own group's fixed scale and zero
    (same layout); False keeps the input order."""
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"
    scale_grid: int = 20
    """Grid points for the scale exponent alpha in [0, 1)."""
    scale_screen_tokens: int | None = 8192
    """Groups scored through a block (attention, MLP): every grid point is first scored on about this many
    tokens (whole sequences, evenly spread), and only the `scale_finalists` best on every token. None: every
    grid point on every token (AutoAWQ's brute force; the same choice where the full set's best is a finalist)."""
    scale_finalists: int = 3
    duo_scaling: bool = True
    """s = mean|x|^a / mean|w|^(1-a) (AutoAWQ's default) instead of mean|x|^a alone."""
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int | None = None
    """None: the clip search scores on every calibration token. An int: on that many evenly strided tokens,
    as AutoAWQ (512), whose stride grows with the data and oversamples each block's first token (issue 20)."""
    inputs_from_quantized: bool = True
    """Feed layer i+1 with the outputs of the *quantized* layer i (AutoAWQ feeds the 16-bit outputs)."""
    max_batch_tokens: int = 16384
    """Tokens per forward launch during the search: bounds activation memory."""

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise InputError(f"bits={self.bits}: the AutoAWQ GEMM layout holds 4-bit weights only; use bits=4.")
        if self.group_size <= 0 or self.group_size % 8:
            raise InputError(f"group_size={self.group_size}: use a positive multiple of 8 (128 is standard).")
        if not self.zero_point:
            raise InputError("zero_point=false: the AutoAWQ GEMM layout needs zero points; set zero_point: true.")
        if self.version != "gemm":
            raise InputError(f"version={self.version!r}: only the 'gemm' layout is written (vLLM serves it).")
        if self.method not in METHODS:
            raise InputError(f"method={self.method!r}: use one of {', '.join(METHODS)}.")
        if self.method == "awq-gptq":
            if not self.gptq_damp > 0:
                raise InputError(f"gptq_damp={self.gptq_damp}: must be > 0 (0.01 = 1% of the mean diagonal).")
            if self.gptq_block_size <= 0:
                raise InputError(f"gptq_block_size={self.gptq_block_size}: use a positive number of columns "
                                 f"(128 is standard).")
        if self.scale_screen_tokens is not None and self.scale_screen_tokens <= 0:
            raise InputError(f"scale_screen_tokens={self.scale_screen_tokens}: use a positive token count "
                             f"(8192 is the default) or null for the full search.")
        if self.scale_finalists < 1:
            raise InputError(f"scale_finalists={self.scale_finalists}: at least one grid point must be scored "
                             f"on every token; use 1 or more (3 is the default).")
        if not 0 < self.clip_max_shrink < 1:
            raise InputError(f"clip_max_shrink={self.clip_max_shrink}: must lie in (0, 1).")

    def quantization_config(self, modules_to_not_convert: tuple[str, ...]) -> dict:
        """The `quantization_config` block of config.json that vLLM and transformers read."""
        return {
            "quant_method": "awq",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "version": self.version,
            "modules_to_not_convert": list(modules_to_not_convert),
        }

    def as_dict(self) -> dict:
        return asdict(self)


def default_method(backend: str) -> Method:
    """The method a backend runs when none is asked for: AutoAWQ only rounds to nearest."""
    return "awq" if backend == "autoawq" else QuantSettings.method
