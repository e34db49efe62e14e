"""Edge attribution between residual-stream writers and readers.

Edge AtP (EAP): ``Î(u→v) = Δw_uᵀ · ∂L/∂r_v`` per prompt pair, where ``Δw_u`` is the change of
writer ``u``'s residual write between source and base run and ``r_v`` is reader ``v``'s private
copy of the residual (its q/k/v input, MLP input or the unembedding's input). All edges come
from one source forward, one base forward and one backward: reader gradients are rebuilt
from ``∂L/∂q|k|v`` through the transposed projection and the exact LayerNorm Jacobian, and
contracted with the stacked writer differences in one product per reader layer.

Edge AtP* adds, for edges into queries and keys, the exact recomputation of the reader's
query/key from ``r + Δw_u`` (LayerNorm, projection, rotary), the exact softmax and the base
gradient w.r.t. the attention probabilities; and GradDrop (``Σ_l |Î_l| / n_terms`` over
backward passes with block ``l``'s write cut). ``ig`` averages reader gradients over ``K``
points on the straight path from base to source embedding (EAP-IG's "inputs" variant).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import EdgeatpError
from ..graph import EdgeGraph, Node, NodeKind
from ..metrics import Metric, get_metric
from ..model import ModelAdapter, Site, load_model
from ..patching import WriterLayout, capture, patch_edges
from ..scores import Cost, EdgeScores
from ..tasks.pairs import Direction, PromptPairs
from .nodes import check_gradient_metric
from .passes import GradDropMode, GradRun, gradient_run, graddrop_units, nonzero_terms
from .qk_fix import key_fix, key_shift, softmax_change

EdgeMethod = Literal["atp", "atp-qk", "atp-gd", "atp*", "ig", "exact"]
EDGE_METHODS: dict[str, tuple[bool, bool]] = {  # name -> (qk fix, graddrop)
    "atp": (False, False),
    "atp-qk": (True, False),
    "atp-gd": (False, True),
    "atp*": (True, True),
    "ig": (False, False),
    "exact": (False, False),
}


class _ReaderGroup:
    """Readers that share one site (the q, k or v inputs of one layer, an MLP input, the logits)."""

    def __init__(self, kind: str, layer: int, readers: list[int], heads: list[int], writers: torch.Tensor) -> None:
        self.kind, self.layer = kind, layer
        self.readers = torch.tensor(readers, dtype=torch.long)
        self.heads = torch.tensor(heads, dtype=torch.long)
        self.writers = writers  # upstream writer indices
        self.w_sel, self.r_sel = _selector(self.writers), _selector(self.readers)


def _selector(idx: torch.Tensor) -> slice | torch.Tensor:
    """A slice when the indices are one contiguous run (views instead of copies), else the indices."""
    if len(idx) and bool((idx == torch.arange(int(idx[0]), int(idx[0]) + len(idx))).all()):
        return slice(int(idx[0]), int(idx[0]) + len(idx))
    return idx


def _reader_groups(graph: EdgeGraph) -> list[_ReaderGroup]:
    """Reader sites that some writer of the graph can reach."""
    out = []
    for (kind, layer), (rs, hs) in graph.reader_sites().items():
        ws = graph.mask[:, rs].any(1).nonzero()[:, 0]
        if len(ws):
            out.append(_ReaderGroup(kind, layer, rs, hs, ws))
    return out


def _sites(adapter: ModelAdapter, layout: WriterLayout, groups: list[_ReaderGroup], qk: set[tuple[str, int]]
           ) -> tuple[list[Site], list[Site], list[Site]]:
    act = layout.sites()
    grad, base = [], []
    for g in groups:
        if g.kind in ("q", "k", "v"):
            grad += [Site("q", g.layer), Site("k", g.layer), Site("v", g.layer)]
            base.append(Site("resid_pre", g.layer))
            if (g.kind, g.layer) in qk:
                base += [Site("rot_q", g.layer), Site("rot_k", g.layer), Site("scores", g.layer)]
                grad.append(Site("pattern", g.layer))
                base.append(Site("pattern", g.layer))
        elif g.kind == "mlp":
            grad.append(Site("mlp_in", g.layer))
        else:
            grad.append(Site("resid_final"))
    return act, list(dict.fromkeys(grad)), list(dict.fromkeys(base))


def _deltas(layout: WriterLayout, run_source: dict[Site, torch.Tensor], run_base: dict[Site, torch.Tensor],
            n_writers: int) -> torch.Tensor:
    """``[b, T, W, d]`` writer differences source − base, in graph writer order."""
    parts = {}
    for site, (idx, _) in layout.groups.items():
        d = layout.writes(site, run_source[site] - run_base[site])
        for k, w in enumerate(idx):
            parts[w] = d[:, :, k]
    return torch.stack([parts[w] for w in range(n_writers)], dim=2)


def _reader_grads(adapter: ModelAdapter, run: GradRun, g: dict[Site, torch.Tensor], group: _ReaderGroup,
                  cache: dict) -> torch.Tensor:
    """``[b, T, n_readers, d]`` gradients w.r.t. each reader's private residual input."""
    if group.kind == "mlp":
        return g[Site("mlp_in", group.layer)][:, :, None, :]
    if group.kind == "logits":
        return g[Site("resid_final")][:, :, None, :]
    key = (id(g), group.layer)
    if key not in cache:
        grads = [g[Site(k, group.layer)] for k in "qkv"]
        cache[key] = adapter.reader_input_grads(group.layer, run.base[Site("resid_pre", group.layer)], grads)
    return cache[key][:, :, "qkv".index(group.kind)][:, :, group.heads]


def _qk_shift_chunks(adapter: ModelAdapter, run: GradRun, delta: torch.Tensor, group: _ReaderGroup,
                     chunk: int, dtype: torch.dtype):
    """Yield ``(writer chunk, shift [b, c, n, T, T])``: score changes when each writer's Δ enters
    only these heads' query (or key) input, recomputed exactly (LayerNorm, projection, rotary)."""
    l = group.layer
    Q, K = run.base[Site("rot_q", l)][:, :, group.heads], run.base[Site("rot_k", l)][:, :, group.heads]
    resid = run.base[Site("resid_pre", l)]
    F0 = adapter.attention_score_fn(l, Q, K)  # [b, n, T, T]
    b, T = resid.shape[:2]
    n = len(group.heads)
    for start in range(0, len(group.writers), chunk):
        ws = group.writers[start: start + chunk]
        c = len(ws)
        x = resid[:, :, None, :] + delta[:, :, ws]  # [b, T, c, d]
        new = adapter.qkv_all_heads(l, group.kind, x, group.heads)  # [b, T, c, n, dh]
        new = new.permute(0, 2, 1, 3, 4).reshape(b * c, T, n, -1)
        new = adapter.rotate(l, new)
        other = (K if group.kind == "q" else Q)[:, None].expand(b, c, T, n, Q.shape[-1]).reshape(b * c, T, n, -1)
        qq, kk = (new, other) if group.kind == "q" else (other, new)
        F = adapter.attention_score_fn(l, qq, kk).view(b, c, n, T, T)
        yield ws, (F - F0[:, None]).to(dtype)


def attribute_edges(
    model: ModelAdapter | object,
    pairs: PromptPairs,
    method: EdgeMethod | str = "atp",
    graph: EdgeGraph | None = None,
    metric: str | Metric = "logit_diff",
    direction: Direction | str = Direction.NOISING,
    batch_size: int = 16,
    positions: bool = False,
    neurons: bool = False,
    graddrop: GradDropMode = "block",
    ig_steps: int = 8,
    qk_readers: Sequence[Node] | None = None,
    memory_budget_mb: float = 1024.0,
    progress: bool = False,
) -> EdgeScores:
    """Scores for every edge of ``graph`` (default: the model's full writer→reader graph,
    position-aggregated unless ``positions``; ``neurons`` makes every MLP neuron a writer).

    ``method``: ``atp`` (EAP), ``atp-qk`` (QK fix on query/key edges), ``atp-gd`` (GradDrop),
    ``atp*`` (both), ``ig`` (integrated gradients over ``ig_steps`` points) or ``exact``
    (one patched forward per edge). ``qk_readers`` restricts the QK fix to some q/k readers
    (e.g. heads that passed a node-level filter); others keep plain AtP.
    ``memory_budget_mb`` bounds the large intermediate buffers by chunking pairs and writers;
    the estimated peak is reported in ``meta["peak_buffer_mb"]``.
    """
    if method not in EDGE_METHODS:
        raise EdgeatpError(f"unknown edge method {method!r}; choose from {', '.join(EDGE_METHODS)}")
    adapter = load_model(model)
    metric_obj, direction = get_metric(metric), Direction(direction)
    if graph is None:
        graph = EdgeGraph.from_shape(adapter.shape, neurons=neurons, n_positions=pairs.n_positions if positions else None)
    if graph.shape != adapter.shape:
        raise EdgeatpError("the edge graph was built for a different model shape")
    if graph.n_positions is not None and graph.n_positions != pairs.n_positions:
        raise EdgeatpError(f"the graph has {graph.n_positions} positions but the prompts have {pairs.n_positions}")
    adapter.check_pairs(pairs)
    if method == "exact":
        return _exact(adapter, pairs, graph, metric_obj, direction, batch_size, progress)
    check_gradient_metric(metric_obj, direction)
    if method == "ig" and ig_steps < 1:
        raise EdgeatpError("ig_steps must be at least 1")
    qk_on, use_gd = EDGE_METHODS[method]
    layout = WriterLayout(adapter, graph)
    groups = _reader_groups(graph)
    allowed = None if qk_readers is None else set(qk_readers)
    if allowed is not None:
        for node in allowed:
            if node.kind not in (NodeKind.Q, NodeKind.K) or node not in graph.reader_index:
                raise EdgeatpError(f"qk_readers: {node.name} is not a query or key reader of this graph")
    qk_groups: list[_ReaderGroup] = []
    for g in groups:
        if qk_on and g.kind in ("q", "k"):
            keep = [i for i, r in enumerate(g.readers.tolist()) if allowed is None or graph.readers[r] in allowed]
            if keep:
                qk_groups.append(_ReaderGroup(g.kind, g.layer, g.readers[keep].tolist(), g.heads[keep].tolist(), g.writers))
    qk_keys = {(g.kind, g.layer) for g in qk_groups}
    act, grad, base = _sites(adapter, layout, groups, qk_keys)
    gd_mode = graddrop if use_gd else None
    units = graddrop_units(adapter, graddrop) if use_gd else []
    n_passes = 1 + len(units)
    P = graph.n_positions
    lead = (P,) if P else ()
    N = len(pairs)
    signed = torch.zeros((N, *lead, graph.n_writers, graph.n_readers), dtype=torch.float64)
    magnitude = torch.zeros_like(signed)
    norm = torch.tensor([nonzero_terms(units, {adapter.shape.block_of(r)}) for r in graph.readers],
                        dtype=torch.float64) if units else None
    work_dtype = torch.float64 if adapter.dtype == torch.float64 else torch.float32
    T = pairs.n_positions
    H, d = adapter.shape.n_heads, adapter.shape.d_model
    per_pair_mb = 4 * T * (graph.n_writers * d + 3 * H * d * 2) / 2**20
    per_pair_mb += 8 * n_passes * math.prod(lead) * graph.n_writers * graph.n_readers / 2**20
    bs = max(1, min(batch_size, int(memory_budget_mb // max(per_pair_mb, 1e-9))))
    qk_unit_mb = 12 * 4 * H * T * T / 2**20  # per (pair, writer) of the QK fix's softmax buffers
    chunk = max(1, int((memory_budget_mb - bs * per_pair_mb) // max(qk_unit_mb * bs, 1e-9))) if qk_groups else 1
    peak = bs * per_pair_mb + (min(chunk, graph.n_writers) * bs * qk_unit_mb if qk_groups else 0.0)
    with adapter.session():
        batches = list(pairs.batches(bs, direction, same_length=not adapter.causal or P is not None))
        for batch in tqdm(batches, disable=not progress, desc=f"edge {method}", leave=False):
            batch = batch.to(adapter.device)
            b = len(batch)
            out = torch.zeros((n_passes, b, *lead, graph.n_writers, graph.n_readers), dtype=torch.float64)
            if method == "ig":
                _ig_batch(adapter, batch, metric_obj, layout, groups, act, grad, base, ig_steps, out[0], graph)
            else:
                run = gradient_run(adapter, batch, metric_obj, act, grad, gd_mode, base)
                with torch.no_grad():
                    delta = _deltas(layout, run.source, run.base, graph.n_writers).to(work_dtype)
                    flat = _flat_deltas(delta) if P is None else delta
                    cache: dict = {}
                    for p, g in enumerate(run.grads):
                        for group in groups:
                            if qk_on and (group.kind, group.layer) in qk_keys and allowed is None:
                                continue
                            gin = _reader_grads(adapter, run, g, group, cache).to(work_dtype)
                            _contract(out[p], delta, flat, gin, group, P)
                        cache.clear()
                    for group in qk_groups:
                        _qk_edges(adapter, run, delta, group, chunk, out, work_dtype, P)
            rows = batch.index.cpu()
            signed[rows] = out[0]
            if units:
                magnitude[rows] = torch.where(norm > 0, out[1:].abs().sum(0) / norm.clamp(min=1), out[0].abs())
            else:
                magnitude[rows] = out[0].abs()
    mask = graph.mask
    signed *= mask
    magnitude *= mask
    cost = _cost(method, metric_obj, len(units), ig_steps)
    meta = {"graddrop": graddrop if use_gd else None, "n_terms": len(units), "batch_size": bs,
            "ig_steps": ig_steps if method == "ig" else None, "model": adapter.name,
            "qk_readers": None if qk_readers is None else [n.name for n in qk_readers],
            "peak_buffer_mb": round(peak, 1), "writer_chunk": chunk}
    return EdgeScores(signed, magnitude, method, direction, metric_obj.name, cost, meta, graph)


def _cost(method: str, metric: Metric, n_units: int, ig_steps: int) -> Cost:
    extra = int(metric.needs_reference)
    if method == "ig":  # source and base captures, then one forward (+ a reference for KL) per step
        return Cost(forwards=2 + ig_steps * (1 + extra), backwards=ig_steps)
    return Cost(forwards=2 + extra, backwards=1 + n_units)


def _flat_deltas(delta: torch.Tensor) -> torch.Tensor:
    """``[b, W, T·d]`` contiguous copy of the writer differences, so each reader layer's
    contraction is one batched matrix product over a view."""
    b, T, W, d = delta.shape
    return delta.permute(0, 2, 1, 3).reshape(b, W, T * d)


def _contract(out: torch.Tensor, delta: torch.Tensor, flat: torch.Tensor, gin: torch.Tensor, group: _ReaderGroup,
              P: int | None) -> None:
    """Add ``Δw · g_r`` for the group's readers into ``out`` ``[b, (T,) W, R]``."""
    T = delta.shape[1]
    if P is None:
        b, _, r, d = gin.shape
        vals = torch.bmm(flat[:, group.w_sel], gin.permute(0, 1, 3, 2).reshape(b, T * d, r)).double()
    else:
        vals = torch.einsum("btwd,btrd->btwr", delta[:, :, group.w_sel], gin).double()
    target = out if P is None else out[:, :T]
    if isinstance(group.w_sel, slice) and isinstance(group.r_sel, slice):
        target[..., group.w_sel, group.r_sel] += vals
    else:
        target[..., group.writers[:, None], group.readers[None, :]] += vals


def _qk_edges(adapter: ModelAdapter, run: GradRun, delta: torch.Tensor, group: _ReaderGroup, chunk: int,
              out: torch.Tensor, dtype: torch.dtype, P: int | None) -> None:
    """QK-fixed estimates of the group's edges for every gradient pass, written into ``out``."""
    l = group.layer
    S = run.base[Site("scores", l)][:, group.heads].to(dtype)[:, None]  # [b, 1, n, T, T]
    A = run.base[Site("pattern", l)][:, group.heads].to(dtype)[:, None]
    Gs = [g[Site("pattern", l)][:, group.heads].to(dtype)[:, None] for g in run.grads]
    for ws, shift in _qk_shift_chunks(adapter, run, delta, group, chunk, dtype):
        # the softmax recomputation does not depend on the gradient: once per chunk, not per pass
        if group.kind == "q" or P is None:
            dA = softmax_change(S, S + shift, A)
        else:
            ks = key_shift(S, shift)
        for p, G in enumerate(Gs):
            if group.kind == "q":
                est = (dA * G).sum(-1)  # [b, c, n, T(query)]: rows are independent
            elif P is None:
                est = (dA * G).sum((-1, -2))[..., None]  # all key positions at once: not additive
            else:
                est = key_fix(S, shift, G, ks)  # [b, c, n, T(key)]
            if P is None:
                out[p][:, ws[:, None], group.readers[None, :]] = est.sum(-1).double()
            else:
                T = est.shape[-1]
                out[p][:, :T, ws[:, None], group.readers[None, :]] = est.permute(0, 3, 1, 2).double()


def _ig_batch(adapter: ModelAdapter, batch, metric: Metric, layout: WriterLayout, groups: list[_ReaderGroup],
              act: list[Site], grad: list[Site], base: list[Site], steps: int, out: torch.Tensor,
              graph: EdgeGraph) -> None:
    """Integrated gradients: Δw · mean over α of reader gradients, with the embedding at base + α·Δ."""
    _, source = capture(adapter, batch.source, [*act, Site("resid_pre", 0)], logits=False)
    _, base_acts = capture(adapter, batch.base, act, logits=False)
    delta = _deltas(layout, source, base_acts, graph.n_writers)
    mean_g: dict[int, torch.Tensor] = {}
    for k in range(steps):
        alpha = (k + 0.5) / steps
        run = gradient_run(adapter, batch, metric, act, grad, None, base, source=source, alpha=alpha)
        cache: dict = {}
        with torch.no_grad():
            for i, group in enumerate(groups):
                gin = _reader_grads(adapter, run, run.grads[0], group, cache)
                mean_g[i] = mean_g.get(i, 0) + gin / steps
    with torch.no_grad():
        flat = _flat_deltas(delta) if graph.n_positions is None else delta
        for i, group in enumerate(groups):
            _contract(out, delta, flat, mean_g[i], group, graph.n_positions)


def _exact(adapter: ModelAdapter, pairs: PromptPairs, graph: EdgeGraph, metric: Metric, direction: Direction,
           batch_size: int, progress: bool) -> EdgeScores:
    """Ground truth: one patched forward per edge (and position) per pair batch."""
    coords = graph.edge_coords
    P = graph.n_positions
    if P is None:
        masks = torch.zeros(len(coords), graph.n_writers, graph.n_readers, dtype=torch.bool)
        masks[torch.arange(len(coords)), coords[:, 0], coords[:, 1]] = True
    else:
        n = len(coords)
        masks = torch.zeros(P * n, P, graph.n_writers, graph.n_readers, dtype=torch.bool)
        rows = torch.arange(P * n)
        masks[rows, rows // n, coords[rows % n, 0], coords[rows % n, 1]] = True
    eff = patch_edges(adapter, pairs, graph, masks, metric, direction, batch_size, progress=progress)
    lead = (P,) if P else ()
    per_pair = torch.zeros((len(pairs), *lead, graph.n_writers, graph.n_readers), dtype=torch.float64)
    if P is None:
        per_pair[:, coords[:, 0], coords[:, 1]] = eff.per_pair
    else:
        n = len(coords)
        per_pair[:, torch.arange(P).repeat_interleave(n), coords[:, 0].repeat(P), coords[:, 1].repeat(P)] = eff.per_pair
    cost = Cost(forwards=eff.n_forwards, backwards=0)
    return EdgeScores(per_pair, per_pair.abs(), "exact", direction, metric.name, cost, {"model": adapter.name}, graph)
