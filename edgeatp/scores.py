"""Attribution results: dense score tensors with light node/edge views.

Every method produces, per prompt pair, a signed estimate and the magnitude it ranks by
(``|estimate|``, or GradDrop's mean of per-layer ``|·|``). A result keeps running statistics of
both over the pairs (:class:`PairStats`: means, spread, sign counts), so scores, signed means,
standard errors and sign agreement need no per-pair storage; the per-pair tensors themselves are
kept too unless they would be large (``per_pair`` is then ``None``). Results know their method,
direction, metric and sign convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .errors import EdgeatpError
from .graph import Edge, EdgeGraph, Node, NodeIndex
from .methods import Cost
from .metrics import sign_convention
from .tasks.pairs import Direction


@dataclass(frozen=True, eq=False)
class PairStats:
    """Statistics over prompt pairs of a per-pair signed estimate ``x`` and magnitude ``m``.

    ``mean`` and ``m2`` (sum of squared deviations) follow Chan et al.'s pairwise update, so
    batches and processes merge without loss of precision.
    """

    n: int
    mean: torch.Tensor  # E[x]
    m2: torch.Tensor  # Σ (x − E[x])²
    magnitude: torch.Tensor  # E[m]
    n_pos: torch.Tensor  # pairs with x > 0
    n_neg: torch.Tensor  # pairs with x < 0

    @classmethod
    def of(cls, x: torch.Tensor, m: torch.Tensor | None = None) -> "PairStats":
        """Statistics of ``[pairs, ...]`` estimates (and magnitudes; default ``|x|``)."""
        x = x.double()
        m = x.abs() if m is None else m.double()
        n = int(x.shape[0])
        if n == 0:
            raise EdgeatpError("no prompt pairs to summarise")
        mean = x.mean(0)
        return cls(n, mean, ((x - mean) ** 2).sum(0), m.mean(0), (x > 0).sum(0).to(mean.dtype),
                   (x < 0).sum(0).to(mean.dtype))

    def merge(self, other: "PairStats") -> "PairStats":
        """The statistics of both sets of pairs together."""
        n = self.n + other.n
        delta = other.mean - self.mean
        wa, wb = self.n / n, other.n / n
        return PairStats(n, self.mean + delta * wb, self.m2 + other.m2 + delta ** 2 * (self.n * wb),
                         self.magnitude * wa + other.magnitude * wb, self.n_pos + other.n_pos,
                         self.n_neg + other.n_neg)

    def select(self, index: Any) -> "PairStats":
        """The statistics of some entries (``index`` applied to the trailing axes)."""
        return PairStats(self.n, self.mean[index], self.m2[index], self.magnitude[index], self.n_pos[index],
                         self.n_neg[index])

    def to(self, device: torch.device | str) -> "PairStats":
        return PairStats(self.n, *(t.to(device) for t in (self.mean, self.m2, self.magnitude, self.n_pos,
                                                           self.n_neg)))

    @property
    def stderr(self) -> torch.Tensor:
        """Standard error of the mean estimate (NaN with fewer than two pairs)."""
        if self.n < 2:
            return torch.full_like(self.mean, float("nan"))
        return (self.m2.clamp(min=0) / (self.n - 1)).sqrt() / self.n ** 0.5

    @property
    def sign_agreement(self) -> torch.Tensor:
        """Among pairs with a non-zero estimate, the share with the majority sign (1 if all are zero)."""
        both = self.n_pos + self.n_neg
        return torch.where(both > 0, torch.maximum(self.n_pos, self.n_neg) / both.clamp(min=1),
                           torch.ones_like(both))


Combine = Callable[[PairStats | None, tuple[int, ...], list[torch.Tensor | None]],
                   tuple[PairStats | None, list[torch.Tensor | None]]]


class Accumulator:
    """Collects per-pair estimates batch by batch into :class:`PairStats` (and, if asked, the
    per-pair tensors themselves, on the estimates' device until the end, then in host memory).

    ``combine`` joins the statistics and per-pair rows of the processes of a data-parallel run.
    """

    def __init__(self, n_pairs: int, shape: tuple[int, ...], keep_per_pair: bool, combine: Combine | None = None
                 ) -> None:
        self.n_pairs, self.shape, self.keep, self.combine = n_pairs, shape, keep_per_pair, combine
        self.stats: PairStats | None = None
        self.per_pair: torch.Tensor | None = None
        self.per_pair_abs: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, signed: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
        """Estimates ``[b, *shape]`` of dataset rows ``rows``."""
        if tuple(signed.shape[1:]) != self.shape:
            raise ValueError(f"estimates of shape {tuple(signed.shape)} do not fit {self.shape}")
        stats = PairStats.of(signed, magnitude)
        self.stats = stats if self.stats is None else self.stats.merge(stats)
        if self.keep:
            if self.per_pair is None:
                self.per_pair = torch.zeros((self.n_pairs, *self.shape), dtype=torch.float64, device=signed.device)
                self.per_pair_abs = torch.zeros_like(self.per_pair)
            r = rows.to(self.per_pair.device)
            self.per_pair[r] = signed.double().to(self.per_pair.device)
            self.per_pair_abs[r] = (signed.abs() if magnitude is None else magnitude).double().to(self.per_pair.device)

    def result(self) -> tuple[PairStats, torch.Tensor | None, torch.Tensor | None]:
        stats = self.stats
        rows = [self.per_pair, self.per_pair_abs]
        if self.keep and self.per_pair is None:  # no pairs here (a data-parallel share can be empty)
            rows = [torch.zeros((self.n_pairs, *self.shape), dtype=torch.float64) for _ in range(2)]
        if self.combine is not None:
            stats, rows = self.combine(stats, self.shape, rows)
        if stats is None:
            raise EdgeatpError("no prompt pairs were processed")
        per_pair, per_pair_abs = (None if t is None else t.cpu() for t in rows)
        return stats, per_pair, per_pair_abs


@dataclass(frozen=True, eq=False)
class _Result:
    stats: PairStats
    method: str
    direction: Direction
    metric: str
    cost: Cost = field(default_factory=Cost)
    meta: dict[str, Any] = field(default_factory=dict)
    per_pair: torch.Tensor | None = field(default=None, repr=False)  # [pairs, ...] signed, when kept
    per_pair_abs: torch.Tensor | None = field(default=None, repr=False)  # [pairs, ...] ranking magnitudes

    @property
    def n_pairs(self) -> int:
        return self.stats.n

    @property
    def scores(self) -> torch.Tensor:
        """The ranking score: the mean over pairs of the per-pair magnitude (non-negative)."""
        return self.stats.magnitude

    @property
    def signed(self) -> torch.Tensor:
        """The signed mean estimate."""
        return self.stats.mean

    @property
    def stderr(self) -> torch.Tensor:
        """Standard error of the signed mean across prompt pairs."""
        return self.stats.stderr

    @property
    def sign_agreement(self) -> torch.Tensor:
        """Share of prompt pairs whose signed estimate has the majority sign."""
        return self.stats.sign_agreement

    @property
    def sign_convention(self) -> str:
        return ("estimates approximate " + sign_convention(self.direction, self.metric)
                + "; scores rank by the mean over pairs of the per-pair magnitude")

    def need_per_pair(self, what: str) -> torch.Tensor:
        """The per-pair signed estimates, or a clear error when they were not kept."""
        if self.per_pair is None:
            raise EdgeatpError(f"{what} needs the per-pair estimates, which were not kept for this large result; "
                               "run with keep_per_pair=True")
        return self.per_pair


def _check_shape(stats: PairStats, want: tuple[int, ...], what: str) -> None:
    if tuple(stats.mean.shape) != want:
        raise EdgeatpError(f"{what} statistics must have shape {want}, got {tuple(stats.mean.shape)}")


@dataclass(frozen=True, eq=False)
class NodeScores(_Result):
    """Per-node attribution scores over a :class:`NodeIndex` (statistics ``[nodes]``)."""

    nodes: NodeIndex = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        _check_shape(self.stats, (len(self.nodes),), "node")

    @classmethod
    def from_per_pair(cls, per_pair: torch.Tensor, per_pair_abs: torch.Tensor | None, method: str,
                      direction: Direction, metric: str, nodes: NodeIndex, cost: Cost = Cost(),
                      meta: dict[str, Any] | None = None) -> "NodeScores":
        """Scores from ``[pairs, nodes]`` estimates (magnitudes default to ``|estimate|``)."""
        absolute = per_pair.abs() if per_pair_abs is None else per_pair_abs
        return cls(PairStats.of(per_pair, absolute), method, Direction(direction), metric, cost, meta or {},
                   per_pair.double(), absolute.double(), nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, node: Node | str) -> float:
        return float(self.scores[self.nodes.position_of(node)])

    def signed_of(self, node: Node | str) -> float:
        return float(self.signed[self.nodes.position_of(node)])

    def order(self) -> torch.Tensor:
        """Node indices by decreasing score (stable)."""
        return torch.sort(self.scores.cpu(), descending=True, stable=True).indices

    def top(self, k: int | None = None) -> list[tuple[Node, float, float]]:
        """The ``k`` best nodes as ``(node, score, signed mean)``."""
        idx = self.order()[: k if k is not None else len(self.nodes)].tolist()
        s, m = self.scores.cpu().tolist(), self.signed.cpu().tolist()
        return [(self.nodes[i], s[i], m[i]) for i in idx]

    def to_table(self, k: int | None = None) -> list[dict[str, Any]]:
        """Rows ``{node, score, signed, stderr, sign_agreement}`` by decreasing score."""
        idx = self.order()[: k if k is not None else len(self.nodes)].tolist()
        se, ag = self.stderr.cpu().tolist(), self.sign_agreement.cpu().tolist()
        s, m = self.scores.cpu().tolist(), self.signed.cpu().tolist()
        return [{"node": self.nodes[i].name, "score": s[i], "signed": m[i], "stderr": se[i],
                 "sign_agreement": ag[i]} for i in idx]

    def select(self, nodes: list[Node]) -> "NodeScores":
        """The scores of a subset of nodes, in the given order."""
        idx = torch.tensor([self.nodes.position_of(n) for n in nodes], dtype=torch.long)
        pick = (lambda t: None if t is None else t[:, idx])
        return NodeScores(self.stats.select(idx.to(self.stats.mean.device)), self.method, self.direction,
                          self.metric, self.cost, dict(self.meta), pick(self.per_pair), pick(self.per_pair_abs),
                          NodeIndex(tuple(nodes)))


@dataclass(frozen=True, eq=False)
class EdgeScores(_Result):
    """Edge scores on an :class:`EdgeGraph`: statistics ``[P, writers, readers]`` (``P = 1`` for a
    position-aggregated graph); entries of edges that do not exist are 0."""

    graph: EdgeGraph = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        g = self.graph
        _check_shape(self.stats, (g.P, g.n_writers, g.n_readers), "edge")

    @classmethod
    def from_per_pair(cls, per_pair: torch.Tensor, per_pair_abs: torch.Tensor | None, method: str,
                      direction: Direction, metric: str, graph: EdgeGraph, cost: Cost = Cost(),
                      meta: dict[str, Any] | None = None) -> "EdgeScores":
        """Scores from ``[pairs, P, W, R]`` estimates (magnitudes default to ``|estimate|``)."""
        absolute = per_pair.abs() if per_pair_abs is None else per_pair_abs
        return cls(PairStats.of(per_pair, absolute), method, Direction(direction), metric, cost, meta or {},
                   per_pair.double(), absolute.double(), graph)

    @property
    def positional(self) -> bool:
        return self.graph.positional

    def _coords(self, edge: Edge | str) -> tuple[int, int, int]:
        e = Edge.parse(edge) if isinstance(edge, str) else edge
        w, r = self.graph.index_of(e)
        return (self.graph.position_index(e), w, r)

    def __getitem__(self, edge: Edge | str) -> float:
        return float(self.scores[self._coords(edge)])

    def signed_of(self, edge: Edge | str) -> float:
        return float(self.signed[self._coords(edge)])

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of existing edges as a vector and their ``[n, 3]`` (position, writer, reader)
        coordinates, canonical order (positions outermost)."""
        coords = self.graph.all_coords
        return self.scores.cpu()[tuple(coords.T)], coords

    def top(self, k: int | None = None) -> list[tuple[Edge, float, float]]:
        """The ``k`` best edges as ``(edge, score, signed mean)``."""
        values, coords = self.flat()
        order = torch.sort(values, descending=True, stable=True).indices
        order = order[: k if k is not None else len(order)]
        picked = coords[order]
        signed = self.signed.cpu()[tuple(picked.T)].tolist()
        return [(self.graph.edge_at(tuple(c)), v, s)
                for c, v, s in zip(picked.tolist(), values[order].tolist(), signed)]

    def edges(self) -> Iterator[tuple[Edge, float]]:
        values, coords = self.flat()
        for v, c in zip(values.tolist(), coords.tolist()):
            yield self.graph.edge_at(tuple(c)), v

    def to_table(self, k: int | None = None) -> list[dict[str, Any]]:
        """Rows ``{edge, score, signed, stderr, sign_agreement}`` by decreasing score."""
        se, ag = self.stderr.cpu(), self.sign_agreement.cpu()
        rows = []
        for edge, score, signed in self.top(k):
            c = self._coords(edge)
            rows.append({"edge": edge.name, "score": score, "signed": signed, "stderr": float(se[c]),
                         "sign_agreement": float(ag[c])})
        return rows

    def writer_totals(self) -> torch.Tensor:
        """Per pair, the sum of each writer's outgoing signed edge estimates ``[pairs, writers]``
        (equals the writer's node AtP for plain edge AtP)."""
        return self.need_per_pair("writer totals").sum((1, 3))
