"""Attribution results: dense score tensors with light node/edge views.

A result keeps the signed per-pair estimates (``per_pair``) and the per-pair magnitudes the
method ranks by (``per_pair_abs``: ``|estimate|``, or GradDrop's mean of per-layer ``|·|``),
so its score ``E_pairs[per_pair_abs]`` and its signed mean come from one place. Results
know their method, direction, metric and sign convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .graph import Edge, EdgeGraph, Node, NodeIndex
from .metrics import sign_convention
from .tasks.pairs import Direction


@dataclass(frozen=True)
class Cost:
    """Work spent, in passes over the batch of prompt pairs (the AtP* paper's unit is a forward)."""

    forwards: int = 0
    backwards: int = 0

    def units(self, backward_cost: float = 2.0) -> float:
        """Cost in forward-pass units, a backward counted as ``backward_cost`` forwards."""
        return self.forwards + backward_cost * self.backwards

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.forwards + other.forwards, self.backwards + other.backwards)


def _stderr(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    if n < 2:
        return torch.full(x.shape[1:], float("nan"), dtype=x.dtype)
    return x.std(0, unbiased=True) / n ** 0.5


def _sign_agreement(x: torch.Tensor) -> torch.Tensor:
    """Among pairs with a non-zero estimate, the share with the majority sign (1 if all are zero)."""
    pos, neg = (x > 0).double().sum(0), (x < 0).double().sum(0)
    return torch.where(pos + neg > 0, torch.maximum(pos, neg) / (pos + neg).clamp(min=1), torch.ones_like(pos))


@dataclass(frozen=True, eq=False)
class _Result:
    per_pair: torch.Tensor
    per_pair_abs: torch.Tensor
    method: str
    direction: Direction
    metric: str
    cost: Cost = field(default_factory=Cost)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return int(self.per_pair.shape[0])

    @property
    def scores(self) -> torch.Tensor:
        """The ranking score ``E_pairs[per_pair_abs]`` (non-negative)."""
        return self.per_pair_abs.mean(0)

    @property
    def signed(self) -> torch.Tensor:
        """The signed mean estimate ``E_pairs[per_pair]``."""
        return self.per_pair.mean(0)

    @property
    def stderr(self) -> torch.Tensor:
        """Standard error of the signed mean across prompt pairs."""
        return _stderr(self.per_pair)

    @property
    def sign_agreement(self) -> torch.Tensor:
        """Share of prompt pairs whose signed estimate has the majority sign."""
        return _sign_agreement(self.per_pair)

    @property
    def sign_convention(self) -> str:
        return ("estimates approximate " + sign_convention(self.direction, self.metric)
                + "; scores rank by the mean over pairs of the per-pair magnitude")


@dataclass(frozen=True, eq=False)
class NodeScores(_Result):
    """Per-node attribution scores: ``per_pair`` is ``[pairs, nodes]``."""

    nodes: NodeIndex = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.per_pair.shape != self.per_pair_abs.shape or self.per_pair.shape[-1] != len(self.nodes):
            raise ValueError("per-pair tensors must be [pairs, nodes] and match the node index")

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, node: Node | str) -> float:
        return float(self.scores[self.nodes.position_of(node)])

    def signed_of(self, node: Node | str) -> float:
        return float(self.signed[self.nodes.position_of(node)])

    def order(self) -> torch.Tensor:
        """Node indices by decreasing score (stable)."""
        return torch.sort(self.scores, descending=True, stable=True).indices

    def top(self, k: int | None = None) -> list[tuple[Node, float, float]]:
        """The ``k`` best nodes as ``(node, score, signed mean)``."""
        idx = self.order()[: k if k is not None else len(self.nodes)]
        s, m = self.scores, self.signed
        return [(self.nodes[i], float(s[i]), float(m[i])) for i in idx.tolist()]

    def to_table(self, k: int | None = None) -> list[dict[str, Any]]:
        """Rows ``{node, score, signed, stderr, sign_agreement}`` by decreasing score."""
        idx = self.order()[: k if k is not None else len(self.nodes)]
        se, ag = self.stderr, self.sign_agreement
        return [{"node": self.nodes[i].name, "score": float(self.scores[i]), "signed": float(self.signed[i]),
                 "stderr": float(se[i]), "sign_agreement": float(ag[i])} for i in idx.tolist()]

    def select(self, nodes: list[Node]) -> "NodeScores":
        """The scores of a subset of nodes, in the given order."""
        idx = torch.tensor([self.nodes.position_of(n) for n in nodes], dtype=torch.long)
        return NodeScores(self.per_pair[:, idx], self.per_pair_abs[:, idx], self.method, self.direction,
                          self.metric, self.cost, dict(self.meta), NodeIndex(tuple(nodes)))


@dataclass(frozen=True, eq=False)
class EdgeScores(_Result):
    """Edge scores on an :class:`EdgeGraph`: ``per_pair`` is ``[pairs, (positions,) writers, readers]``;
    entries of edges that do not exist are 0."""

    graph: EdgeGraph = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        g = self.graph
        lead = (g.n_positions,) if g.n_positions else ()
        want = (*lead, g.n_writers, g.n_readers)
        if tuple(self.per_pair.shape[1:]) != want or self.per_pair.shape != self.per_pair_abs.shape:
            raise ValueError(f"per-pair edge scores must be [pairs, {', '.join(map(str, want))}]")

    @property
    def positional(self) -> bool:
        return self.graph.n_positions is not None

    def _coords(self, edge: Edge | str) -> tuple[int, ...]:
        e = Edge.parse(edge) if isinstance(edge, str) else edge
        w, r = self.graph.index_of(e)
        if self.positional:
            if e.position is None:
                raise KeyError(f"{e.name}: this graph is position-resolved; name a position, e.g. {e.name}@0")
            return (e.position, w, r)
        if e.position is not None:
            raise KeyError(f"{e.name}: this graph has no positions")
        return (w, r)

    def __getitem__(self, edge: Edge | str) -> float:
        return float(self.scores[self._coords(edge)])

    def signed_of(self, edge: Edge | str) -> float:
        return float(self.signed[self._coords(edge)])

    def flat(self) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
        """Scores of existing edges as a vector and their coordinates, canonical order."""
        coords = self.graph.edge_coords
        if self.positional:
            P = self.graph.n_positions or 0
            pos = torch.arange(P).repeat_interleave(len(coords))
            wr = coords.repeat(P, 1)
            full = torch.cat([pos[:, None], wr], 1)
        else:
            full = coords
        values = self.scores[tuple(full.T)]
        return values, [tuple(c) for c in full.tolist()]

    def edge_at(self, coord: tuple[int, ...]) -> Edge:
        if self.positional:
            p, w, r = coord
            return self.graph.edge(w, r, p)
        w, r = coord
        return self.graph.edge(w, r)

    def top(self, k: int | None = None) -> list[tuple[Edge, float, float]]:
        """The ``k`` best edges as ``(edge, score, signed mean)``."""
        values, coords = self.flat()
        order = torch.sort(values, descending=True, stable=True).indices
        order = order[: k if k is not None else len(order)]
        signed = self.signed
        return [(self.edge_at(coords[i]), float(values[i]), float(signed[coords[i]])) for i in order.tolist()]

    def edges(self) -> Iterator[tuple[Edge, float]]:
        values, coords = self.flat()
        for v, c in zip(values.tolist(), coords):
            yield self.edge_at(c), v

    def to_table(self, k: int | None = None) -> list[dict[str, Any]]:
        """Rows ``{edge, score, signed, stderr, sign_agreement}`` by decreasing score."""
        se, ag = self.stderr, self.sign_agreement
        rows = []
        for edge, score, signed in self.top(k):
            c = self._coords(edge)
            rows.append({"edge": edge.name, "score": score, "signed": signed, "stderr": float(se[c]),
                         "sign_agreement": float(ag[c])})
        return rows

    def writer_totals(self) -> torch.Tensor:
        """Per pair, the sum of each writer's outgoing signed edge estimates ``[pairs, writers]``
        (equals the writer's node AtP for plain edge AtP)."""
        x = self.per_pair.sum(1) if self.positional else self.per_pair
        return x.sum(-1)
