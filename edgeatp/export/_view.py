"""Flat, export-ready views of a circuit shared by the networkx, DOT and report writers.

A circuit's edges go from a writer (``input``, a head, an MLP or a neuron) to a reader (a head's
q/k/v input, an MLP input or the logits). Exports draw *components*: a q/k/v reader is drawn as
its head, and in a position-resolved circuit every component exists once per position
(``a1.h3@5``). The **node score** of a component in an edge-level circuit is the sum of the
``score`` of the kept edges that touch it (incoming plus outgoing); in a node- or neuron-level
circuit it is the circuit's ``node_scores`` entry (``None`` when the component was not scored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..circuit import Circuit
from ..graph import Edge, ModelShape, Node, NodeKind
from ..tasks.pairs import Direction


@dataclass(frozen=True)
class EdgeRow:
    """One edge of a circuit with its numbers: ranking score, signed estimate, exact effect."""

    edge: Edge
    score: float
    signed: float
    exact: float | None
    in_graph: bool

    @property
    def writer(self) -> Node:
        """The writing component at the edge's position."""
        return self.edge.writer.at(self.edge.position)

    @property
    def reader(self) -> Node:
        """The reading component (a head for q/k/v inputs) at the edge's position."""
        return self.edge.reader.head_node.at(self.edge.position)

    @property
    def reader_type(self) -> str:
        """``q``, ``k``, ``v``, ``mlp`` or ``logits``: which input of the reader the edge enters."""
        return reader_type(self.edge.reader)


def reader_type(node: Node) -> str:
    """The input a reader node stands for (``q``/``k``/``v``/``mlp``/``logits``)."""
    return node.kind.value


def exact_effects(circuit: Circuit) -> dict[str, float]:
    """Verified exact effects keyed by edge name (empty when the circuit was not verified)."""
    if circuit.verification is None:
        return {}
    return {c.name: c.exact for c in circuit.verification.checks}


def edge_rows(circuit: Circuit, include_all: bool = False) -> list[EdgeRow]:
    """The circuit's kept edges (or every existing edge) by decreasing score, ties in graph order."""
    g = circuit.graph
    mask = g.full_mask if include_all else circuit.in_graph & g.full_mask
    coords = mask.nonzero()
    score = circuit.score[tuple(coords.T)].double()
    order = torch.sort(score, descending=True, stable=True).indices
    coords = coords[order]
    scores, signed = score[order].tolist(), circuit.signed[tuple(coords.T)].double().tolist()
    kept = circuit.in_graph[tuple(coords.T)].tolist()
    exact = exact_effects(circuit)
    rows = []
    for c, s, x, k in zip(coords.tolist(), scores, signed, kept):
        edge = g.edge_at(tuple(c))
        rows.append(EdgeRow(edge, s, x, exact.get(edge.name), bool(k)))
    return rows


def node_score_map(circuit: Circuit, rows: list[EdgeRow]) -> dict[Node, float | None]:
    """Node score of every component the rows touch (see the module docstring for the definition)."""
    if circuit.level != "edge":
        return {n: circuit.node_scores.get(n.component.name) for r in rows for n in (r.writer, r.reader)}
    total: dict[Node, float] = {}
    for row in rows:
        for node in (row.writer, row.reader):
            total[node] = total.get(node, 0.0) + (row.score if row.in_graph else 0.0)
    return dict(total)


def kept_nodes(rows: list[EdgeRow]) -> set[Node]:
    """Components (at their positions) touched by a kept edge."""
    return {n for r in rows if r.in_graph for n in (r.writer, r.reader)}


def sign_legend(direction: Direction, metric: str = "logit_diff") -> str:
    """What a positive and a negative signed estimate mean under the circuit's direction and metric."""
    from ..metrics import METRICS

    better = METRICS[metric].higher_is_better if metric in METRICS else True
    if direction is Direction.NOISING:
        carries, other = ("negative (red)", "positive (blue)") if better else ("positive (blue)", "negative (red)")
        return (f"{carries}: patching the corrupt value into the clean run moves the metric away from the "
                f"behaviour, so the edge carries it; {other}: the patch moves it the other way")
    carries, other = ("positive (blue)", "negative (red)") if better else ("negative (red)", "positive (blue)")
    return (f"{carries}: patching the clean value into the corrupt run moves the metric toward the behaviour, "
            f"so the edge restores it; {other}: the patch moves it the other way")


def layer_rank(node: Node, shape: ModelShape) -> tuple[int, str]:
    """Drawing row of a component, top to bottom, and its label: embed, L0 attn, L0 mlp, …, unembed."""
    if node.kind is NodeKind.INPUT:
        return 0, "embed"
    if node.kind is NodeKind.LOGITS:
        return 2 * shape.n_layers + 1, "unembed"
    layer = int(node.layer)  # type: ignore[arg-type]
    if shape.parallel_attn_mlp:
        return 1 + 2 * layer, f"L{layer} attn+mlp"
    if node.is_attention:
        return 1 + 2 * layer, f"L{layer} attn"
    return 2 + 2 * layer, f"L{layer} mlp"


def node_sort_key(node: Node, shape: ModelShape) -> tuple[int, int, int, int, int]:
    """Forward order of components: by row, then position, then MLP before neurons, head/neuron index."""
    return (layer_rank(node, shape)[0], -1 if node.position is None else node.position,
            int(node.kind is NodeKind.NEURON), -1 if node.head is None else node.head,
            -1 if node.neuron is None else node.neuron)
