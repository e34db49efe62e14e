"""The skeleton every gradient method shares: the passes over a batch and the one loop over batches.

For one batch, :func:`gradient_run` does a source forward (activations of the run patched from), a
base forward that keeps the requested activations on the autograd graph, and one backward of the
summed per-pair metric — plus, for GradDrop, one more backward per dropped unit with the gradient
into that unit's residual write stopped (forward values unchanged). Integrated gradients repeat
the base forward and backward at points between base and source embedding.

An :class:`Estimator` (nodes, edges, groups) turns a run into estimates in two steps: the
*gradient side* of one backward pass (linear in the gradients, e.g. reader-input gradients),
and the *estimate* from the activation differences and the gradient sides of every pass.
Integrated gradients average gradient sides over the path; GradDrop keeps one per dropped unit.
:func:`estimate_pairs` is the single batch loop, and :func:`graddrop_magnitude` the single
GradDrop combination ``Σ_l |Î_l| / n_terms``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Protocol, Sequence

import torch

from ..methods import Kind, Method
from ..model import EMBED, FwdHook, Site, capture
from ..scores import PairStats
from ..setup import Setup
from ..tasks.pairs import PairBatch

GradDropMode = Literal["block", "sublayer"]
Unit = tuple[str, int]


class _Drop:
    """Which GradDrop unit is dropped in the current backward (``None`` = plain backward)."""

    unit: Unit | None = None


class _Gate(torch.autograd.Function):
    """Identity forward; backward passes the gradient unless this gate's unit is dropped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: _Drop, unit: Unit) -> torch.Tensor:  # type: ignore[override]
        ctx.state, ctx.unit = state, unit
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        dropped = ctx.state.unit == ctx.unit
        return (torch.zeros_like(g) if dropped else g), None, None


def graddrop_units(n_layers: int, attn_only: bool, mode: GradDropMode = "block") -> list[Unit]:
    """The units whose residual writes GradDrop drops one at a time.

    ``block``: one unit per transformer block (attention + MLP writes together), the AtP*
    paper's ``L`` terms (exact for parallel blocks, our default for sequential ones);
    ``sublayer``: attention and MLP writes separately (``2L`` terms for sequential blocks).
    """
    if mode == "block" or attn_only:
        return [("block", layer) for layer in range(n_layers)]
    if mode != "sublayer":
        raise ValueError(f"unknown GradDrop granularity {mode!r}; use 'block' or 'sublayer'")
    return [(kind, layer) for layer in range(n_layers) for kind in ("attn", "mlp")]


def nonzero_terms(units: list[Unit], blocks: set[Unit | None]) -> int:
    """How many GradDrop terms are not identically zero for something living in ``blocks``
    (sublayers ``("attn"|"mlp", layer)``; ``None`` = outside every block, e.g. the embedding or
    the logits): a term is zero only when every part of it sits inside the dropped unit."""
    if not units or None in blocks:
        return len(units)
    inside = {("block", b[1]) for b in blocks} if units[0][0] == "block" else set(blocks)  # type: ignore[index]
    return len(units) - (1 if len(inside) == 1 and next(iter(inside)) in units else 0)


def graddrop_magnitude(plain: torch.Tensor, dropped_abs: torch.Tensor, n_terms: torch.Tensor) -> torch.Tensor:
    """GradDrop's per-pair magnitude ``Σ_l |Î_l| / n_terms`` from the sum of the dropped passes'
    ``|estimates|``; plain ``|Î|`` where no term is non-trivial (``n_terms`` = 0)."""
    n = n_terms.to(plain.device, plain.dtype)
    return torch.where(n > 0, dropped_abs / n.clamp(min=1), plain.abs())


def fold_passes(estimates: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The plain pass's estimates and the sum of ``|estimates|`` of the later (dropped) passes."""
    it = iter(estimates)
    plain = next(it)
    dropped = None
    for e in it:
        dropped = e.abs() if dropped is None else dropped + e.abs()
    return plain, dropped


@dataclass(frozen=True)
class SiteNeeds:
    """The activations a method reads: in both runs (``act``), in the base run only (``base``),
    and the sites whose gradients it needs (``grad``)."""

    act: tuple[Site, ...]
    grad: tuple[Site, ...]
    base: tuple[Site, ...] = ()

    @classmethod
    def of(cls, act: Iterable[Site], grad: Iterable[Site], base: Iterable[Site] = ()) -> "SiteNeeds":
        return cls(tuple(dict.fromkeys(act)), tuple(dict.fromkeys(grad)), tuple(dict.fromkeys(base)))


@dataclass
class GradRun:
    """One batch: activations of both runs, the point where gradients were taken, and the
    metric's gradients at the requested sites.

    ``base`` holds the base run's activations (for differences); ``point`` the activations of
    the run the gradients belong to (the base run itself, or a point on the integration path).
    ``grads[0]`` is the ordinary backward; ``grads[i + 1]`` the backward with ``units[i]`` dropped.
    """

    source: Mapping[Site, torch.Tensor]
    base: Mapping[Site, torch.Tensor]
    point: Mapping[Site, torch.Tensor]
    grads: list[Mapping[Site, torch.Tensor]]
    units: list[Unit]
    base_metric: torch.Tensor


def gradient_run(setup: Setup, batch: PairBatch, needs: SiteNeeds, units: Sequence[Unit] = (),
                 source: Mapping[Site, torch.Tensor] | None = None, alpha: float = 0.0) -> GradRun:
    """One batch's activations and gradients of the summed per-pair metric on the base run.

    ``units`` adds one backward per GradDrop unit. ``source`` reuses source-run activations (it
    must include the embedding when ``alpha`` is set); ``alpha`` moves the base run's embedding
    that far toward the source's (integrated gradients), so ``point`` is the interpolated run.
    """
    model, metric = setup.model, setup.metric
    ref = setup.reference(batch)
    if source is None:
        _, source = capture(model, batch.source, [*needs.act, EMBED] if alpha else needs.act, logits=False,
                            cache=setup.new_cache())
    kept: dict[Site, torch.Tensor] = {}
    state = _Drop()
    src0 = source.get(EMBED)

    def keep(site: Site) -> FwdHook:
        def fn(t: torch.Tensor) -> torch.Tensor | None:
            if alpha and site == EMBED:
                t = (t + alpha * (src0 - t)).detach().requires_grad_(True)  # type: ignore[operator]
                kept[site] = t
                return t
            if not t.requires_grad:  # frozen weights: still differentiate w.r.t. activations
                t = t.detach().requires_grad_(True)
                kept[site] = t
                return t
            kept[site] = t
            return None
        return fn

    def gate(unit: Unit) -> FwdHook:
        return lambda t: _Gate.apply(t, state, unit)

    hooks: list[tuple[Site, FwdHook]] = [(EMBED, keep(EMBED))]
    hooks += [(s, keep(s)) for s in dict.fromkeys([*needs.act, *needs.grad, *needs.base]) if s != EMBED]
    block_units = bool(units) and units[0][0] == "block"
    for layer in range(model.shape.n_layers) if units else ():
        hooks.append((Site("attn_out", layer), gate(("block", layer) if block_units else ("attn", layer))))
        if model.shape.has_mlp:
            hooks.append((Site("mlp_out", layer), gate(("block", layer) if block_units else ("mlp", layer))))
    with torch.enable_grad():
        logits = model.forward(batch.base, hooks)
        value = metric(logits, batch, ref)
        total = value.sum()
        targets = [kept[s] for s in needs.grad]
        grads = []
        passes: list[Unit | None] = [None, *units]
        for i, unit in enumerate(passes):
            state.unit = unit
            got = torch.autograd.grad(total, targets, retain_graph=i < len(passes) - 1, allow_unused=True)
            grads.append(setup.new_cache())
            grads[-1].update({s: (g if g is not None else torch.zeros_like(t)).detach()
                              for s, g, t in zip(needs.grad, got, targets)})
    point = setup.new_cache()
    point.update({s: kept[s].detach() for s in dict.fromkeys([*needs.act, *needs.base])})
    base = point
    if alpha:
        _, base = capture(model, batch.base, needs.act, logits=False, cache=setup.new_cache())
    return GradRun(source, base, point, grads, list(units), value.detach())


class Estimator(Protocol):
    """What a level (nodes, edges, groups) computes from gradient runs."""

    shape: tuple[int, ...]  # per pair
    needs: SiteNeeds
    n_terms: torch.Tensor | None  # GradDrop's non-trivial terms per entry (None: no GradDrop)

    def gradient_side(self, point: dict[Site, torch.Tensor], grads: dict[Site, torch.Tensor]) -> dict[Any, torch.Tensor]:
        """What one backward pass contributes, linear in ``grads`` (so it can be averaged)."""

    def estimate(self, run: GradRun, sides: Iterable[dict[Any, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[b, *shape]`` estimates of the plain pass and the sum of the dropped passes' ``|estimates|``
        (``None`` without GradDrop), from the activation differences and every pass's gradient side."""


def _integrated(setup: Setup, batch: PairBatch, est: Estimator, steps: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integrated gradients: gradient sides averaged over ``steps`` midpoints from base to source."""
    _, source = capture(setup.model, batch.source, [*est.needs.act, EMBED], logits=False, cache=setup.new_cache())
    mean: dict[Any, torch.Tensor] = {}
    run = None
    for k in range(steps):
        run = gradient_run(setup, batch, est.needs, source=source, alpha=(k + 0.5) / steps)
        side = est.gradient_side(run.point, run.grads[0])
        for key, value in side.items():
            mean[key] = mean[key] + value / steps if key in mean else value / steps
    assert run is not None
    return est.estimate(run, [mean])


def estimate_pairs(setup: Setup, method: Method, est: Estimator, description: str, *, units: Sequence[Unit] = (),
                   ig_steps: int = 8, same_length: bool = False) -> tuple[PairStats, torch.Tensor | None,
                                                                            torch.Tensor | None]:
    """The one loop over prompt pairs: every batch's estimates, collected with their GradDrop magnitudes
    (batches small enough for the setup's memory budget)."""
    setup = setup.fit(setup.device_mb_per_pair(est.needs, 1 + len(units)))
    acc = setup.accumulator(est.shape)
    for batch in setup.batches(description, same_length=same_length):
        if method.kind is Kind.INTEGRATED:
            with torch.no_grad():
                plain, dropped = _integrated(setup, batch, est, ig_steps)
        else:
            run = gradient_run(setup, batch, est.needs, units)
            with torch.no_grad():
                plain, dropped = est.estimate(run, (est.gradient_side(run.point, g) for g in run.grads))
        magnitude = None
        if est.n_terms is not None and dropped is not None:
            magnitude = graddrop_magnitude(plain, dropped, est.n_terms)
        setup.check_finite(plain if magnitude is None else torch.stack([plain, magnitude]), "attribution estimates")
        acc.add(batch.index, plain, magnitude)
    return acc.result()
