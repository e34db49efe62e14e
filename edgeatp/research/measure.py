"""What a run really costs, measured: the planner's ground truth (:mod:`edgeatp.plan`).

* **Passes.** Every forward edgeatp runs goes through :meth:`ModelAdapter.forward` and every
  backward through ``torch.autograd.grad``; :func:`measure` counts both (rows, so that a stacked
  forward of ``k`` patch sets counts ``k`` forwards over its pairs, and backward calls).
* **Memory.** :class:`TensorMemory` follows, op by op, every tensor storage torch creates while it is
  active and frees it when the storage dies (weak references): its peak is the largest total of live
  tensor bytes allocated during the call, on any device, without the allocator's caching or
  fragmentation. Tensors that existed before (weights, buffers, prompts) are not counted.
* **Time.** Process CPU time, as a ratio to one plain forward+backward of the same batches
  (:func:`forward_backward`), measured before and after the call and averaged.

:func:`check_plan` puts the planner's figures next to the measured ones for one setup.
"""

from __future__ import annotations

import statistics
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..model import EMBED, ModelAdapter
from ..plan import MB, MethodPlan, ModelSpec, Workload, plan
from ..setup import Setup
from ..tasks.pairs import PromptPairs


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._known: set[int] = set()

    def ignore(self, tensors: Any) -> None:
        """Storages that existed before (weights, buffers, inputs): never counted."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                self._known.add(id(t.untyped_storage()))

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._sizes or key in self._known:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


@dataclass(frozen=True)
class Measured:
    """One call's measured cost: passes over the prompt pairs, model calls, peak tensor memory."""

    forwards: float  # forward rows / pairs: forward passes over every pair
    backward_calls: int
    forward_calls: int
    peak_mb: float  # peak of live tensor bytes allocated during the call


@contextmanager
def _counting(adapter: ModelAdapter) -> Iterator[list[int]]:
    """Count forward calls and rows (through the adapter) and backward calls (autograd)."""
    counts = [0, 0, 0]  # forward calls, forward rows, backward calls
    forward, grad = adapter.forward, torch.autograd.grad

    def counted_forward(tokens: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counts[0] += 1
        counts[1] += int(tokens.shape[0])
        return forward(tokens, *args, **kwargs)

    def counted_grad(*args: Any, **kwargs: Any) -> Any:
        counts[2] += 1
        return grad(*args, **kwargs)

    adapter.forward = counted_forward  # type: ignore[method-assign]
    torch.autograd.grad = counted_grad  # type: ignore[assignment]
    try:
        yield counts
    finally:
        del adapter.forward
        torch.autograd.grad = grad  # type: ignore[assignment]


def measure(setup: Setup, fn: Callable[[], Any]) -> tuple[Any, Measured]:
    """Run ``fn`` once (it should use ``setup``) and measure its passes and its peak tensor memory."""
    adapter, p = setup.model, setup.pairs
    with _counting(adapter) as counts, TensorMemory() as memory:
        memory.ignore([list(adapter.model.parameters()), list(adapter.model.buffers()),
                       p.clean, p.corrupt, p.answer, p.wrong])
        result = fn()
    return result, Measured(counts[1] / setup.n_pairs, counts[2], counts[0], memory.peak / MB)


def cpu_seconds(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median process CPU seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def forward_backward(setup: Setup) -> Callable[[], None]:
    """One plain forward+backward over every pair, in the setup's batches: the base run, the summed
    metric and its gradient with respect to the embedding (no other hooks, weights untouched)."""
    adapter, metric = setup.model, setup.metric

    def run() -> None:
        for batch in setup.batches("forward+backward"):
            kept: list[torch.Tensor] = []

            def keep(t: torch.Tensor) -> torch.Tensor:
                kept.append(t.detach().requires_grad_(True))
                return kept[-1]

            with torch.enable_grad():
                logits = adapter.forward(batch.base, [(EMBED, keep)])
                torch.autograd.grad(metric(logits, batch, setup.reference(batch)).sum(), kept)
    return run


def shared_prefix(pairs: PromptPairs) -> int:
    """Leading positions where every pair's two prompts agree (edge attribution skips them)."""
    differ = (pairs.clean != pairs.corrupt).any(0).nonzero()
    return int(differ[0]) if len(differ) else pairs.n_positions - 1


def workload_of(setup: Setup, level: str = "edge", positions: bool = False, memory_budget: float | None = None,
                graddrop: str = "block") -> Workload:
    """The planner's workload of attribution runs on this setup (its memory budget unless given)."""
    p = setup.pairs
    budget = setup.memory_budget_mb if memory_budget is None else memory_budget
    return Workload(level, setup.n_pairs, p.n_positions, shared_prefix(p), positions, setup.batch_size, budget,
                    graddrop, offload=setup.offload)


def attribution_call(setup: Setup, work: Workload, method: str) -> Callable[[], Any]:
    """The attribution run a workload describes, ready to call."""
    from ..attribution import attribute_edges, attribute_nodes

    if work.level == "edge":
        return lambda: attribute_edges(setup, method, positions=work.positions, memory_budget_mb=work.memory_budget,
                                       graddrop=work.graddrop)  # type: ignore[arg-type]
    mlp = [] if setup.model.shape.attn_only else ["neuron" if work.level == "neuron" else "mlp"]
    return lambda: attribute_nodes(setup, method, ["head", "q", "k", "v", *mlp], positions=work.positions,
                                   graddrop=work.graddrop)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Check:
    """One method's planned and measured cost on one setup."""

    planned: MethodPlan
    measured: Measured
    time_ratio: float | None  # measured CPU time / one plain forward+backward (None: not timed)

    @property
    def planned_peak_mb(self) -> float:
        """The planned peak as :class:`TensorMemory` sees it on the CPU: the device's peak without the
        weights (they existed before) plus the host's per-pair estimates (the host is the device)."""
        m = self.planned.memory
        return (m.device_peak - m.fixed["weights"] + m.host) / MB

    @property
    def memory_error(self) -> float:
        return self.planned_peak_mb / self.measured.peak_mb - 1

    @property
    def time_error(self) -> float | None:
        return None if self.time_ratio is None else self.planned.time / self.time_ratio - 1


def check_plan(setup: Setup, spec: ModelSpec, work: Workload, methods: list[str], repeats: int = 0) -> list[Check]:
    """The planner's figures for ``methods`` next to measured runs (timed when ``repeats`` > 0, each
    method between two timings of the plain forward+backward)."""
    planned = plan(spec, work, methods)
    fb = forward_backward(setup)
    out = []
    for name, mp in planned.methods.items():
        call = attribution_call(setup, work, name)
        _, measured = measure(setup, call)
        ratio = None
        if repeats:
            before = cpu_seconds(fb, repeats)
            seconds = cpu_seconds(call, repeats)
            ratio = 2 * seconds / (before + cpu_seconds(fb, repeats))
        out.append(Check(mp, measured, ratio))
    return out
