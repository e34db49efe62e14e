"""A run's setup: the model, the prompt pairs, the metric, the direction, batching and progress.

Every attribution, patching, verification and faithfulness function takes one :class:`Setup`
instead of six loose arguments, and every loop over prompt pairs is :meth:`Setup.batches`: it
runs inside the model's session (eval mode, flags and hooks restored), moves each batch to the
model's device, keeps pairs of equal length together where padding would be visible, and
shows progress. In a data-parallel run it yields only this process's share of the pairs, and
:meth:`Setup.accumulator` joins the processes' results (see :mod:`edgeatp.distributed`).
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator

import torch

from . import distributed
from .distributed import Ranks
from .errors import EdgeatpError, option_error
from .memory import MB, HostCache, PatchLoad, cache_mb_per_pair, fit_sweep, gradient_run_flags, saved_bytes
from .metrics import Metric, get_metric
from .model import ModelAdapter, capture, load_model
from .progress import Progress, silent
from .scores import Accumulator, PairStats
from .tasks.pairs import Direction, PairBatch, PromptPairs

if TYPE_CHECKING:
    from .attribution.passes import SiteNeeds

KEEP_PER_PAIR_MB = 256.0  # per-pair estimates are kept (for per-pair analyses) up to this size


@dataclass(frozen=True, eq=False)
class Setup:
    """What every computation on prompt pairs needs, validated once.

    ``model`` may be anything :func:`~edgeatp.model.load_model` accepts; ``metric`` a name or a
    :class:`~edgeatp.metrics.Metric`; ``direction`` ``"noising"`` (patch corrupt values into the
    clean run) or ``"denoising"``. ``keep_per_pair`` keeps every pair's estimates in results
    (default: when they take at most 256 MB). ``memory_budget_mb`` bounds the device memory of a
    batch (cached activations, gradients, the autograd graph and attribution buffers; in exact
    patching, the source run's cache and the rows a patched forward stacks): batches shrink to fit;
    ``offload`` keeps cached activations and gradients in host memory. ``ranks``: this
    process's share of a data-parallel run (default: the initialised torch.distributed process
    group, if any, else all pairs; :data:`~edgeatp.distributed.SINGLE` opts out).
    """

    model: ModelAdapter
    pairs: PromptPairs
    metric: Metric = field(default="logit_diff")  # type: ignore[assignment]
    direction: Direction = Direction.NOISING
    batch_size: int = 32
    progress: Progress = field(default=silent, repr=False)
    keep_per_pair: bool | None = None
    memory_budget_mb: float = 1024.0
    offload: bool = False
    ranks: Ranks | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.ranks is None:
            object.__setattr__(self, "ranks", distributed.current())
        if not isinstance(self.model, ModelAdapter):
            object.__setattr__(self, "model", load_model(self.model))
        if not isinstance(self.pairs, PromptPairs):
            raise EdgeatpError(f"pairs must be PromptPairs (make_task, load_pairs or PromptPairs.from_tokens), "
                               f"got {type(self.pairs).__name__}")
        object.__setattr__(self, "metric", get_metric(self.metric))
        try:
            object.__setattr__(self, "direction", Direction(self.direction))
        except ValueError:
            raise option_error(f"{{direction}} {self.direction!r} is unknown; use noising or denoising") from None
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise option_error(f"{{batch_size}} must be a positive integer, got {self.batch_size!r}")
        if not math.isfinite(self.memory_budget_mb) or self.memory_budget_mb <= 0:
            raise option_error(f"{{memory_budget_mb}} must be a positive number of megabytes, got {self.memory_budget_mb}")
        self.model.check_pairs(self.pairs)

    def with_(self, **changes: Any) -> "Setup":
        """The same setup with some fields changed (validated again)."""
        return replace(self, **changes)

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    def batches(self, description: str, *, same_length: bool = False, batch_size: int | None = None
                ) -> Iterator[PairBatch]:
        """The prompt pairs in batches on the model's device, inside the model's session.

        ``same_length`` keeps pairs of one length together (position-resolved results need it;
        bidirectional models always get it, as they see padding).
        """
        model = self.model
        chunks = list(self.pairs.batches(batch_size or self.batch_size, self.direction,
                                         same_length=same_length or not model.causal,
                                         rows=self.ranks.shard(self.n_pairs)))
        progress = self.progress if self.ranks.is_main else silent
        with model.session(), progress(description, len(chunks)) as bar:
            for batch in chunks:
                yield batch.to(model.device)
                bar.update(1)

    def n_batches(self, batch_size: int | None = None) -> int:
        """The batches :meth:`batches` takes over every pair in one process: what forwards are counted
        in, so that a data-parallel run (each process batching its own share) counts what one process does."""
        return sum(1 for _ in self.pairs.batches(batch_size or self.batch_size, self.direction,
                                                 same_length=not self.model.causal))

    def reference(self, batch: PairBatch) -> torch.Tensor | None:
        """Clean-run log-probabilities at the answer position, for metrics that compare with them."""
        if not self.metric.needs_reference:
            return None
        logits, _ = capture(self.model, batch.clean, [])
        rows = torch.arange(len(batch), device=logits.device)
        at = logits[rows, batch.answer_pos.to(logits.device)]
        return torch.log_softmax(at.to(torch.promote_types(at.dtype, torch.float32)), -1)

    def check_gradient_metric(self) -> None:
        """KL to the clean run has zero gradient on the clean run: gradient methods cannot noise with it."""
        if self.metric.needs_reference and self.direction is Direction.NOISING:
            raise option_error(f"{{metric}} {self.metric.name} has zero gradient at the clean run, so gradient "
                               "methods cannot estimate noising effects with it; use {direction} denoising or "
                               "another metric")

    def check_finite(self, values: torch.Tensor, what: str) -> None:
        """Refuse non-finite results: they would rank first, or silently drop out, everywhere downstream."""
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            raise EdgeatpError(f"{int(bad.sum())} {what} are not finite (NaN or infinite): the model overflowed in "
                               f"{str(self.model.dtype).removeprefix('torch.')}; run it in float32 or float64 "
                               "({dtype})", dtype="dtype")

    def new_cache(self) -> MutableMapping:
        """Where a run keeps cached activations and gradients: on their devices, or in host memory
        when ``offload`` is set."""
        return HostCache() if self.offload else {}

    def device_mb_per_pair(self, needs: "SiteNeeds", passes: int = 1) -> float:
        """Device megabytes one prompt pair takes in a gradient run reading ``needs`` (sites ``act``,
        ``base`` and ``grad``) with ``passes`` backward passes: the base forward's autograd graph, plus
        the cached activations and gradients unless they are offloaded."""
        shape, T = self.model.shape, self.pairs.n_positions
        size = torch.empty((), dtype=self.model.dtype).element_size()
        graph = saved_bytes(self.model.spec, 1, T, *gradient_run_flags(needs.base, needs.grad)) / MB
        if self.offload:
            return graph
        return graph + cache_mb_per_pair(shape, size, T, needs.act, needs.base, needs.grad, passes)

    def fit(self, per_pair_mb: float) -> "Setup":
        """This setup with as many pairs per batch (at least one, at most ``batch_size``) as
        ``memory_budget_mb`` holds at ``per_pair_mb`` each."""
        fitted = max(1, min(self.batch_size, int(self.memory_budget_mb // max(per_pair_mb, 1e-9))))
        return self if fitted == self.batch_size else self.with_(batch_size=fitted)

    def stacking(self, load: PatchLoad) -> tuple[int, int]:
        """Pairs per batch and patch sets per forward of an exact-patching sweep with ``load``: as many
        as ``batch_size`` stacks that ``memory_budget_mb`` holds (:func:`~edgeatp.memory.fit_sweep`)."""
        return fit_sweep(self.model.spec, self.pairs.n_positions, load, self.n_pairs, self.batch_size,
                         self.memory_budget_mb, self.offload)

    def accumulator(self, shape: tuple[int, ...]) -> Accumulator:
        """A collector of per-pair estimates of ``shape`` (per pairs kept when small or when asked)."""
        size_mb = 16 * self.n_pairs * float(torch.tensor(shape).prod()) / 2 ** 20 if shape else 0.0
        keep = self.keep_per_pair if self.keep_per_pair is not None else size_mb <= KEEP_PER_PAIR_MB
        return Accumulator(self.n_pairs, shape, keep, self._combine if self.ranks.active else None)

    def _combine(self, stats: PairStats | None, shape: tuple[int, ...], rows: list[torch.Tensor | None]
                 ) -> tuple[PairStats | None, list[torch.Tensor | None]]:
        """Attribution results of every process of a data-parallel run, joined."""
        kept = ", per-pair rows" if any(r is not None for r in rows) else ""
        self.ranks.check("attribution", layout=f"{self.n_pairs} prompt pairs, estimates {list(shape)}{kept}")
        return self.ranks.merge_stats(stats, shape), self.ranks.sum_rows(*rows)
