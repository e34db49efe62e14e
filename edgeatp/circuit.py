"""Circuits: the :class:`Circuit` type and the rules that select one from scores.

A circuit is a set of edges of an :class:`~edgeatp.graph.EdgeGraph` (for node- and group-level
circuits: the edges among the kept components) with the dense per-edge estimates it was selected
from, how it was selected (:class:`Selection`, including anything the user should know, such as
edges dropped by the connectivity cleanup), and — once measured by
:mod:`edgeatp.verification` — its own faithfulness and necessity, a faithfulness curve and the
exact effects of verified edges. Selection rules are functions from scores to masks; files are
:mod:`edgeatp.export`'s job.
"""

from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import torch

from .errors import EdgeatpError, option_error
from .graph import Edge, EdgeGraph, Node, NodeKind
from .metrics import sign_convention
from .scores import EdgeScores, NodeScores
from .tasks.pairs import Direction

Level = Literal["edge", "node", "neuron", "group"]
LEVELS: tuple[str, ...] = ("edge", "node", "neuron", "group")


class CircuitWarning(UserWarning):
    """A circuit is not what was asked for: fewer edges, edges dropped by cleanup, target missed."""


# ------------------------------------------------------------------------------------ result types
@dataclass(frozen=True)
class Check:
    """One exactly patched edge, node or group: signed estimate and exact effect (means over pairs)."""

    name: str
    estimate: float
    exact: float
    score: float
    in_circuit: bool


@dataclass(frozen=True)
class Verification:
    """Exact patches of the top-ranked items and a random sample below the cut.

    ``checks[:n_ranked]`` are the top of the ranking; the rest is the random sample outside the
    circuit. ``outside_max`` is the largest ``|exact|`` among *all* checked items outside the
    circuit (``outside_checked`` of them), not a statement about unchecked ones; ``bound`` is the
    diagnostic bound on any unchecked item's ``|effect|`` (``None`` unless asked for).
    """

    checks: tuple[Check, ...]
    n_ranked: int
    rank_correlation: float  # Spearman between |estimate| and |exact| over the ranked items
    sign_agreement: float  # share of ranked items whose estimate has the exact effect's sign
    largest_miss: str  # the item with the largest |estimate − exact|
    largest_miss_size: float
    outside_max: float
    outside_checked: int
    bound: float | None
    bound_alpha: float | None
    n_forwards: int


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Whole-circuit runs of circuits of growing size, normalised ``(m − m_corrupt)/(m_clean − m_corrupt)``."""

    sizes: tuple[int, ...]
    faithfulness: tuple[float, ...]  # everything outside the circuit patched
    necessity: tuple[float, ...]  # the circuit's own edges patched
    clean_metric: float
    corrupt_metric: float
    label: str = ""  # which ranking or search made the circuits


@dataclass(frozen=True)
class CircuitMetrics:
    """MIB's circuit metrics of one ranking (or one set of searched circuits): faithfulness of the
    circuits at the grid's fractions of all ``n_edges`` edges, CPR (area under faithfulness over the
    nominal fraction, linear; higher is better) and CMD (area under ``|1 − faithfulness|``; lower is
    better). CPR's circuits are the top edges by the ranking score signed by the estimate's direction
    (edges that carry the behaviour first), CMD's by the ranking score; searched circuits serve both.
    Sizes are kept edges after the cleanup."""

    label: str
    n_edges: int
    grid: tuple[float, ...]
    cpr_sizes: tuple[int, ...]
    cpr_faithfulness: tuple[float, ...]
    cmd_sizes: tuple[int, ...]
    cmd_faithfulness: tuple[float, ...]
    cpr: float
    cmd: float
    n_forwards: int


@dataclass(frozen=True)
class RefinedSize:
    """One size of a circuit search: the ranking's top-``size`` circuit and the searched one (at most
    ``size`` edges), both measured exactly; ``found_by`` names the step that found it (ranking, mask,
    given circuit, greedy, exhaustive, or ``size N`` for a smaller size's better result) and ``n_forwards`` what searching at this size spent."""

    size: int
    edges: tuple[str, ...]
    faithfulness: float
    necessity: float
    before_edges: int
    before_faithfulness: float
    before_necessity: float
    found_by: str
    n_forwards: int


@dataclass(frozen=True)
class Refinement:
    """A circuit search from a ranking (``ranking``: its method) within a budget of forwards: its
    settings, what it spent in all (the final exact check included), the clean and corrupt mean
    metrics, and per size the circuit before and after."""

    ranking: str
    objective: str
    budget: int
    seed: int
    n_candidates: int
    n_forwards: int
    clean_metric: float
    corrupt_metric: float
    sizes: tuple[RefinedSize, ...]

    def before_curve(self) -> FaithfulnessCurve:
        """The ranking's top-k circuits as a curve (sizes in kept edges)."""
        s = self.sizes
        return FaithfulnessCurve(tuple(r.before_edges for r in s), tuple(r.before_faithfulness for r in s),
                                 tuple(r.before_necessity for r in s), self.clean_metric, self.corrupt_metric,
                                 f"top-k of {self.ranking}")

    def after_curve(self) -> FaithfulnessCurve:
        """The searched circuits as a curve (sizes in kept edges)."""
        s = self.sizes
        return FaithfulnessCurve(tuple(len(r.edges) for r in s), tuple(r.faithfulness for r in s),
                                 tuple(r.necessity for r in s), self.clean_metric, self.corrupt_metric,
                                 f"refined from {self.ranking}")

    def at(self, size: int) -> RefinedSize:
        """The record of one searched size."""
        for r in self.sizes:
            if r.size == size:
                return r
        raise KeyError(f"size {size} was not searched; searched sizes: {', '.join(str(r.size) for r in self.sizes)}")


UnitKind = Literal["component", "group", "coarse_edge"]


@dataclass(frozen=True)
class Unit:
    """A scored part of a circuit coarser than an edge — a component of a node-level circuit, a
    group of nodes, or a coarse edge between groups — with its estimate and, once patched, its
    exact effect (means over pairs). A group lists the names of its ``members`` (fine nodes such
    as ``a0.h1<q>`` or ``m0@3``); other units have none."""

    name: str
    kind: UnitKind
    score: float
    signed: float
    exact: float | None = None
    in_circuit: bool = False
    members: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class KVView:
    """Per-query-head scores of the edges into shared key/value heads: the ungrouped view that
    EAP-IG and MIB name (``u->a1.h3<k>``, query head 3's own copy of its key input), from
    attribution on that view (:meth:`~edgeatp.graph.EdgeGraph.ungrouped_view`). ``[P, W, R]`` over
    the view's readers; only the key/value readers' columns are used."""

    score: torch.Tensor
    signed: torch.Tensor


@dataclass(frozen=True)
class Selection:
    """How a circuit was chosen: the rule and its value, what the rule picked and what was kept.

    ``notes`` say what differs from what was asked (fewer edges than requested, edges dropped by
    the connectivity cleanup, a faithfulness target not reached).
    """

    rule: str
    value: float | None
    requested: int | None = None
    kept: int = 0
    notes: tuple[str, ...] = ()

    def with_note(self, note: str) -> "Selection":
        return replace(self, notes=(*self.notes, note))


@dataclass(frozen=True, eq=False)
class Circuit:
    """A set of edges with the estimates it was chosen from and what verification found.

    ``in_graph``, ``score`` and ``signed`` are ``[P, W, R]`` like the graph's scores (``P = 1``
    for a position-aggregated graph). ``refinement`` records the circuit search that produced it
    (if any) and ``circuit_metrics`` MIB's CPR/CMD of its ranking (and of searched circuits).
    """

    graph: EdgeGraph
    in_graph: torch.Tensor
    score: torch.Tensor
    signed: torch.Tensor
    level: Level = "edge"
    method: str = ""
    direction: Direction = Direction.NOISING
    metric: str = "logit_diff"
    selection: Selection | None = None
    units: tuple[Unit, ...] = ()
    faithfulness: float | None = None
    necessity: float | None = None
    curve: FaithfulnessCurve | None = None
    verification: Verification | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    kv_view: KVView | None = None
    refinement: Refinement | None = None
    circuit_metrics: tuple[CircuitMetrics, ...] = ()

    def __post_init__(self) -> None:
        want = (self.graph.P, self.graph.n_writers, self.graph.n_readers)
        for name in ("in_graph", "score", "signed"):
            if tuple(getattr(self, name).shape) != want:
                raise ValueError(f"circuit {name} must be [{', '.join(map(str, want))}], "
                                 f"got {tuple(getattr(self, name).shape)}")

    @property
    def n_edges(self) -> int:
        return int(self.in_graph.sum())

    @property
    def sign_convention(self) -> str:
        return sign_convention(self.direction, self.metric)

    @property
    def node_scores(self) -> dict[str, float]:
        """Scores of the scored components (node- and neuron-level circuits), by decreasing score."""
        return {u.name: u.score for u in self.units if u.kind == "component"}

    def units_of(self, kind: UnitKind) -> list[Unit]:
        """The units of one kind by decreasing score."""
        return sorted((u for u in self.units if u.kind == kind), key=lambda u: -u.score)

    @property
    def warnings(self) -> tuple[str, ...]:
        """Everything about the circuit that differs from what was asked."""
        return self.selection.notes if self.selection is not None else ()

    def edges(self) -> list[Edge]:
        """Kept edges by decreasing score."""
        coords = self.in_graph.nonzero()
        vals = self.score[tuple(coords.T)]
        order = torch.sort(vals, descending=True, stable=True).indices
        return [self.graph.edge_at(tuple(coords[i].tolist())) for i in order.tolist()]

    def nodes(self) -> list[Node]:
        """Components touched by kept edges (heads for q/k/v readers), in forward order."""
        seen: dict[Node, None] = {}
        for w, r in self.in_graph.any(0).nonzero().tolist():
            seen[self.graph.writers[w]] = None
            seen[component(self.graph.readers[r])] = None
        order = {n: i for i, n in enumerate([*self.graph.writers, Node(NodeKind.LOGITS)])}
        return sorted(seen, key=lambda n: order.get(n, len(order)))

    def components(self) -> list[Node]:
        """The heads, MLPs and neurons the circuit keeps (its nodes without the input, the logits and
        the inputs of shared key/value heads)."""
        return [n for n in self.nodes() if n.kind in (NodeKind.HEAD, NodeKind.MLP, NodeKind.NEURON)]

    def with_(self, **changes: Any) -> "Circuit":
        return replace(self, **changes)

    def per_query_head(self) -> "Circuit":
        """The circuit in the ungrouped view of a grouped model: an edge into a shared key/value head
        becomes one edge into each of its query heads' copies, kept when the shared edge is kept,
        with its own per-head scores from :attr:`kv_view` (the circuit itself when not grouped; node-
        and group-level circuits, whose edges carry no scores, need no view)."""
        g = self.graph
        if not g.shape.grouped or g.ungrouped:
            return self
        if self.kv_view is None and self.level == "edge":
            raise EdgeatpError("this circuit of a grouped-query model has no per-query-head key/value scores, which the "
                               "EAP-IG/MIB format needs; compute them with edgeatp.attribution.per_head_kv (edgeatp "
                               "discover does when asked for the mib format)")
        view = g.ungrouped_view()
        source = []
        for r in view.readers:
            shared = r.kind in (NodeKind.K, NodeKind.V) and g.shape.grouped
            key = Node(r.kind, r.layer, g.shape.kv_of(r.head), kv=True) if shared else r  # type: ignore[arg-type]
            source.append(g.reader_index[key])
        cols = torch.tensor(source)
        kv = torch.tensor([r.kind in (NodeKind.K, NodeKind.V) for r in view.readers])
        per_head = self.kv_view or KVView(torch.zeros(view.full_mask.shape), torch.zeros(view.full_mask.shape))
        score = torch.where(kv, per_head.score.to(self.score.dtype), self.score[..., cols])
        signed = torch.where(kv, per_head.signed.to(self.signed.dtype), self.signed[..., cols])
        return replace(self, graph=view, in_graph=self.in_graph[..., cols] & view.full_mask, score=score,
                       signed=signed, kv_view=None)


# ------------------------------------------------------------------------------------ selection rules
def _ranked(scores: EdgeScores) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of existing edges, canonical order (non-finite scores refused) and their coordinates."""
    values, coords = scores.flat()
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        edge = scores.graph.edge_at(tuple(coords[int(bad.nonzero()[0])].tolist()))
        raise option_error(f"{int(bad.sum())} edge scores are not finite (e.g. {edge.name}); the attribution "
                           "overflowed: run in a wider {dtype} (float32 or float64)")
    return values, coords


def _mask_of(scores: EdgeScores, coords: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(scores.graph.full_mask.shape, dtype=torch.bool)
    mask[tuple(coords.T)] = True
    return mask


def select_top_k(scores: EdgeScores, k: int) -> torch.Tensor:
    """Mask of the ``k`` highest-scoring edges (ties in canonical order)."""
    if k < 0:
        raise option_error("{top_k} must be non-negative")
    values, coords = _ranked(scores)
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    return _mask_of(scores, coords[order])


def select_threshold(scores: EdgeScores, threshold: float) -> torch.Tensor:
    """Mask of edges whose score (mean per-pair magnitude) is at least ``threshold``."""
    if not math.isfinite(threshold) or threshold < 0:
        raise option_error("{threshold} must be a non-negative number (scores are magnitudes), "
                           f"got {threshold}")
    values, coords = _ranked(scores)
    return _mask_of(scores, coords[values >= threshold])


def select_cumulative(scores: EdgeScores, share: float) -> torch.Tensor:
    """Mask of the fewest top edges whose scores add up to ``share`` of the total score."""
    if not 0 < share <= 1:
        raise option_error(f"{{cumulative}} must be a share in (0, 1], got {share}")
    values, coords = _ranked(scores)
    order = torch.sort(values, descending=True, stable=True).indices
    vals = values[order].clamp(min=0).double()
    total = float(vals.sum())
    if total == 0:
        return _mask_of(scores, coords[:0])
    k = int(torch.searchsorted(torch.cumsum(vals, 0), torch.tensor(share * total, dtype=vals.dtype) - 1e-12 * total)) + 1
    return _mask_of(scores, coords[order[:k]])


def block_node(node: Node) -> Node:
    """The graph vertex a node's edges meet at: heads for q/k/v, the MLP for its neurons
    (a neuron reads through its MLP's input)."""
    if node.kind is NodeKind.NEURON:
        return Node(NodeKind.MLP, node.layer)
    return component(node)


def component(node: Node) -> Node:
    """The component a reader belongs to (a head for its q/k/v inputs; the inputs of a shared
    key/value head stand for themselves)."""
    return node.head_node if node.kind in (NodeKind.Q, NodeKind.K, NodeKind.V) else node


def member_components(graph: EdgeGraph, node: Node) -> tuple[Node, ...]:
    """The components a node belongs to: its head (for q/k/v), every query head sharing a
    key/value head, or the node itself (without position)."""
    if node.kind in (NodeKind.K, NodeKind.V):
        return graph.reader_targets(node.component)
    return (component(node.component),)


def targets(graph: EdgeGraph, reader: Node) -> tuple[Node, ...]:
    """The graph vertices a reader feeds (see :meth:`EdgeGraph.reader_targets`)."""
    return tuple(block_node(t) for t in graph.reader_targets(reader))


def select_greedy(scores: EdgeScores, k: int) -> torch.Tensor:
    """Grow a circuit from the logits backwards: repeatedly add the best edge into a component
    already in the circuit, until ``k`` edges (position-aggregated graphs only)."""
    g = scores.graph
    if g.positional:
        raise option_error("{greedy} selection works on position-aggregated graphs; drop {positions}")
    if k < 1:
        raise option_error("{greedy} must be at least 1")
    values, coords = _ranked(scores)
    s = dict(zip(map(tuple, coords[:, 1:].tolist()), values.tolist()))
    into: dict[Node, list[tuple[int, int]]] = {}
    for w, r in g.edge_coords.tolist():
        for t in targets(g, g.readers[r]):
            into.setdefault(t, []).append((w, r))
    mask = torch.zeros(g.full_mask.shape, dtype=torch.bool)
    heap: list[tuple[float, int, int]] = []
    seen: set[Node] = set()

    def open_component(node: Node) -> None:
        if node in seen:
            return
        seen.add(node)
        for w, r in into.get(node, []):
            heapq.heappush(heap, (-s[(w, r)], w, r))

    open_component(Node(NodeKind.LOGITS))
    taken = 0
    while heap and taken < k:
        _, w, r = heapq.heappop(heap)
        if mask[0, w, r]:
            continue
        mask[0, w, r] = True
        taken += 1
        open_component(block_node(g.writers[w]))
    return mask


def connected(graph: EdgeGraph, mask: torch.Tensor) -> torch.Tensor:
    """Keep only edges on a path from the input to the logits (positions are collapsed:
    a component counts as reached if any of its kept edges at any position reaches it)."""
    flat = mask.any(0)
    comps_w = [block_node(n) for n in graph.writers]
    comps_r = [targets(graph, n) for n in graph.readers]
    keep = flat.clone()
    while True:
        coords = keep.nonzero().tolist()
        fed = {Node(NodeKind.INPUT)} | {t for _, r in coords for t in comps_r[r]}
        feeds = {Node(NodeKind.LOGITS)} | {comps_w[w] for w, _ in coords}
        new = keep.clone()
        for w, r in coords:
            if comps_w[w] not in fed or not any(t in feeds for t in comps_r[r]):
                new[w, r] = False
        if torch.equal(new, keep):
            break
        keep = new
    return mask & keep[None]


def _select_notes(rule: str, value: float | None, requested: int, kept: int, available: int) -> tuple[str, ...]:
    """What the user should know about a selection before any measurement."""
    notes = []
    if rule in ("top_k", "greedy") and value is not None and requested < value:
        what = "edges exist" if rule == "top_k" else "edges are connected to the logits"
        notes.append(f"asked for {int(value)} edges but only {requested} {what}")
    if kept < requested:
        notes.append(f"the connectivity cleanup dropped {requested - kept} of the {requested} selected edges "
                      "(they are on no path from the input to the logits)")
    if kept == 0 and available:
        notes.append("the circuit is empty: no selected edge lies on an input-to-logits path; select more edges")
    return tuple(notes)


def circuit_from_edges(scores: EdgeScores, mask: torch.Tensor, rule: str, value: float | None,
                       cleanup: bool = True) -> Circuit:
    """A circuit of the edges in ``mask`` ``[P, W, R]`` (cleaned to input→logits paths unless told
    otherwise), recording the rule and anything the user should know about the result."""
    mask = mask & scores.graph.full_mask
    keep = connected(scores.graph, mask) if cleanup else mask
    requested, kept = int(mask.sum()), int(keep.sum())
    selection = Selection(rule, value, requested, kept,
                          _select_notes(rule, value, requested, kept, scores.graph.n_edges))
    return Circuit(scores.graph, keep, scores.scores.cpu(), scores.signed.cpu(), "edge", scores.method,
                   scores.direction, scores.metric, selection, meta=dict(scores.meta))


def prune(scores: EdgeScores, *, top_k: int | None = None, threshold: float | None = None,
          cumulative: float | None = None, greedy: int | None = None, cleanup: bool = True) -> Circuit:
    """Select edges by exactly one rule (top-k, score threshold, cumulative share, greedy from the
    logits), then drop edges not on an input→logits path. Anything that differs from what was
    asked (fewer edges, edges dropped by the cleanup) is in ``circuit.warnings`` and is also
    issued as a :class:`CircuitWarning`."""
    rules = {"top_k": top_k, "threshold": threshold, "cumulative": cumulative, "greedy": greedy}
    given = [k for k, v in rules.items() if v is not None]
    if len(given) != 1:
        raise option_error("choose exactly one of {top_k}, {threshold}, {cumulative} or {greedy} to prune by")
    rule = given[0]
    select = {"top_k": select_top_k, "threshold": select_threshold, "cumulative": select_cumulative,
              "greedy": select_greedy}[rule]
    circuit = circuit_from_edges(scores, select(scores, rules[rule]), rule, rules[rule], cleanup)  # type: ignore[arg-type]
    for note in circuit.warnings:
        warnings.warn(note, CircuitWarning, stacklevel=2)
    return circuit


def top_k_circuits(scores: EdgeScores, sizes: Sequence[int], cleanup: bool = True) -> list[tuple[int, Circuit]]:
    """``(k, circuit)`` for increasing top-``k``, skipping sizes whose cleaned circuit is empty or
    repeats the previous one (cleanup can make several ``k`` give the same circuit)."""
    out: list[tuple[int, Circuit]] = []
    for k in sorted(set(sizes)):
        c = circuit_from_edges(scores, select_top_k(scores, k), "top_k", k, cleanup)
        if c.n_edges == 0 or (out and torch.equal(c.in_graph, out[-1][1].in_graph)):
            continue
        out.append((k, c))
    return out


# ------------------------------------------------------------------------------------ component circuits
def _component_circuit(graph: EdgeGraph, kept: set[Node], method: str, direction: Direction, metric: str,
                       level: Level, selection: Selection, units: tuple[Unit, ...]) -> Circuit:
    """The edges among kept components (plus input and logits); a kept neuron keeps its MLP's input."""
    keep_set = set(kept) | {Node(NodeKind.INPUT), Node(NodeKind.LOGITS)}
    keep_set |= {Node(NodeKind.MLP, n.layer) for n in kept if n.kind is NodeKind.NEURON}
    w_in = torch.tensor([w in keep_set for w in graph.writers])
    r_in = torch.tensor([any(t in keep_set for t in graph.reader_targets(r)) for r in graph.readers])
    mask = (graph.mask & w_in[:, None] & r_in[None, :])[None]
    keep = connected(graph, mask)
    zeros = torch.zeros(keep.shape, dtype=torch.float64)
    return Circuit(graph, keep, zeros, zeros, level, method, direction, metric,
                   replace(selection, kept=int(keep.sum())), units)


def component_units(scores: NodeScores, graph: EdgeGraph) -> list[Unit]:
    """Components (heads, MLPs, neurons) by decreasing score: a head scores as its best node
    among its output, query, key and value (a shared key/value head's nodes count for every
    query head of its group), with that node's signed estimate."""
    best: dict[Node, tuple[float, float]] = {}
    for node, score, signed in scores.top():
        for c in member_components(graph, node):
            best.setdefault(c, (score, signed))
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])
    return [Unit(c.name, "component", s, m) for c, (s, m) in ranked]


def node_circuit(scores: NodeScores, graph: EdgeGraph, *, top_k: int) -> Circuit:
    """A circuit of the ``top_k`` components (heads, MLPs or neurons; q/k/v scores count for their
    head) by node score, as the edges among them, the input and the logits."""
    if top_k < 0:
        raise option_error("{top_k} must be non-negative")
    ranked = component_units(scores, graph)
    kept = {u.name for u in ranked[:top_k]}
    units = tuple(replace(u, in_circuit=u.name in kept) for u in ranked)
    nodes = {Node.parse(n) for n in kept}
    level: Level = "neuron" if any(n.kind is NodeKind.NEURON for n in nodes) else "node"
    notes = (f"asked for {top_k} components but only {len(ranked)} were scored",) if len(ranked) < top_k else ()
    return _component_circuit(graph, nodes, scores.method, scores.direction, scores.metric, level,
                              Selection("top_k", top_k, len(kept), 0, notes), units)


def group_circuit(scores: Any, graph: EdgeGraph, *, top_k: int) -> Circuit:
    """A circuit over coarse groups: every component of the ``top_k`` best groups of a
    :class:`~edgeatp.attribution.grouping.GroupScores`. A circuit is a set of edges between whole
    components, so a group covering only some positions of a component (``span:`` groups) keeps
    the whole component; the groups themselves, kept or not, are the circuit's units."""
    if top_k < 0:
        raise option_error("{top_k} must be non-negative")
    ranked = scores.top()
    kept_groups = ranked[:top_k]
    nodes = {c for g, *_ in kept_groups for m in g.members for c in member_components(graph, m)}
    names = {g.name for g, *_ in kept_groups}
    units = tuple(Unit(g.name, "group", s, m, None, g.name in names, tuple(n.name for n in g.members))
                  for g, s, m in ranked)
    notes = (f"asked for {top_k} groups but only {len(ranked)} exist",) if len(ranked) < top_k else ()
    return _component_circuit(graph, nodes, scores.method, scores.direction, scores.metric, "group",
                              Selection("top_k groups", top_k, len(kept_groups), 0, notes), units)


def coarse_edge_units(coarse: Any, kept: set[str] = frozenset(), exact: dict[str, float] | None = None
                      ) -> tuple[Unit, ...]:
    """Coarse edges of a :class:`~edgeatp.attribution.grouping.CoarseEdgeScores` as units."""
    exact = exact or {}
    return tuple(Unit(n, "coarse_edge", s, m, exact.get(n), n in kept) for n, s, m in coarse.top())


def coarse_edge_circuit(coarse: Any, scores: EdgeScores, *, top_k: int, cleanup: bool = True) -> Circuit:
    """A circuit of the member edges of the ``top_k`` best coarse edges of a
    :class:`~edgeatp.attribution.grouping.CoarseEdgeScores` (fine scores kept for drawing)."""
    kept = coarse.top(top_k)
    index = {n: (i, j) for n, i, j in coarse.names()}
    mask = torch.zeros(scores.graph.full_mask.shape, dtype=torch.bool)
    for name, *_ in kept:
        i, j = index[name]
        mask[0] |= coarse.members[i, j]
    circuit = circuit_from_edges(scores, mask, "top_k coarse edges", top_k, cleanup)
    return circuit.with_(units=coarse_edge_units(coarse, {n for n, *_ in kept}))
