"""The two AWQ searches on one decoder layer's captured activations: per-group scales, per-linear clipping.

Activations arrive as lists of micro-batches (each [..., features]); losses are mean squared errors over all
output elements, as in AutoAWQ. Where the inspected block is a single linear, the error of a candidate weight
W' is computed exactly from the inputs' Gram matrix, (W' - W) G (W' - W)^T, instead of re-running the matmul
over every token: fewer FLOPs and no cancellation between two rounded outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from quantkit.awq import kernels
from quantkit.awq.quant import fake_quantize, fake_quantize_groups_
from quantkit.awq.reduce import BatchLayout, Reducer, summed, summed_count
from quantkit.awq.settings import QuantSettings


def channel_mean_abs(batches: Sequence[torch.Tensor], reducer: Reducer | None = None) -> torch.Tensor:
    """Mean |x| per input channel over every token of every micro-batch (of every rank), float32 [features]."""
    total = summed((x.reshape(-1, x.shape[-1]).abs().float().sum(dim=0) for x in batches), reducer, torch.float64)
    count = summed_count(sum(x.numel() // x.shape[-1] for x in batches), reducer)
    return (total / count).float()


def weight_channel_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's max |w|, per input channel (AutoAWQ's w_mean)."""
    w = torch.cat([wt.float() for wt in weights], dim=0)
    g = w.abs().reshape(-1, group_size)
    g = g / (g.amax(dim=1, keepdim=True) + 1e-6)
    return g.reshape(w.shape).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float, duo: bool) -> torch.Tensor:
    """Per-channel scale for exponent `ratio`, normalised so that max * min = 1."""
    if duo:
        s = x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)
    else:
        s = x_mean.pow(ratio)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quant(weight: torch.Tensor, scales: torch.Tensor, settings: QuantSettings) -> torch.Tensor:
    """Q(W * s) / s: the effective weight once the input is divided by s and W's columns multiplied by s."""
    if kernels.available(weight, settings.group_size):
        return kernels.scaled_fake_quant(weight, scales, settings.bits, settings.group_size)
    s = scales.to(weight.dtype)
    return fake_quantize(weight * s, settings.bits, settings.group_size) / s


@dataclass(frozen=True)
class ScaleChoice:
    ratio: float
    scales: torch.Tensor  # float32 [in_features]
    loss: float
    losses: tuple[float, ...]  # one per grid point


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32; 16-bit operands stay 16-bit on CUDA (tensor cores)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return a.float() @ b.float()


def gram(batches: Sequence[torch.Tensor], reducer: Reducer | None = None) -> tuple[torch.Tensor, int]:
    """X^T X over every token of every rank (float32 per micro-batch, summed in float64), float32, and the
    token count."""
    flats = [x.reshape(-1, x.shape[-1]) for x in batches]
    total = summed((_mm_float32(flat.t(), flat) for flat in flats), reducer)
    return total, summed_count(sum(flat.shape[0] for flat in flats), reducer)


def search_scales_linear(
    weight: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    x_mean: torch.Tensor,
    settings: QuantSettings,
    max_candidates_bytes: int = 2 * 2**30,
    input_gram: tuple[torch.Tensor, int] | None = None,
    reducer: Reducer | None = None,
) -> ScaleChoice:
    """Scale search for a group whose inspected block is the single linear `weight` [out, in].

    `input_gram`: gram(inputs, reducer), when the caller keeps it for later use. The losses come from the
    (reduced) Gram matrix alone, so every rank computes the same ones."""
    g, tokens = input_gram if input_gram is not None else gram(inputs, reducer)
    # On a GPU the (W' - W) G products run in the weight's 16-bit dtype: W' - W is small, so its rounding
    # is relative to the error itself, and the sums accumulate in float32.
    product_dtype = weight.dtype if weight.is_cuda else torch.float32
    g = g.to(product_dtype)
    w_mean = weight_channel_mean([weight], settings.group_size)
    ratios = [i / settings.scale_grid for i in range(settings.scale_grid)]
    per_batch = max(1, max_candidates_bytes // (weight.numel() * 4 * 2))
    losses: list[float] = []
    w32 = weight.float()
    for start in range(0, len(ratios), per_batch):
        chunk = ratios[start : start + per_batch]
        deltas = torch.stack(
            [
                scaled_fake_quant(weight, candidate_scales(x_mean, w_mean, r, settings.duo_scaling), settings).float()
                - w32
                for r in chunk
            ]
        )
        projected = (deltas.to(product_dtype) @ g).float()
        errs = (projected * deltas).sum(dim=(1, 2)) / (tokens * weight.shape[0])
        losses.extend(errs.tolist())
    return _best(ratios, losses, x_mean, w_mean, settings)


def screening_subset(
    batches: Sequence[torch.Tensor], max_tokens: int, whole_batches: bool, layout: BatchLayout | None = None
) -> list[tuple[int, torch.Tensor]] | None:
    """About `max_tokens` tokens of whole sequences, spread evenly over the micro-batches [B, L, F], as
    (micro-batch index, activations) pairs; None when that is all of them.

    Whole sequences keep attention meaningful and every position represented (a token stride would oversample
    position 0, the attention sink). `whole_batches` picks whole micro-batches instead, for blocks that need
    each micro-batch's own layer kwargs (masks, rotary tables). With a `layout` (several ranks), the subset is
    chosen over every rank's micro-batches, as one process would, and each rank gets its own part of it (maybe
    none); the indices are local.
    """
    layout = layout or BatchLayout.local(batches)
    total = sum(rows * length for rows, length in layout.shapes)
    if total <= max_tokens:
        return None
    n_batches = len(layout.shapes)
    if whole_batches:
        count = math.ceil(max_tokens / (total / n_batches))
        if count >= n_batches:
            return None
        chosen = {round(j * n_batches / count) for j in range(count)}
        return [(k, x) for k, (j, x) in enumerate(zip(layout.positions, batches)) if j in chosen]
    stride = math.ceil(total / max_tokens)
    starts = layout.starts("rows")
    picked = []
    for k, (j, x) in enumerate(zip(layout.positions, batches)):
        rows = [r for r in range(x.shape[0]) if (starts[j] + r) % stride == 0]
        if rows:
            picked.append((k, x[rows]))
    return picked


def gram_scoring_is_cheaper(tokens: int, weight_shape: Sequence[int], settings: QuantSettings) -> bool:
    """Whether a single linear's scale grid costs fewer FLOPs scored through its inputs' Gram matrix (build it,
    then one out x in x in product per grid point) than by re-running the linear over the tokens (screened as
    `settings` says). Few tokens or a narrow input favour the Gram matrix; 65k tokens into a 7B MLP's down
    projection do not."""
    out_features, in_features = weight_shape
    grid = settings.scale_grid
    through_gram = (tokens + grid * out_features) * in_features * in_features
    screen = settings.scale_screen_tokens
    token_runs = grid * tokens if screen is None or tokens <= screen else grid * screen + settings.scale_finalists * tokens
    return through_gram <= token_runs * out_features * in_features


def search_scales_block(
    linears: Sequence[torch.nn.Linear],
    inputs: Sequence[torch.Tensor],
    x_mean: torch.Tensor,
    run_block: Callable[[int, torch.Tensor], torch.Tensor],
    settings: QuantSettings,
    screen: Sequence[tuple[int, torch.Tensor]] | None = None,
    reducer: Reducer | None = None,
    reference: Sequence[torch.Tensor] | None = None,
) -> ScaleChoice:
    """Scale search for a group inspected through a block (attention, MLP, or a single linear): the block is
    re-run per grid point.

    `run_block(i, x)` runs the block on micro-batch i (or on rows of it). With a `screen` (screening_subset),
    every grid point is scored on it first and only the `settings.scale_finalists` best on all inputs: the
    loss curve over the grid is smooth, so the full set's best is among the screen's few best at a fraction of
    the FLOPs. The other grid points' `losses` are then NaN. `reference`: the block's 16-bit outputs on every
    micro-batch, when the layer's own forward already computed them (saves one run over every token).
    The linears' weights are restored before returning.

    With a `reducer`, each candidate's squared-error sum and element count are added over the ranks (float64)
    before any ranking: the finalists and the choice are the same on every rank.
    """
    w_mean = weight_channel_mean([lin.weight for lin in linears], settings.group_size)
    originals = [lin.weight.data.clone() for lin in linears]
    ratios = [i / settings.scale_grid for i in range(settings.scale_grid)]

    def score(candidates: list[int], batches: Sequence[tuple[int, torch.Tensor]],
              reference: Sequence[torch.Tensor] | None = None) -> list[float]:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
        if reference is None:
            reference = [run_block(i, x) for i, x in batches]
        sums = []
        for c in candidates:
            s = candidate_scales(x_mean, w_mean, ratios[c], settings.duo_scaling)
            for lin, w in zip(linears, originals):
                lin.weight.data = scaled_fake_quant(w, s, settings)
            err = torch.zeros((), dtype=torch.float64, device=x_mean.device)
            count = 0
            for (i, x), ref in zip(batches, reference):
                diff = run_block(i, x).float().sub_(ref).view(-1)
                err += torch.dot(diff, diff)
                count += diff.numel()
            sums.append(torch.stack([err, torch.tensor(float(count), dtype=torch.float64, device=err.device)]))
        total = summed([torch.stack(sums)], reducer, torch.float64).tolist()  # [candidates, (error, count)]
        return [err / count if count else math.nan for err, count in total]

    everything = list(enumerate(inputs))
    try:
        if screen is None:
            losses = score(list(range(len(ratios))), everything, reference)
        else:
            screened = score(list(range(len(ratios))), screen)
            ranked = sorted(range(len(ratios)), key=lambda c: (not math.isfinite(screened[c]), screened[c], c))
            finalists = sorted(ranked[: settings.scale_finalists])
            losses = [math.nan] * len(ratios)
            for c, loss in zip(finalists, score(finalists, everything, reference)):
                losses[c] = loss
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    return _best(ratios, losses, x_mean, w_mean, settings)


def _best(
    ratios: list[float], losses: list[float], x_mean: torch.Tensor, w_mean: torch.Tensor, settings: QuantSettings
) -> ScaleChoice:
    finite = [(loss, i) for i, loss in enumerate(losses) if math.isfinite(loss)]
    if not finite:
        raise FloatingPointError("every scale candidate gave a non-finite loss (NaN/Inf activations?)")
    best_loss, best = min(finite)  # ties -> the smallest ratio, as AutoAWQ's strict '<'
    scales = candidate_scales(x_mean, w_mean, ratios[best], settings.duo_scaling)
    return ScaleChoice(ratio=ratios[best], scales=scales, loss=best_loss, losses=tuple(losses))


def strided_token_batches(batches: Sequence[torch.Tensor], max_tokens: int,
                          layout: BatchLayout | None = None) -> list[torch.Tensor]:
    """Every k-th token of the concatenated micro-batches (of every rank, by `layout`), k = max(1, total //
    max_tokens) (AutoAWQ's sampling), as one [tokens, features] tensor per local micro-batch."""
    layout = layout or BatchLayout.local(batches)
    total = sum(rows * length for rows, length in layout.shapes)
    step = max(1, total // max_tokens)
    starts = layout.starts("tokens")
    return [x.reshape(-1, x.shape[-1])[(-starts[j]) % step :: step] for j, x in zip(layout.positions, batches)]


def strided_tokens(batches: Sequence[torch.Tensor], max_tokens: int) -> torch.Tensor:
    """strided_token_batches of one process, concatenated."""
    return torch.cat(strided_token_batches(batches, max_tokens), dim=0)


def group_grams(batches: Sequence[torch.Tensor], group_size: int, reducer: Reducer | None = None) -> torch.Tensor:
    """Mean over every token (of every rank) of x_g^T x_g per input-channel group g, float32 [groups, gs, gs]:
    the block diagonal of X^T X / n, which is all the clip search's loss needs (n * in * gs FLOPs, no token
    subsample)."""
    flats = [x.reshape(-1, x.shape[-1]) for x in batches]

    def part(flat: torch.Tensor) -> torch.Tensor:
        g = flat.reshape(flat.shape[0], -1, group_size).transpose(0, 1).float()  # [groups, n, gs]
        return g.transpose(1, 2) @ g

    total = summed((part(flat) for flat in flats), reducer, torch.float64)
    return (total / summed_count(sum(flat.shape[0] for flat in flats), reducer)).float()


def clip_grams(batches: Sequence[torch.Tensor], settings: QuantSettings, reducer: Reducer | None = None,
               layout: BatchLayout | None = None) -> torch.Tensor:
    """What the clip search scores with: group_grams of every token, or of `settings.clip_tokens` strided ones
    (picked over every rank's micro-batches by `layout`)."""
    if settings.clip_tokens is not None:
        batches = strided_token_batches(batches, settings.clip_tokens, layout)
    return group_grams(batches, settings.group_size, reducer)


def search_clip(
    weight: torch.Tensor, batches: Sequence[torch.Tensor], settings: QuantSettings, grams: torch.Tensor | None = None,
    reducer: Reducer | None = None, layout: BatchLayout | None = None,
) -> tuple[torch.Tensor, float]:
    """Per (output row, group) clip bound max|w| * (1 - k / grid), k < grid * max_shrink, minimising the
    group's partial-output error on the input micro-batches (every token, or `settings.clip_tokens` strided
    ones). `grams`: clip_grams(batches, settings, reducer, layout), when linears fed the same input already
    computed it. Returns the bound [out, groups] and the mean error."""
    if grams is None:
        grams = clip_grams(batches, settings, reducer, layout)
    factors = [1 - step / settings.clip_grid for step in range(int(settings.clip_max_shrink * settings.clip_grid))]
    if kernels.available(weight, settings.group_size):
        best_max, best_err = kernels.clip_search(weight, grams, factors, settings.bits, settings.group_size)
        return best_max, best_err.mean().item()
    out_features, in_features = weight.shape
    gs = settings.group_size
    groups = in_features // gs
    w = weight.float().reshape(out_features, groups, gs).transpose(0, 1).contiguous()  # [groups, out, gs]
    org_max = w.abs().amax(dim=-1)  # [groups, out]
    best_err = torch.full_like(org_max, float("inf"))
    best_max = org_max.clone()
    for factor in factors:
        max_val = org_max * factor
        bound = max_val.unsqueeze(-1)
        delta = fake_quantize_groups_(torch.clamp(w, -bound, bound), settings.bits).sub_(w)
        err = (torch.bmm(delta, grams) * delta).sum(dim=-1)  # [groups, out]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max.t().contiguous(), best_err.mean().item()


def apply_clip(weight: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """Clamp each (row, group) of `weight` to [-max_val, max_val]; returns a new tensor in weight's dtype."""
    out_features, in_features = weight.shape
    w = weight.reshape(out_features, in_features // group_size, group_size)
    bound = max_val.to(weight.dtype).unsqueeze(-1)
    return torch.maximum(torch.minimum(w, bound), -bound).reshape(weight.shape)
