"""Coarser nodes: groups of fine nodes patched together, and a coarse-to-fine pass.

A :class:`Group` is a named set of fine nodes (a whole attention layer, a set of heads, an MLP
layer, a span of positions, any user-defined set). First-order group scores add the members'
estimates **per prompt pair** before ``|·|`` (exact for linear AtP); a group's queries are
recomputed together through the softmax, and so are its keys (a group holding both queries and
keys of one head adds the two recomputations, each taken with the other side clean);
GradDrop adds members per term and normalises by the group's non-trivial terms. Exact group
patching patches all members in one forward. :func:`coarse_to_fine` scores layers first and
refines only the groups that matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from ..errors import EdgeatpError, option_error
from ..graph import EdgeGraph, ModelShape, Node, NodeKind, attention_inputs, check_nodes, node_set
from ..groupspec import group_file, parse_spans
from ..methods import Cost, GradDropMode, Kind, Method, get_method, graddrop_units
from ..model import ModelAdapter, Site
from ..patching import PatchEffects, patch_edges, patch_nodes
from ..scores import EdgeScores, PairStats, _Result
from ..setup import Setup
from .nodes import QK, Family, NodeTerms, family
from .passes import GradRun, estimate_pairs, fold_passes, nonzero_terms
from .qk_fix import joint, softmax_change


@dataclass(frozen=True)
class Group:
    """A named set of fine nodes that is patched, and scored, as one."""

    name: str
    members: tuple[Node, ...]

    def __post_init__(self) -> None:
        if not self.members:
            raise EdgeatpError(f"group {self.name!r} has no members")


@dataclass(frozen=True, eq=False)
class GroupScores(_Result):
    """Per-group scores: ``per_pair`` is ``[pairs, groups]``."""

    groups: tuple[Group, ...] = field(default=())

    @classmethod
    def from_effects(cls, effects: PatchEffects, groups: Sequence[Group], cost: Cost, meta: dict[str, Any]
                     ) -> "GroupScores":
        """Exact group effects as scores (magnitude ``|effect|`` per pair)."""
        per_pair = effects.per_pair
        return cls(PairStats.of(per_pair), "exact", effects.direction, effects.metric, cost, meta, per_pair,
                   per_pair.abs(), tuple(groups))

    def __getitem__(self, name: str) -> float:
        return float(self.scores[self._index(name)])

    def _index(self, name: str) -> int:
        for i, g in enumerate(self.groups):
            if g.name == name:
                return i
        raise KeyError(f"no group named {name!r}")

    def top(self, k: int | None = None) -> list[tuple[Group, float, float]]:
        scores, signed = self.scores.cpu(), self.signed.cpu()
        order = torch.sort(scores, descending=True, stable=True).indices[: len(self.groups) if k is None else k]
        return [(self.groups[i], float(scores[i]), float(signed[i])) for i in order.tolist()]

    def to_table(self, k: int | None = None) -> list[dict]:
        se = self.stderr
        return [{"group": g.name, "size": len(g.members), "score": s, "signed": m,
                 "stderr": float(se[self._index(g.name)])} for g, s, m in self.top(k)]


# ------------------------------------------------------------------------------------ building groups
def layer_groups(shape: ModelShape, positions: int | None = None) -> list[Group]:
    """One group per attention layer (all head outputs) and per MLP layer."""
    out = []
    for layer in range(shape.n_layers):
        heads = [Node(NodeKind.HEAD, layer, h) for h in range(shape.n_heads)]
        out.append(Group(f"a{layer}", tuple(_at(heads, positions))))
        if shape.has_mlp:
            out.append(Group(f"m{layer}", tuple(_at([Node(NodeKind.MLP, layer)], positions))))
    return out


def head_groups(shape: ModelShape, families: Sequence[str] = ("head", "q", "k", "v"),
                positions: int | None = None) -> list[Group]:
    """One group per head holding the given families of that head (e.g. its output and q/k/v)."""
    out = []
    for layer in range(shape.n_layers):
        for h in range(shape.n_heads):
            members = [head_member(shape, NodeKind(f), layer, h) for f in families]
            out.append(Group(f"a{layer}.h{h}", tuple(_at(members, positions))))
    return out


def head_member(shape: ModelShape, kind: NodeKind, layer: int, head: int) -> Node:
    """A query head's output, query, key or value node (the key and value of its shared
    key/value head in a grouped model)."""
    if kind in (NodeKind.K, NodeKind.V) and shape.grouped:
        return Node(kind, layer, shape.kv_of(head), kv=True)
    return Node(kind, layer, head)


def span_groups(nodes: Iterable[Node], spans: Sequence[tuple[int, int]]) -> list[Group]:
    """Each component over each position span ``[start, end]`` (inclusive): e.g. ``a1.h2@3-5``."""
    out = []
    for comp in dict.fromkeys(n.component for n in nodes):
        for start, end in spans:
            if start > end or start < 0:
                raise EdgeatpError(f"position span {start}-{end}: write start-end with 0 <= start <= end")
            out.append(Group(f"{comp.name}@{start}-{end}", tuple(comp.at(p) for p in range(start, end + 1))))
    return out


def _at(nodes: list[Node], positions: int | None) -> list[Node]:
    return nodes if positions is None else [n.at(p) for n in nodes for p in range(positions)]


def parse_groups(spec: str, shape: ModelShape, n_positions: int) -> list[Group]:
    """Groups from a CLI spec: ``layer``, ``head``, ``span:0-3,4-9`` (head outputs and MLPs over
    position spans) or a JSON file ``{"group name": ["a0.h1", "a0.h2@3", ...], ...}``."""
    if spec == "layer":
        return layer_groups(shape)
    if spec == "head":
        return head_groups(shape)
    if spec.startswith("span:"):
        spans = parse_spans(spec)
        if max(e for _, e in spans) >= n_positions:
            raise option_error(f"{{group}} {spec!r}: the prompts have positions 0..{n_positions - 1}")
        fams = ["head", "mlp"] if shape.has_mlp else ["head"]
        return span_groups(node_set(shape, fams), spans)
    groups = []
    for name, members in group_file(spec).items():
        try:
            nodes = tuple(Node.parse(str(m)) for m in members)
        except ValueError as exc:
            raise EdgeatpError(f"{spec}, group {name!r}: {exc}") from None
        groups.append(Group(name, nodes))
    return groups


# ------------------------------------------------------------------------------------ scoring
def _check_groups(model: ModelAdapter, groups: Sequence[Group], n_positions: int) -> None:
    if not groups:
        raise EdgeatpError("no groups to score")
    for g in groups:
        try:
            check_nodes(model.shape, g.members)
        except ValueError as exc:
            raise EdgeatpError(f"group {g.name}: {exc}") from None
        for n in g.members:
            if n.position is not None and n.position >= n_positions:
                raise EdgeatpError(f"group {g.name}: node {n.name} is beyond the prompts' {n_positions} positions")


def patch_groups(setup: Setup, groups: Sequence[Group]) -> PatchEffects:
    """Exact effect of patching each group's members jointly (one forward per group and batch)."""
    _check_groups(setup.model, groups, setup.pairs.n_positions)
    return patch_nodes(setup, [list(g.members) for g in groups], labels=[g.name for g in groups])


class GroupEstimator:
    """First-order group estimates: members' linear estimates added per pair; a group's queries
    (and, apart, its keys) recomputed together through the softmax."""

    partial_passes = False

    def __init__(self, model: ModelAdapter, groups: Sequence[Group], qk_fix: bool, units: list, n_positions: int
                 ) -> None:
        self.terms = NodeTerms(model, {family(n) for g in groups for n in g.members}, qk_fix)
        self.needs = self.terms.needs
        self.shape = (len(groups),)
        self.n_terms = torch.tensor([nonzero_terms(units, {model.shape.block_of(n) for n in g.members})
                                     for g in groups], dtype=torch.float64) if units else None
        self.masks = [_member_masks(g, n_positions, model.shape) for g in groups]

    def prepare(self, source: dict[Site, torch.Tensor], base: dict[Site, torch.Tensor]) -> None:
        return None

    def gradient_side(self, prep: None, point: dict[Site, torch.Tensor], grads: dict[Site, torch.Tensor]
                      ) -> dict[Any, torch.Tensor]:
        return self.terms.gradient_side(point, grads)

    def estimate(self, prep: None, run: GradRun, sides: Iterable[dict[Any, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shifts = {f: self.terms.score_shift(run, f) for f in self.terms.qk}
        return fold_passes(self._one_pass(run, side, shifts) for side in sides)

    def _one_pass(self, run: GradRun, side: dict[Any, torch.Tensor], shifts: dict) -> torch.Tensor:
        lin = {f: self.terms.linear(run, side, f) for f in self.terms.families if f not in shifts}
        return torch.stack([self._group_value(m, lin, shifts, side) for m in self.masks], 1)

    def _group_value(self, masks: dict[Family, torch.Tensor], lin: dict, shifts: dict, side: dict) -> torch.Tensor:
        """``[b]`` first-order estimate of one group for one gradient pass."""
        total = None
        for fam, m in masks.items():
            if fam in shifts:
                S, A, shift = shifts[fam]
                mm = m[: S.shape[-1]].to(S.device)  # [T, heads]; shared keys reach every query head of their group
                mm = self.terms.model.expand_kv(mm, dim=1) if fam[0] is NodeKind.K else mm
                sel = mm.T[None, :, :, None] if fam[0] is NodeKind.Q else mm.T[None, :, None, :]
                v = joint(softmax_change(S, S + shift * sel, A), self.terms.pattern_grad(side, fam)).sum(-1)
            else:
                x = lin[fam]  # [b, T, n]
                v = (x * m[: x.shape[1]].to(x.device)).sum((1, 2))
            total = v if total is None else total + v.to(total.device)  # layers may live on several devices
        return total  # type: ignore[return-value]


def attribute_groups(setup: Setup, groups: Sequence[Group], method: str | Method = "atp", *,
                     graddrop: GradDropMode = "block", ig_steps: int = 8) -> GroupScores:
    """Scores of groups of nodes: first-order estimates (see the module docstring for how members
    combine) or, with ``method="exact"``, each group patched as one."""
    m = get_method(method, "group")
    model = setup.model
    _check_groups(model, groups, setup.pairs.n_positions)
    meta = {"model": model.name, "graddrop": graddrop if m.graddrop else None}
    if m.kind is Kind.EXACT:
        return GroupScores.from_effects(patch_groups(setup, groups), groups, m.cost(patches=len(groups)), meta)
    setup.check_gradient_metric()
    if ig_steps < 1:
        raise option_error("{ig_steps} must be at least 1")
    units = graddrop_units(model.shape.n_layers, model.shape.attn_only, graddrop) if m.graddrop else []
    est = GroupEstimator(model, groups, m.qk_fix, units, setup.pairs.n_positions)
    stats, per_pair, per_abs = estimate_pairs(setup, m, est, f"group {m.name}", units=units, ig_steps=ig_steps)
    cost = m.cost(graddrop_terms=len(units), ig_steps=ig_steps, reference=setup.metric.needs_reference)
    return GroupScores(stats, m.name, setup.direction, setup.metric.name, cost, meta, per_pair, per_abs,
                       tuple(groups))


def _member_masks(group: Group, T: int, shape: ModelShape) -> dict[Family, torch.Tensor]:
    """Per (family, layer), a ``[T, n]`` mask of the group's members (all positions if unpositioned)."""
    out: dict[Family, torch.Tensor] = {}
    for n in group.members:
        width = (shape.kv_heads if n.kv else shape.n_heads) if n.is_attention else (
            shape.d_mlp if n.kind is NodeKind.NEURON else 1)
        m = out.setdefault(family(n), torch.zeros(T, width or 1, dtype=torch.bool))
        j = n.head if n.is_attention else (n.neuron if n.kind is NodeKind.NEURON else 0)
        m[slice(None) if n.position is None else n.position, j] = True
    return out


# ------------------------------------------------------------------------------------ coarse to fine
@dataclass(frozen=True)
class CoarseToFine:
    """What a coarse-to-fine pass scored at each level and the fine nodes it ended with."""

    levels: tuple[GroupScores, ...]
    kept: tuple[tuple[str, ...], ...]  # names of the groups refined at each level
    final: GroupScores  # finest level: one group per fine node
    cost: Cost


def coarse_to_fine(setup: Setup, method: str | Method = "atp-qk", keep: float = 0.5, positions: bool = True
                   ) -> CoarseToFine:
    """Score layers, then the heads/MLPs of the layers holding ``keep`` of the total score,
    then (``positions``) their positions — refining only what matters at each level."""
    if not 0 < keep <= 1:
        raise option_error("{keep} must be a share in (0, 1]")
    shape, T = setup.model.shape, setup.pairs.n_positions
    levels, kept_names = [], []
    cost = Cost()
    current = layer_groups(shape)
    refine = [_split_layer, *([_split_positions] if positions else [])]
    for step in range(len(refine) + 1):
        scores = attribute_groups(setup, current, method)
        levels.append(scores)
        cost = cost + scores.cost
        if step == len(refine):
            break
        chosen = _top_share(scores, keep)
        kept_names.append(tuple(g.name for g in chosen))
        current = [child for g in chosen for child in refine[step](g, shape, T)]
    return CoarseToFine(tuple(levels), tuple(kept_names), levels[-1], cost)


def _top_share(scores: GroupScores, keep: float) -> list[Group]:
    """The best groups whose scores add up to ``keep`` of the level's total."""
    ranked = scores.top()
    total = sum(s for _, s, _ in ranked) or 1.0
    out, acc = [], 0.0
    for g, s, _ in ranked:
        out.append(g)
        acc += s
        if acc >= keep * total:
            break
    return out


def _split_layer(group: Group, shape: ModelShape, T: int) -> list[Group]:
    """A layer group → one group per head (its output, query, key and value) or the MLP itself."""
    if all(n.kind is NodeKind.MLP for n in group.members):
        return [Group(group.name, group.members)]
    layer = group.members[0].layer
    return [Group(f"a{layer}.h{h}", tuple(head_member(shape, NodeKind(f), layer, h) for f in ("head", "q", "k", "v")))
            for h in range(shape.n_heads)]


def _split_positions(group: Group, shape: ModelShape, T: int) -> list[Group]:
    """A component group → one group per position."""
    return [Group(f"{group.name}@{p}", tuple(n.at(p) for n in group.members)) for p in range(T)]


# ------------------------------------------------------------------------------------ coarse edges
@dataclass(frozen=True, eq=False)
class CoarseEdgeScores(_Result):
    """Scores of edges between groups of writers and groups of readers: ``per_pair`` is
    ``[pairs, writer groups, reader groups]``; coarse edges with no fine edge inside stay 0."""

    writer_groups: tuple[Group, ...] = ()
    reader_groups: tuple[Group, ...] = ()
    members: torch.Tensor = field(default=None)  # type: ignore[assignment]  # [Gw, Gr, W, R] fine-edge masks

    def names(self) -> list[tuple[str, int, int]]:
        """``(name, writer group, reader group)`` of every coarse edge with a fine edge inside."""
        out = []
        for i, wg in enumerate(self.writer_groups):
            for j, rg in enumerate(self.reader_groups):
                if bool(self.members[i, j].any()):
                    out.append((f"{wg.name}->{rg.name}", i, j))
        return out

    def top(self, k: int | None = None) -> list[tuple[str, float, float]]:
        """The ``k`` best coarse edges as ``(name, score, signed mean)``."""
        scores, signed = self.scores.cpu(), self.signed.cpu()
        rows = [(n, float(scores[i, j]), float(signed[i, j])) for n, i, j in self.names()]
        return sorted(rows, key=lambda r: -r[1])[: len(rows) if k is None else k]

    def to_table(self, k: int | None = None) -> list[dict]:
        return [{"edge": n, "score": s, "signed": m} for n, s, m in self.top(k)]


def layer_writer_groups(shape: ModelShape) -> list[Group]:
    """The embedding, each attention layer's heads together, each MLP: coarse residual writers."""
    return [Group("input", (Node(NodeKind.INPUT),)), *layer_groups(shape)]


def layer_reader_groups(shape: ModelShape) -> list[Group]:
    """Each attention layer's query, key and value inputs (all heads), each MLP input, the logits."""
    out = []
    for layer in range(shape.n_layers):
        for kind in ("q", "k", "v"):
            out.append(Group(f"a{layer}<{kind}>", tuple(attention_inputs(shape, layer, NodeKind(kind)))))
        if shape.has_mlp:
            out.append(Group(f"m{layer}", (Node(NodeKind.MLP, layer),)))
    out.append(Group("logits", (Node(NodeKind.LOGITS),)))
    return out


def _membership(groups: Sequence[Group], index: dict[Node, int], what: str) -> torch.Tensor:
    """``[G, n]`` bool: which of the graph's writers (readers) each group holds."""
    out = torch.zeros(len(groups), len(index), dtype=torch.bool)
    for g, group in enumerate(groups):
        for n in group.members:
            if n not in index:
                raise EdgeatpError(f"group {group.name}: {n.name} is not a {what} of this graph")
            out[g, index[n]] = True
    return out


def coarse_edges(scores: EdgeScores, writer_groups: Sequence[Group] | None = None,
                 reader_groups: Sequence[Group] | None = None) -> CoarseEdgeScores:
    """First-order scores of coarse edges: member edges' signed estimates added **per prompt pair**
    (exact for plain AtP by linearity; for QK-fixed or GradDrop scores the sum is of the fine
    estimates, not a joint recomputation), then ``|·|`` and the mean over pairs. Default groups:
    layers (:func:`layer_writer_groups`, :func:`layer_reader_groups`). Position-aggregated only."""
    g = scores.graph
    if g.positional:
        raise option_error("coarse edges are built from position-aggregated edge scores; drop {positions}")
    wgs = list(writer_groups or layer_writer_groups(g.shape))
    rgs = list(reader_groups or layer_reader_groups(g.shape))
    W = _membership(wgs, g.writer_index, "writer").double()
    R = _membership(rgs, g.reader_index, "reader").double()
    per_pair = torch.einsum("iw,nwr,jr->nij", W, scores.need_per_pair("coarse edges")[:, 0] * g.mask, R)
    members = (W[:, None, :, None] * R[None, :, None, :]).bool() & g.mask
    return CoarseEdgeScores(PairStats.of(per_pair), scores.method, scores.direction, scores.metric, scores.cost,
                            {**scores.meta, "coarse": True}, per_pair, per_pair.abs(), tuple(wgs), tuple(rgs),
                            members)


def patch_coarse_edges(setup: Setup, coarse: CoarseEdgeScores, graph: EdgeGraph) -> PatchEffects:
    """Exact effect of each coarse edge: all its member edges patched in one forward."""
    names = coarse.names()
    masks = torch.stack([coarse.members[i, j] for _, i, j in names])[:, None]
    return patch_edges(setup, graph, masks, labels=[n for n, _, _ in names])
