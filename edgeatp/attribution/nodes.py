"""Node attribution: AtP, AtP + QK fix, AtP + GradDrop and AtP* (Kramár et al. 2024).

For a node ``n`` and a prompt pair, AtP estimates the patching effect as
``(n(source) − n(base))ᵀ ∂L/∂n`` at the base run. The QK fix replaces the linear estimate of
query and key nodes by an exact softmax recomputation followed by the base gradient w.r.t.
the attention probabilities. GradDrop repeats the backward pass once per layer with that
layer's residual write cut from the gradient, and averages the per-layer ``|estimates|``.
Absolute values are always taken per prompt pair (and per GradDrop term), never of a mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import EdgeatpError
from ..graph import Node, NodeIndex, NodeKind, check_nodes, node_set
from ..metrics import Metric, get_metric
from ..model import ModelAdapter, Site, load_model
from ..patching import NODE_SITE
from ..scores import Cost, NodeScores
from ..tasks.pairs import Direction, PromptPairs
from .passes import GradDropMode, GradRun, gradient_run, graddrop_units, nonzero_terms
from .qk_fix import key_fix, key_shift, softmax_change

NodeMethod = Literal["atp", "atp-qk", "atp-gd", "atp*"]
NODE_METHODS: dict[str, tuple[bool, bool]] = {  # name -> (qk fix, graddrop)
    "atp": (False, False),
    "atp-qk": (True, False),
    "atp-gd": (False, True),
    "atp*": (True, True),
}


def check_gradient_metric(metric: Metric, direction: Direction) -> None:
    """KL to the clean run has zero gradient on the clean run: gradient methods cannot noise with it."""
    if metric.needs_reference and direction is Direction.NOISING:
        raise EdgeatpError(f"metric {metric.name} has zero gradient at the clean run, so gradient methods "
                           "cannot estimate noising effects with it; use --direction denoising or another metric")


def resolve_nodes(adapter: ModelAdapter, nodes: NodeIndex | Sequence[Node] | Iterable[str] | None,
                  positions: bool, n_positions: int) -> NodeIndex:
    """A node index from an explicit list, family names (``head``, ``q``, …) or the default families."""
    if nodes is None:
        return node_set(adapter.shape, ("head", "q", "k", "v", "mlp") if adapter.shape.has_mlp else ("head", "q", "k", "v"),
                        n_positions if positions else None)
    if isinstance(nodes, NodeIndex):
        index = nodes
    else:
        items = list(nodes)
        if all(isinstance(x, str) and x in ("head", "q", "k", "v", "mlp", "neuron", "input") for x in items):
            return node_set(adapter.shape, items, n_positions if positions else None)  # type: ignore[arg-type]
        index = NodeIndex(tuple(Node.parse(x) if isinstance(x, str) else x for x in items))
    check_nodes(adapter.shape, index)
    for n in index:
        if n.position is not None and n.position >= n_positions:
            raise EdgeatpError(f"node {n.name}: the prompts have only {n_positions} positions")
    return index


@dataclass(frozen=True)
class _Need:
    """Which (family, layer) estimates a node set needs, per position and/or aggregated."""

    per_pos: frozenset[tuple[NodeKind, int]]
    agg: frozenset[tuple[NodeKind, int]]

    @classmethod
    def of(cls, index: NodeIndex) -> "_Need":
        per_pos, agg = set(), set()
        for n in index:
            key = (n.kind, n.layer if n.layer is not None else 0)
            (agg if n.position is None else per_pos).add(key)
        return cls(frozenset(per_pos), frozenset(agg))

    @property
    def keys(self) -> set[tuple[NodeKind, int]]:
        return set(self.per_pos | self.agg)


def _sites(need: _Need, qk_fix: bool) -> tuple[list[Site], list[Site], list[Site]]:
    """(activation sites of both runs, gradient sites, base-only sites)."""
    act, grad, base = [], [], []
    for kind, layer in sorted(need.keys, key=lambda k: (k[1], k[0].value)):
        if qk_fix and kind in (NodeKind.Q, NodeKind.K):
            act += [Site("rot_q", layer), Site("rot_k", layer)]
            base += [Site("scores", layer), Site("pattern", layer)]
            grad.append(Site("pattern", layer))
        else:
            s = Site(NODE_SITE[kind], layer)
            act.append(s)
            grad.append(s)
    return list(dict.fromkeys(act)), list(dict.fromkeys(grad)), list(dict.fromkeys(base))


def _linear(run: GradRun, g: dict[Site, torch.Tensor], kind: NodeKind, layer: int) -> torch.Tensor:
    """``[b, T, n]`` per-position linear estimates (n = heads, neurons or 1)."""
    s = Site(NODE_SITE[kind], layer)
    prod = (run.source[s] - run.base[s]) * g[s]
    if kind in (NodeKind.HEAD, NodeKind.Q, NodeKind.K, NodeKind.V):
        return prod.sum(-1)
    if kind is NodeKind.NEURON:
        return prod
    return prod.sum(-1, keepdim=True)


def qk_score_shift(adapter: ModelAdapter, run: GradRun, kind: NodeKind, layer: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base scores, base probabilities and the score change when the layer's queries (or keys)
    take their source values, all ``[b, H, T, T]`` float64 (masked scores stay ``-inf``)."""
    Q, K = run.base[Site("rot_q", layer)], run.base[Site("rot_k", layer)]
    F0 = adapter.attention_score_fn(layer, Q, K)
    if kind is NodeKind.Q:
        shift = adapter.attention_score_fn(layer, run.source[Site("rot_q", layer)], K) - F0
    else:
        shift = adapter.attention_score_fn(layer, Q, run.source[Site("rot_k", layer)]) - F0
    return run.base[Site("scores", layer)].double(), run.base[Site("pattern", layer)].double(), shift.double()


def _qk(adapter: ModelAdapter, run: GradRun, g: dict[Site, torch.Tensor], kind: NodeKind, layer: int,
        per_pos: bool, agg: bool, cache: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """QK-fixed estimates for query or key nodes: ``[b, T, H]`` per position and ``[b, H]`` aggregated."""
    key = (kind, layer, per_pos, agg)
    if key not in cache:  # the softmax part does not depend on the gradient pass
        S, A, shift = qk_score_shift(adapter, run, kind, layer)
        dA = softmax_change(S, S + shift, A) if kind is NodeKind.Q or agg else None
        ks = key_shift(S, shift) if kind is NodeKind.K and per_pos else None
        cache[key] = (S, shift, dA, ks)
    S, shift, dA, ks = cache[key]
    G = g[Site("pattern", layer)].double()
    pp = ag = None
    if kind is NodeKind.Q:
        rows = (dA * G).sum(-1)  # [b, H, T]: each query row patched alone (rows are independent)
        pp, ag = rows.transpose(1, 2), rows.sum(-1)
    else:
        if per_pos:
            pp = key_fix(S, shift, G, ks).transpose(1, 2)
        if agg:
            ag = (dA * G).sum((-1, -2))  # all keys at once, recomputed jointly
    return pp, ag


def attribute_nodes(
    model: ModelAdapter | object,
    pairs: PromptPairs,
    method: NodeMethod | str = "atp*",
    nodes: NodeIndex | Sequence[Node] | Iterable[str] | None = None,
    metric: str | Metric = "logit_diff",
    direction: Direction | str = Direction.NOISING,
    batch_size: int = 32,
    positions: bool = False,
    graddrop: GradDropMode = "block",
    progress: bool = False,
) -> NodeScores:
    """Attribution scores for nodes (default: every head output, query, key, value and MLP,
    aggregated over positions; ``positions=True`` for one node per position).

    ``method``: ``atp`` (plain), ``atp-qk`` (QK fix), ``atp-gd`` (GradDrop) or ``atp*``
    (QK fix inside every GradDrop term). GradDrop's score is ``Σ_l |Î_l| / n_terms`` where
    ``n_terms`` excludes the one identically zero term of a node inside a dropped unit
    (``L − 1`` for layer nodes, ``L`` for the embedding); a node with no non-trivial term
    (a one-layer model) keeps its plain ``|estimate|``. In a two-layer model the only
    non-trivial term of a layer-0 node drops every indirect path through layer 1.
    """
    if method not in NODE_METHODS:
        raise EdgeatpError(f"unknown node method {method!r}; choose from {', '.join(NODE_METHODS)}")
    adapter = load_model(model)
    metric_obj, direction = get_metric(metric), Direction(direction)
    check_gradient_metric(metric_obj, direction)
    qk_fix, use_gd = NODE_METHODS[method]
    adapter.check_pairs(pairs)
    index = resolve_nodes(adapter, nodes, positions, pairs.n_positions)
    if len(index) == 0:
        raise EdgeatpError("no nodes to attribute: the node list is empty")
    need = _Need.of(index)
    act, grad, base = _sites(need, qk_fix)
    gd_mode = graddrop if use_gd else None
    units = graddrop_units(adapter, graddrop) if use_gd else []
    n_nodes = len(index)
    signed = torch.zeros(len(pairs), n_nodes, dtype=torch.float64)
    magnitude = torch.zeros_like(signed)
    norm = torch.tensor([nonzero_terms(units, {adapter.shape.block_of(n)}) if units else 1 for n in index],
                        dtype=torch.float64)
    with adapter.session():
        for batch in tqdm(list(pairs.batches(batch_size, direction, same_length=not adapter.causal)),
                          disable=not progress, desc=f"node {method}", leave=False):
            batch = batch.to(adapter.device)
            run = gradient_run(adapter, batch, metric_obj, act, grad, gd_mode, base)
            cache: dict = {}
            with torch.no_grad():
                values = [_gather(adapter, run, g, need, index, qk_fix, cache, pairs.n_positions) for g in run.grads]
            rows = batch.index.cpu()
            signed[rows] = values[0]
            if use_gd:
                terms = torch.stack(values[1:]).abs().sum(0) / norm.clamp(min=1)
                magnitude[rows] = torch.where(norm > 0, terms, values[0].abs())
            else:
                magnitude[rows] = values[0].abs()
    cost = Cost(forwards=2 + int(metric_obj.needs_reference), backwards=1 + len(units))
    meta = {"graddrop": graddrop if use_gd else None, "n_terms": len(units), "batch_size": batch_size,
            "model": adapter.name}
    return NodeScores(signed, magnitude, method, direction, metric_obj.name, cost, meta, index)


def _gather(adapter: ModelAdapter, run: GradRun, g: dict[Site, torch.Tensor], need: _Need, index: NodeIndex,
            qk_fix: bool, cache: dict, n_positions: int) -> torch.Tensor:
    """``[b, n_nodes]`` estimates of one gradient pass, in the index's order."""
    per_pos: dict[tuple[NodeKind, int], torch.Tensor] = {}
    agg: dict[tuple[NodeKind, int], torch.Tensor] = {}
    for key in need.keys:
        kind, layer = key
        if qk_fix and kind in (NodeKind.Q, NodeKind.K):
            pp, ag = _qk(adapter, run, g, kind, layer, key in need.per_pos, key in need.agg, cache)
            if pp is not None:
                per_pos[key] = pp
            if ag is not None:
                agg[key] = ag
        else:
            pp = _linear(run, g, kind, layer).double()
            per_pos[key], agg[key] = pp, pp.sum(1)
    for key, pp in per_pos.items():
        if pp.shape[1] < n_positions:
            per_pos[key] = torch.nn.functional.pad(pp, (0, 0, 0, n_positions - pp.shape[1]))
    b = next(iter(per_pos.values() or agg.values())).shape[0]
    out = torch.zeros(b, len(index), dtype=torch.float64)
    for (key, aggregated), (cols, pos, js) in _layout(index).items():
        if aggregated:
            out[:, cols] = agg[key][:, js].cpu()
        else:
            out[:, cols] = per_pos[key][:, pos, js].cpu()
    return out


def _layout(index: NodeIndex) -> dict[tuple[tuple[NodeKind, int], bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per (family, layer) and aggregation: output columns, positions and head/neuron indices."""
    groups: dict[tuple[tuple[NodeKind, int], bool], tuple[list[int], list[int], list[int]]] = {}
    for i, n in enumerate(index):
        key = (n.kind, n.layer if n.layer is not None else 0)
        j = n.head if n.is_attention else (n.neuron if n.kind is NodeKind.NEURON else 0)
        cols, pos, js = groups.setdefault((key, n.position is None), ([], [], []))
        cols.append(i)
        pos.append(n.position or 0)
        js.append(j)  # type: ignore[arg-type]
    return {k: tuple(torch.tensor(x, dtype=torch.long) for x in v) for k, v in groups.items()}  # type: ignore[misc]
