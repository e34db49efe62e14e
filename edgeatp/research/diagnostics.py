"""The false-negative diagnostic (AtP* paper, §7 of the spec): after verifying the top ``K``
nodes of a method, bound the effect ``|c(n)|`` of every node left unverified.

Subsampling (Algorithm 1) over the unverified nodes only (verified nodes stay unpatched) gives,
per node, ``ĉ = ī+ − ī−``, its standard error ``SE = sqrt(s+²/m+ + s−²/m−)`` and the
Welch–Satterthwaite degrees of freedom ``ν``. A one-sided Welch test of ``|c(n)| ≥ θ`` at its
least favourable point rejects for ``θ ≥ |ĉ(n)| + t_{ν,1−α}·SE``; the global null "some
unverified node has ``|c| ≥ θ``" is a union of these, so (intersection–union test, no
multiplicity correction) the bound is ``θ* = max_n (|ĉ(n)| + t_{ν_n,1−α}·SE_n)``: with
confidence ``1 − α`` no unverified node has ``|c| ≥ θ*``.

:func:`edgeatp.verification.edge_false_negative_bound` applies the same test to unverified edges;
the statistics themselves are :mod:`edgeatp.stats`.

Validity needs ``ī+ − ī−`` to be close to unbiased for ``c(n)`` (weak interactions inside the
sampled subsets, i.e. small ``p``) and roughly normal subset means (moderate counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import option_error
from ..graph import Node, NodeIndex
from ..scores import NodeScores
from ..setup import Setup
from ..stats import SubsetStats, WelchStats, welch_upper_bounds
from .baselines import Ranking, attribution_ranking, order_ranking, subsampling


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


def _as_ranking(scores_or_order: NodeScores | Ranking | Sequence[Node]) -> Ranking:
    """Any ranked input as a :class:`Ranking` (an explicit order lists every candidate node)."""
    if isinstance(scores_or_order, Ranking):
        return scores_or_order
    if isinstance(scores_or_order, NodeScores):
        return attribution_ranking(scores_or_order)
    return order_ranking([Node.parse(x) if isinstance(x, str) else x for x in scores_or_order])


def false_negative_bound(setup: Setup, scores_or_order: NodeScores | Ranking | Sequence[Node], k: int, *,
                         p: float = 0.05, m: int = 256, alpha: float = 0.05, seed: int = 0) -> FalseNegativeBound:
    """Verify the top ``k`` of a method's order, subsample the rest (``m`` subsets, inclusion
    probability ``p``) and return the upper confidence bound θ* on their ``|c|``."""
    ranking = _as_ranking(scores_or_order)
    order = ranking.ordered_nodes
    if not 0 <= k < len(order):
        raise option_error(f"{{k}}={k} must leave at least one of the {len(order)} nodes unverified (0 <= k < {len(order)})")
    verified, rest = order[:k], NodeIndex(tuple(sorted(order[k:], key=ranking.nodes.position_of)))
    result = subsampling(setup, rest, p=p, m=m, seed=seed)
    welch = welch_upper_bounds(result.stats, alpha, [n.name for n in rest])
    worst = int(torch.argmax(welch.upper))
    return FalseNegativeBound(float(welch.upper[worst]), alpha, k, m, p, tuple(verified), rest, result.stats,
                              welch, rest[worst], float(result.upfront))
