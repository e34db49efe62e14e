"""The forward/backward passes every gradient method shares.

:func:`gradient_run` does, for one batch: a source forward (activations of the run patched
from), a base forward that keeps the requested activations on the autograd graph, and one
backward of the summed per-pair metric — plus, for GradDrop, one more backward per dropped
unit with the gradient into that unit's residual write stopped (forward values unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from ..metrics import Metric
from ..model import FwdHook, ModelAdapter, Site
from ..patching import capture, reference_logprobs
from ..tasks.pairs import PairBatch

GradDropMode = Literal["block", "sublayer"]


class _Drop:
    """Which GradDrop unit is dropped in the current backward (``None`` = plain backward)."""

    unit: tuple[str, int] | None = None


class _Gate(torch.autograd.Function):
    """Identity forward; backward passes the gradient unless this gate's unit is dropped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: _Drop, unit: tuple[str, int]) -> torch.Tensor:  # type: ignore[override]
        ctx.state, ctx.unit = state, unit
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        dropped = ctx.state.unit == ctx.unit
        return (torch.zeros_like(g) if dropped else g), None, None


def graddrop_units(adapter: ModelAdapter, mode: GradDropMode = "block") -> list[tuple[str, int]]:
    """The units whose residual writes GradDrop drops one at a time.

    ``block``: one unit per transformer block (attention + MLP writes together), the AtP*
    paper's ``L`` terms (exact for parallel blocks, our default for sequential ones);
    ``sublayer``: attention and MLP writes separately (``2L`` terms for sequential blocks).
    """
    shape = adapter.shape
    if mode == "block" or shape.attn_only:
        return [("block", layer) for layer in range(shape.n_layers)]
    if mode != "sublayer":
        raise ValueError(f"unknown GradDrop granularity {mode!r}; use 'block' or 'sublayer'")
    return [(kind, layer) for layer in range(shape.n_layers) for kind in ("attn", "mlp")]


def nonzero_terms(units: list[tuple[str, int]], blocks: set[tuple[str, int] | None]) -> int:
    """How many GradDrop terms are not identically zero for something living in ``blocks``
    (sublayers ``("attn"|"mlp", layer)``; ``None`` = outside every block, e.g. the embedding or
    the logits): a term is zero only when every part of it sits inside the dropped unit."""
    if not units or None in blocks:
        return len(units)
    inside = {("block", b[1]) for b in blocks} if units[0][0] == "block" else set(blocks)  # type: ignore[index]
    return len(units) - (1 if len(inside) == 1 and next(iter(inside)) in units else 0)


def unit_of_write(site_kind: str, layer: int, mode: GradDropMode) -> tuple[str, int]:
    """The GradDrop unit a sublayer's write belongs to."""
    return ("block", layer) if mode == "block" else (site_kind, layer)


@dataclass
class GradRun:
    """Activations of both runs and the metric's gradients at the requested sites.

    ``grads[0]`` is the ordinary backward; ``grads[i + 1]`` the backward with ``units[i]`` dropped.
    """

    base: dict[Site, torch.Tensor]
    source: dict[Site, torch.Tensor]
    grads: list[dict[Site, torch.Tensor]]
    units: list[tuple[str, int]]
    base_metric: torch.Tensor


def gradient_run(
    adapter: ModelAdapter,
    batch: PairBatch,
    metric: Metric,
    act_sites: Sequence[Site],
    grad_sites: Sequence[Site],
    graddrop: GradDropMode | None = None,
    base_sites: Sequence[Site] = (),
    source: dict[Site, torch.Tensor] | None = None,
    alpha: float = 0.0,
) -> GradRun:
    """One batch's activations (``act_sites`` in both runs, ``base_sites`` in the base run only)
    and gradients (``grad_sites``) of the summed per-pair metric on the base run.

    ``source`` reuses source-run activations (it must include ``resid_pre`` of block 0 when
    ``alpha`` is set); ``alpha`` moves the base run's embedding that far toward the source's
    (integrated gradients), in which case ``base`` holds the interpolated run's activations.
    """
    ref = reference_logprobs(adapter, batch, metric)
    if source is None:
        _, source = capture(adapter, batch.source, [*act_sites, Site("resid_pre", 0)] if alpha else act_sites,
                            logits=False)
    kept: dict[Site, torch.Tensor] = {}
    state = _Drop()

    src0 = source.get(Site("resid_pre", 0))

    def keep(site: Site) -> FwdHook:
        def fn(t: torch.Tensor) -> torch.Tensor | None:
            if alpha and site == Site("resid_pre", 0):
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

    def gate(unit: tuple[str, int]) -> FwdHook:
        return lambda t: _Gate.apply(t, state, unit)

    hooks: list[tuple[Site, FwdHook]] = [(Site("resid_pre", 0), keep(Site("resid_pre", 0)))]
    for s in dict.fromkeys([*act_sites, *grad_sites, *base_sites]):
        if s != Site("resid_pre", 0):
            hooks.append((s, keep(s)))
    units = graddrop_units(adapter, graddrop) if graddrop else []
    if graddrop:
        for layer in range(adapter.shape.n_layers):
            hooks.append((Site("attn_out", layer), gate(unit_of_write("attn", layer, graddrop))))
            if not adapter.shape.attn_only:
                hooks.append((Site("mlp_out", layer), gate(unit_of_write("mlp", layer, graddrop))))
    with torch.enable_grad():
        logits = adapter.forward(batch.base, hooks)
        value = metric(logits, batch, ref)
        total = value.sum()
        targets = [kept[s] for s in grad_sites]
        grads = []
        for unit in [None, *units]:
            state.unit = unit
            got = torch.autograd.grad(total, targets, retain_graph=unit != (units[-1] if units else None),
                                      allow_unused=True)
            grads.append({s: (g if g is not None else torch.zeros_like(t)).detach()
                          for s, g, t in zip(grad_sites, got, targets)})
    base = {s: kept[s].detach() for s in dict.fromkeys([*act_sites, *base_sites])}
    return GradRun(base, source, grads, units, value.detach())
