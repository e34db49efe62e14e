"""Node attribution: AtP, AtP + QK fix, AtP + GradDrop, AtP*, integrated gradients and exact patching.

For a node ``n`` and a prompt pair, AtP estimates the patching effect as
``(n(source) − n(base))ᵀ ∂L/∂n`` at the base run. The QK fix replaces the linear estimate of
query and key nodes by an exact softmax recomputation followed by the base gradient w.r.t.
the attention probabilities. GradDrop repeats the backward pass once per layer with that
layer's residual write cut from the gradient, and averages the per-layer ``|estimates|``.
Absolute values are always taken per prompt pair (and per GradDrop term), never of a mean.

:class:`NodeTerms` computes the per-family, per-layer pieces (linear products and QK-fixed
softmax changes) that node and group attribution both assemble.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ..errors import EdgeatpError, option_error
from ..graph import Node, NodeIndex, NodeKind, check_nodes, node_set
from ..methods import GradDropMode, Kind, Method, get_method, graddrop_units
from ..model import ModelAdapter, Site
from ..model.sites import NODE_SITE
from ..patching import patch_nodes
from ..scores import NodeScores
from ..setup import Setup
from .passes import GradRun, SiteNeeds, estimate_pairs, fold_passes, nonzero_terms
from .qk_fix import joint, key_fix, key_shift, per_query, softmax_change

Family = tuple[NodeKind, int]  # (kind, layer)
QK = (NodeKind.Q, NodeKind.K)


def resolve_nodes(model: ModelAdapter, nodes: NodeIndex | Sequence[Node] | Iterable[str] | None,
                  positions: bool, n_positions: int) -> NodeIndex:
    """A node index from an explicit list, family names (``head``, ``q``, …) or the default families."""
    if nodes is None:
        fams = ("head", "q", "k", "v", "mlp") if model.shape.has_mlp else ("head", "q", "k", "v")
        return node_set(model.shape, fams, n_positions if positions else None)
    if isinstance(nodes, NodeIndex):
        index = nodes
    else:
        items = list(nodes)
        if items and all(isinstance(x, str) and x in ("head", "q", "k", "v", "mlp", "neuron", "input") for x in items):
            return node_set(model.shape, items, n_positions if positions else None)  # type: ignore[arg-type]
        try:
            index = NodeIndex(tuple(Node.parse(x) if isinstance(x, str) else x for x in items))
        except ValueError as exc:
            raise EdgeatpError(str(exc)) from None
    try:
        check_nodes(model.shape, index)
    except ValueError as exc:
        raise EdgeatpError(str(exc)) from None
    for n in index:
        if n.position is not None and n.position >= n_positions:
            raise EdgeatpError(f"node {n.name}: the prompts have only {n_positions} positions")
    if len(index) == 0:
        raise EdgeatpError("no nodes to attribute: the node list is empty")
    return index


def family(node: Node) -> Family:
    """The (kind, layer) whose site holds a node."""
    return (node.kind, node.layer if node.layer is not None else 0)


class NodeTerms:
    """Per-family pieces of node estimates from gradient runs.

    Linear families give ``[b, T, n]`` products ``Δact · ∂L/∂act`` (``n`` = heads, neurons or 1);
    query and key families under the QK fix give the base scores, probabilities and the score
    change of patching (``[b, H, T, T]``, float64) and take ``G = ∂L/∂pattern`` from each pass.
    """

    def __init__(self, model: ModelAdapter, families: Iterable[Family], qk_fix: bool) -> None:
        self.model = model
        self.families = sorted(set(families), key=lambda f: (f[1], f[0].value))
        self.qk = {f for f in self.families if qk_fix and f[0] in QK}
        act, grad, base = [], [], []
        for kind, layer in self.families:
            if (kind, layer) in self.qk:
                act += [Site("rot_q", layer), Site("rot_k", layer)]
                base += [Site("scores", layer), Site("pattern", layer)]
                grad.append(Site("pattern", layer))
            else:
                s = Site(NODE_SITE[kind], layer)
                act.append(s)
                grad.append(s)
        self.needs = SiteNeeds.of(act, grad, base)

    def gradient_side(self, point: dict[Site, torch.Tensor], grads: dict[Site, torch.Tensor]) -> dict[Any, torch.Tensor]:
        """The gradients each family needs (pattern gradients for QK-fixed families)."""
        return {s: grads[s] for s in self.needs.grad}

    def linear(self, run: GradRun, side: dict[Any, torch.Tensor], fam: Family) -> torch.Tensor:
        """``[b, T, n]`` per-position linear estimates of a family, float64."""
        kind, layer = fam
        s = Site(NODE_SITE[kind], layer)
        prod = (run.source[s].double() - run.base[s].double()) * side[s].double()
        if kind is NodeKind.NEURON:
            return prod
        return prod.sum(-1) if kind in (NodeKind.HEAD, *QK, NodeKind.V) else prod.sum(-1, keepdim=True)

    def score_shift(self, run: GradRun, fam: Family) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Base scores, base probabilities and the score change when the family's queries (or
        keys) take their source values, all ``[b, H, T, T]`` per query head, float64 (masked
        scores stay ``-inf``; a shared key changes the scores of every query head of its group)."""
        kind, layer = fam
        model = self.model
        score = model.attention_score_fn
        Q, K = run.base[Site("rot_q", layer)].double(), model.expand_kv(run.base[Site("rot_k", layer)]).double()
        F0 = score(layer, Q, K)
        if kind is NodeKind.Q:
            shift = score(layer, run.source[Site("rot_q", layer)].double(), K) - F0
        else:
            shift = score(layer, Q, model.expand_kv(run.source[Site("rot_k", layer)]).double()) - F0
        S = run.base[Site("scores", layer)].double()
        return S, torch.softmax(S, -1), shift  # probabilities of these scores, not the model's rounded ones

    @staticmethod
    def pattern_grad(side: dict[Any, torch.Tensor], fam: Family) -> torch.Tensor:
        return side[Site("pattern", fam[1])].double()


class NodeEstimator:
    """Estimates for a node index: per position or aggregated over positions."""

    partial_passes = False

    def __init__(self, model: ModelAdapter, index: NodeIndex, qk_fix: bool, units: list, n_positions: int) -> None:
        self.index, self.T = index, n_positions
        self.terms = NodeTerms(model, {family(n) for n in index}, qk_fix)
        self.needs = self.terms.needs
        self.shape = (len(index),)
        self.n_terms = torch.tensor([nonzero_terms(units, {model.shape.block_of(n)}) for n in index],
                                    dtype=torch.float64) if units else None
        self.per_pos = {family(n) for n in index if n.position is not None}
        self.agg = {family(n) for n in index if n.position is None}
        cols: dict[tuple[Family, bool], tuple[list[int], list[int], list[int]]] = {}
        for i, n in enumerate(index):
            j = n.head if n.is_attention else (n.neuron if n.kind is NodeKind.NEURON else 0)
            c, pos, js = cols.setdefault((family(n), n.position is None), ([], [], []))
            c.append(i)
            pos.append(n.position or 0)
            js.append(j)  # type: ignore[arg-type]
        self.layout = {k: tuple(torch.tensor(x, dtype=torch.long) for x in v) for k, v in cols.items()}

    def prepare(self, source: dict[Site, torch.Tensor], base: dict[Site, torch.Tensor]) -> None:
        return None

    def gradient_side(self, prep: None, point: dict[Site, torch.Tensor], grads: dict[Site, torch.Tensor]
                      ) -> dict[Any, torch.Tensor]:
        return self.terms.gradient_side(point, grads)

    def estimate(self, prep: None, run: GradRun, sides: Iterable[dict[Any, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shifts = {f: self._softmax_part(run, f) for f in self.terms.qk}  # shared by every pass
        return fold_passes(self._one_pass(run, side, shifts) for side in sides)

    def _softmax_part(self, run: GradRun, fam: Family) -> tuple:
        S, A, shift = self.terms.score_shift(run, fam)
        dA = softmax_change(S, S + shift, A) if fam[0] is NodeKind.Q or fam in self.agg else None
        ks = key_shift(S, shift) if fam[0] is NodeKind.K and fam in self.per_pos else None
        return S, shift, dA, ks

    def _one_pass(self, run: GradRun, side: dict[Any, torch.Tensor], shifts: dict) -> torch.Tensor:
        per_pos: dict[Family, torch.Tensor] = {}
        agg: dict[Family, torch.Tensor] = {}
        for fam in self.terms.families:
            if fam in shifts:
                S, shift, dA, ks = shifts[fam]
                G = self.terms.pattern_grad(side, fam)
                if fam[0] is NodeKind.Q:
                    rows = per_query(dA, G)  # [b, H, T]: each query row patched alone
                    per_pos[fam], agg[fam] = rows.transpose(1, 2), rows.sum(-1)
                else:  # a shared key's effect adds up over the query heads that read it
                    if fam in self.per_pos:
                        per_pos[fam] = self.terms.model.sum_to_kv(key_fix(S, shift, G, ks), 1).transpose(1, 2)
                    if fam in self.agg:
                        agg[fam] = self.terms.model.sum_to_kv(joint(dA, G), 1)  # all keys at once, jointly
            else:
                pp = self.terms.linear(run, side, fam)
                per_pos[fam], agg[fam] = pp, pp.sum(1)
        b = run.base_metric.shape[0]
        out = torch.zeros(b, len(self.index), dtype=torch.float64, device=run.base_metric.device)
        for (fam, aggregated), (cols, pos, js) in self.layout.items():
            if aggregated:
                out[:, cols] = agg[fam][:, js.to(agg[fam].device)].to(out.device)
            else:
                pp = per_pos[fam]
                inside = pos < pp.shape[1]  # positions beyond this batch's prompts hold only padding
                out[:, cols[inside]] = pp[:, pos[inside].to(pp.device), js[inside].to(pp.device)].to(out.device)
        return out


def attribute_nodes(setup: Setup, method: str | Method = "atp*",
                    nodes: NodeIndex | Sequence[Node] | Iterable[str] | None = None, *, positions: bool = False,
                    graddrop: GradDropMode = "block", ig_steps: int = 8) -> NodeScores:
    """Attribution scores for nodes (default: every head output, query, key, value and MLP,
    aggregated over positions; ``positions=True`` for one node per position).

    ``method``: ``atp`` (plain), ``atp-qk`` (QK fix), ``atp-gd`` (GradDrop), ``atp*`` (QK fix
    inside every GradDrop term), ``ig`` (integrated gradients over ``ig_steps`` points of the
    embedding path) or ``exact`` (one patched forward per node). GradDrop's score is
    ``Σ_l |Î_l| / n_terms`` where ``n_terms`` excludes the one identically zero term of a node
    inside a dropped unit (``L − 1`` for layer nodes, ``L`` for the embedding); a node with no
    non-trivial term (a one-layer model) keeps its plain ``|estimate|``. In a two-layer model
    the only non-trivial term of a layer-0 node drops every indirect path through layer 1.
    """
    m = get_method(method, "node")
    model = setup.model
    index = resolve_nodes(model, nodes, positions, setup.pairs.n_positions)
    if m.kind is Kind.EXACT:
        eff = patch_nodes(setup, list(index))
        return NodeScores.from_per_pair(eff.per_pair, None, m.name, setup.direction, setup.metric.name, index,
                                        m.cost(patches=len(index)), {"model": model.name})
    setup.check_gradient_metric()
    if ig_steps < 1:
        raise option_error("{ig_steps} must be at least 1")
    units = graddrop_units(model.shape.n_layers, model.shape.attn_only, graddrop) if m.graddrop else []
    est = NodeEstimator(model, index, m.qk_fix, units, setup.pairs.n_positions)
    fitted = setup.fit(setup.device_mb_per_pair(est.needs, 1 + len(units)))  # pairs per batch within the budget
    stats, per_pair, per_abs = estimate_pairs(fitted, m, est, f"node {m.name}", units=units, ig_steps=ig_steps)
    cost = m.cost(graddrop_terms=len(units), ig_steps=ig_steps, reference=setup.metric.needs_reference)
    meta = {"graddrop": graddrop if m.graddrop else None, "n_terms": len(units), "batch_size": fitted.batch_size,
            "ig_steps": ig_steps if m.kind is Kind.INTEGRATED else None, "model": model.name}
    return NodeScores(stats, m.name, setup.direction, setup.metric.name, cost, meta, per_pair, per_abs, index)
