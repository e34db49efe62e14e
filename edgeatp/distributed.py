"""Data-parallel runs over prompt pairs with torch.distributed.

Under ``torchrun`` (or any initialised default process group) every loop over prompt pairs
(:meth:`~edgeatp.setup.Setup.batches`) takes only this process's share of the pairs, a
contiguous block, and the places that collect per-pair results combine them across processes:
attribution statistics (:meth:`Ranks.merge_stats`: Chan merges in rank order), exact patching
effects (:meth:`Ranks.sum_rows`: every pair's row comes from one process) and metric sums
(:meth:`Ranks.sum_values`). Every process ends with the same bits, so the rest of a run (pruning,
circuit sizes, verification samples) takes the same path everywhere; only rank 0 prints and writes.

Failures: every combination starts with a status exchange (:meth:`Ranks.check`). A process that
fails reports its error at the exchange the others are waiting in (:func:`guard`), so every
process stops with one message naming the failing rank; collectives also time out.
"""

from __future__ import annotations

import datetime
import importlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .errors import EdgeatpError, OptionError, option_error
from .scores import PairStats

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default: a phase's slowest rank may keep the others waiting this long


class DistributedError(EdgeatpError):
    """The processes of a data-parallel run cannot go on together."""


class RankFailed(DistributedError):
    """Another process of the run failed; this one stops too."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (``world`` 1: a run of its own)."""

    rank: int = 0
    world: int = 1
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> torch.Tensor:
        """This process's rows of ``n`` prompt pairs: a contiguous block, sizes differing by at most one."""
        return torch.arange(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    # ------------------------------------------------------------------ collectives
    def check(self, phase: str, failure: tuple[str, dict[str, str]] | None = None, layout: str = "") -> None:
        """Exchange every process's status at a combination point: raise :class:`RankFailed` when
        another process failed (``failure`` is this process's own: message template and options),
        :class:`DistributedError` when the processes are not at the same point or when what they are
        about to combine differs (``layout``: this process's pair count and result shapes, which the
        collectives need equal everywhere)."""
        if not self.active:
            return
        import torch.distributed as dist

        got: list[Any] = [None] * self.world
        with self._talking(phase):
            dist.all_gather_object(got, (phase, failure, layout))
        failed = [(r, f) for r, (_, f, _) in enumerate(got) if f is not None and r != self.rank]
        if failure is not None:
            return
        if failed:
            rank, (template, options) = failed[0]
            more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
            raise RankFailed(f"rank {rank} of {self.world} failed{more}, so every rank stopped: {template}", **options)
        phases = {p for p, _, _ in got}
        if len(phases) > 1:
            raise DistributedError(f"the {self.world} processes are at different steps ({', '.join(sorted(phases))}); "
                                   "every rank must run the same command on the same data")
        if len({lay for _, _, lay in got}) > 1:
            ranks = "; ".join(f"rank {r}: {lay}" for r, (_, _, lay) in enumerate(got))
            raise DistributedError(f"the {self.world} processes cannot combine their results at {phase} ({ranks}); "
                                   "every rank must run the same command on the same data")

    @contextmanager
    def _talking(self, phase: str) -> Iterator[None]:
        """Collectives at one point of the run: a peer that vanished or never came (the collective
        timed out) becomes one line instead of the backend's error."""
        try:
            yield
        except RuntimeError as exc:  # gloo and NCCL report timeouts and lost peers as RuntimeError subclasses
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise DistributedError(
                f"lost the other processes of the data-parallel run at {phase} ({first}): one of them "
                "stopped or did not get there within the collective timeout ({collective_timeout}); see the other "
                "ranks' output", collective_timeout="collective_timeout") from None

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` where the backend can send it: the current CUDA device for NCCL, host memory otherwise."""
        if self.backend == "nccl":
            return t.to(torch.device(torch.cuda.current_device()))
        return t.cpu()

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        import torch.distributed as dist

        t = self._wire(t.contiguous())
        out = [torch.empty_like(t) for _ in range(self.world)]
        with self._talking("combining results"):
            dist.all_gather(out, t)
        return out

    def merge_stats(self, stats: PairStats | None, shape: Sequence[int]) -> PairStats | None:
        """Every process's statistics of its pairs merged in rank order (the same bits everywhere);
        ``None`` stands for a process without pairs."""
        if not self.active:
            return stats
        if stats is None:
            zero = torch.zeros(tuple(shape), dtype=torch.float64)
            stats = PairStats(0, zero, zero, zero, zero, zero)
        home = stats.mean.device
        packed = torch.stack([stats.mean, stats.m2, stats.magnitude, stats.n_pos, stats.n_neg]).double()
        counts = self._gather(torch.tensor([stats.n], dtype=torch.float64))
        merged: PairStats | None = None
        for n, part in zip(counts, self._gather(packed)):
            if int(n.item()) == 0:
                continue
            part = part.to(home)
            one = PairStats(int(n.item()), part[0], part[1], part[2], part[3], part[4])
            merged = one if merged is None else merged.merge(one)
        return merged

    def sum_rows(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The sums over processes of tensors whose rows each process filled for its own pairs, zeros
        elsewhere (exact: every entry is one process's value plus zeros)."""
        if not self.active:
            return list(tensors)
        import torch.distributed as dist

        out: list[torch.Tensor | None] = []
        for t in tensors:
            if t is None:
                out.append(None)
                continue
            wire = self._wire(t.contiguous())
            with self._talking("combining results"):
                dist.all_reduce(wire)
            out.append(wire.to(t.device))
        return out

    def sum_values(self, values: Sequence[float]) -> list[float]:
        """Each value summed over processes in rank order (the same bits everywhere)."""
        if not self.active:
            return list(values)
        parts = self._gather(torch.tensor(list(values), dtype=torch.float64))
        return [sum(float(p[i]) for p in parts) for i in range(len(values))]


SINGLE = Ranks()


def current() -> Ranks:
    """The data-parallel run this process belongs to: the initialised default process group, if any."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return SINGLE
    import torch.distributed as dist

    return Ranks(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str | None, n_devices: int = 1) -> str | None:
    """The first device of this process: under torchrun a bare accelerator name (``cuda``) becomes
    the first of this process's own ``n_devices`` devices, ``cuda:LOCAL_RANK*n_devices`` (one
    process per device, or per ``n_devices`` devices of a split model); refused in one line when the
    node's processes need more devices than it has."""
    if device is None or not launched() or ":" in device or torch.device(device).type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(local + 1)))
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if per_node * n_devices > have:
        raise OptionError(f"{{device}} {device} under torchrun: {per_node} processes on this node with {{n_devices}} "
                          f"{n_devices} each need {per_node * n_devices} CUDA devices, but this machine has {have}; "
                          "start fewer processes per node (--nproc-per-node) or lower {n_devices}",
                          device="device", n_devices="n_devices")
    return f"{device}:{local * n_devices}"


@contextmanager
def process_group(device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Ranks]:
    """The data-parallel run of a command: joins the process group torchrun describes in the
    environment (NCCL for CUDA devices, gloo otherwise) and leaves it afterwards; a run of its own
    when not launched as one of several (or when the caller already set up a group)."""
    if not launched() or current().active:
        yield current()
        return
    if not torch.distributed.is_available():
        raise DistributedError("this torch build has no torch.distributed; run one process")
    if not timeout_s > 0:
        raise option_error("{timeout} must be a positive number of seconds")
    import torch.distributed as dist

    # torch.distributed.nn takes the default group as its functions' default argument when first
    # imported (transformers imports it while loading a model): imported after the group was made,
    # it keeps the destroyed group's threads alive until the interpreter exits, where tearing them
    # down aborts the process now and then ("terminate called without an active exception").
    importlib.import_module("torch.distributed.nn")

    accelerator = device is not None and torch.device(device).type == "cuda"
    if accelerator:
        torch.cuda.set_device(torch.device(device))  # type: ignore[arg-type]
    dist.init_process_group("nccl" if accelerator else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def _failure(exc: BaseException) -> tuple[str, dict[str, str]]:
    """What another process needs to report ``exc`` in one line: its message template and options
    (other errors than edgeatp's own are named by their type)."""
    if isinstance(exc, EdgeatpError):
        return exc.template.splitlines()[0] if exc.template else type(exc).__name__, dict(exc.options)
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return f"{type(exc).__name__}: {(text.splitlines() or [''])[0]}", {}


@contextmanager
def guard(ranks: Ranks | None = None) -> Iterator[Ranks]:
    """Run a block on every process of a data-parallel run so that a failure anywhere stops every
    process with one message: a failing process reports its error at the next status exchange
    (where the others wait), and the block ends with one more exchange so late failures are seen."""
    ranks = ranks if ranks is not None else current()
    try:
        yield ranks
    except DistributedError:
        raise
    except Exception as exc:
        if ranks.active:
            ranks.check("failed", _failure(exc))
        raise
    ranks.check("finished")
