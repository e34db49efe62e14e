"""The skeleton every gradient method shares: the passes over a batch and the one loop over batches.

For one batch, :func:`gradient_run` does a source forward (activations of the run patched from), a
base forward that keeps the requested activations on the autograd graph, and one backward of the
summed per-pair metric — plus, for GradDrop, one truncated backward per dropped unit: above the
unit the gradient is the ordinary one, so each dropped pass starts at the unit's input with the
ordinary gradient of the residual it writes to (the unit's own write cut) and runs only through
the layers below it, about ``L²/2`` block-backwards in all instead of ``L²`` (spec §4.3).
Integrated gradients repeat the base forward and backward at points between base and source
embedding.

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

from ..methods import Kind, Method, Unit
from ..model import EMBED, FwdHook, Site, capture
from ..scores import PairStats
from ..setup import Setup
from ..tasks.pairs import PairBatch

Relation = Literal["below", "inside", "above"]
_ATTN_SITES = frozenset({"q", "k", "v", "rot_q", "rot_k", "scores", "pattern", "z", "attn_out", "attn_post_scale"})
_MLP_SITES = frozenset({"mlp_in", "mlp_post", "mlp_out", "mlp_post_scale"})


def nonzero_terms(units: list[Unit], blocks: set[Unit | None]) -> int:
    """How many GradDrop terms are not identically zero for something living in ``blocks``
    (sublayers ``("attn"|"mlp", layer)``; ``None`` = outside every block, e.g. the embedding or
    the logits): a term is zero only when every part of it sits inside the dropped unit."""
    if not units or None in blocks:
        return len(units)
    inside = {("block", b[1]) for b in blocks} if units[0][0] == "block" else set(blocks)  # type: ignore[index]
    return len(units) - (1 if len(inside) == 1 and next(iter(inside)) in units else 0)


def relation(unit: Unit, site: Site, parallel: bool) -> Relation:
    """How dropping ``unit``'s residual write changes the gradient at ``site``: recomputed by the
    truncated backward (``below``), identically zero (``inside`` the unit), or the ordinary
    gradient (``above``: no path from the site to the metric passes through the unit)."""
    kind, m = unit
    if site.kind == "resid_final" or site.layer > m:
        return "above"
    if site.layer < m or site.kind == "resid_pre":
        return "below"
    part = "attn" if site.kind in _ATTN_SITES else "mlp" if site.kind in _MLP_SITES else None
    if part is None:
        raise ValueError(f"GradDrop does not define the gradient at site {site.kind}")
    if kind in ("block", part):
        return "inside"
    return "below" if kind == "mlp" and not parallel else "above"  # a sequential MLP reads the attention's output


def _cut(unit: Unit, n_layers: int, parallel: bool) -> list[tuple[Site, Site]]:
    """Where the truncated backward of a dropped unit starts: ``(tensor, site whose ordinary
    gradient it receives)`` pairs that cover every path to the metric except the unit's write."""
    kind, m = unit
    pre = Site("resid_pre", m)
    post = Site("resid_pre", m + 1) if m + 1 < n_layers else Site("resid_final")
    if kind == "block":
        return [(pre, post)]
    if parallel:
        return [(pre, post), (Site("mlp_out" if kind == "attn" else "attn_out", m), post)]
    return [(pre, Site("resid_mid", m))] if kind == "attn" else [(Site("resid_mid", m), post)]


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
    ``grads[0]`` is the ordinary backward; ``grads[i + 1]`` holds the backward with ``units[i]``
    dropped at the sites :func:`relation` calls ``below`` only (:meth:`full` completes it).
    """

    source: Mapping[Site, torch.Tensor]
    base: Mapping[Site, torch.Tensor]
    point: Mapping[Site, torch.Tensor]
    grads: list[Mapping[Site, torch.Tensor]]
    units: list[Unit]
    base_metric: torch.Tensor
    parallel: bool = False

    def full(self, i: int) -> Mapping[Site, torch.Tensor]:
        """Pass ``i``'s gradient at every site: recomputed below the dropped unit, zero inside it,
        the ordinary gradient above it."""
        if i == 0:
            return self.grads[0]
        unit, out = self.units[i - 1], {}
        for s, g in self.grads[0].items():
            rel = relation(unit, s, self.parallel)
            out[s] = self.grads[i][s] if rel == "below" else g if rel == "above" else torch.zeros_like(g)
        return out


def gradient_run(setup: Setup, batch: PairBatch, needs: SiteNeeds, units: Sequence[Unit] = (),
                 source: Mapping[Site, torch.Tensor] | None = None, alpha: float = 0.0,
                 base: Mapping[Site, torch.Tensor] | None = None) -> GradRun:
    """One batch's activations and gradients of the summed per-pair metric on the base run.

    ``units`` adds one truncated backward per GradDrop unit. ``source`` reuses source-run
    activations (it must include the embedding when ``alpha`` is set); ``alpha`` moves the base
    run's embedding that far toward the source's (integrated gradients), so ``point`` is the
    interpolated run and ``base`` (the base run's activations) must be given.
    """
    model, metric = setup.model, setup.metric
    ref = setup.reference(batch)
    if source is None:
        _, source = capture(model, batch.source, [*needs.act, EMBED] if alpha else needs.act, logits=False,
                            cache=setup.new_cache())
    kept: dict[Site, torch.Tensor] = {}
    src0 = source.get(EMBED)
    shape = model.shape
    cuts = [_cut(u, shape.n_layers, shape.parallel_attn_mlp) for u in units]
    cut_sites = [s for cut in cuts for pair in cut for s in pair]

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

    hooks: list[tuple[Site, FwdHook]] = [(EMBED, keep(EMBED))]
    hooks += [(s, keep(s)) for s in dict.fromkeys([*needs.act, *needs.grad, *needs.base, *cut_sites]) if s != EMBED]
    with torch.enable_grad():
        logits = model.forward(batch.base, hooks)
        value = metric(logits, batch, ref)
        sites = list(dict.fromkeys([*needs.grad, *(fed for cut in cuts for _, fed in cut)]))
        got = torch.autograd.grad(value.sum(), [kept[s] for s in sites], retain_graph=bool(units), allow_unused=True)
        plain = {s: (g if g is not None else torch.zeros_like(kept[s])).detach() for s, g in zip(sites, got)}
        grads = [_kept(setup, {s: plain[s] for s in needs.grad})]
        for i, (unit, cut) in enumerate(zip(units, cuts)):
            below = [s for s in needs.grad if relation(unit, s, shape.parallel_attn_mlp) == "below"]
            got = torch.autograd.grad([kept[start] for start, _ in cut], [kept[s] for s in below],
                                      grad_outputs=[plain[fed] for _, fed in cut], retain_graph=i < len(units) - 1,
                                      allow_unused=True) if below else ()
            grads.append(_kept(setup, {s: (g if g is not None else torch.zeros_like(kept[s])).detach()
                                       for s, g in zip(below, got)}))
    point = _kept(setup, {s: kept[s].detach() for s in dict.fromkeys([*needs.act, *needs.base])})
    if not alpha:
        base = point
    elif base is None:
        raise ValueError("a run at an integration point needs the base run's activations")
    return GradRun(source, base, point, grads, list(units), value.detach(), shape.parallel_attn_mlp)


def _kept(setup: Setup, values: dict[Site, torch.Tensor]) -> Mapping[Site, torch.Tensor]:
    """``values`` where the setup keeps a run's activations and gradients (see :meth:`Setup.new_cache`)."""
    cache = setup.new_cache()
    cache.update(values)
    return cache


class Estimator(Protocol):
    """What a level (nodes, edges, groups) computes from gradient runs."""

    shape: tuple[int, ...]  # per pair
    needs: SiteNeeds
    n_terms: torch.Tensor | None  # GradDrop's non-trivial terms per entry (None: no GradDrop)
    partial_passes: bool  # True: dropped passes come as computed (below the unit only), see GradRun.full

    def prepare(self, source: dict[Site, torch.Tensor], base: dict[Site, torch.Tensor]) -> Any:
        """Per-batch work that depends only on the two runs' activations (shared by every pass)."""

    def gradient_side(self, prep: Any, point: dict[Site, torch.Tensor], grads: dict[Site, torch.Tensor]
                      ) -> dict[Any, torch.Tensor]:
        """What one backward pass contributes, linear in ``grads`` (so it can be averaged)."""

    def estimate(self, prep: Any, run: GradRun, sides: Iterable[dict[Any, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[b, *shape]`` estimates of the plain pass and the sum of the dropped passes' ``|estimates|``
        (``None`` without GradDrop), from the activation differences and every pass's gradient side."""


def _integrated(setup: Setup, batch: PairBatch, est: Estimator, steps: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integrated gradients: gradient sides averaged over ``steps`` midpoints from base to source."""
    _, source = capture(setup.model, batch.source, [*est.needs.act, EMBED], logits=False, cache=setup.new_cache())
    _, base = capture(setup.model, batch.base, est.needs.act, logits=False, cache=setup.new_cache())
    prep = est.prepare(source, base)
    mean: dict[Any, torch.Tensor] = {}
    run = None
    for k in range(steps):
        run = None  # the previous point's run is freed before the next one is made
        run = gradient_run(setup, batch, est.needs, source=source, alpha=(k + 0.5) / steps, base=base)
        for key, value in est.gradient_side(prep, run.point, run.grads[0]).items():
            mean[key] = mean[key] + value / steps if key in mean else value / steps
    assert run is not None
    return est.estimate(prep, run, [mean])


def _estimate_batch(setup: Setup, batch: PairBatch, method: Method, est: Estimator, units: Sequence[Unit],
                    ig_steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch's plain estimates and dropped passes' magnitudes; its runs and buffers are freed on
    return, before the next batch's runs are made."""
    if method.kind is Kind.INTEGRATED:
        with torch.no_grad():
            return _integrated(setup, batch, est, ig_steps)
    run = gradient_run(setup, batch, est.needs, units)
    passes = run.grads if est.partial_passes else [run.full(i) for i in range(len(run.grads))]
    with torch.no_grad():
        prep = est.prepare(run.source, run.base)
        return est.estimate(prep, run, (est.gradient_side(prep, run.point, g) for g in passes))


def estimate_pairs(setup: Setup, method: Method, est: Estimator, description: str, *, units: Sequence[Unit] = (),
                   ig_steps: int = 8, same_length: bool = False) -> tuple[PairStats, torch.Tensor | None,
                                                                            torch.Tensor | None]:
    """The one loop over prompt pairs: every batch's estimates, collected with their GradDrop magnitudes
    (batches small enough for the setup's memory budget)."""
    setup = setup.fit(setup.device_mb_per_pair(est.needs, 1 + len(units)))
    acc = setup.accumulator(est.shape)
    for batch in setup.batches(description, same_length=same_length):
        plain, dropped = _estimate_batch(setup, batch, method, est, units, ig_steps)
        magnitude = None
        if est.n_terms is not None and dropped is not None:
            magnitude = graddrop_magnitude(plain, dropped, est.n_terms)
        setup.check_finite(plain if magnitude is None else torch.stack([plain, magnitude]), "attribution estimates")
        acc.add(batch.index, plain, magnitude)
    return acc.result()
