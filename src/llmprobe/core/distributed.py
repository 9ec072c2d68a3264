"""The world of a run launched on several processes by ``torchrun`` or ``accelerate launch``.

llmprobe does not bring its own engine: it reads the rank and world size from
``torch.distributed`` (initialised from the ``env://`` variables the launchers set: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and offers three kinds of helpers:

* **sharding** — :func:`share` (a contiguous block of a list: calibration and evaluation batches,
  so every batch holds the same windows as in a single-process run) and
  :func:`shard_by_cost` (greedy longest-processing-time: weight matrices balanced by the cost
  of their decomposition, m·n·min(m, n), not by their count);
* **merging** — :func:`exchange` (``all_gather_object`` in rank order), :func:`map_shards`
  (each rank maps its share, every rank gets all results in the single-process order),
  :func:`merge_collectors` (streaming statistics folded across ranks);
* **failing together** — every collective goes through :func:`exchange`, which also carries a
  "this rank failed" marker; a rank that fails sends it at its next exchange (at the latest in
  :func:`settle`, around each analysis), and every rank then raises :class:`RankFailed` naming
  the failing rank (:class:`RankRefused` when it refused bad input). No rank waits forever for
  one that died with a Python error.

Without a launcher (or with a world of one process) every helper is the identity and nothing
here imports or initialises ``torch.distributed``: single-process runs are unchanged.

Objects travel over a gloo group even when the tensors' backend is NCCL: states are small
CPU objects, and gloo reports a peer that died instead of hanging.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .errors import LLMProbeError, RunFailed

T = TypeVar("T")
R = TypeVar("R")

_STATE: dict[str, Any] = {"group": None, "failed": None, "owned": False}


class RankFailed(RunFailed):
    """One rank of a distributed run failed; every rank raises this, naming it (exit code 1; the
    run folder keeps its ``incomplete`` manifest)."""


class RankRefused(LLMProbeError):
    """One rank refused bad input (an :class:`LLMProbeError`): every rank raises this (exit code 2;
    like bad input in one process, it leaves the disk as it was)."""


def _failure(message: str, exit_code: int) -> Exception:
    return RankRefused(message) if exit_code == LLMProbeError.exit_code else RankFailed(message)


# -- the world ---------------------------------------------------------------------------------


def _dist():
    """torch.distributed when a process group is up, else None (without importing torch)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def local_rank() -> int:
    if not is_distributed():
        return 0
    return int(os.environ.get("LOCAL_RANK", rank()))


def local_world_size() -> int:
    if not is_distributed():
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes and prints."""
    return rank() == 0


def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "MASTER_ADDR" in os.environ


def _gpus_per_rank() -> int:
    import torch

    return max(1, torch.cuda.device_count() // max(1, local_world_size()))


def rank_gpus() -> list[int]:
    """This rank's GPUs: an equal, disjoint slice of the node's visible GPUs (one GPU per rank
    when there are as many GPUs as ranks; k GPUs per rank for ``--device-map auto`` when there
    are k times as many)."""
    import torch

    if not torch.cuda.is_available():
        return []
    if not is_distributed() and not launched():
        return list(range(torch.cuda.device_count()))
    per_rank = _gpus_per_rank()
    first = (int(os.environ.get("LOCAL_RANK", "0")) * per_rank) % torch.cuda.device_count()
    return list(range(first, first + per_rank))


def device_map_limits() -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments that keep ``device_map="auto"`` on this rank's GPUs
    under a launcher (accelerate would otherwise spread every rank over every GPU); {} in one
    process."""
    if not is_distributed():
        return {}
    import torch

    if not torch.cuda.is_available():
        return {}
    limits: dict[Any, int] = {gpu: int(torch.cuda.mem_get_info(gpu)[0]) for gpu in rank_gpus()}
    try:
        import psutil

        limits["cpu"] = int(psutil.virtual_memory().available // local_world_size())
    except ImportError:  # pragma: no cover - accelerate depends on psutil
        pass
    return {"max_memory": limits}


def init_from_env() -> bool:
    """Join the process group the launcher describes (idempotent). Returns whether this run is
    distributed. Backend: nccl when CUDA is available (each rank on cuda:LOCAL_RANK, or on the
    first GPU of its slice), gloo on CPU; ``LLMPROBE_DIST_BACKEND=gloo`` forces gloo."""
    if _dist() is not None:
        _object_group()
        return is_distributed()
    if not launched():
        return False
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and os.environ.get("LLMPROBE_DIST_BACKEND", "") != "gloo"
    if cuda:
        torch.cuda.set_device(rank_gpus()[0])
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    _STATE["owned"] = True
    _object_group()
    atexit.register(shutdown)
    if threading.current_thread() is threading.main_thread():
        # torchrun stops the other ranks with SIGTERM when one dies outside Python's reach
        # (killed for memory, say): turn it into an exception so that the run folder's manifest
        # records the failure (it already says "incomplete").
        signal.signal(signal.SIGTERM, _terminated)
    return is_distributed()


def _terminated(signum, frame):  # pragma: no cover - needs a launcher killing us
    _STATE["failed"] = "stopped by the launcher (another rank failed)"
    _STATE["exit_code"] = 1
    raise RankFailed(_STATE["failed"])


def shutdown() -> None:
    dist = _dist()
    if dist is not None and _STATE["owned"]:
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass
        _STATE.update(group=None, owned=False)


def _object_group():
    dist = _dist()
    if dist is None:
        return None
    if _STATE["group"] is None:
        _STATE["group"] = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _STATE["group"]


def facts() -> dict[str, Any]:
    """What the manifest records about the world (a collective: call it on every rank)."""
    if not is_distributed():
        return {}
    import torch

    device = f"cuda:{torch.cuda.current_device()}" if _dist().get_backend() == "nccl" else "cpu"
    launcher = "accelerate" if "ACCELERATE_MIXED_PRECISION" in os.environ or any(
        k.startswith("ACCELERATE_") for k in os.environ) else "torchrun"
    return {"world_size": world_size(), "backend": _dist().get_backend(), "launcher": launcher,
            "nodes": world_size() // max(1, local_world_size()), "rank_devices": exchange(device)}


# -- failing together ---------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, LLMProbeError) else f"{type(exc).__name__}: {text}"


def exchange(payload: Any, *, failed: BaseException | None = None) -> list[Any]:
    """``all_gather_object`` of ``payload`` in rank order (``[payload]`` in a single process).

    ``failed``: this rank could not produce its payload; every rank then raises
    :class:`RankFailed` (the failing one chained to its own exception).
    """
    if not is_distributed():
        if failed is not None:
            raise failed
        return [payload]
    if _STATE["failed"] is not None:  # the world already failed: no further collectives
        raise _failure(_STATE["failed"], _STATE.get("exit_code", 1)) from failed
    dist = _dist()
    message = None if failed is None else (_one_line(failed), getattr(failed, "exit_code", 1))
    gathered: list[Any] = [None] * world_size()
    try:
        dist.all_gather_object(gathered, (message, None if failed is not None else payload), group=_object_group())
    except RuntimeError as exc:  # a rank died without a word (killed, out of memory): the link broke
        _STATE["failed"] = f"another rank stopped (connection lost: {_one_line(exc)[:200]})"
        _STATE["exit_code"] = 1
        raise RankFailed(_STATE["failed"]) from (failed or exc)
    broken = [(r, m) for r, (m, _) in enumerate(gathered) if m is not None]
    if broken:
        who, (what, code) = broken[0]
        _STATE["failed"] = f"rank {who} of {world_size()} failed: {what}"
        _STATE["exit_code"] = code
        raise _failure(_STATE["failed"], code) from failed
    return [p for _, p in gathered]


def settle(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Run ``fn`` on this rank, then agree: if any rank raised, every rank raises
    :class:`RankFailed`; otherwise return this rank's value."""
    if not is_distributed():
        return fn(*args, **kwargs)
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:
        if isinstance(exc, (RankFailed, RankRefused)) and _STATE["failed"] is not None:
            raise
        exchange(None, failed=exc)
        raise  # pragma: no cover - exchange always raises on failure
    exchange(None)
    return value


def abort(exc: BaseException) -> None:
    """Tell the other ranks this one failed (when distributed) and raise."""
    if is_distributed() and _STATE["failed"] is None:
        exchange(None, failed=exc)
    raise exc


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    return exchange(value)[0]


# -- sharding -----------------------------------------------------------------------------------


def split_bounds(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of ``parts`` contiguous blocks of ``count`` items, sizes differing by at
    most one, the larger blocks first."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def share(items: Sequence[T]) -> list[T]:
    """This rank's contiguous block of ``items`` (all of them in a single process)."""
    start, stop = split_bounds(len(items), world_size())[rank()]
    return list(items[start:stop])


def shard_by_cost(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Item indices per part, balanced by cost: longest processing time first (largest cost to
    the least-loaded part; ties to the lower index), each part's indices in ascending order.
    Deterministic, so every rank computes the same assignment."""
    loads = [0.0] * parts
    assigned: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        part = min(range(parts), key=lambda p: (loads[p], p))
        loads[part] += float(costs[index])
        assigned[part].append(index)
    return [sorted(indices) for indices in assigned]


def matrix_cost(shape: Sequence[int]) -> float:
    """Cost of a matrix's spectrum: m·n·min(m, n) (an SVD or a Gram eigen-decomposition)."""
    if len(shape) < 2:
        return float(max(1, *shape)) if shape else 1.0
    m, n = int(shape[-2]), int(shape[-1])
    rest = 1
    for d in shape[:-2]:
        rest *= int(d)
    return float(rest) * m * n * min(m, n)


def map_shards(items: Sequence[T], fn: Callable[[list[T]], list[R]], costs: Sequence[float] | None = None
               ) -> list[R]:
    """``fn`` maps a list of items to one result per item. Each rank maps its share (by cost,
    or a contiguous block without costs); every rank returns all results in ``items`` order."""
    if not is_distributed():
        return list(fn(list(items)))
    if costs is None:
        start, stop = split_bounds(len(items), world_size())[rank()]
        mine = list(range(start, stop))
    else:
        mine = shard_by_cost(costs, world_size())[rank()]
    try:
        local = list(fn([items[i] for i in mine]))
        if len(local) != len(mine):
            raise RuntimeError(f"shard produced {len(local)} results for {len(mine)} items")
    except Exception as exc:
        abort(exc)
    results: list[Any] = [None] * len(items)
    for part in exchange(list(zip(mine, local))):
        for index, value in part:
            results[index] = value
    return results


# -- merging streaming statistics ---------------------------------------------------------------


def merge_collectors(collectors: Sequence[Any]) -> None:
    """Fold every rank's collector states into every rank's collectors, in rank order, so each
    rank holds the statistics of all windows. A collector takes part through three methods:
    ``shard_state()`` (a picklable CPU snapshot), ``load_shard_state(state)`` and
    ``merge_shard_state(state)``."""
    if not is_distributed():
        return
    try:
        for collector in collectors:
            if not hasattr(collector, "shard_state"):
                raise LLMProbeError(f"{type(collector).__name__} cannot merge across ranks; "
                                    "run this analysis in one process")
        local = [collector.shard_state() for collector in collectors]
    except Exception as exc:
        abort(exc)
    states = exchange(local)
    for index, collector in enumerate(collectors):
        collector.load_shard_state(states[0][index])
        for other in states[1:]:
            collector.merge_shard_state(other[index])
