"""Error-compensated rounding (the GPTQ update) onto a fixed group grid: pure torch, no I/O.

The AWQ searches fix each (row, group)'s scale and zero; round-to-nearest then rounds every weight on its own.
Here the columns are rounded one at a time in input order and each column's rounding error is pushed onto the
columns not yet rounded, weighted by the inverse of the inputs' Gram matrix H = X^T X, which minimises the
increase of ||(W - Q) X||^2 column by column (Frantzen & Alistarh's optimal brain quantization, GPTQ's form).
Groups stay contiguous with one scale and zero each (no act-order), so the result is the AutoAWQ GEMM layout.

Work happens in each group's own units (w / s + z): rounding is then round + clamp, and the update inside a
group is a rank-1 update of plain numbers. Updates reach later groups of the same block once per group, and
later blocks once per block (lazy batch updates: few large matmuls instead of one small one per column).
"""

from __future__ import annotations

import torch

from quantkit.awq.quant import GroupQuant, min_max_grid


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, float32.

    Columns no token ever reaches (diag 0) get diag 1: their error then moves nowhere. Float32 first, float64
    where float32 is not positive definite enough to factor.
    """
    h = hessian.float().clone()
    h.diagonal()[torch.diagonal(h) <= 0] = 1
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    for dtype in (torch.float32, torch.float64):
        lower, info = torch.linalg.cholesky_ex(h.to(dtype))
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0:
                return upper.float()
    raise FloatingPointError(f"the inputs' Gram matrix is not positive definite even in float64 with "
                             f"gptq_damp={damp}; raise gptq_damp")


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, grid: GroupQuant, damp: float, block_size: int,
               bits: int = 4, regrid_bounds: torch.Tensor | None = None) -> GroupQuant:
    """Integers for `weight` [out, in] on `grid`'s scales and zeros, with error compensation through `hessian`.

    `block_size` columns share one lazy update (a multiple of the group size). With `regrid_bounds`
    ([out, groups], the clip bounds; inf where unclipped), each group's scale and zero are instead set when its
    first column is reached, by min-max of the error-updated weights clipped to the bound: the earlier groups'
    compensation has moved them, and a grid fitted before would clamp them.
    """
    out_features, in_features = weight.shape
    groups = grid.scales.shape[1]
    gs = in_features // groups
    if block_size % gs:
        raise ValueError(f"gptq block size {block_size} is not a multiple of the group size {gs}")
    max_int = 2**bits - 1
    u = inverse_hessian_factor(hessian, damp).to(weight.device)
    scales = grid.scales.to(weight.device, copy=True)
    zeros = grid.zeros.to(weight.device, torch.float32, copy=True)
    w = weight.float().clone()
    q = torch.empty_like(w)
    for b0 in range(0, in_features, block_size):
        b1 = min(b0 + block_size, in_features)
        block_err = torch.empty(out_features, b1 - b0, device=w.device)  # scaled error / U[j, j], weight units
        for g0 in range(b0, b1, gs):
            g1 = g0 + gs
            k = g0 // gs
            if regrid_bounds is not None:
                bound = regrid_bounds[:, k : k + 1].to(w.device, torch.float32)
                scales[:, k], zeros[:, k] = min_max_grid(torch.maximum(torch.minimum(w[:, g0:g1], bound), -bound), bits)
            s = scales[:, k : k + 1].float()
            z = zeros[:, k : k + 1]
            units = w[:, g0:g1].div(s).add_(z).t().contiguous()  # [gs, out] in the group's steps, rows contiguous
            u_group = u[g0:g1, g0:g1]
            d = torch.diagonal(u_group)
            steps = u_group / d.unsqueeze(1)  # row j: how column j's error moves onto the later columns
            rounded = torch.empty_like(units)
            err = torch.empty_like(units)
            for j in range(gs):
                torch.round(units[j], out=rounded[j])
                rounded[j].clamp_(0, max_int)
                torch.sub(units[j], rounded[j], out=err[j])
                if j + 1 < gs:
                    units[j + 1 :].addr_(steps[j, j + 1 :], err[j], alpha=-1)
            q[:, g0:g1] = rounded.t()
            err = err.t()
            group_err = err.mul_(s).div_(d)
            block_err[:, g0 - b0 : g1 - b0] = group_err
            if g1 < b1:
                w[:, g1:b1].addmm_(group_err, u[g0:g1, g1:b1], alpha=-1)
        if b1 < in_features:
            w[:, b1:].addmm_(block_err, u[b0:b1, b1:], alpha=-1)
    return GroupQuant(q=q.to(torch.int64), scales=scales.to(grid.scales.device),
                      zeros=zeros.to(grid.zeros.device, torch.int64))


def gptq_round_shared(weights: list[torch.Tensor], hessian: torch.Tensor, grids: list[GroupQuant], damp: float,
                      block_size: int, bits: int = 4,
                      regrid_bounds: list[torch.Tensor] | None = None, act_order: bool = False) -> list[GroupQuant]:
    """gptq_round on linears fed the same input (q/k/v, gate/up) as one stacked weight: one column loop."""
    stacked = GroupQuant(q=torch.cat([g.q for g in grids]), scales=torch.cat([g.scales for g in grids]),
                         zeros=torch.cat([g.zeros for g in grids]))
    bounds = None if regrid_bounds is None else torch.cat(regrid_bounds)
    if act_order:
        rounded = gptq_round_act_order(torch.cat(weights), hessian, stacked, damp, block_size, bits)
    else:
        rounded = gptq_round(torch.cat(weights), hessian, stacked, damp, block_size, bits, bounds)
    rows = [w.shape[0] for w in weights]
    return [GroupQuant(q=q, scales=s, zeros=z)
            for q, s, z in zip(rounded.q.split(rows), rounded.scales.split(rows), rounded.zeros.split(rows))]


@torch.no_grad()
def gptq_round_act_order(weight: torch.Tensor, hessian: torch.Tensor, grid: GroupQuant, damp: float,
                         block_size: int, bits: int = 4) -> GroupQuant:
    """gptq_round with the columns taken in order of falling input energy (diag H), on grid's fixed groups.

    The columns whose rounding error costs most are rounded first, while the most columns are left to absorb
    it; each column keeps its own group's scale and zero, so the layout stays contiguous groups.
    """
    out_features, in_features = weight.shape
    gs = in_features // grid.scales.shape[1]
    max_int = 2**bits - 1
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True).to(weight.device)
    h = hessian.to(weight.device)[order][:, order]
    u = inverse_hessian_factor(h, damp)
    col_scales = grid.scales.float().to(weight.device).repeat_interleave(gs, dim=1)[:, order]
    col_zeros = grid.zeros.float().to(weight.device).repeat_interleave(gs, dim=1)[:, order]
    w = weight.float()[:, order].contiguous()
    q = torch.empty_like(w)
    for b0 in range(0, in_features, block_size):
        b1 = min(b0 + block_size, in_features)
        wb = w[:, b0:b1].t().contiguous()  # [cols, out]
        ub = u[b0:b1, b0:b1]
        errs = torch.empty_like(wb)
        for j in range(b1 - b0):
            s, z = col_scales[:, b0 + j], col_zeros[:, b0 + j]
            qj = torch.round(wb[j] / s).add_(z).clamp_(0, max_int)
            q[:, b0 + j] = qj
            errs[j] = (wb[j] - (qj - z) * s) / ub[j, j]
            if j + 1 < b1 - b0:
                wb[j + 1 :].addr_(ub[j, j + 1 :], errs[j], alpha=-1)
        if b1 < in_features:
            w[:, b1:].addmm_(errs.t(), u[b0:b1, b1:], alpha=-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(in_features, device=order.device)
    return GroupQuant(q=q[:, inverse].to(torch.int64), scales=grid.scales, zeros=grid.zeros)
