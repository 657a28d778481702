"""Sums over calibration tokens that several processes share: the engine's one seam to torch.distributed.

Every statistic the searches use is a sum over calibration tokens (channel means, Gram matrices, each scale
candidate's squared error, the clip search's group Gram matrices, GPTQ's Hessians, the layer's output error).
With the micro-batches dealt out to several ranks, each rank sums its own share and a `Reducer` adds the shares
up; everything chosen from the sums (scales, clip bounds, integers) is then the same on every rank.

Sums over micro-batches accumulate in float64: each micro-batch's float32 part is computed exactly as one process
would compute it, and float64 holds the sum of a few float32 values exactly (or within 1e-16 of it), so the order
in which shares are added does not change the float32 result the searches see: N ranks choose what one does.

The default `Reducer()` is one process: nothing is exchanged. Pure torch; no launching, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


class Reducer:
    """One process: the local sums are the global ones."""

    rank: int = 0
    world_size: int = 1

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Add `tensor` over every rank, in place; returns it."""
        return tensor


class ProcessGroupReducer(Reducer):
    """Sums with torch.distributed.all_reduce over `group` (gloo on the CPU, NCCL on GPUs; None: the default
    group). Every rank must call the engine with the same settings and weights, so that the collectives match."""

    def __init__(self, group: object | None = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self.group)
        return tensor


SINGLE = Reducer()


def summed(parts: Iterable[torch.Tensor], reducer: Reducer | None = None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sum of `parts` (a rank's per-micro-batch partial sums, at least one) over every rank, in `dtype`.

    Accumulated in float64 where more than one part is added (see the module's docstring); a single part on a
    single process is returned as is (float32 -> float64 -> float32 is exact, so nothing is lost skipping it)."""
    reducer = reducer or SINGLE
    total: torch.Tensor | None = None
    for part in parts:
        if total is None:
            total = part
        else:
            if total.dtype != torch.float64:
                total = total.double()
            total += part
    if total is None:
        raise ValueError("no calibration micro-batch on this rank: give every rank at least one")
    if reducer.world_size > 1:
        total = reducer.sum_(total.double())
    return total.to(dtype)


def summed_count(count: int, reducer: Reducer | None = None) -> int:
    """`count` (tokens, elements) added over every rank."""
    reducer = reducer or SINGLE
    if reducer.world_size == 1:
        return count
    return int(reducer.sum_(torch.tensor([float(count)], dtype=torch.float64, device=_device(reducer))).item())


def _device(reducer: Reducer) -> torch.device:
    """Where a collective's tensors live: NCCL needs the rank's GPU, gloo the CPU."""
    backend = ""
    if isinstance(reducer, ProcessGroupReducer):
        backend = str(reducer._dist.get_backend(reducer.group))
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


@dataclass(frozen=True)
class BatchLayout:
    """Where a rank's micro-batches sit among everyone's: `positions[k]` is the global index of local
    micro-batch k; `shapes[j]` is (sequences, tokens per sequence) of global micro-batch j. Token subsets that
    depend on a token's global position (the screening subset, the clip search's strided tokens) use it to pick
    on every rank exactly the tokens one process would pick."""

    positions: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]

    @staticmethod
    def local(batches: Sequence[torch.Tensor]) -> BatchLayout:
        """One process holding every micro-batch."""
        return BatchLayout(tuple(range(len(batches))), tuple((x.shape[0], x.shape[1]) for x in batches))

    def starts(self, unit: str) -> list[int]:
        """First global sequence ("rows") or token ("tokens") of each global micro-batch."""
        starts, at = [], 0
        for rows, length in self.shapes:
            starts.append(at)
            at += rows if unit == "rows" else rows * length
        return starts


def strided_positions(count: int, rank: int, world_size: int) -> list[int]:
    """The global micro-batch indices rank `rank` takes out of `count`: every world_size-th from `rank`
    (strided, so text blocks and image samples are spread evenly)."""
    return list(range(rank, count, world_size))


def batch_layout(batches: Sequence[torch.Tensor], reducer: Reducer | None = None,
                 positions: Sequence[int] | None = None) -> BatchLayout:
    """Every rank's view of the global micro-batch list (two small collectives). `positions`: the global index
    of each local micro-batch (default: strided_positions, the share quantkit.quantize hands each rank)."""
    reducer = reducer or SINGLE
    if reducer.world_size == 1:
        return BatchLayout.local(batches)
    total = summed_count(len(batches), reducer)
    if positions is None:
        positions = strided_positions(total, reducer.rank, reducer.world_size)
    if len(positions) != len(batches):
        raise ValueError(f"{len(batches)} micro-batches on rank {reducer.rank} but {len(positions)} positions")
    shapes = torch.zeros(total, 2, dtype=torch.float64, device=_device(reducer))
    for k, x in zip(positions, batches):
        shapes[k, 0], shapes[k, 1] = x.shape[0], x.shape[1]
    reducer.sum_(shapes)
    return BatchLayout(tuple(positions), tuple((int(b), int(n)) for b, n in shapes.tolist()))
