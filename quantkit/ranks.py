"""Several processes ("ranks") that share one job through torch.distributed: starting them, watching them.

`run_ranks` starts one process per rank (multiprocessing spawn), joins them into a process group (gloo on the CPU,
NCCL with one GPU per rank), calls the same function in each with a `RankContext`, and returns rank 0's result.
The calling process only watches: it relays rank 0's messages (progress) to a callback, and when any rank fails
(an exception, or its process dies) it stops the others at once and raises that rank's error, so no rank is left
waiting in a collective. Every collective also has a timeout (`timeout_s`) as a last resort.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from quantkit.errors import DependencyError, InputError, QuantkitError


@dataclass
class RankContext:
    """What a rank knows about the group it runs in."""

    rank: int
    world_size: int
    device: str
    """cpu, or cuda:RANK."""
    reducer: Any
    """A quantkit.awq.reduce.ProcessGroupReducer over the group."""
    _queue: Any = None

    def send(self, message: Any) -> None:
        """Hand `message` (picklable) to the launching process's `on_message`; rank 0's only."""
        if self.rank == 0 and self._queue is not None:
            self._queue.put(("message", self.rank, pickle.loads(pickle.dumps(message))))


class RankFailed(QuantkitError):
    """A rank of a multi-process run raised or died; the message names the rank and its error."""


def check_ranks(world_size: int, device_type: str) -> None:
    """Fail before any work when `world_size` ranks cannot run on `device_type` (cpu or cuda)."""
    if world_size < 1:
        raise InputError(f"{world_size} ranks: use 1 or more.")
    if device_type == "cuda":
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < world_size:
            raise DependencyError(
                f"--gpus {world_size}: only {visible} CUDA GPU(s) visible to torch {torch.__version__} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --gpus {visible} "
                "or fewer, or run on a machine with more GPUs." if visible else
                f"--gpus {world_size}: no CUDA GPU is visible to torch {torch.__version__}; on a CPU use "
                "--cpu-ranks N (gloo) instead.")
    elif device_type != "cpu":
        raise InputError(f"device {device_type!r}: ranks run on cpu (gloo) or cuda (NCCL).")


def run_ranks(target: Callable[..., Any], args: tuple, world_size: int, device_type: str,
              timeout_s: float = 1800.0, on_message: Callable[[Any], None] | None = None,
              threads_per_rank: int | None = None) -> Any:
    """target(RankContext, *args) in `world_size` fresh processes; rank 0's return value.

    `target` and `args` must be picklable (a module-level function). `threads_per_rank`: torch CPU threads in
    each rank (default: the machine's cores shared out). Raises RankFailed (or the rank's own QuantkitError)
    as soon as one rank fails; the others are terminated.
    """
    import torch.multiprocessing as mp

    check_ranks(world_size, device_type)
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    context = mp.get_context("spawn")
    messages = context.Queue()
    with tempfile.TemporaryDirectory(prefix="quantkit-ranks-") as rendezvous:
        init_file = Path(rendezvous) / "init"
        processes = []
        try:
            for rank in range(world_size):
                process = context.Process(
                    target=_rank_main, name=f"quantkit-rank{rank}", daemon=False,
                    args=(rank, world_size, device_type, str(init_file), timeout_s, threads, messages, target, args))
                process.start()
                processes.append(process)
            return _watch(processes, messages, on_message)
        finally:
            for process in processes:  # only after a failure: a finished rank has already exited
                if process.is_alive():
                    process.terminate()
            for process in processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
                    process.join()


def _watch(processes: list, messages: Any, on_message: Callable[[Any], None] | None) -> Any:
    """Relay messages until every rank has exited; rank 0's result, or the first failure raised."""
    result: tuple[bool, Any] = (False, None)
    while True:
        try:
            kind, rank, payload = messages.get(timeout=0.2)
        except queue_module.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(processes) if p.exitcode not in (None, 0)]
            if dead:
                _raise_first_cause(processes, messages, [])
            if all(p.exitcode == 0 for p in processes):
                if not result[0]:
                    raise RankFailed("every rank exited but rank 0 returned no result")
                return result[1]
            continue
        if kind == "message" and on_message is not None:
            on_message(payload)
        elif kind == "result":
            result = (True, pickle.loads(payload))
        elif kind == "error":
            _raise_first_cause(processes, messages, [(rank, payload)])


_SECONDARY = ("gloo", "nccl", "NCCL", "Connection reset", "Connection closed", "DistBackendError", "timed out",
              "Timed out")
"""Words of the errors a rank gets when another rank has gone away: the consequence, not the cause."""


def _raise_first_cause(processes: list, messages: Any, errors: list[tuple[int, Any]], grace_s: float = 3.0) -> None:
    """One rank failed: collect what the others report for a moment (the failing rank's own error may arrive
    after the others' broken-connection errors), then raise the cause: the first error that is not a lost
    connection, else the first error, else the exit code of a rank that died without a word."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not all(p.exitcode is not None for p in processes):
        try:
            kind, rank, payload = messages.get(timeout=0.1)
        except queue_module.Empty:
            continue
        if kind == "error":
            errors.append((rank, payload))
    while True:
        try:
            kind, rank, payload = messages.get_nowait()
        except queue_module.Empty:
            break
        if kind == "error":
            errors.append((rank, payload))
    causes = [(rank, payload) for rank, payload in errors if not any(w in payload[1] for w in _SECONDARY)]
    if causes or errors:
        rank, payload = (causes or errors)[0]
        _raise_rank_error(rank, len(processes), payload)
    dead = [(r, p.exitcode) for r, p in enumerate(processes) if p.exitcode not in (None, 0)]
    rank, code = dead[0] if dead else (-1, None)
    raise RankFailed(f"rank {rank} of {len(processes)} died (exit code {code}: killed, e.g. out of memory?) "
                     "without reporting an error; the other ranks were stopped. (Ranks are started with "
                     "multiprocessing's spawn: a script that starts them must do so under "
                     "`if __name__ == '__main__':`.)")


def _raise_rank_error(rank: int, world_size: int, payload: tuple[bytes | None, str, str]) -> None:
    pickled, text, trace = payload
    error = None
    if pickled is not None:
        try:
            error = pickle.loads(pickled)
        except Exception:  # noqa: BLE001 - an exception class that does not unpickle: keep its text
            error = None
    if isinstance(error, QuantkitError):
        raise error
    raise RankFailed(f"rank {rank} of {world_size} failed: {text}; the other ranks were stopped.\n{trace}")


def _rank_main(rank: int, world_size: int, device_type: str, init_file: str, timeout_s: float, threads: int,
               messages: Any, target: Callable[..., Any], args: tuple) -> None:
    import torch
    import torch.distributed as dist

    from quantkit.awq.reduce import ProcessGroupReducer

    try:
        torch.set_num_threads(threads)
        device = "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{init_file}",
                                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        try:
            context = RankContext(rank, world_size, device, ProcessGroupReducer(), messages)
            result = target(context, *args)
        finally:
            dist.destroy_process_group()
        if rank == 0:  # pickled here, so that a result that cannot cross is this rank's error, not a lost put
            messages.put(("result", rank, pickle.dumps(result)))
    except BaseException as err:  # noqa: BLE001 - every failure goes to the launcher, which stops the others
        try:
            pickled = pickle.dumps(err)
        except Exception:  # noqa: BLE001 - an unpicklable exception: send its text
            pickled = None
        messages.put(("error", rank, (pickled, f"{type(err).__name__}: {err}", traceback.format_exc())))
        messages.close()
        messages.join_thread()
        os._exit(1)
    messages.close()
    messages.join_thread()
