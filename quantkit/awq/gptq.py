"""Error-compensated rounding (the GPTQ update) onto a fixed group grid: pure torch, no I/O.

The AWQ searches fix each (row, group)'s scale and zero; round-to-nearest then rounds every weight on its own.
Here the columns are rounded one at a time and each column's rounding error is pushed onto the columns not yet
rounded, weighted by the inverse of the inputs' Gram matrix H = X^T X, which minimises the increase of
||(W - Q) X||^2 column by column (Frantar & Alistarh's optimal brain quantization, GPTQ's form).

Columns go in order of falling input energy (diag H, "act-order"): the columns whose error costs most are
rounded first, while the most columns are left to absorb it. Every column keeps its own group's scale and zero,
fixed before any rounding ("static groups"), so the groups stay contiguous with one scale and zero each: the
AutoAWQ GEMM layout, whatever the order. On SmolLM2-135M this order lowers perplexity by 0.40 over input order
(docs/benchmarks.md).

Per block of columns, each weight is shifted by its zero (w + z s), so a column rounds as clamp(round(w / s))
and its error is w - q s; updates reach the rest of the block column by column and later blocks once per block
(lazy batch updates: few large matmuls instead of one small one per column).
"""

from __future__ import annotations

import functools

import torch

from quantkit.awq import kernels
from quantkit.awq.quant import GroupQuant


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so H^-1 = U^T U), float32.

    With J the order reversal, J H J = L L^T gives H = R R^T with R = J L J upper triangular, so U = R^-1: one
    factorisation and one triangular inversion, instead of factorising, inverting and factorising again. On the
    CPU R^-1 comes from one IEEE float32 solve (the halves are faster there too, but round differently, and
    SmolLM2's documented awq-gptq perplexities come from the solve). Columns no token ever reaches (diag 0) get
    diag 1: their error then moves nowhere. Float32 first, float64 where float32 is not positive definite enough.
    """
    h = hessian.float().clone()
    h.diagonal()[torch.diagonal(h) <= 0] = 1
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    for dtype in (torch.float32, torch.float64):
        lower, info = torch.linalg.cholesky_ex(h.to(dtype).flip(0, 1))
        if info.item() == 0:
            upper = lower.flip(0, 1)
            if upper.is_cuda:  # by halves: TF32 products, ~2.4x faster than the solve at n = 18,944 (H200)
                return upper_triangular_inverse(upper).float()
            identity = torch.eye(h.shape[0], dtype=dtype, device=h.device)
            return torch.linalg.solve_triangular(upper, identity, upper=True).float()
    raise FloatingPointError(f"the inputs' Gram matrix is not positive definite even in float64 with "
                             f"gptq_damp={damp}; raise gptq_damp")


def upper_triangular_inverse(r: torch.Tensor, base: int = 1024) -> torch.Tensor:
    """R^-1 for an upper triangular R, by halves: [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]].

    A triangular solve against the identity spends n^3 FLOPs, most on zeros; the halves spend ~2 n^3 / 3, in
    matrix products: TF32 tensor cores where the caller allows them (the engine on a GPU).
    """
    n = r.shape[0]
    if n <= base:
        return torch.linalg.solve_triangular(r, torch.eye(n, dtype=r.dtype, device=r.device), upper=True)
    k = n // 2 // 128 * 128 or n // 2  # a split on a 128 boundary keeps the products' tiles whole
    a_inv, c_inv = upper_triangular_inverse(r[:k, :k], base), upper_triangular_inverse(r[k:, k:], base)
    inverse = torch.zeros_like(r)
    inverse[:k, :k] = a_inv
    inverse[k:, k:] = c_inv
    inverse[:k, k:] = (a_inv @ r[:k, k:]) @ c_inv
    inverse[:k, k:].neg_()
    return inverse


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, grid: GroupQuant, damp: float, block_size: int,
               bits: int = 4, act_order: bool = True) -> GroupQuant:
    """Integers for `weight` [out, in] on `grid`'s scales and zeros, with error compensation through `hessian`.

    `block_size` columns share one lazy update. `act_order` False keeps the input order. Returns a GroupQuant
    with grid's scales and zeros.
    """
    out_features, in_features = weight.shape
    group_size = in_features // grid.scales.shape[1]
    max_int = 2**bits - 1
    device = weight.device
    hessian = hessian.to(device)
    if act_order:
        order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        hessian = hessian[order][:, order]
    else:
        order = torch.arange(in_features, device=device)
    u = inverse_hessian_factor(hessian, damp)
    column_group = order // group_size
    col_scales = grid.scales.to(device).float()[:, column_group].t().contiguous()  # [in, out], in rounding order
    col_shift = (grid.zeros.to(device).float()[:, column_group].t() * col_scales).contiguous()
    w = weight.float()[:, order].t().contiguous()  # [in, out]: column j is row j, contiguous
    q = torch.empty_like(w)
    for b0 in range(0, in_features, block_size):
        b1 = min(b0 + block_size, in_features)
        wb = w[b0:b1].add_(col_shift[b0:b1])  # a view: w + z s, the zero folded in
        sb = col_scales[b0:b1]
        qb = q[b0:b1]
        ub = u[b0:b1, b0:b1]
        d = torch.diagonal(ub)
        steps = ub / d.unsqueeze(1)  # row j: how column j's error moves onto the later columns
        err = torch.empty_like(wb)
        if kernels.available(wb):
            kernels.round_block_(wb, sb, steps, qb, err, max_int)
        elif device.type == "cuda":
            _graphed_block(b1 - b0, out_features, device, max_int)(wb, sb, steps, qb, err)
        else:
            round_block_(wb, sb, steps, qb, err, max_int)
        if b1 < in_features:
            w[b1:].addmm_(u[b0:b1, b1:].t(), err.div_(d.unsqueeze(1)), alpha=-1)
    integers = torch.empty_like(q)
    integers[order] = q
    return GroupQuant(q=integers.t().to(torch.int64), scales=grid.scales, zeros=grid.zeros)


def round_block_(wb: torch.Tensor, sb: torch.Tensor, steps: torch.Tensor, qb: torch.Tensor, err: torch.Tensor,
                 max_int: int) -> None:
    """One block's column loop, in place: integers into qb, each column's error (weight units) into err.

    wb and sb are [cols, out] (weights with the zero folded in, scales); steps [cols, cols]. Allocates nothing,
    so a CUDA graph can hold it.
    """
    cols = wb.shape[0]
    for j in range(cols):
        torch.div(wb[j], sb[j], out=qb[j])
        qb[j].round_().clamp_(0, max_int)
        torch.addcmul(wb[j], qb[j], sb[j], value=-1, out=err[j])
        if j + 1 < cols:
            wb[j + 1 :].addr_(steps[j, j + 1 :], err[j], alpha=-1)


class _GraphedBlock:
    """round_block_ captured once per (cols, out) as a CUDA graph and replayed per block.

    The loop is ~5 tiny kernels per column (29,696 columns per MiniCPM-V 2.6 layer): eager launches cost more
    than the arithmetic. A replay launches the whole block at once from static buffers.
    """

    def __init__(self, cols: int, out_features: int, device: torch.device, max_int: int) -> None:
        self.wb = torch.zeros(cols, out_features, device=device)
        self.sb = torch.ones(cols, out_features, device=device)
        self.steps = torch.zeros(cols, cols, device=device)
        self.qb = torch.zeros(cols, out_features, device=device)
        self.err = torch.zeros(cols, out_features, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
            round_block_(self.wb, self.sb, self.steps, self.qb, self.err, max_int)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            round_block_(self.wb, self.sb, self.steps, self.qb, self.err, max_int)

    def __call__(self, wb: torch.Tensor, sb: torch.Tensor, steps: torch.Tensor, qb: torch.Tensor,
                 err: torch.Tensor) -> None:
        self.wb.copy_(wb)
        self.sb.copy_(sb)
        self.steps.copy_(steps)
        self.graph.replay()
        qb.copy_(self.qb)
        err.copy_(self.err)


@functools.lru_cache(maxsize=8)
def _graphed_block(cols: int, out_features: int, device: torch.device, max_int: int) -> _GraphedBlock:
    """One graph per block shape: a layer has three or four (q/k/v, o, gate/up, down), the same in every layer."""
    return _GraphedBlock(cols, out_features, device, max_int)


def gptq_round_shared(weights: list[torch.Tensor], hessian: torch.Tensor, grids: list[GroupQuant], damp: float,
                      block_size: int, bits: int = 4, act_order: bool = True) -> list[GroupQuant]:
    """gptq_round on linears fed the same input (q/k/v, gate/up) as one stacked weight: one column loop."""
    stacked = GroupQuant(q=torch.cat([g.q for g in grids]), scales=torch.cat([g.scales for g in grids]),
                         zeros=torch.cat([g.zeros for g in grids]))
    rounded = gptq_round(torch.cat(weights), hessian, stacked, damp, block_size, bits, act_order)
    rows = [w.shape[0] for w in weights]
    return [GroupQuant(q=q, scales=g.scales, zeros=g.zeros) for q, g in zip(rounded.q.split(rows), grids)]
