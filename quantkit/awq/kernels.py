"""Fused GPU kernels (Triton) for the searches' and GPTQ's elementwise hot paths.

Each kernel computes what a torch function elsewhere in quantkit.awq computes, in one pass over the weight
instead of a chain of elementwise launches, each reading and writing the whole tensor:

- `scaled_fake_quant`: Q(W * s) / s for one scale candidate, as search.scaled_fake_quant (bit-identical);
- `clip_search`: every clip step of one linear, as search.search_clip (losses through TF32 tensor cores in
  both, so ties can resolve differently);
- `round_block_`: one GPTQ block's column loop, as gptq.round_block_ (one launch per block instead of five
  per column; FMA contractions can move an integer by one where a value sits on a rounding midpoint).

`available(tensor)` says whether they apply: a CUDA tensor and an importable Triton (the CPU wheels of torch
carry none; there the torch code runs). QUANTKIT_TRITON=0 switches them off; TRITON_INTERPRET=1 runs them on
the CPU for tests. `compile_ahead` compiles them on a worker thread while the caller loads its model: a fresh
process otherwise spends its first layer in Triton's compiler.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton
    triton = None

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(tensor: torch.Tensor, group_size: int | None = None) -> bool:
    """Whether the fused kernels run for `tensor`: CUDA and Triton (or Triton's CPU interpreter), unless
    QUANTKIT_TRITON=0 asks for the torch code. The grouped kernels take a group as one tile, so a `group_size`
    must be a power of two of at least 16 (tl.arange, tl.dot)."""
    fits = group_size is None or (group_size >= 16 and group_size & (group_size - 1) == 0)
    return (fits and triton is not None and (tensor.is_cuda or _INTERPRETED)
            and os.environ.get("QUANTKIT_TRITON", "1") != "0")


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        """torch.round's rule (ties to even) with plain arithmetic, which Triton's interpreter also runs."""
        r = tl.floor(x + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        r = tl.where(((r - x) == 0.5) & odd, r - 1.0, r)
        return tl.where(tl.abs(x) >= 8388608.0, x, r)  # 2^23: already an integer

    @triton.jit
    def _fake_quant_rows(g, max_int):
        """quant.fake_quantize_groups_ on a [rows, group] float32 tile: min-max asymmetric, fp16 scales."""
        w_max = tl.max(g, axis=1)
        w_min = tl.min(g, axis=1)
        s = tl.div_rn(tl.maximum(w_max - w_min, 1e-5), max_int).to(tl.float16).to(tl.float32)
        z = tl.minimum(tl.maximum(-_round_half_even(tl.div_rn(w_min, s)), 0.0), max_int)
        q = _round_half_even(tl.div_rn(g, s[:, None]))
        q = tl.minimum(tl.maximum(q, -z[:, None]), max_int - z[:, None])
        return q * s[:, None]

    @triton.jit
    def _scaled_fake_quant_kernel(w_ptr, s_ptr, out_ptr, rows, cols, max_int,
                                  GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
        mask = (row < rows)[:, None]
        offsets = row[:, None] * cols + col[None, :]
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0)
        s = tl.load(s_ptr + col)  # already in w's dtype
        scaled = (w.to(tl.float32) * s.to(tl.float32)).to(w.dtype)  # W * s, rounded as torch rounds it
        fq = _fake_quant_rows(scaled.to(tl.float32), max_int).to(w.dtype)
        out = tl.div_rn(fq.to(tl.float32), s.to(tl.float32)[None, :]).to(w.dtype)
        tl.store(out_ptr + offsets, out, mask=mask)

    @triton.jit
    def _clip_search_kernel(w_ptr, gram_ptr, factor_ptr, best_max_ptr, best_err_ptr, rows, cols, steps, max_int,
                            GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        group = tl.program_id(1)
        k = tl.arange(0, GROUP)
        mask = (row < rows)[:, None]
        w = tl.load(w_ptr + row[:, None] * cols + group * GROUP + k[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gram_ptr + group * GROUP * GROUP + k[:, None] * GROUP + k[None, :])
        org_max = tl.max(tl.abs(w), axis=1)
        best_err = tl.full([BLOCK_ROWS], float("inf"), tl.float32)
        best_max = org_max
        for step in range(steps):
            max_val = org_max * tl.load(factor_ptr + step)
            bound = max_val[:, None]
            delta = _fake_quant_rows(tl.minimum(tl.maximum(w, -bound), bound), max_int) - w
            err = tl.sum(tl.dot(delta, g, input_precision="tf32") * delta, axis=1)
            better = err < best_err
            best_err = tl.where(better, err, best_err)
            best_max = tl.where(better, max_val, best_max)
        out = row * (cols // GROUP) + group
        tl.store(best_max_ptr + out, best_max, mask=row < rows)
        tl.store(best_err_ptr + out, best_err, mask=row < rows)

    @triton.jit
    def _round_block_kernel(w_ptr, s_ptr, steps_ptr, q_ptr, err_ptr, out_features, max_int,
                            COLS: tl.constexpr, BLOCK_OUT: tl.constexpr):
        o = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        c = tl.arange(0, COLS)
        mask = o < out_features
        w = tl.load(w_ptr + c[:, None] * out_features + o[None, :], mask=mask[None, :], other=0.0)
        for j in range(COLS):
            this = c[:, None] == j
            wj = tl.sum(tl.where(this, w, 0.0), axis=0)
            sj = tl.load(s_ptr + j * out_features + o, mask=mask, other=1.0)
            qj = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(wj, sj)), 0.0), max_int)
            ej = wj - qj * sj
            tl.store(q_ptr + j * out_features + o, qj, mask=mask)
            tl.store(err_ptr + j * out_features + o, ej, mask=mask)
            step = tl.load(steps_ptr + j * COLS + c)
            step = tl.where(c > j, step, 0.0)
            w = w - step[:, None] * ej[None, :]


_compiling: Future | None = None
"""compile_ahead's work, until a kernel call has waited for it."""


def compile_ahead(device: torch.device, dtype: torch.dtype, bits: int, group_size: int,
                  gptq_columns: int | None = None) -> None:
    """Start compiling (or reading from Triton's disk cache) the kernels a run on `device` with weights in
    `dtype` will launch, on a worker thread, by launching each once on a small tensor of the same
    specialisation (dtypes, power-of-two tile sizes, sizes divisible by 16). The first kernel call waits for it.
    `gptq_columns`: the GPTQ block size, when the run rounds with GPTQ. Does nothing where the kernels don't
    run (the CPU outside Triton's interpreter, Triton missing, QUANTKIT_TRITON=0)."""
    global _compiling
    device = torch.device(device)
    if _compiling is not None or not available(torch.empty(0, device=device), group_size):
        return

    def launch_each() -> None:
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            gen = torch.Generator(device).manual_seed(0)
            weight = torch.randn(64, 2 * group_size, generator=gen, device=device).to(dtype)
            scales = torch.rand(2 * group_size, generator=gen, device=device).add_(0.5)
            _scaled_fake_quant(weight, scales, bits, group_size)
            grams = torch.eye(group_size, device=device).expand(2, -1, -1)
            _clip_search(weight, grams, [1.0, 0.9], bits, group_size)
            if gptq_columns is not None:
                cols = triton.next_power_of_2(gptq_columns)
                block = torch.randn(cols, 64, generator=gen, device=device)
                _round_block(block, torch.ones_like(block), torch.zeros(cols, cols, device=device),
                             torch.empty_like(block), torch.empty_like(block), 2**bits - 1)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantkit-triton")
    _compiling = pool.submit(launch_each)
    pool.shutdown(wait=False)  # the thread ends with its one task


def _wait_for_compile_ahead() -> None:
    global _compiling
    if _compiling is not None:
        pending, _compiling = _compiling, None
        pending.result()


def scaled_fake_quant(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Q(W * s) / s for `weight` [out, in] and per-input-channel `scales`, in weight's dtype."""
    _wait_for_compile_ahead()
    return _scaled_fake_quant(weight, scales, bits, group_size)


def _scaled_fake_quant(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    rows, cols = weight.shape
    weight = weight.contiguous()
    out = torch.empty_like(weight)
    block_rows = 32
    grid = (triton.cdiv(rows, block_rows), cols // group_size)
    _scaled_fake_quant_kernel[grid](weight, scales.to(weight.dtype).contiguous(), out, rows, cols, float(2**bits - 1),
                                    GROUP=group_size, BLOCK_ROWS=block_rows)
    return out


def clip_search(weight: torch.Tensor, grams: torch.Tensor, factors: list[float], bits: int,
                group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (row, group) of `weight` [out, in], the bound max|w| * factor (first of the best) minimising
    d^T G d, d the fake-quantization error of the clamped group and G its `grams` [groups, gs, gs] slice.
    Returns the bounds and their errors, both float32 [out, groups]."""
    _wait_for_compile_ahead()
    return _clip_search(weight, grams, factors, bits, group_size)


def _clip_search(weight: torch.Tensor, grams: torch.Tensor, factors: list[float], bits: int,
                 group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    weight = weight.contiguous()
    best_max = torch.empty(rows, cols // group_size, dtype=torch.float32, device=weight.device)
    best_err = torch.empty_like(best_max)
    factor = torch.tensor(factors, dtype=torch.float32, device=weight.device)
    block_rows = 32
    grid = (triton.cdiv(rows, block_rows), cols // group_size)
    _clip_search_kernel[grid](weight, grams.float().contiguous(), factor, best_max, best_err, rows, cols,
                              len(factors), float(2**bits - 1), GROUP=group_size, BLOCK_ROWS=block_rows)
    return best_max, best_err


def round_block_(wb: torch.Tensor, sb: torch.Tensor, steps: torch.Tensor, qb: torch.Tensor, err: torch.Tensor,
                 max_int: int) -> None:
    """gptq.round_block_ in one launch: wb, sb, qb, err [cols, out] float32 (contiguous), steps [cols, cols].
    wb is read, not updated (the caller has no further use for it)."""
    _wait_for_compile_ahead()
    _round_block(wb, sb, steps, qb, err, max_int)


def _round_block(wb: torch.Tensor, sb: torch.Tensor, steps: torch.Tensor, qb: torch.Tensor, err: torch.Tensor,
                 max_int: int) -> None:
    cols, out_features = wb.shape
    block_out = 32
    padded = triton.next_power_of_2(cols)
    if padded != cols:  # the last, shorter block: pad with columns that round nothing
        pad = padded - cols
        wb, sb = torch.nn.functional.pad(wb, (0, 0, 0, pad)), torch.nn.functional.pad(sb, (0, 0, 0, pad), value=1.0)
        steps = torch.nn.functional.pad(steps, (0, pad, 0, pad))
        q_full, err_full = torch.empty_like(wb), torch.empty_like(wb)
    else:
        q_full, err_full = qb, err
    grid = (triton.cdiv(out_features, block_out),)
    _round_block_kernel[grid](wb.contiguous(), sb.contiguous(), steps.contiguous(), q_full, err_full, out_features,
                              float(max_int), COLS=padded, BLOCK_OUT=block_out)
    if padded != cols:
        qb.copy_(q_full[:cols])
        err.copy_(err_full[:cols])
