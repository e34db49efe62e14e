"""Edge attribution between residual-stream writers and readers.

Edge AtP (EAP): ``Î(u→v) = Δw_uᵀ · ∂L/∂r_v`` per prompt pair, where ``Δw_u`` is the change of
writer ``u``'s residual write between source and base run and ``r_v`` is reader ``v``'s private
copy of the residual (its q/k/v input, MLP input or the unembedding's input). All edges come
from one source forward, one base forward and one backward: reader gradients are rebuilt
from ``∂L/∂q|k|v`` through the transposed projection and the exact LayerNorm Jacobian, and
contracted with the stacked writer differences in one product per reader site.

Edge AtP* adds, for edges into queries and keys, the exact recomputation of the reader's
query/key from ``r + Δw_u`` (LayerNorm, projection, rotary), the exact softmax and the base
gradient w.r.t. the attention probabilities; and GradDrop (``Σ_l |Î_l| / n_terms`` over
backward passes with block ``l``'s write cut). ``ig`` averages reader gradients over ``K``
points on the straight path from base to source embedding (EAP-IG's "inputs" variant).

The work is cut in three: :class:`EdgePlan` (which reader sites, which get the QK fix, which
activations are needed), :class:`~edgeatp.plan.MemoryBudget` (pairs per batch and writers per QK chunk;
the rule lives with the planner, which reports the batches it picks) and :class:`EdgeEstimator` (the
per-batch arithmetic run by the shared batch loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from ..circuit import KVView
from ..errors import EdgeatpError, option_error
from ..graph import EdgeGraph, Node, NodeKind
from ..methods import GradDropMode, Kind, Method, get_method, graddrop_units
from ..model import ModelAdapter, Site, WriterLayout
from ..patching import _check_graph, patch_edges
from ..plan import MemoryBudget
from ..scores import EdgeScores
from ..setup import Setup
from .passes import GradRun, SiteNeeds, estimate_pairs, nonzero_terms, relation
from .qk_edges import BaseScores, ReaderInputs, contract, first_difference, patched_scores, score_shifts, writer_chunks
from .qk_fix import key_fix, key_shift


def _selector(idx: torch.Tensor) -> slice | torch.Tensor:
    """A slice when the indices are one contiguous run (views instead of copies), else the indices."""
    if len(idx) and bool((idx == torch.arange(int(idx[0]), int(idx[0]) + len(idx))).all()):
        return slice(int(idx[0]), int(idx[0]) + len(idx))
    return idx


class _Selectors:
    """Writer and reader selectors (a slice where the indices are a contiguous run) of a reader set."""

    writers: torch.Tensor
    readers: torch.Tensor

    @property
    def w_sel(self) -> slice | torch.Tensor:
        return _selector(self.writers)

    @property
    def r_sel(self) -> slice | torch.Tensor:
        return _selector(self.readers)


@dataclass(frozen=True, eq=False)
class ReaderGroup(_Selectors):
    """Readers that share one site (the q, k or v inputs of one layer, an MLP input, the logits)
    and the writers upstream of them; ``qk`` groups get the QK fix."""

    kind: str  # "q", "k", "v", "mlp" or "logits"
    layer: int
    readers: torch.Tensor  # reader indices in the graph
    heads: torch.Tensor  # head of each reader (0 for MLP and logits)
    writers: torch.Tensor  # upstream writer indices
    qk: bool = False


@dataclass(frozen=True, eq=False)
class EdgePlan:
    """What an edge method computes: reader groups (QK-fixed ones apart) and the sites it reads."""

    graph: EdgeGraph
    layout: WriterLayout
    groups: tuple[ReaderGroup, ...]
    needs: SiteNeeds

    @classmethod
    def build(cls, model: ModelAdapter, graph: EdgeGraph, qk_fix: bool,
              qk_readers: Sequence[Node] | None = None) -> "EdgePlan":
        allowed = None if qk_readers is None else set(qk_readers)
        for node in allowed or ():
            if node.kind not in (NodeKind.Q, NodeKind.K) or node not in graph.reader_index:
                raise option_error(f"{{qk_readers}}: {node.name} is not a query or key reader of this graph")
        groups: list[ReaderGroup] = []
        for (kind, layer), (rs, hs) in graph.reader_sites().items():
            writers = graph.mask[:, rs].any(1).nonzero()[:, 0]
            if not len(writers):
                continue
            fixed = [qk_fix and kind in ("q", "k") and (allowed is None or graph.readers[r] in allowed) for r in rs]
            for flag in (False, True):
                pick = [i for i, f in enumerate(fixed) if f is flag]
                if pick:
                    groups.append(ReaderGroup(kind, layer, torch.tensor([rs[i] for i in pick]),
                                              torch.tensor([hs[i] for i in pick]), writers, flag))
        layout = WriterLayout(model, graph)
        act, grad, base = list(layout.sites()), [], []
        for g in groups:
            if g.kind in ("q", "k", "v"):
                base.append(Site("resid_pre", g.layer))
                if g.qk:  # the softmax is recomputed: pattern gradients instead of the reader inputs'
                    base += [Site("rot_q", g.layer), Site("rot_k", g.layer), Site("scores", g.layer)]
                    grad.append(Site("pattern", g.layer))
                else:
                    grad.append(Site(g.kind, g.layer))
            elif g.kind == "mlp":
                grad.append(Site("mlp_in", g.layer))
            else:
                grad.append(Site("resid_final"))
        return cls(graph, layout, tuple(groups), SiteNeeds.of(act, grad, base))

    @property
    def has_qk(self) -> bool:
        return any(g.qk for g in self.groups)


@dataclass(frozen=True)
class EdgeBatch:
    """One batch's writer differences ``[b, T, W, d]``, the first position where any is non-zero
    (earlier positions carry no edge effect and are skipped) and, for the QK fix, each writer
    site's difference factors."""

    delta: torch.Tensor
    start: int
    factors: dict[Site, tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True, eq=False)
class Contraction(_Selectors):
    """Linear (non-QK-fixed) readers sharing one gradient source and one set of upstream writers:
    the q/k/v inputs of one layer, one MLP input, or the logits."""

    key: Any  # ("qkv", layer), ("mlp", layer) or "logits"
    site: Site  # the site whose gradient relation to a dropped unit decides whether it is recomputed
    groups: tuple[ReaderGroup, ...]
    readers: torch.Tensor
    writers: torch.Tensor


class EdgeEstimator:
    """Per-batch edge estimates ``[b, P, W, R]`` for a plan (plain pass and GradDrop's dropped passes).

    Dropped passes arrive partial (:attr:`partial_passes`): readers the truncated backward did not
    reach keep their plain estimate in that term (``n_above`` counts those terms per reader).
    """

    partial_passes = True

    def __init__(self, model: ModelAdapter, plan: EdgePlan, budget: MemoryBudget, units: list) -> None:
        self.model, self.plan, self.budget = model, plan, budget
        g = plan.graph
        self.shape = (g.P, g.n_writers, g.n_readers)
        self.needs = plan.needs
        self.n_terms = torch.tensor([nonzero_terms(units, {model.shape.block_of(r)}) for r in g.readers],
                                    dtype=torch.float64) if units else None
        self.work = torch.float64 if model.dtype == torch.float64 else torch.float32
        by_key: dict[Any, list[ReaderGroup]] = {}
        for group in plan.groups:
            if not group.qk:
                key = ("qkv", group.layer) if group.kind in "qkv" else (group.kind, group.layer)
                by_key.setdefault(key if group.kind != "logits" else "logits", []).append(group)
        self.contractions = [Contraction(key, _reader_site(gs[0]), tuple(gs), torch.cat([x.readers for x in gs]),
                                         gs[0].writers) for key, gs in by_key.items()]
        parallel = model.shape.parallel_attn_mlp
        above = torch.zeros(g.n_readers, dtype=torch.float64)
        for group in plan.groups:
            above[group.readers] = float(sum(relation(u, _reader_site(group), parallel) == "above" for u in units))
        self.n_above = above

    def prepare(self, source: dict[Site, torch.Tensor], base: dict[Site, torch.Tensor]) -> EdgeBatch:
        factors = self.plan.layout.all_factors(source, base, self.work)
        delta = self.plan.layout.deltas(factors)  # [b, T, W, d], on the model's first device
        return EdgeBatch(delta, first_difference(delta), factors)

    def gradient_side(self, prep: EdgeBatch, point: dict[Site, torch.Tensor], grads: dict[Site, torch.Tensor]
                      ) -> dict[Any, torch.Tensor]:
        """Gradients ``[b, T', n, d]`` w.r.t. each contraction's reader inputs (positions from the
        first difference) and the pattern gradients of QK-fixed layers, for the sites this pass has."""
        t0, home = prep.start, prep.delta.device  # a split model's reader gradients join the differences there
        side: dict[Any, torch.Tensor] = {}
        for c in self.contractions:
            if c.key == "logits" or c.key[0] == "mlp":
                site = Site("resid_final") if c.key == "logits" else Site("mlp_in", c.key[1])
                if site in grads:
                    side[c.key] = grads[site][:, t0:, None, :].to(home, self.work)
            else:
                layer = c.key[1]
                kinds = [k for k in "qkv" if any(x.kind == k for x in c.groups)]
                if Site(kinds[0], layer) not in grads:
                    continue
                g_qkv = {k: grads[Site(k, layer)][:, t0:].to(self.work) for k in kinds}
                g_in = self.model.reader_input_grads(layer, point[Site("resid_pre", layer)][:, t0:], g_qkv)
                offset = {k: sum(g_qkv[j].shape[2] for j in kinds[:i]) for i, k in enumerate(kinds)}
                idx = torch.cat([x.heads.to(g_in.device) + offset[x.kind] for x in c.groups])
                whole = len(idx) == g_in.shape[2] and bool((idx == torch.arange(len(idx), device=idx.device)).all())
                side[c.key] = (g_in if whole else g_in[:, :, idx]).to(home, self.work)
        for group in self.plan.groups:
            site = Site("pattern", group.layer)
            if group.qk and site in grads:
                side[("pattern", group.layer)] = grads[site]
        return side

    def estimate(self, prep: EdgeBatch, run: GradRun, sides: Iterable[dict[Any, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        delta, t0 = prep.delta[:, prep.start:], prep.start
        b = delta.shape[0]
        flat = delta.permute(0, 2, 1, 3).reshape(b, delta.shape[2], -1) if not self.plan.graph.positional else None
        plain = torch.zeros((b, *self.shape), dtype=torch.float64, device=delta.device)
        dropped = None
        patterns: list[dict[Any, torch.Tensor]] = []
        for p, side in enumerate(sides):
            target = plain if p == 0 else torch.zeros_like(plain)
            for c in self.contractions:
                if c.key in side:
                    self._contract(target, delta, flat, side[c.key], c, t0)
            patterns.append({k: v for k, v in side.items() if isinstance(k, tuple) and k[0] == "pattern"})
            if p:
                dropped = target.abs() if dropped is None else dropped.add_(target.abs())
        if len(patterns) > 1 and dropped is None:
            dropped = torch.zeros_like(plain)
        for group in self.plan.groups:
            if group.qk:
                Gs = [(p, pt[("pattern", group.layer)]) for p, pt in enumerate(patterns) if ("pattern", group.layer) in pt]
                self._qk_edges(run, prep, group, Gs, plain, dropped)
        if dropped is not None:
            dropped += plain.abs() * self.n_above.to(plain.device)
        return plain, dropped

    def _contract(self, out: torch.Tensor, delta: torch.Tensor, flat: torch.Tensor | None, gin: torch.Tensor,
                  c: Contraction, t0: int) -> None:
        """Add ``Δw · g_r`` for the contraction's readers into ``out`` ``[b, P, W, R]``."""
        T = delta.shape[1]
        if flat is not None:  # aggregated: one batched matrix product over positions and d_model
            b, _, r, d = gin.shape
            vals = torch.bmm(flat[:, c.w_sel], gin.permute(0, 2, 1, 3).reshape(b, r, T * d).transpose(1, 2))[:, None]
            target = out
        else:
            vals = torch.einsum("btwd,btrd->btwr", delta[:, :, c.w_sel], gin)
            target = out[:, t0:t0 + T]
        if isinstance(c.w_sel, slice) and isinstance(c.r_sel, slice):
            target[..., c.w_sel, c.r_sel] += vals.double()
        else:
            target[..., c.writers[:, None], c.readers[None, :]] += vals.double()

    def _query_heads(self, group: ReaderGroup) -> torch.Tensor:
        """The query heads whose softmax a QK-fixed group's readers change: their own heads for
        queries, every query head sharing each key/value head for keys (reader by reader)."""
        if group.kind == "q" or not self.model.grouped_now:
            return group.heads
        size = self.model.shape.group_size
        return torch.cat([torch.arange(g * size, (g + 1) * size) for g in group.heads.tolist()])

    def _qk_edges(self, run: GradRun, prep: EdgeBatch, group: ReaderGroup, Gs: list[tuple[int, torch.Tensor]],
                  plain: torch.Tensor, dropped: torch.Tensor | None) -> None:
        """QK-fixed estimates of the group's edges for every gradient pass that has its pattern
        gradient, written into ``plain`` (pass 0) and added as ``|·|`` into ``dropped`` (the others).
        A shared key's edge sums its query heads' recomputed softmaxes.

        ``Σ G (softmax(S') - A)`` is computed as ``Σ G softmax(S') - Σ G A``: the first sum, over
        every pass at once, is one batched product per chunk (:func:`contract`), the second one
        per group."""
        l, dt, t0 = group.layer, self.work, prep.start
        if t0 >= prep.delta.shape[1]:
            return
        positional = self.plan.graph.positional
        model = self.model
        qheads = self._query_heads(group)
        inputs = ReaderInputs(model, l, group.kind, group.heads, run.base[Site("resid_pre", l)], t0, dt)
        Q, K = inputs.unpatched(qheads, run.base[Site("rot_q", l)][:, :, qheads].to(dt),
                                model.expand_kv(run.base[Site("rot_k", l)])[:, :, qheads].to(dt))
        base = BaseScores.of(inputs, run.base[Site("scores", l)][:, qheads, t0:].to(dt), Q, K)
        # the pattern gradients of every pass [b, n_q, T', T, p]; the probabilities in dt, not the model's rounded ones
        G = torch.stack([g[:, qheads, t0:].to(dt) for _, g in Gs], -1).masked_fill(base.dead[..., None], 0.0)
        A = torch.softmax(base.S, -1)
        if not positional:
            AG = torch.einsum("bnts,bntsp->bnp", A, G)[:, :, None]
        elif group.kind == "q":
            AG = torch.matmul(A[:, :, :, None], G)  # [b, n, T', 1, p]: each query row's own
        else:
            F0 = model.attention_score_fn(l, Q, K)
        for chunk in writer_chunks(self.plan.layout, prep.factors, prep.delta, group.writers, t0,
                                   self.budget.writer_chunk):
            if positional and group.kind == "k":  # each key alone: the closed form of single-key patches
                S, shift = base.S[:, None], score_shifts(inputs, qheads, Q, K, F0, chunk)
                ks = key_shift(S, shift)
                est = torch.stack([key_fix(S, shift, G[:, None, ..., i], ks) for i in range(len(Gs))], -1)
                est = est.transpose(1, 2)  # [b, n, c, T(key), p]
            else:
                P = torch.softmax(patched_scores(inputs, qheads, Q, K, base, chunk), -1)
                if not positional:
                    est = (contract(P, G, group.kind) - AG)[:, :, :, None]  # [b, n, c, 1, p]
                else:  # per query row: rows are independent
                    est = (torch.matmul(P.transpose(2, 3), G) - AG).transpose(2, 3)  # [b, n, c, T', p]
            est = est.unflatten(1, (len(group.heads), -1)).sum(2)  # query heads -> their reader
            vals = est.permute(0, 3, 2, 1, 4).double().to(plain.device)  # [b, positions, c, readers, p]
            lo = t0 if positional and group.kind == "q" else 0
            idx = (slice(None), slice(lo, lo + vals.shape[1]), chunk.writers[:, None], group.readers[None, :])
            for i, (p, _) in enumerate(Gs):
                if p == 0:
                    plain[idx] = vals[..., i]
                elif dropped is not None:
                    dropped[idx] += vals[..., i].abs()


def _reader_site(group: ReaderGroup) -> Site:
    """The site whose gradient a reader group's estimates use (for GradDrop's relation to a unit)."""
    if group.kind in ("q", "k", "v"):
        return Site(group.kind, group.layer)
    return Site("mlp_in", group.layer) if group.kind == "mlp" else Site("resid_final")


def attribute_edges(setup: Setup, method: str | Method = "atp", graph: EdgeGraph | None = None, *,
                    positions: bool = False, neurons: bool = False, graddrop: GradDropMode = "block",
                    ig_steps: int = 8, qk_readers: Sequence[Node] | None = None,
                    memory_budget_mb: float | None = None) -> EdgeScores:
    """Scores for every edge of ``graph`` (default: the model's full writer→reader graph,
    position-aggregated unless ``positions``; ``neurons`` makes every MLP neuron a writer).

    ``method``: ``atp`` (EAP), ``atp-qk`` (QK fix on query/key edges), ``atp-gd`` (GradDrop),
    ``atp*`` (both), ``ig`` (integrated gradients over ``ig_steps`` points) or ``exact``
    (one patched forward per edge). ``qk_readers`` restricts the QK fix to some q/k readers
    (e.g. heads that passed a node-level filter); others keep plain AtP.
    ``memory_budget_mb`` (default: the setup's) bounds the device memory of a batch, activation
    caches and large intermediate buffers, by choosing the pairs per batch and the writers per QK-fix
    chunk; the estimated peak is reported in ``meta["peak_buffer_mb"]``.
    """
    m = get_method(method, "edge")
    model = setup.model
    if graph is None:
        graph = EdgeGraph.from_shape(model.shape, neurons=neurons,
                                     n_positions=setup.pairs.n_positions if positions else None)
    _check_graph(setup, graph)
    if m.kind is Kind.EXACT:
        return _exact(setup, graph, m)
    setup.check_gradient_metric()
    if ig_steps < 1:
        raise option_error("{ig_steps} must be at least 1")
    plan = EdgePlan.build(model, graph, m.qk_fix, qk_readers)
    units = graddrop_units(model.shape.n_layers, model.shape.attn_only, graddrop) if m.graddrop else []
    memory_budget_mb = setup.memory_budget_mb if memory_budget_mb is None else memory_budget_mb
    if memory_budget_mb <= 0:
        raise option_error("{memory_budget_mb} must be positive")
    g = plan.graph
    budget = MemoryBudget.fit(g.n_writers, g.n_readers, g.P, setup.pairs.n_positions, model.shape.d_model,
                              model.shape.n_heads, plan.has_qk, setup.batch_size, memory_budget_mb,
                              setup.device_mb_per_pair(plan.needs, 1 + len(units)), m.kind is Kind.INTEGRATED)
    est = EdgeEstimator(model, plan, budget, units)
    with model.ungrouped(graph.ungrouped):
        fitted = setup.with_(batch_size=budget.batch_size, memory_budget_mb=memory_budget_mb)
        stats, per_pair, per_abs = estimate_pairs(fitted, m, est,
                                                  f"edge {m.name}", units=units, ig_steps=ig_steps,
                                                  same_length=graph.positional)
    cost = m.cost(graddrop_terms=len(units), ig_steps=ig_steps, reference=setup.metric.needs_reference)
    meta = {"graddrop": graddrop if m.graddrop else None, "n_terms": len(units), "batch_size": budget.batch_size,
            "ig_steps": ig_steps if m.kind is Kind.INTEGRATED else None, "model": model.name,
            "qk_readers": None if qk_readers is None else [n.name for n in qk_readers],
            "peak_buffer_mb": budget.peak_mb, "writer_chunk": budget.writer_chunk}
    return EdgeScores(stats, m.name, setup.direction, setup.metric.name, cost, meta, per_pair, per_abs, graph)


def per_head_kv(setup: Setup, scores: EdgeScores, **options: Any) -> KVView:
    """Per-query-head scores of the edges into shared key/value heads (the ungrouped view EAP-IG and
    MIB name), from the same method run on that view of the graph (``options`` as for
    :func:`attribute_edges`)."""
    view = scores.graph.ungrouped_view()
    ungrouped = attribute_edges(setup, scores.method, view, **options)
    kv = torch.tensor([r.kind in (NodeKind.K, NodeKind.V) for r in view.readers])
    zero = torch.zeros((), dtype=torch.float64)
    return KVView(torch.where(kv, ungrouped.scores.cpu(), zero), torch.where(kv, ungrouped.signed.cpu(), zero))


def _exact(setup: Setup, graph: EdgeGraph, m: Method) -> EdgeScores:
    """Ground truth: one patched forward per edge (and position) per pair batch."""
    coords = graph.all_coords
    masks = torch.zeros(len(coords), graph.P, graph.n_writers, graph.n_readers, dtype=torch.bool)
    masks[torch.arange(len(coords)), coords[:, 0], coords[:, 1], coords[:, 2]] = True
    eff = patch_edges(setup, graph, masks)
    per_pair = torch.zeros((setup.n_pairs, graph.P, graph.n_writers, graph.n_readers), dtype=torch.float64)
    per_pair[:, coords[:, 0], coords[:, 1], coords[:, 2]] = eff.per_pair
    return EdgeScores.from_per_pair(per_pair, None, m.name, setup.direction, setup.metric.name, graph,
                                    m.cost(patches=len(coords)), {"model": setup.model.name})
