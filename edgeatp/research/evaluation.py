"""Evaluating node-ranking methods against exhaustive exact patching (spec §8).

* Ground truth: every candidate node patched alone; ``c(n) = E_pairs[I]`` and the ranking key
  ``|c(n)|`` (``"signed_mean"``, default) or ``E_pairs|I|`` (``"mean_abs"``).
* Cost-of-verification curve: ``cost_M(x) = U_M + max_{n ∈ Top_x} rank_M(n)`` — the units
  spent until every one of the ``x`` truly largest nodes is verified (for Hierarchical: the
  patches made until the last of them is emitted). Units as in :mod:`edgeatp.baselines`.
  Ties in the true ``|c|`` are resolved in the method's favour: any ``x`` nodes that form a
  valid top-``x`` set count, so the curve is ``cummax`` of the methods' per-node verification
  costs sorted by (true ``|c|`` descending, cost ascending) — deterministic and independent of
  how tied nodes are indexed. Ties in a method's own scores are broken by the order the method
  emits (stable index order for attribution scores; seeded random order inside a Block).
* Oracle: verifies in true order, ``oracle(x) = x``.
* IRWRGM: ``exp(Σ_{x≤X} (1/x)·ln(cost_M(x)/x) / Σ_{x≤X} 1/x)``; 1 for the oracle, larger is
  worse. ``X`` is the horizon (default: the nodes whose ``|c|`` is not negligible).
* Recall@k: the share of a valid true top-``k`` found in the method's first ``k`` nodes (ties
  again in the method's favour).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..attribution.nodes import attribute_nodes, resolve_nodes
from ..errors import EdgeatpError
from ..graph import NodeIndex
from ..methods import METHODS, Kind
from ..setup import Setup
from ..tasks.pairs import Direction
from .baselines import (EFFECT_KINDS, EffectKind, NodesArg, Ranking, attribution_ranking, blocks, hierarchical,
                        iterative, joint_effects, subsampling)

BASELINE_METHODS = ("iterative", "subsampling", "blocks", "hierarchical")
ATTRIBUTION_METHODS = tuple(name for name, m in METHODS.items() if m.kind is not Kind.EXACT)
DEFAULT_METHODS = ("iterative", "atp", "atp-qk", "atp*", "subsampling", "blocks", "hierarchical")


# ------------------------------------------------------------------------------------ ground truth
@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Exact single-node patching effects of every candidate node."""

    nodes: NodeIndex
    per_pair: torch.Tensor  # [pairs, n] float64
    kind: EffectKind
    metric: str
    direction: Direction

    @property
    def signed(self) -> torch.Tensor:
        """``c(n) = E_pairs[I]``."""
        return self.per_pair.mean(0)

    @property
    def magnitude(self) -> torch.Tensor:
        """The key the evaluation ranks by: ``|c(n)|`` or ``E_pairs|I|``."""
        return self.signed.abs() if self.kind == "signed_mean" else self.per_pair.abs().mean(0)

    @property
    def cost(self) -> float:
        """Units spent: one forward per node."""
        return float(len(self.nodes))

    def oracle(self) -> Ranking:
        """The oracle's verification order (decreasing true magnitude, ties in index order)."""
        order = torch.sort(self.magnitude, descending=True, stable=True).indices
        return Ranking(method="oracle", nodes=self.nodes, order=order, upfront=0.0, scores=self.magnitude)

    def top(self, x: int) -> list[int]:
        """Indices of ``x`` nodes with the largest magnitude (ties in index order)."""
        return self.oracle().order[:x].tolist()


def compute_ground_truth(setup: Setup, nodes: NodeIndex, kind: EffectKind = "signed_mean") -> GroundTruth:
    """Patch every node alone (exhaustive activation patching) to get the true effects."""
    if kind not in EFFECT_KINDS:
        raise EdgeatpError(f"unknown ground truth {kind!r}; use 'signed_mean' or 'mean_abs'")
    per_pair = joint_effects(setup, [[n] for n in nodes])
    return GroundTruth(nodes, per_pair, kind, setup.metric.name, setup.direction)


# ------------------------------------------------------------------------------------ curves
def _check_aligned(magnitude: torch.Tensor, other: torch.Tensor, what: str) -> None:
    """Both vectors must describe the same nodes in the same order."""
    if magnitude.dim() != 1 or other.shape != magnitude.shape:
        raise EdgeatpError(f"true magnitudes and {what} must be vectors over the same nodes")


def _horizon(n: int, horizon: int | None) -> int:
    """Validate a horizon against the number of nodes (``None`` = all)."""
    X = n if horizon is None else horizon
    if not 1 <= X <= n:
        raise EdgeatpError(f"horizon {horizon} must lie in 1..{n} (the number of nodes)")
    return X


def cost_curve(magnitude: torch.Tensor, costs: torch.Tensor, horizon: int | None = None) -> torch.Tensor:
    """``cost_M(x)`` for ``x = 1..X`` from the true magnitudes and the method's per-node
    verification costs (same node order), ties in the truth resolved in the method's favour."""
    _check_aligned(magnitude, costs, "verification costs")
    X = _horizon(len(magnitude), horizon)
    by_cost = torch.sort(costs.double(), stable=True).indices
    by_truth = by_cost[torch.sort(magnitude.double()[by_cost], descending=True, stable=True).indices]
    return torch.cummax(costs.double()[by_truth], 0).values[:X]


def oracle_curve(horizon: int) -> torch.Tensor:
    """The oracle's curve ``x`` for ``x = 1..X``."""
    return torch.arange(1, horizon + 1, dtype=torch.float64)


def irwrgm(curve: torch.Tensor) -> float:
    """Inverse-rank-weighted relative geometric mean of ``curve[x−1] / x`` (weights ``1/x``)."""
    if curve.dim() != 1 or len(curve) == 0:
        raise EdgeatpError("IRWRGM needs a non-empty cost curve")
    x = oracle_curve(len(curve))
    w = 1.0 / x
    return float(torch.exp((w * torch.log(curve.double() / x)).sum() / w.sum()))


def recall_at_k(magnitude: torch.Tensor, order: torch.Tensor, k: int) -> float:
    """Share of a true top-``k`` among the method's first ``k`` nodes (``order``: node indices,
    first verified first); a tie at the true ``k``-th value counts any of the tied nodes."""
    n = len(magnitude)
    if order.shape != (n,):
        raise EdgeatpError("the order must list every node once")
    if k < 1:
        raise EdgeatpError(f"k={k} must be at least 1")
    k = min(k, n)
    mag = magnitude.double()
    kth = torch.sort(mag, descending=True).values[k - 1]
    picked = mag[order[:k]]
    above = int((picked > kth).sum())
    tied = int((picked == kth).sum())
    return (above + min(tied, k - int((mag > kth).sum()))) / k


def default_horizon(magnitude: torch.Tensor, negligible: float = 1e-3) -> int:
    """Number of nodes whose magnitude exceeds ``negligible`` times the largest (at least 1)."""
    top = float(magnitude.max())
    return max(1, int((magnitude > negligible * top).sum())) if top > 0 else len(magnitude)


# ------------------------------------------------------------------------------------ one method
@dataclass(frozen=True, eq=False)
class MethodEvaluation:
    """How one method's order compares with the truth."""

    label: str
    method: str
    irwrgm: float
    recall: dict[int, float]
    upfront: float  # units not spent verifying single nodes
    cost_at_horizon: float  # units until the whole true top-X is verified
    wall_time: float  # seconds (median over repeats) to produce the order
    curve: torch.Tensor  # [X] cost_M(x)


def evaluate_ranking(truth: GroundTruth, ranking: Ranking, horizon: int, ks: Sequence[int] = (10, 50),
                     label: str | None = None, wall_time: float = float("nan")) -> MethodEvaluation:
    """Curve, IRWRGM, recalls and costs of one ranking against the ground truth."""
    if tuple(ranking.nodes) != tuple(truth.nodes):
        raise EdgeatpError(f"{ranking.method}: the ranking and the ground truth must cover the same nodes in the same order")
    mag = truth.magnitude
    curve = cost_curve(mag, ranking.verification_costs(), horizon)
    return MethodEvaluation(label or ranking.method, ranking.method, irwrgm(curve),
                            {k: recall_at_k(mag, ranking.order, k) for k in ks}, float(ranking.upfront),
                            float(curve[-1]), wall_time, curve)


# ------------------------------------------------------------------------------------ many methods
@dataclass(frozen=True)
class MethodSpec:
    """A method name (a node attribution method or a baseline) with keyword parameters."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def title(self) -> str:
        """The label shown in tables."""
        return self.label or self.name


@dataclass(frozen=True, eq=False)
class EvaluationTable:
    """One row per method, plus the ground truth and horizon they were scored against."""

    rows: tuple[MethodEvaluation, ...]
    truth: GroundTruth
    horizon: int
    truth_wall_time: float
    backward_cost: float

    def to_rows(self) -> list[dict[str, Any]]:
        """Plain dict rows (method, IRWRGM, recall@k, upfront, cost@X, wall time)."""
        out = []
        for r in self.rows:
            row: dict[str, Any] = {"method": r.label, "irwrgm": r.irwrgm}
            row.update({f"recall@{k}": v for k, v in r.recall.items()})
            row.update({"upfront": r.upfront, "cost@X": r.cost_at_horizon, "wall_time": r.wall_time})
            out.append(row)
        return out


def _as_spec(method: str | MethodSpec) -> MethodSpec:
    """Accept bare names and check them."""
    spec = MethodSpec(method) if isinstance(method, str) else method
    if spec.name not in ATTRIBUTION_METHODS and spec.name not in BASELINE_METHODS:
        raise EdgeatpError(f"unknown method {spec.name!r}; choose from "
                           f"{', '.join([*ATTRIBUTION_METHODS, *BASELINE_METHODS])}")
    return spec


def _timed(fn: Callable[[], Ranking], repeats: int) -> tuple[Ranking, float]:
    """The result of ``fn`` and its median wall time over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def evaluate_methods(
    setup: Setup,
    methods: Iterable[str | MethodSpec] = DEFAULT_METHODS,
    nodes: NodesArg = None,
    positions: bool = True,
    ground_truth: EffectKind = "signed_mean",
    horizon: int | None = None,
    negligible: float = 1e-3,
    ks: Sequence[int] = (10, 50),
    backward_cost: float = 2.0,
    seed: int = 0,
    repeats: int = 1,
    truth: GroundTruth | None = None,
) -> EvaluationTable:
    """Exhaustive ground truth once, then every method's order scored against it.

    Nodes default to every head output, query, key, value (and MLP) per position. Hierarchical
    stops its search once the true top-``X`` is emitted (later emissions do not enter the
    curve). ``truth`` reuses an earlier ground truth for the same nodes, pairs and metric.
    """
    specs = [_as_spec(m) for m in methods]
    if repeats < 1:
        raise EdgeatpError(f"repeats={repeats} must be at least 1")
    index = resolve_nodes(setup.model, nodes, positions, setup.pairs.n_positions)
    truth_time = float("nan")
    if truth is None:
        t0 = time.perf_counter()
        truth = compute_ground_truth(setup, index, ground_truth)
        truth_time = time.perf_counter() - t0
    elif tuple(truth.nodes) != tuple(index):
        raise EdgeatpError("the given ground truth covers other nodes; pass the same nodes or drop truth=")
    X = _horizon(len(index), horizon if horizon is not None else default_horizon(truth.magnitude, negligible))
    targets = [index[i] for i in truth.top(X)]
    effect = truth.kind

    def runner(spec: MethodSpec) -> Callable[[], Ranking]:
        """A no-argument call that runs one method on the shared nodes and settings."""
        p = dict(spec.params)
        if spec.name in ATTRIBUTION_METHODS:
            return lambda: attribution_ranking(attribute_nodes(setup, spec.name, index, **p), backward_cost)
        if spec.name == "iterative":
            return lambda: iterative(index, seed=p.get("seed", seed))
        if spec.name == "subsampling":
            return lambda: subsampling(setup, index, **{"seed": seed, "effect": effect, **p})
        if spec.name == "blocks":
            return lambda: blocks(setup, index, **{"seed": seed, "effect": effect, **p})
        return lambda: hierarchical(setup, index, **{"effect": effect, "targets": targets, **p})

    rows = []
    for spec in specs:
        ranking, wall = _timed(runner(spec), repeats)
        rows.append(evaluate_ranking(truth, ranking, X, ks, spec.title, wall))
    return EvaluationTable(tuple(rows), truth, X, truth_time, backward_cost)
