"""Flat, export-ready views of a circuit shared by the networkx, DOT, chart and report writers.

A circuit's edges go from a writer (``input``, a head, an MLP or a neuron) to a reader (a head's
q/k/v input, an MLP input or the logits). Exports draw *components*: a q/k/v reader is drawn as
its head, and in a position-resolved circuit every component exists once per position
(``a1.h3@5``). The **node score** of a component in an edge-level circuit is the sum of the
``score`` of the kept edges that touch it (incoming plus outgoing); in a node- or neuron-level
circuit it is the circuit's ``node_scores`` entry (``None`` when the component was not scored).

Numbers keep one meaning everywhere (:func:`column_notes`): the **score** is the non-negative
ranking magnitude (for GradDrop methods the mean over dropped layers of ``|estimate|``), the
**signed estimate** the plain signed estimate, the **exact effect** the patched one. Where an
exact effect is known it decides the sign that is shown (:func:`best_effect`).

:func:`drawing` is what a picture shows: at most ``max_neurons`` neurons per MLP (the
best-scoring; the others are merged into their MLP's node) and at most ``max_edges`` edges — an
edge circuit's highest-scoring, or in node-level circuits, whose edges are not scored (a head's
q/k/v inputs from one writer drawn as one edge), those whose weaker end scores highest — with a
sentence for everything left out. The JSON and networkx exports always keep every edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..circuit import Circuit, Unit, UnitKind, component
from ..graph import Edge, ModelShape, Node, NodeKind
from ..methods import METHODS, Kind
from ..tasks.pairs import Direction

MAX_EDGES = 100  # edges a drawing shows (see drawing())
MAX_NEURONS = 8  # neurons per MLP (and position) a drawing shows one by one


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


def sign_legend(direction: Direction, metric: str = "logit_diff", what: str = "edge") -> str:
    """What a positive and a negative effect of ``what`` (an edge, a component, a group) mean under
    the circuit's direction and metric."""
    from ..metrics import METRICS

    better = METRICS[metric].higher_is_better if metric in METRICS else True
    if direction is Direction.NOISING:
        carries, other = ("negative (red)", "positive (blue)") if better else ("positive (blue)", "negative (red)")
        return (f"{carries}: patching the corrupt value into the clean run moves the metric away from the "
                f"behaviour, so the {what} carries it; {other}: the patch moves it the other way")
    carries, other = ("positive (blue)", "negative (red)") if better else ("negative (red)", "positive (blue)")
    return (f"{carries}: patching the clean value into the corrupt run moves the metric toward the behaviour, "
            f"so the {what} restores it; {other}: the patch moves it the other way")


# ------------------------------------------------------------------------------------ what the numbers mean
@dataclass(frozen=True)
class ColumnNotes:
    """What the score, signed estimate and exact effect of a circuit's method mean."""

    score: str
    signed: str
    exact: str


def column_notes(method: str) -> ColumnNotes:
    """The meaning of score, signed estimate and exact effect for ``method`` (GradDrop-aware)."""
    m = METHODS.get(method)
    exact = "the effect measured by patching, mean over prompt pairs (only for patched items)"
    if m is None:
        return ColumnNotes("the non-negative ranking magnitude recorded with the circuit",
                           "the signed estimate recorded with the circuit", exact)
    if m.graddrop:
        return ColumnNotes(f"the ranking magnitude (for GradDrop, as in {m.name}: the mean over prompt pairs of the "
                           "mean over dropped layers of |estimate|), so it can differ from |signed estimate| by "
                           "orders of magnitude", "the plain (un-dropped) estimate, mean over prompt pairs", exact)
    if m.kind is Kind.EXACT:
        return ColumnNotes("the ranking magnitude (the mean over prompt pairs of |exact effect|)",
                           "the exact effect (method exact), mean over prompt pairs", exact)
    return ColumnNotes("the ranking magnitude (the mean over prompt pairs of |estimate|)",
                       "the estimate, mean over prompt pairs", exact)


def best_effect(signed: float | None, exact: float | None) -> tuple[float | None, bool]:
    """The best-known effect — the exact one when patched, else the signed estimate — and whether it is exact."""
    return (exact, True) if exact is not None else (signed, False)


def sign_of(value: float | None) -> int | None:
    """-1, 0 or +1 (``None`` for no value)."""
    return None if value is None else (value > 0) - (value < 0)


def unit_kind(circuit: Circuit) -> UnitKind | None:
    """The units a circuit is chosen by: components (node/neuron level), groups, or none (edges)."""
    return {"node": "component", "neuron": "component", "group": "group"}.get(circuit.level)  # type: ignore[return-value]


def size_word(circuit: Circuit) -> str:
    """What the circuit's size and its faithfulness curve count: edges, components or groups."""
    return {"component": "components", "group": "groups"}.get(unit_kind(circuit) or "", "edges")


def chosen_size(circuit: Circuit) -> int:
    """The circuit's size in :func:`size_word` units: kept edges, or kept components or groups."""
    kind = unit_kind(circuit)
    return circuit.n_edges if kind is None else sum(u.in_circuit for u in circuit.units_of(kind))


def size_summary(circuit: Circuit) -> str:
    """The circuit's size in words: edges and components, or kept units of how many (and the
    components and edges among them)."""
    kind = unit_kind(circuit)
    if kind is None:
        return f"{circuit.n_edges} edges, {len(circuit.components())} components"
    among = f"{circuit.n_edges} edges among them"
    if kind == "group":
        among = f"{len(circuit.components())} components, " + among
    return f"{chosen_size(circuit)} of {len(circuit.units_of(kind))} {size_word(circuit)} kept ({among})"


# ------------------------------------------------------------------------------------ drawings
@dataclass(frozen=True)
class DrawEdge:
    """An edge as drawn: one circuit edge, or several (``members``, their names) drawn as one — the
    edges of merged neurons into one reader, or the q/k/v inputs of a head in a node-level drawing
    (``reader_type`` then joins their letters, e.g. ``qkv``); scores and signed estimates are summed
    and a merged edge has no exact effect."""

    id: str
    writer: Node
    reader: Node
    reader_type: str
    score: float
    signed: float
    exact: float | None
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class DrawNode:
    """A drawn component with its numbers: node score, the scored unit (node/neuron circuits), the
    kept groups it belongs to (group circuits) and the neurons merged into it (an MLP's node)."""

    node: Node
    score: float | None
    unit: Unit | None = None
    groups: tuple[Unit, ...] = ()
    merged: tuple[Node, ...] = ()

    def effect_sign(self) -> tuple[int | None, bool]:
        """Sign of the best-known effect of the node's unit or of its kept groups (``None`` when
        there is none or the groups disagree) and whether every effect behind it is exact."""
        units = [self.unit] if self.unit is not None else list(self.groups)
        effects = [best_effect(u.signed, u.exact) for u in units]
        signs = {sign_of(v) for v, _ in effects}
        if len(signs) != 1:
            return None, False
        return signs.pop(), all(exact for _, exact in effects)


@dataclass(frozen=True)
class Drawing:
    """What a picture of a circuit shows, in forward order, and what it leaves out (sentences)."""

    nodes: tuple[DrawNode, ...]
    edges: tuple[DrawEdge, ...]
    left_out: tuple[str, ...]


def member_components(group: Unit) -> list[str]:
    """Names of the components a group's members belong to (heads for q/k/v members), in order."""
    return list(dict.fromkeys(component(Node.parse(m).component).name for m in group.members))


def _groups_by_component(groups: Sequence[Unit]) -> dict[str, list[Unit]]:
    """Groups by the component names of their members."""
    out: dict[str, list[Unit]] = {}
    for g in groups:
        for name in member_components(g):
            out.setdefault(name, []).append(g)
    return out


def _merged_neurons(circuit: Circuit, rows: list[EdgeRow], scores: dict[Node, float | None],
                    max_neurons: int) -> dict[Node, Node]:
    """Neurons beyond the ``max_neurons`` best of their MLP (and position), mapped to the MLP's node.
    Neurons rank by unit score in node-level circuits, by node score in edge circuits."""
    def rank(n: Node) -> float:
        value = circuit.node_scores.get(n.component.name) if circuit.level != "edge" else scores.get(n)
        return -(value or 0.0)

    blocks: dict[Node, list[Node]] = {}
    for node in dict.fromkeys(r.writer for r in rows):
        if node.kind is NodeKind.NEURON:
            blocks.setdefault(Node(NodeKind.MLP, node.layer, position=node.position), []).append(node)
    return {n: mlp for mlp, neurons in blocks.items() for n in sorted(neurons, key=rank)[max_neurons:]}


def drawing(circuit: Circuit, *, max_edges: int | None = MAX_EDGES, max_neurons: int | None = MAX_NEURONS
            ) -> Drawing:
    """The drawn part of a circuit (see the module docstring): the ``max_neurons`` best neurons of
    each MLP one by one, the others merged into the MLP's node, and at most ``max_edges`` edges
    (``None`` for no limit)."""
    rows = edge_rows(circuit)
    scores = node_score_map(circuit, rows)
    left: list[str] = []
    if circuit.level == "edge" and max_edges is not None and len(rows) > max_edges:
        left.append(f"only the {max_edges} highest-scoring of the {len(rows)} kept edges are drawn "
                    "(every edge is in the JSON and networkx exports)")
        rows = rows[:max_edges]
    into = {} if max_neurons is None else _merged_neurons(circuit, rows, scores, max_neurons)
    bundles: dict[tuple[Node, Node, int | None], list[EdgeRow]] = {}
    for r in rows:
        reader = r.reader if circuit.level != "edge" else r.edge.reader.at(r.edge.position)
        bundles.setdefault((into.get(r.writer, r.writer), reader, r.edge.position), []).append(r)
    edges: list[DrawEdge] = []
    n_drawn = 0  # drawn edges out of merged neurons
    for (writer, _, position), members in bundles.items():
        first = members[0]
        if len(members) == 1 and first.writer == writer:
            edges.append(DrawEdge(first.edge.name, writer, first.reader, first.reader_type, first.score,
                                  first.signed, first.exact))
            continue
        kinds = {m.reader_type for m in members}
        types = "".join(t for t in "qkv" if t in kinds) or first.reader_type
        from_merged = any(m.writer in into for m in members)
        n_drawn += from_merged
        source = f"{writer.component.name}.n*" if from_merged else writer.component.name
        target = first.reader.component.name + (f"<{types}>" if first.edge.reader.is_attention else "")
        edges.append(DrawEdge(f"{source}->{target}" + ("" if position is None else f"@{position}"), writer,
                              first.reader, types, sum(m.score for m in members), sum(m.signed for m in members),
                              None, tuple(m.edge.name for m in members)))
    if into:
        per_mlp = {m: list(into.values()).count(m) for m in dict.fromkeys(into.values())}
        n_rows = sum(r.writer in into for r in rows)
        left.append(f"only the {max_neurons} best-scoring neurons of each MLP are drawn one by one; the other "
                    + ", ".join(f"{k} of {m.name}" for m, k in per_mlp.items())
                    + f" are merged into their MLP's node ('+N neurons') and their {n_rows} edges drawn as {n_drawn} "
                    "(every edge is in the JSON and networkx exports)")
    units = {u.name: u for u in circuit.units_of("component")}
    kept_groups = [u for u in circuit.units_of("group") if u.in_circuit]
    by_component = _groups_by_component([g for g in kept_groups if g.members])
    unplaced = [g.name for g in kept_groups if not g.members]
    if unplaced:
        left.append(f"kept groups whose members are not recorded are not placed: {', '.join(unplaced)}")
    shape = circuit.graph.shape
    ends = sorted({n for e in edges for n in (e.writer, e.reader)}, key=lambda n: node_sort_key(n, shape))
    nodes = tuple(DrawNode(n, scores.get(n), units.get(n.component.name), tuple(by_component.get(n.component.name, ())),
                           tuple(k for k, v in into.items() if v == n)) for n in ends)
    if circuit.level != "edge" and max_edges is not None and len(edges) > max_edges:
        edges = _strongest_edges(edges, nodes, circuit.node_scores, max_edges)
        left.append(f"only {max_edges} of the {len(bundles)} edges among the kept components are drawn, those whose "
                    f"weaker end scores highest (standing for {sum(len(e.members) or 1 for e in edges)} of the "
                    f"{circuit.n_edges} circuit edges); every component stays in the picture")
    return Drawing(nodes, tuple(edges) + _shared_kv_links(circuit, ends), tuple(left))


def _shared_kv_links(circuit: Circuit, ends: Sequence[Node]) -> tuple[DrawEdge, ...]:
    """Links from each drawn input of a shared key/value head to the drawn query heads that read it
    (reader type ``shared``; they carry no numbers)."""
    drawn = set(ends)
    links = []
    for node in ends:
        if node.kv:
            for head in circuit.graph.reader_targets(node.component):
                target = head.at(node.position)
                if target in drawn:
                    links.append(DrawEdge(f"{node.name}=>{target.name}", node, target, "shared", 0.0, 0.0, None))
    return tuple(links)


def _strongest_edges(edges: list[DrawEdge], nodes: Sequence[DrawNode], neuron_scores: dict[str, float],
                     k: int) -> list[DrawEdge]:
    """The ``k`` edges of a node-level drawing whose weaker end has the highest score (order kept).
    A node scores as its unit, its best kept group or its best merged neuron; unscored nodes
    (input, logits, MLP inputs) never limit an edge."""
    def score(n: DrawNode) -> float:
        values = [u.score for u in (n.unit, *n.groups) if u is not None]
        values += [neuron_scores.get(m.component.name, 0.0) for m in n.merged]
        return max(values, default=math.inf)

    of = {n.node: score(n) for n in nodes}
    order = sorted(range(len(edges)), key=lambda i: -min(of[edges[i].writer], of[edges[i].reader]))
    return [edges[i] for i in sorted(order[:k])]


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
