"""The false-negative diagnostic (AtP* paper, §7 of the spec): after verifying the top ``K``
nodes of a method, bound the effect ``|c(n)|`` of every node left unverified.

Subsampling (Algorithm 1) over the unverified nodes only (verified nodes stay unpatched) gives,
per node, ``ĉ = ī+ − ī−``, its standard error ``SE = sqrt(s+²/m+ + s−²/m−)`` and the
Welch–Satterthwaite degrees of freedom ``ν``. A one-sided Welch test of ``|c(n)| ≥ θ`` at its
least favourable point rejects for ``θ ≥ |ĉ(n)| + t_{ν,1−α}·SE``; the global null "some
unverified node has ``|c| ≥ θ``" is a union of these, so (intersection–union test, no
multiplicity correction) the bound is ``θ* = max_n (|ĉ(n)| + t_{ν_n,1−α}·SE_n)``: with
confidence ``1 − α`` no unverified node has ``|c| ≥ θ*``.

:func:`edge_false_negative_bound` applies the same test to a list of unverified edges.

Validity needs ``ī+ − ī−`` to be close to unbiased for ``c(n)`` (weak interactions inside the
sampled subsets, i.e. small ``p``) and roughly normal subset means (moderate counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import stats as scipy_stats

from .baselines import Ranking, SubsetStats, attribution_ranking, order_ranking, subsampling, subset_statistics
from .errors import EdgeatpError
from .graph import Edge, EdgeGraph, Node, NodeIndex
from .metrics import Metric
from .model import ModelAdapter, load_model
from .patching import patch_edges
from .scores import NodeScores
from .tasks.pairs import Direction, PromptPairs


@dataclass(frozen=True, eq=False)
class WelchStats:
    """Per-node Welch quantities behind the bound (all ``[n]`` float64)."""

    estimate: torch.Tensor  # ĉ = ī+ − ī−
    se: torch.Tensor  # sqrt(s+²/m+ + s−²/m−)
    df: torch.Tensor  # Welch–Satterthwaite ν (inf when both variances are 0)
    t_quantile: torch.Tensor  # t_{ν, 1−α}
    upper: torch.Tensor  # |ĉ| + t·SE: the node's own 1−α upper bound on |c|


@dataclass(frozen=True, eq=False)
class FalseNegativeBound:
    """θ*: with confidence ``1 − alpha`` no node outside the verified top ``k`` has ``|c| ≥ theta``."""

    theta: float
    alpha: float
    k: int
    m: int
    p: float
    verified: tuple[Node, ...]
    unverified: NodeIndex
    stats: SubsetStats
    welch: WelchStats
    worst: Node  # the unverified node whose upper bound is θ*
    cost: float  # units spent on the diagnostic (m joint patches)


@dataclass(frozen=True, eq=False)
class EdgeFalseNegativeBound:
    """θ* over edges: with confidence ``1 − alpha`` no listed unverified edge has ``|c| ≥ theta``."""

    theta: float
    alpha: float
    m: int
    p: float
    edges: tuple[Edge, ...]
    stats: SubsetStats
    welch: WelchStats
    worst: Edge
    cost: float  # units (m joint patches)
    n_forwards: int  # forwards actually run (patch sets are stacked several per forward)


def welch_upper_bounds(stats: SubsetStats, alpha: float = 0.05, names: Sequence[str] | None = None,
                       kind: str = "node") -> WelchStats:
    """Per-node ``|ĉ| + t_{ν,1−α}·SE`` from Algorithm 1's statistics (pure; needs ≥ 2 included
    and ≥ 2 excluded samples per node, since fewer leave the variance undefined)."""
    if not 0.0 < alpha < 1.0:
        raise EdgeatpError(f"alpha={alpha} must lie strictly between 0 and 1")
    n_p, n_m = stats.n_plus.long(), stats.n_minus.long()
    short = ((n_p < 2) | (n_m < 2)).nonzero()[:, 0]
    if len(short):
        i = int(short[0])
        name = names[i] if names is not None else f"#{i}"
        raise EdgeatpError(
            f"{len(short)} {kind}(s) (first: {name}, included in {int(n_p[i])} and excluded from {int(n_m[i])} "
            "subsets) lack the >= 2 included and >= 2 excluded samples a variance needs, which makes the bound "
            "infinite; raise m, the number of subsets (or move p toward 0.5)")
    a = stats.var_plus.double() / n_p.double()
    b = stats.var_minus.double() / n_m.double()
    se2 = a + b
    den = a ** 2 / (n_p.double() - 1) + b ** 2 / (n_m.double() - 1)
    df = torch.where(den > 0, se2 ** 2 / den.clamp(min=torch.finfo(torch.float64).tiny),
                     torch.tensor(math.inf, dtype=torch.float64))
    t = torch.from_numpy(np.asarray(scipy_stats.t.ppf(1.0 - alpha, df.numpy()), dtype=np.float64))
    se = se2.sqrt()
    estimate = stats.estimate.double()
    return WelchStats(estimate, se, df, t, estimate.abs() + t * se)


def theta_star(stats: SubsetStats, alpha: float = 0.05) -> tuple[float, int]:
    """``θ* = max_n (|ĉ(n)| + t_{ν_n,1−α}·SE_n)`` and the index of the node attaining it."""
    upper = welch_upper_bounds(stats, alpha).upper
    i = int(torch.argmax(upper))
    return float(upper[i]), i


def _as_ranking(scores_or_order: NodeScores | Ranking | Sequence[Node]) -> Ranking:
    """Any ranked input as a :class:`Ranking` (an explicit order lists every candidate node)."""
    if isinstance(scores_or_order, Ranking):
        return scores_or_order
    if isinstance(scores_or_order, NodeScores):
        return attribution_ranking(scores_or_order)
    return order_ranking([Node.parse(x) if isinstance(x, str) else x for x in scores_or_order])


def false_negative_bound(
    model: ModelAdapter | object,
    pairs: PromptPairs,
    scores_or_order: NodeScores | Ranking | Sequence[Node],
    k: int,
    p: float = 0.05,
    m: int = 256,
    alpha: float = 0.05,
    seed: int = 0,
    metric: str | Metric = "logit_diff",
    direction: Direction | str = Direction.NOISING,
    batch_size: int = 256,
) -> FalseNegativeBound:
    """Verify the top ``k`` of a method's order, subsample the rest (``m`` subsets, inclusion
    probability ``p``) and return the upper confidence bound θ* on their ``|c|``."""
    adapter = load_model(model)
    ranking = _as_ranking(scores_or_order)
    order = ranking.ordered_nodes
    if not 0 <= k < len(order):
        raise EdgeatpError(f"k={k} must leave at least one of the {len(order)} nodes unverified (0 <= k < {len(order)})")
    verified, rest = order[:k], NodeIndex(tuple(sorted(order[k:], key=ranking.nodes.position_of)))
    result = subsampling(adapter, pairs, rest, p=p, m=m, seed=seed, metric=metric, direction=direction,
                         batch_size=batch_size)
    welch = welch_upper_bounds(result.stats, alpha, [n.name for n in rest])
    worst = int(torch.argmax(welch.upper))
    return FalseNegativeBound(float(welch.upper[worst]), alpha, k, m, p, tuple(verified), rest, result.stats,
                              welch, rest[worst], float(result.upfront))


def edge_false_negative_bound(
    model: ModelAdapter | object,
    pairs: PromptPairs,
    graph: EdgeGraph,
    unverified: Sequence[Edge],
    metric: str | Metric = "logit_diff",
    direction: Direction | str = Direction.NOISING,
    samples: int = 256,
    p: float = 0.05,
    alpha: float = 0.05,
    seed: int = 0,
    batch_size: int = 256,
) -> EdgeFalseNegativeBound:
    """The same bound over edges: ``samples`` joint patches of random subsets of the unverified
    edges (inclusion probability ``p``), then ``θ* = max_e (|ĉ(e)| + t·SE_e)``."""
    adapter = load_model(model)
    edges = tuple(unverified)
    if not edges:
        raise EdgeatpError("no unverified edges to bound: pass the edges left outside verification")
    if not 0.0 < p < 1.0 or samples < 1:
        raise EdgeatpError(f"need 0 < p < 1 and at least one sample (got p={p}, samples={samples})")
    gen = torch.Generator().manual_seed(seed)
    included = torch.rand(samples, len(edges), generator=gen, dtype=torch.float64) < p
    sets = [[edges[j] for j in row.nonzero()[:, 0].tolist()] for row in included]
    effects = patch_edges(adapter, pairs, graph, sets, metric, direction, batch_size,
                          labels=[f"subset{j}" for j in range(samples)])
    stats = subset_statistics(effects.mean, included)
    welch = welch_upper_bounds(stats, alpha, [e.name for e in edges], kind="edge")
    worst = int(torch.argmax(welch.upper))
    return EdgeFalseNegativeBound(float(welch.upper[worst]), alpha, samples, p, edges, stats, welch, edges[worst],
                                  float(samples), effects.n_forwards)
