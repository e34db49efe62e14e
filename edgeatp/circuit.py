"""Circuits: pruning scores to an edge set, cleaning up connectivity, verifying with exact patches.

A :class:`Circuit` is a set of edges of an :class:`~edgeatp.graph.EdgeGraph` (for node-level
circuits: the edges among the kept components) together with the dense per-edge estimates it
was selected from, the exact effects of the edges that were verified, and whole-circuit
faithfulness numbers. Pruning and verification are functions from inputs to results; writing
files is :mod:`edgeatp.export`'s job.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import torch
from scipy.stats import spearmanr

from .errors import EdgeatpError
from .graph import Edge, EdgeGraph, Node, NodeKind
from .metrics import Metric, get_metric, sign_convention
from .model import ModelAdapter
from .patching import capture, patch_edges, patch_nodes, reference_logprobs, run_circuit
from .scores import EdgeScores, NodeScores
from .tasks.pairs import Direction, PromptPairs

Level = Literal["edge", "node", "neuron"]


# ------------------------------------------------------------------------------------ selection
def _flat_scores(scores: torch.Tensor, graph: EdgeGraph) -> torch.Tensor:
    """Scores with non-existent edges at -inf (for top-k), any shape ``[(T,) W, R]``."""
    return scores.masked_fill(~graph.mask.expand_as(scores), float("-inf"))


def select_top_k(scores: EdgeScores, k: int) -> torch.Tensor:
    """Mask of the ``k`` highest-scoring edges."""
    if k < 0:
        raise EdgeatpError("--top-k must be non-negative")
    flat = _flat_scores(scores.scores, scores.graph).flatten()
    k = min(k, scores.graph.n_edges)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, k).indices] = True
    return mask.view_as(scores.scores)


def select_threshold(scores: EdgeScores, threshold: float) -> torch.Tensor:
    """Mask of edges whose score (mean per-pair magnitude) is at least ``threshold``."""
    if threshold < 0:
        raise EdgeatpError("--threshold must be non-negative (scores are magnitudes)")
    return (scores.scores >= threshold) & scores.graph.mask.expand_as(scores.scores)


def select_cumulative(scores: EdgeScores, share: float) -> torch.Tensor:
    """Mask of the fewest top edges whose scores add up to ``share`` of the total score."""
    if not 0 < share <= 1:
        raise EdgeatpError("the cumulative share must lie in (0, 1]")
    flat = _flat_scores(scores.scores, scores.graph).flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    vals = flat[order].clamp(min=0)
    total = float(vals[torch.isfinite(vals)].sum())
    if total == 0:
        return torch.zeros_like(scores.scores, dtype=torch.bool)
    k = int(torch.searchsorted(torch.cumsum(vals, 0), torch.tensor(share * total, dtype=vals.dtype) - 1e-12 * total)) + 1
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[: min(k, scores.graph.n_edges)]] = True
    return mask.view_as(scores.scores)


def _component(node: Node) -> Node:
    """The component a reader belongs to (a head for its q/k/v inputs)."""
    return node.head_node if node.kind in (NodeKind.Q, NodeKind.K, NodeKind.V) else node


def _block_node(node: Node) -> Node:
    """The graph vertex a node's edges meet at: heads for q/k/v, the MLP for its neurons
    (a neuron reads through its MLP's input)."""
    if node.kind is NodeKind.NEURON:
        return Node(NodeKind.MLP, node.layer)
    return _component(node)


def select_greedy(scores: EdgeScores, k: int) -> torch.Tensor:
    """Grow a circuit from the logits backwards: repeatedly add the best edge into a component
    already in the circuit, until ``k`` edges (position-aggregated graphs only)."""
    g = scores.graph
    if g.n_positions is not None:
        raise EdgeatpError("greedy selection works on position-aggregated graphs; drop --positions")
    s = scores.scores
    into: dict[Node, list[tuple[int, int]]] = {}
    for w, r in g.edge_coords.tolist():
        into.setdefault(_block_node(g.readers[r]), []).append((w, r))
    mask = torch.zeros_like(g.mask)
    heap: list[tuple[float, int, int]] = []
    seen: set[Node] = set()

    def open_component(node: Node) -> None:
        if node in seen:
            return
        seen.add(node)
        for w, r in into.get(node, []):
            heapq.heappush(heap, (-float(s[w, r]), w, r))

    open_component(Node(NodeKind.LOGITS))
    while heap and int(mask.sum()) < k:
        _, w, r = heapq.heappop(heap)
        if mask[w, r]:
            continue
        mask[w, r] = True
        open_component(_block_node(g.writers[w]))
    return mask


def connected(graph: EdgeGraph, mask: torch.Tensor) -> torch.Tensor:
    """Keep only edges on a path from the input to the logits (positions are collapsed:
    a component counts as reached if any of its kept edges at any position reaches it)."""
    flat = mask.any(0) if mask.dim() == 3 else mask
    comps_w = [_block_node(n) for n in graph.writers]
    comps_r = [_block_node(n) for n in graph.readers]
    keep = flat.clone()
    while True:
        coords = keep.nonzero().tolist()
        fed = {Node(NodeKind.INPUT)} | {comps_r[r] for _, r in coords}
        feeds = {Node(NodeKind.LOGITS)} | {comps_w[w] for w, _ in coords}
        new = keep.clone()
        for w, r in coords:
            if comps_w[w] not in fed or comps_r[r] not in feeds:
                new[w, r] = False
        if torch.equal(new, keep):
            break
        keep = new
    return mask & keep if mask.dim() == 2 else mask & keep[None]


# ------------------------------------------------------------------------------------ circuits
@dataclass(frozen=True)
class EdgeCheck:
    """One verified edge (or node, in node-level circuits): signed estimate and exact effect, means over pairs."""

    edge: str
    estimate: float
    exact: float
    score: float
    in_circuit: bool


@dataclass(frozen=True)
class Verification:
    """Exact patches of the top edges and a random sample below the cut."""

    checks: tuple[EdgeCheck, ...]
    rank_correlation: float  # Spearman between |estimate| and |exact| over the top edges
    sign_agreement: float  # share of top edges whose estimate and exact effect share a sign
    largest_miss: str  # the edge with the largest |estimate − exact|
    largest_miss_size: float
    below_cut_max: float  # largest |exact| among sampled edges outside the circuit
    below_cut_bound: float | None  # diagnostic bound θ* on any unverified edge's |c| (None if not run)
    bound_alpha: float | None
    n_forwards: int

    def table(self) -> list[dict[str, Any]]:
        return [vars(c) for c in self.checks]


@dataclass(frozen=True)
class Faithfulness:
    """Whole-circuit runs, normalised ``(m − m_corrupt)/(m_clean − m_corrupt)``."""

    sizes: tuple[int, ...]
    faithfulness: tuple[float, ...]  # everything outside the circuit patched
    necessity: tuple[float, ...]  # the circuit's edges knocked out
    clean_metric: float
    corrupt_metric: float


@dataclass(frozen=True, eq=False)
class Circuit:
    """A set of edges with the estimates it was chosen from and what verification found.

    ``in_graph``, ``score`` and ``signed`` are dense like the graph's scores
    (``[W, R]`` or ``[T, W, R]``); ``verified`` maps verified edge names to exact effects.
    """

    graph: EdgeGraph
    in_graph: torch.Tensor
    score: torch.Tensor
    signed: torch.Tensor
    level: Level = "edge"
    method: str = ""
    direction: Direction = Direction.NOISING
    metric: str = "logit_diff"
    node_scores: dict[str, float] = field(default_factory=dict)
    verification: Verification | None = None
    faithfulness: Faithfulness | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return int(self.in_graph.sum())

    @property
    def sign_convention(self) -> str:
        return sign_convention(self.direction, self.metric)

    def edges(self) -> list[Edge]:
        """Kept edges by decreasing score."""
        coords = self.in_graph.nonzero()
        vals = self.score[tuple(coords.T)]
        order = torch.sort(vals, descending=True, stable=True).indices
        out = []
        for i in order.tolist():
            c = coords[i].tolist()
            out.append(self.graph.edge(c[-2], c[-1], c[0] if len(c) == 3 else None))
        return out

    def nodes(self) -> list[Node]:
        """Components touched by kept edges (heads for q/k/v readers), in forward order."""
        flat = self.in_graph.any(0) if self.in_graph.dim() == 3 else self.in_graph
        seen: dict[Node, None] = {}
        for w, r in flat.nonzero().tolist():
            seen[self.graph.writers[w]] = None
            seen[_component(self.graph.readers[r])] = None
        order = {n: i for i, n in enumerate([*self.graph.writers, Node(NodeKind.LOGITS)])}
        return sorted(seen, key=lambda n: order.get(n, len(order)))

    def with_(self, **changes: Any) -> "Circuit":
        return replace(self, **changes)

    def to_json(self, mode: str = "edgeatp") -> dict[str, Any]:
        """The circuit as JSON-able data (``mode="mib"``: the EAP-IG/MIB interchange format)."""
        from .export.json_io import circuit_to_json

        return circuit_to_json(self, mode)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> "Circuit":
        """Rebuild a circuit from :meth:`to_json` data (either mode) or a path to a JSON file."""
        from .export.json_io import circuit_from_json

        return circuit_from_json(data)


def circuit_from_edges(scores: EdgeScores, mask: torch.Tensor, cleanup: bool = True, meta: dict | None = None) -> Circuit:
    """A circuit of the edges in ``mask`` (optionally cleaned to input→logits paths)."""
    keep = connected(scores.graph, mask) if cleanup else mask & scores.graph.mask.expand_as(mask)
    return Circuit(scores.graph, keep, scores.scores, scores.signed, "edge", scores.method, scores.direction,
                   scores.metric, meta={**scores.meta, **(meta or {})})


def prune(scores: EdgeScores, *, top_k: int | None = None, threshold: float | None = None,
          cumulative: float | None = None, greedy: int | None = None, cleanup: bool = True) -> Circuit:
    """Select edges by exactly one rule (top-k, score threshold, cumulative share, greedy from the
    logits), then drop edges not on an input→logits path."""
    rules = {"top_k": top_k, "threshold": threshold, "cumulative": cumulative, "greedy": greedy}
    given = [k for k, v in rules.items() if v is not None]
    if len(given) != 1:
        raise EdgeatpError("choose exactly one of top_k, threshold, cumulative or greedy to prune by")
    if top_k is not None:
        mask = select_top_k(scores, top_k)
    elif threshold is not None:
        mask = select_threshold(scores, threshold)
    elif cumulative is not None:
        mask = select_cumulative(scores, cumulative)
    else:
        mask = select_greedy(scores, greedy)  # type: ignore[arg-type]
    return circuit_from_edges(scores, mask, cleanup, {"rule": given[0], "value": rules[given[0]]})


def node_circuit(scores: NodeScores, graph: EdgeGraph, *, top_k: int) -> Circuit:
    """A circuit of the ``top_k`` components (heads, MLPs or neurons; q/k/v scores count for their
    head) by node score, as the edges among them, the input and the logits."""
    comp: dict[Node, float] = {}
    for node, score, _ in scores.top():
        c = _component(node.component)
        comp[c] = max(comp.get(c, 0.0), score)
    kept = sorted(comp, key=lambda n: -comp[n])[:top_k]
    return _component_circuit(graph, {n: comp[n] for n in kept}, scores.method, scores.direction, scores.metric,
                              {**scores.meta, "rule": "top_k", "value": top_k})


def group_circuit(scores: Any, graph: EdgeGraph, *, top_k: int) -> Circuit:
    """A circuit over coarse groups: every component of the ``top_k`` best groups of a
    :class:`~edgeatp.attribution.grouping.GroupScores` (a component scores as its best group).
    A circuit is a set of edges between whole components, so a group covering only some
    positions of a component (``span:`` groups) keeps the whole component."""
    kept_groups = scores.top(top_k)
    comp: dict[Node, float] = {}
    for group, score, _ in kept_groups:
        for member in group.members:
            c = _component(member.component)
            comp[c] = max(comp.get(c, 0.0), score)
    meta = {**scores.meta, "rule": "top_k groups", "value": top_k, "groups_kept": [g.name for g, *_ in kept_groups]}
    return _component_circuit(graph, comp, scores.method, scores.direction, scores.metric, meta)


def _component_circuit(graph: EdgeGraph, comp: dict[Node, float], method: str, direction: Direction, metric: str,
                       meta: dict[str, Any]) -> Circuit:
    """The edges among kept components (plus input and logits); a kept neuron keeps its MLP's input."""
    keep_set = set(comp) | {Node(NodeKind.INPUT), Node(NodeKind.LOGITS)}
    keep_set |= {Node(NodeKind.MLP, n.layer) for n in comp if n.kind is NodeKind.NEURON}
    w_in = torch.tensor([w in keep_set for w in graph.writers])
    r_in = torch.tensor([_component(r) in keep_set for r in graph.readers])
    mask = graph.mask & w_in[:, None] & r_in[None, :]
    zeros = torch.zeros(graph.mask.shape, dtype=torch.float64)
    level: Level = "neuron" if any(n.kind is NodeKind.NEURON for n in comp) else "node"
    return Circuit(graph, connected(graph, mask), zeros, zeros, level, method, direction, metric,
                   node_scores={n.name: v for n, v in comp.items()}, meta=meta)


def coarse_edge_circuit(coarse: Any, scores: EdgeScores, *, top_k: int, cleanup: bool = True) -> Circuit:
    """A circuit of the member edges of the ``top_k`` best coarse edges of a
    :class:`~edgeatp.attribution.grouping.CoarseEdgeScores` (fine scores kept for drawing)."""
    kept = coarse.top(top_k)
    index = {n: (i, j) for n, i, j in coarse.names()}
    mask = torch.zeros_like(scores.graph.mask)
    for name, *_ in kept:
        mask |= coarse.members[index[name]]
    return circuit_from_edges(scores, mask, cleanup, {"rule": "top_k coarse edges", "value": top_k,
                                                      "coarse_edges_kept": [n for n, *_ in kept]})


# ------------------------------------------------------------------------------------ verification
def _clean_corrupt(adapter: ModelAdapter, pairs: PromptPairs, metric: Metric, batch_size: int) -> tuple[float, float]:
    """Mean metric on the clean and on the corrupt prompts."""
    totals = [0.0, 0.0]
    with adapter.session():
        for batch in pairs.batches(batch_size, same_length=not adapter.causal):
            batch = batch.to(adapter.device)
            ref = reference_logprobs(adapter, batch, metric)
            for i, tokens in enumerate((batch.clean, batch.source)):
                logits, _ = capture(adapter, tokens, [])
                totals[i] += float(metric(logits, batch, ref).double().sum())
    return totals[0] / len(pairs), totals[1] / len(pairs)


def top_k_circuits(scores: EdgeScores, sizes: Sequence[int], cleanup: bool = True) -> list[tuple[int, Circuit]]:
    """``(k, circuit)`` for increasing top-``k``, skipping sizes whose cleaned circuit is empty or
    repeats the previous one (cleanup can make several ``k`` give the same circuit)."""
    out: list[tuple[int, Circuit]] = []
    for k in sorted(set(sizes)):
        c = circuit_from_edges(scores, select_top_k(scores, k), cleanup, {"rule": "top_k", "value": k})
        if c.n_edges == 0 or (out and torch.equal(c.in_graph, out[-1][1].in_graph)):
            continue
        out.append((k, c))
    return out


def faithfulness_curve(adapter: ModelAdapter, pairs: PromptPairs, scores: EdgeScores, sizes: Sequence[int],
                       batch_size: int = 32, cleanup: bool = True) -> Faithfulness:
    """Faithfulness and necessity of the distinct top-``k`` circuits for ``k`` in ``sizes`` (sizes
    reported as kept edge counts, after cleanup)."""
    circuits = [c for _, c in top_k_circuits(scores, sizes, cleanup)]
    return circuits_faithfulness(adapter, pairs, circuits, batch_size)


def circuits_faithfulness(adapter: ModelAdapter, pairs: PromptPairs, circuits: Sequence[Circuit],
                          batch_size: int = 32) -> Faithfulness:
    """Faithfulness and necessity of several edge circuits of one graph, in one sweep."""
    if not circuits:
        raise EdgeatpError("no circuit to evaluate: every requested size leaves no edge after cleanup; try larger sizes")
    first = circuits[0]
    return _faithfulness(adapter, pairs, first.graph, torch.stack([c.in_graph for c in circuits]),
                         get_metric(first.metric), first.direction, batch_size, [c.n_edges for c in circuits])


def _faithfulness(adapter: ModelAdapter, pairs: PromptPairs, graph: EdgeGraph, masks: torch.Tensor, metric: Metric,
                  direction: Direction, batch_size: int, sizes: list[int]) -> Faithfulness:
    """Circuit edges carry clean values and all others corrupt ones (faithfulness), or the
    reverse (necessity). Noising patches corrupt values into the clean run, denoising clean
    values into the corrupt run, so the two runs swap which edges are patched."""
    m_clean, m_corrupt = _clean_corrupt(adapter, pairs, metric, batch_size)
    gap = _gap(m_clean, m_corrupt)
    outside = run_circuit(adapter, pairs, graph, masks, metric, direction, batch_size)
    inside = run_circuit(adapter, pairs, graph, masks, metric, direction, batch_size, knockout=True)
    faithful, necessary = (outside, inside) if direction is Direction.NOISING else (inside, outside)
    base = faithful.base_metric.mean().item()

    def norm(effects: torch.Tensor) -> tuple[float, ...]:
        return tuple(float((base + e - m_corrupt) / gap) for e in effects.tolist())
    return Faithfulness(tuple(sizes), norm(faithful.mean), norm(necessary.mean), m_clean, m_corrupt)


def _gap(m_clean: float, m_corrupt: float) -> float:
    gap = m_clean - m_corrupt
    if abs(gap) < 1e-9:
        raise EdgeatpError("the clean and corrupt prompts give the same mean metric, so faithfulness is undefined; "
                           "check the corrupt prompts or the answer tokens")
    return gap


def circuit_faithfulness(adapter: ModelAdapter, pairs: PromptPairs, circuit: Circuit, batch_size: int = 32) -> Faithfulness:
    """Faithfulness and necessity of one circuit (edge level: edge patching; node level: the
    components outside the circuit are patched as nodes)."""
    metric = get_metric(circuit.metric)
    if circuit.level == "edge":
        return _faithfulness(adapter, pairs, circuit.graph, circuit.in_graph[None], metric, circuit.direction,
                             batch_size, [circuit.n_edges])
    m_clean, m_corrupt = _clean_corrupt(adapter, pairs, metric, batch_size)
    gap = _gap(m_clean, m_corrupt)
    kept = set(circuit.nodes())
    writers = [w for w in circuit.graph.writers if w.kind is not NodeKind.INPUT]
    outside = [w for w in writers if w not in kept]
    inside = [w for w in writers if w in kept]
    sets = [outside, inside] if circuit.direction is Direction.NOISING else [inside, outside]
    eff = patch_nodes(adapter, pairs, sets, metric, circuit.direction, batch_size)
    base = eff.base_metric.mean().item()
    f, n = (float((base + e - m_corrupt) / gap) for e in eff.mean.tolist())
    return Faithfulness((len(kept),), (f,), (n,), m_clean, m_corrupt)


def verify(adapter: ModelAdapter, pairs: PromptPairs, circuit: Circuit, scores: EdgeScores, *, top: int = 20,
           sample_below: int = 20, seed: int = 0, bound: bool = False, alpha: float = 0.05,
           bound_samples: int = 256, bound_p: float = 0.05, batch_size: int = 64) -> Verification:
    """Exactly patch the ``top`` best edges and ``sample_below`` random edges outside the circuit;
    compare with the estimates. ``bound`` adds the AtP* false-negative diagnostic over all
    unverified edges (subsampling + Welch test; see :mod:`edgeatp.diagnostics`)."""
    ranked = [e for e, *_ in scores.top(top)]
    ranked_set = set(ranked)
    outside = [e for e in scores.graph.edges() if not _in(circuit, e)]
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(outside), generator=gen)[: min(sample_below, len(outside))].tolist()
    sample = [outside[i] for i in pick if outside[i] not in ranked_set]
    todo = ranked + sample
    if not todo:
        raise EdgeatpError("nothing to verify: the graph has no edges")
    eff = patch_edges(adapter, pairs, scores.graph, todo, scores.metric, scores.direction, batch_size)
    exact = eff.mean.tolist()
    checks = tuple(EdgeCheck(e.name, scores.signed_of(e), x, scores[e], _in(circuit, e)) for e, x in zip(todo, exact))
    theta = None
    forwards = eff.n_forwards
    if bound:
        from .diagnostics import edge_false_negative_bound

        verified = {c.edge for c in checks}
        unverified = [e for e in outside if e.name not in verified]
        theta = 0.0  # every edge outside the circuit was patched exactly: nothing is left to bound
        if unverified:
            try:
                result = edge_false_negative_bound(adapter, pairs, scores.graph, unverified, metric=scores.metric,
                                                   direction=scores.direction, samples=bound_samples, p=bound_p,
                                                   alpha=alpha, seed=seed, batch_size=batch_size)
            except EdgeatpError as exc:
                raise EdgeatpError(f"{exc} (on the command line: raise --bound-samples, or --bound-p)") from None
            theta = result.theta
            forwards += result.n_forwards
    return summarise_checks(checks, len(ranked), theta, alpha if bound else None, forwards)


def same_sign(estimate: float, exact: float) -> bool:
    """Whether an estimate has the sign of the exact effect (zero only matches zero)."""
    return (estimate > 0) == (exact > 0) and (estimate < 0) == (exact < 0)


def summarise_checks(checks: tuple[EdgeCheck, ...], n_ranked: int, theta: float | None, alpha: float | None,
               forwards: int) -> Verification:
    """Agreement of estimates and exact effects over the first ``n_ranked`` checks; the rest is
    the sample below the cut."""
    head = checks[:n_ranked]
    rho = float(spearmanr([abs(c.estimate) for c in head], [abs(c.exact) for c in head]).correlation) \
        if len(head) > 2 else float("nan")
    signs = sum(same_sign(c.estimate, c.exact) for c in head) / len(head) if head else float("nan")
    miss = max(checks, key=lambda c: abs(c.estimate - c.exact))
    below = [abs(c.exact) for c in checks[n_ranked:]]
    return Verification(checks, rho, signs, miss.edge, abs(miss.estimate - miss.exact), max(below, default=0.0),
                        theta, alpha, forwards)


def verify_nodes(adapter: ModelAdapter, pairs: PromptPairs, circuit: Circuit, scores: NodeScores, *, top: int = 20,
                 sample_below: int = 20, seed: int = 0, batch_size: int = 64) -> Verification:
    """Node-level verification: exact patches of the ``top`` best nodes and a random sample of the rest."""
    ranked = [n for n, *_ in scores.top(top)]
    rest = [n for n in scores.nodes if n not in set(ranked)]
    gen = torch.Generator().manual_seed(seed)
    sample = [rest[i] for i in torch.randperm(len(rest), generator=gen)[: min(sample_below, len(rest))].tolist()]
    todo = ranked + sample
    if not todo:
        raise EdgeatpError("nothing to verify: no nodes were scored")
    eff = patch_nodes(adapter, pairs, todo, scores.metric, scores.direction, batch_size)
    kept = set(circuit.node_scores)
    checks = tuple(EdgeCheck(n.name, scores.signed_of(n), x, scores[n], _component(n.component).name in kept)
                   for n, x in zip(todo, eff.mean.tolist()))
    return summarise_checks(checks, len(ranked), None, None, eff.n_forwards)


def _in(circuit: Circuit, edge: Edge) -> bool:
    w, r = circuit.graph.index_of(edge)
    if circuit.in_graph.dim() == 3:
        return bool(circuit.in_graph[edge.position if edge.position is not None else slice(None), w, r].any())
    return bool(circuit.in_graph[w, r])
