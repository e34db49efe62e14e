"""MIB's circuit metrics: CPR and CMD at MIB's grid of circuit sizes.

As in the MIB circuit-localization track: the circuit at grid point ``x`` keeps the top
``int(x · N)`` edges of a ranking (``N`` = every edge of the graph, q/k/v inputs separate), then
drops dangling edges; its faithfulness is ``(m̄ − m̄_corrupt)/(m̄_clean − m̄_corrupt)`` (means over
the prompt pairs first, no clipping; 0 for the empty circuit, 1 for the whole model). On the nominal
fractions ``x`` (linear axis), CPR is the trapezoid area under faithfulness (higher is better) and
CMD the area under ``|1 − faithfulness|`` (lower is better). Both follow the method's own ranking
score (the one circuits are cut by; for AtP* its GradDrop magnitudes): CMD by the score, CPR by the
score signed by the mean estimate's direction (the edges that carry the behaviour first, as MIB
ranks by signed score). Searched circuits at the grid's sizes give both from the same circuits
(MIB's multi-circuit submissions).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .circuit import CircuitMetrics, Refinement, connected
from .errors import option_error
from .graph import EdgeGraph
from .scores import EdgeScores
from .setup import Setup
from .tasks.pairs import Direction
from .verification import Endpoints, endpoints, faithfulness_of

GRID: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def grid_sizes(n_edges: int, grid: Sequence[float] = GRID) -> tuple[int, ...]:
    """Edges kept at each grid point: ``int(x · n_edges)``, as MIB counts them."""
    return tuple(int(x * n_edges) for x in grid)


def _area(grid: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area of ``values`` over ``grid``."""
    if len(grid) != len(values) or len(grid) < 2:
        raise ValueError(f"need one value per grid point (at least two); got {len(values)} for {len(grid)}")
    return sum((grid[i + 1] - grid[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(grid) - 1))


def cpr(grid: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Circuit performance ratio: the area under faithfulness (higher is better)."""
    return _area(grid, faithfulness)


def cmd(grid: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Circuit-model distance: the area under ``|1 − faithfulness|`` (lower is better)."""
    return _area(grid, [abs(1.0 - f) for f in faithfulness])


def helpfulness(scores: EdgeScores, ends: Endpoints) -> torch.Tensor:
    """Ranking scores signed so that positive means "keeping the edge moves the metric towards the
    clean run" (by the sign of its mean estimate): noising effects that pull towards the corrupt
    run, denoising effects that push towards the clean one."""
    towards_clean = 1.0 if ends.gap > 0 else -1.0
    side = 1.0 if scores.direction is Direction.DENOISING else -1.0
    return scores.scores.double().cpu() * torch.sign(scores.signed.double().cpu() * towards_clean * side)


def top_edges(graph: EdgeGraph, values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``[P, W, R]`` mask of the ``k`` existing edges with the largest values (ties in canonical order)."""
    coords = graph.all_coords
    flat = values[tuple(coords.T)]
    mask = torch.zeros(graph.full_mask.shape, dtype=torch.bool)
    mask[tuple(coords[torch.sort(flat, descending=True, stable=True).indices[:k]].T)] = True
    return mask


def _faithfulness_at(setup: Setup, graph: EdgeGraph, masks: list[torch.Tensor], ends: Endpoints
                     ) -> tuple[list[float], int]:
    """Exact faithfulness of circuits (0 for the empty one and 1 for the whole graph, by definition),
    the others run once each in one sweep; and the forwards spent."""
    full = graph.full_mask
    todo = {}
    for m in masks:
        if bool(m.any()) and not torch.equal(m, full):
            todo.setdefault(tuple(m.nonzero().flatten().tolist()), m)
    values: dict[tuple[int, ...], float] = {}
    forwards = 0
    if todo:
        f, _, forwards = faithfulness_of(setup, graph, torch.stack(list(todo.values())), ends, necessity=False)
        values = dict(zip(todo, f.tolist()))
    out = [0.0 if not bool(m.any()) else 1.0 if torch.equal(m, full) else values[tuple(m.nonzero().flatten().tolist())]
           for m in masks]
    return out, forwards


def ranking_metrics(setup: Setup, scores: EdgeScores, grid: Sequence[float] = GRID) -> CircuitMetrics:
    """CPR and CMD of a ranking: the top edges at every grid point (CPR by the signed ranking score,
    CMD by the ranking score), dangling edges dropped, every circuit run exactly."""
    score = scores.scores.double().cpu()
    on = scores.graph.full_mask
    if not bool(torch.isfinite(score[on]).all() and torch.isfinite(scores.signed.double().cpu()[on]).all()):
        raise option_error("some edge estimates are not finite; the attribution overflowed: run in a wider "
                           "{dtype} (float32 or float64)")
    graph = scores.graph
    ends = endpoints(setup)
    sizes = grid_sizes(graph.n_edges, grid)
    cpr_masks = [connected(graph, top_edges(graph, helpfulness(scores, ends), k)) for k in sizes]
    cmd_masks = [connected(graph, top_edges(graph, score, k)) for k in sizes]
    values, forwards = _faithfulness_at(setup, graph, cpr_masks + cmd_masks, ends)
    f_cpr, f_cmd = values[: len(sizes)], values[len(sizes):]
    return CircuitMetrics(f"top-k of {scores.method}", graph.n_edges, tuple(grid),
                          tuple(int(m.sum()) for m in cpr_masks), tuple(f_cpr),
                          tuple(int(m.sum()) for m in cmd_masks), tuple(f_cmd), cpr(grid, f_cpr), cmd(grid, f_cmd),
                          forwards + ends.n_forwards)


def refined_metrics(refinement: Refinement, n_edges: int, grid: Sequence[float] = GRID) -> CircuitMetrics | None:
    """CPR and CMD of searched circuits when the search covered every grid size strictly between
    0 and ``n_edges`` (the empty circuit counts 0 and the whole model 1); ``None`` otherwise."""
    done = {r.size: r for r in refinement.sizes}
    sizes = grid_sizes(n_edges, grid)
    if any(0 < k < n_edges and k not in done for k in sizes):
        return None
    kept = tuple(0 if k == 0 else n_edges if k >= n_edges else len(done[k].edges) for k in sizes)
    f = tuple(0.0 if k == 0 else 1.0 if k >= n_edges else done[k].faithfulness for k in sizes)
    return CircuitMetrics(f"refined from {refinement.ranking}", n_edges, tuple(grid), kept, f, kept, f,
                          cpr(grid, f), cmd(grid, f), refinement.n_forwards)
