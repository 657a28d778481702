"""The speed arithmetic of verify, apart from vLLM so it can be checked on fake timings.

How a figure is measured (quantkit.verify.vllm_worker): per batch size, one untimed warm-up of exactly the timed
shape (a 1-token generation, then a full `decode_tokens + 1` generation at that batch size: CUDA-graph capture,
compilation and allocations for the shape happen there, not in a timed run), then `repeats` pairs of timed
runs on fresh random prompts: a 1-token generation (prefill + first token) and a `decode_tokens + 1` generation
(the same prefill, then `decode_tokens` decode steps). Decode time = median of the long runs - median of the
1-token runs, so the prefill is subtracted from like-shaped runs and one slow run does not move a figure.
"""

from __future__ import annotations

import statistics
from typing import Any

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12}
"""Peak memory bandwidth by (a part of) the device name, from NVIDIA's data sheets (H200 SXM 4.8 TB/s, H100 SXM
3.35 TB/s). A device not listed gets no bandwidth floor."""


def speed_row(batch: int, prompt_len: int, decode_tokens: int, prefill_s: list[float],
              total_s: list[float], warmup_s: float) -> dict[str, Any]:
    """One batch size's figures from the timed runs (seconds): prefill = batch x prompt_len tokens over the median
    1-token run; decode = batch x decode_tokens over (median long run - median 1-token run); ms_per_step = the
    time of one decode step of the whole batch. `warmup_s` is the untimed first long run at this batch size:
    `first_run_decode_tok_s` is what timing it would have reported (verify's method before issue 13)."""
    prefill, total = statistics.median(prefill_s), statistics.median(total_s)
    decode_s = total - prefill
    if decode_s <= 0:
        raise ValueError(f"batch {batch}: the {decode_tokens + 1}-token runs (median {total:.4f} s) were not slower "
                         f"than the 1-token runs ({prefill:.4f} s): decode too short to time")
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "repeats": len(total_s),
        "prefill_tok_s": batch * prompt_len / prefill,
        "decode_tok_s": batch * decode_tokens / decode_s,
        "ms_per_step": 1000 * decode_s / decode_tokens,
        "first_run_decode_tok_s": batch * decode_tokens / (warmup_s - prefill),
        "prefill_s": list(prefill_s),
        "total_s": list(total_s),
        "warmup_s": warmup_s,
    }


def hbm_bytes_per_s(device_name: str | None) -> float | None:
    """The named bandwidth constant whose key is part of `device_name` (e.g. "NVIDIA H200"), else None."""
    return next((rate for key, rate in HBM_BYTES_PER_S.items() if key in (device_name or "")), None)


def bandwidth_floor_ms(weights_bytes: int | None, device_name: str | None) -> float | None:
    """Milliseconds to read every weight once from memory: no decode step can be faster at small batch. Uses
    the weights as loaded (the vision tower included, which decode does not read: the floor is a little high)."""
    rate = hbm_bytes_per_s(device_name)
    return None if rate is None or weights_bytes is None else 1000 * weights_bytes / rate
