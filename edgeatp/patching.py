"""Exact activation patching: nodes, edges and whole circuits, batched.

One batch loop (:func:`sweep`) runs any :class:`Intervention`: many independent patches are
stacked along the batch axis (row = one prompt pair under one patch set), so a sweep of N
patches over P pairs costs about ``N * P / batch_size`` forwards; the memory budget bounds the
pairs per batch and the rows per forward (:meth:`Setup.stacking`), and the effects are the same
whatever the stacking.

* :class:`NodePatch` replaces node activations (head output ``z``, q/k/v per head, MLP
  output, single neurons, the embedding; one position or all) by their source-run values.
* :class:`EdgePatch` gives each patched reader a private copy of its residual input in which
  the writer's contribution takes its source-run value (``r + w_src − w_current``); everything
  downstream is recomputed. A mask over all edges at once gives whole-circuit runs.

Effects are ``metric(base run with the patch) − metric(base run)``: base = clean for noising,
corrupt for denoising.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import torch

from .errors import EdgeatpError
from .graph import Edge, EdgeGraph, Node, check_nodes
from .memory import PatchLoad, edge_patch_load, node_patch_load, saved_bytes, site_numel
from .metrics import sign_convention
from .model import FwdHook, ModelAdapter, Site, WriterLayout, capture, node_site
from .model.sites import expand
from .setup import Setup
from .tasks.pairs import Direction, PairBatch


@dataclass(frozen=True)
class PatchEffects:
    """Signed exact effects of patch sets, per prompt pair and averaged."""

    labels: tuple[str, ...]
    per_pair: torch.Tensor  # [n_pairs, n_sets]
    base_metric: torch.Tensor  # [n_pairs]
    direction: Direction
    metric: str
    n_forwards: int  # one process's forwards over every pair, in a data-parallel run too (see sweep_forwards)

    @property
    def mean(self) -> torch.Tensor:
        """``c = E[effect]`` per patch set."""
        return self.per_pair.mean(0)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.per_pair.abs().mean(0)

    @property
    def sign_convention(self) -> str:
        return sign_convention(self.direction, self.metric)


class Intervention(Protocol):
    """How to patch rows of a stacked batch: which source sites to cache and which hooks to run."""

    n_sets: int

    def source_sites(self) -> list[Site]:
        """Sites whose source-run values the hooks need."""

    def load(self, n_positions: int) -> PatchLoad:
        """What stacking the sets costs in memory, per pair and per row (the budget's rule)."""

    def hooks(self, source: dict[Site, torch.Tensor], pair_rows: torch.Tensor,
              set_rows: torch.Tensor) -> list[tuple[Site, FwdHook]]:
        """Hooks for a forward whose row ``i`` is pair ``pair_rows[i]`` of the batch under set ``set_rows[i]``."""


def sweep(setup: Setup, intervention: Intervention, labels: Sequence[str] | None = None,
          description: str = "exact patching") -> PatchEffects:
    """Exact effect of every patch set of ``intervention`` on every prompt pair: patch sets are
    stacked along the batch axis, as many per forward as ``setup.batch_size`` and the memory budget
    allow."""
    model, metric = setup.model, setup.metric
    n, s = setup.n_pairs, intervention.n_sets
    if s == 0:
        raise EdgeatpError("nothing to patch: the list of patch sets is empty")
    load = intervention.load(setup.pairs.n_positions)
    pair_bs, chunk = setup.stacking(load)
    per_pair = torch.zeros(n, s, dtype=torch.float64, device=model.device)  # in host memory once done
    base_metric = torch.zeros(n, dtype=torch.float64, device=model.device)
    for batch in setup.batches(description, batch_size=pair_bs):
        _patch_batch(setup, intervention, batch, chunk, per_pair, base_metric)
    setup.ranks.check(description, layout=f"{n} prompt pairs, {s} patch sets")  # every process patched its own pairs
    per_pair, base_metric = setup.ranks.sum_rows(per_pair, base_metric)
    names = tuple(labels) if labels is not None else tuple(f"set{i}" for i in range(s))
    return PatchEffects(names, per_pair.cpu(), base_metric.cpu(), setup.direction, metric.name,  # type: ignore[union-attr]
                        sweep_forwards(setup, s, load))


def _patch_batch(setup: Setup, intervention: Intervention, batch: PairBatch, chunk: int, per_pair: torch.Tensor,
                 base_metric: torch.Tensor) -> None:
    """One pair batch of a sweep, ``chunk`` patch sets per forward, into ``per_pair`` and ``base_metric``
    (its source cache and logits die when it returns, before the next batch's)."""
    model, metric, s, B = setup.model, setup.metric, intervention.n_sets, len(batch)
    ref = setup.reference(batch)
    base = metric(capture(model, batch.base, [])[0], batch, ref)
    setup.check_finite(base, "metric values of the unpatched run")
    base_metric[batch.index] = base.double().to(model.device)
    _, source = capture(model, batch.source, intervention.source_sites(), logits=False, cache=setup.new_cache())
    for start in range(0, s, chunk):
        sets = torch.arange(start, min(s, start + chunk), device=model.device)
        C = len(sets)
        pair_rows = torch.arange(B, device=model.device).repeat(C)
        set_rows = sets.repeat_interleave(B)
        rows = batch.repeat_rows(pair_rows)
        with torch.no_grad():  # the logits die with the metric: the next forward does not meet them
            value = metric(model.forward(rows.base, intervention.hooks(source, pair_rows, set_rows)), rows,
                           ref[pair_rows.to(ref.device)] if ref is not None else None)
        setup.check_finite(value, "patched metric values")
        eff = (value - base[pair_rows.to(base.device)]).double().to(model.device).view(C, B)
        per_pair[batch.index[:, None], sets[None, :]] = eff.T


def sweep_forwards(setup: Setup, n_sets: int, load: PatchLoad) -> int:
    """The forwards :func:`sweep` spends on ``n_sets`` patch sets of ``load`` (at most, when ``load``
    bounds the sets' own, as :func:`circuit_load` does) in one process, and reports in any run (a
    data-parallel run's processes, each batching its own share of the pairs, may spend more between
    them, but every count and every budget decision must be the one-process one): to plan work
    within a budget."""
    pair_bs, chunk = setup.stacking(load)
    return setup.n_batches(pair_bs) * (2 + -(-n_sets // chunk))


# ------------------------------------------------------------------------------------ nodes
@dataclass
class NodePatch:
    """Patch sets of nodes: set ``j`` replaces all its nodes by their source-run values at once."""

    adapter: ModelAdapter
    sets: Sequence[Sequence[Node]]
    n_positions: int
    _entries: dict[Site, dict[int, list[tuple[int | None, int | None]]]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.n_sets = len(self.sets)
        for j, nodes in enumerate(self.sets):
            check_nodes(self.adapter.shape, nodes)
            for node in nodes:
                if node.position is not None and node.position >= self.n_positions:
                    raise ValueError(f"{node.name}: position {node.position} is beyond the prompts' "
                                     f"{self.n_positions} tokens")
                site, index = node_site(node)
                self._entries.setdefault(site, {}).setdefault(j, []).append((node.position, index))

    def source_sites(self) -> list[Site]:
        return list(self._entries)

    def load(self, n_positions: int) -> PatchLoad:
        """The sites any set patches are cached; a forward gathers those its sets reach."""
        numel = {site: site_numel(self.adapter.shape, site, n_positions) for site in self._entries}
        per_set = max(sum(numel[site] for site, by_set in self._entries.items() if j in by_set)
                      for j in range(self.n_sets))
        return node_patch_load(sum(numel.values()), per_set)

    def hooks(self, source: dict[Site, torch.Tensor], pair_rows: torch.Tensor,
              set_rows: torch.Tensor) -> list[tuple[Site, FwdHook]]:
        rows_of: dict[int, list[int]] = {}  # the forward's rows of each set, read from the device once
        for r, j in enumerate(set_rows.tolist()):
            rows_of.setdefault(j, []).append(r)
        out = []
        for site, by_set in self._entries.items():
            cached = source[site]
            mask = self._mask(site, by_set, rows_of, len(set_rows), cached)
            if mask is not None:  # only the sites this forward's sets reach are gathered
                out.append((site, _replace(mask, cached[pair_rows.to(cached.device)])))
        return out

    def _mask(self, site: Site, by_set: dict[int, list[tuple[int | None, int | None]]],
              rows_of: dict[int, list[int]], n_rows: int, src: torch.Tensor) -> torch.Tensor | None:
        """Bool mask shaped like the site's leading axes (``[R, T]`` or ``[R, T, heads|neurons]``),
        built only for the sets in this forward (``src``: the site's cached values, for their shape);
        ``None`` when none of them patches the site here."""
        per_set = site.kind not in ("mlp_out", "resid_pre")
        width = src.shape[2] if per_set else 1
        mask = torch.zeros(n_rows, src.shape[1], width, dtype=torch.bool, device=src.device)
        reached = False
        for j, rows in rows_of.items():
            for pos, index in by_set.get(j, ()):
                if pos is not None and pos >= src.shape[1]:
                    continue  # beyond this batch's prompts: only padding could sit there
                mask[rows, slice(None) if pos is None else pos, 0 if index is None else index] = True
                reached = True
        if not reached:
            return None
        return mask if per_set else mask[:, :, 0]


def _replace(mask: torch.Tensor, src: torch.Tensor) -> FwdHook:
    """A hook that takes ``src`` wherever ``mask`` (broadcast over trailing axes) is set."""
    def fn(act: torch.Tensor) -> torch.Tensor:
        m = mask.reshape(*mask.shape, *([1] * (act.dim() - mask.dim())))
        return torch.where(m, src.to(act.dtype), act)
    return fn


def patch_nodes(setup: Setup, sets: Sequence[Sequence[Node] | Node], labels: Sequence[str] | None = None
                ) -> PatchEffects:
    """Exact effects of patching each node (or each set of nodes jointly)."""
    norm = [[x] if isinstance(x, Node) else list(x) for x in sets]
    names = labels if labels is not None else ["+".join(n.name for n in s) for s in norm]
    return sweep(setup, NodePatch(setup.model, norm, setup.pairs.n_positions), names, "node patching")


# ------------------------------------------------------------------------------------ edges
@dataclass
class EdgePatch:
    """Edge patch masks: row ``i`` patches the edges ``masks[set_rows[i]]`` (``[P, W, R]`` each)."""

    adapter: ModelAdapter
    graph: EdgeGraph
    masks: torch.Tensor  # [n_sets, P, W, R] bool

    def __post_init__(self) -> None:
        want = (self.graph.P, self.graph.n_writers, self.graph.n_readers)
        if self.masks.dim() != 4 or tuple(self.masks.shape[1:]) != want:
            raise EdgeatpError(f"edge patch masks must be [sets, {', '.join(map(str, want))}], "
                               f"got {tuple(self.masks.shape)}")
        self.n_sets = int(self.masks.shape[0])
        self.writers = WriterLayout(self.adapter, self.graph)
        self.masks = self.masks.bool() & self.graph.mask.to(self.masks.device)

    def source_sites(self) -> list[Site]:
        return self.writers.sites()

    def load(self, n_positions: int) -> PatchLoad:
        """The writers' sites are cached, gathered and recorded whatever the sets; the writes of every
        site a set moves a writer of are made for each row of the forward."""
        moved = self.masks.any(3).any(1)  # [sets, W]: the writers each set moves
        hit = self.masks.any(2).any(1)  # [sets, R]: the readers it moves them into
        per_set = torch.zeros(self.n_sets, dtype=torch.long, device=moved.device)
        touched = 0
        for idx, _ in self.writers.groups.values():
            reached = moved[:, idx].any(1)
            per_set += len(idx) * reached
            touched += len(idx) * bool(reached.any())
        g = self.graph
        readers = max(int(hit[:, rs].sum(1).max()) for rs, _ in g.reader_sites().values())
        width = sum(site_numel(self.adapter.shape, site, 1) for site in self.writers.sites())
        return edge_patch_load(self.adapter.shape, n_positions, width, int(per_set.max()), touched,
                               int(moved.sum(1).max()), readers, g.P * g.n_writers * g.n_readers)

    def hooks(self, source: dict[Site, torch.Tensor], pair_rows: torch.Tensor,
              set_rows: torch.Tensor) -> list[tuple[Site, FwdHook]]:
        return edge_mask_hooks(self.adapter, self.graph, self.writers, self.masks[set_rows.to(self.masks.device)],
                               {s: v[pair_rows.to(v.device)] for s, v in source.items()})


@dataclass(frozen=True)
class _Moved:
    """What an edge mask moves into some readers: ``delta`` ``[r, T, n, d]`` added to their inputs
    in batch rows ``rows`` for readers ``cols`` (of the site's), and where it moves anything
    (``touched`` ``[r, T|1, n]``)."""

    delta: torch.Tensor
    touched: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def edge_mask_hooks(adapter: ModelAdapter, graph: EdgeGraph, writers: WriterLayout, mask: torch.Tensor,
                    source: dict[Site, torch.Tensor]) -> list[tuple[Site, FwdHook]]:
    """Hooks that patch, for every row, the edges set in ``mask`` ``[rows, P, W, R]``: each patched
    reader reads its own copy of the residual in which the writers' source values replace theirs.

    A float mask moves each edge by that fraction of its writer's source-minus-current delta
    (0 = the edge as it is, 1 = its source value) and is differentiable; a boolean mask is its
    0/1 case, on the same code path."""
    mask = mask.to(adapter.device)
    T = next(iter(source.values())).shape[1]
    mask = mask[:, :T] if graph.positional else mask  # [rows, T, W, R], or [rows, 1, W, R] for all positions
    live = _live(graph, mask)
    site_writers = {s: torch.tensor(idx, device=adapter.device) for s, (idx, _) in writers.groups.items()}
    current: dict[Site, torch.Tensor] = {}  # this forward's writer activations, as they happen
    deltas: dict[Site, torch.Tensor] = {}  # source minus current writes of a site, once it has fired
    resid: dict[int, torch.Tensor] = {}
    hooks: list[tuple[Site, FwdHook]] = []

    def record(site: Site) -> FwdHook:
        def fn(act: torch.Tensor) -> None:
            current[site] = act
        return fn

    def site_delta(site: Site) -> torch.Tensor:
        if site not in deltas:
            src = {s: v.to(current[site].dtype) for s, v in source.items()}
            deltas[site] = expand(*writers.factors(site, src, current))
        return deltas[site]

    def summed(readers: list[int], device: torch.device) -> _Moved | None:
        """What the mask moves into these readers, on their ``device`` (a split model's writers may
        live on earlier devices), for only the rows and readers it touches."""
        on = live[..., readers]  # [rows, T|1, W, n]
        hit = on.any(dim=2).any(dim=1)  # [rows, n]
        rows, cols = hit.any(1).nonzero()[:, 0], hit.any(0).nonzero()[:, 0]
        if not len(rows):
            return None
        on = on[rows][..., cols]
        used = on.any(dim=3).any(dim=1).any(dim=0)  # [W]
        parts, writer_cols = [], []
        for site, idx in site_writers.items():
            sel = used[idx].nonzero()[:, 0]
            if len(sel):
                delta = site_delta(site)
                parts.append(delta[rows.to(delta.device)][:, :, sel.to(delta.device)].to(device))
                writer_cols.append(idx[sel])
        D = torch.cat(parts, dim=2)  # [r, T, w, d]
        reader_cols = torch.tensor(readers, device=mask.device)[cols]
        weights = mask[rows][:, :, torch.cat(writer_cols)][..., reader_cols].to(device, D.dtype)  # [r, T|1, w, n]
        if weights.shape[1] == 1:  # one weight for all positions: one matrix product per row
            R, T_, w, d = D.shape
            out = torch.bmm(weights[:, 0].transpose(1, 2), D.permute(0, 2, 1, 3).reshape(R, w, T_ * d))
            moved = out.view(R, -1, T_, d).transpose(1, 2)
        else:
            moved = torch.matmul(D.transpose(2, 3), weights).transpose(2, 3)
        return _Moved(moved, on.any(2).to(device), rows.to(device), cols.to(device))

    def attn_reader(kind: str, layer: int, readers: list[int], heads: list[int]) -> FwdHook:
        def fn(act: torch.Tensor) -> torch.Tensor | None:
            got = summed(readers, act.device)
            if got is None:
                return None
            h = torch.tensor(heads, device=act.device)[got.cols]
            new = adapter.qkv_from_residual(layer, kind, resid[layer][got.rows][:, :, None, :] + got.delta, h)
            pos = torch.arange(act.shape[1], device=act.device)
            at = (got.rows[:, None, None], pos[None, :, None], h[None, None, :])  # [r, T, n] of act's first axes
            return act.index_put(at, torch.where(got.touched[..., None], new.to(act.dtype), act[at]))
        return fn

    def resid_reader(readers: list[int]) -> FwdHook:
        def fn(act: torch.Tensor) -> torch.Tensor | None:
            got = summed(readers, act.device)
            return None if got is None else act.index_add(0, got.rows, got.delta[:, :, 0].to(act.dtype))
        return fn

    def keep_resid(layer: int) -> FwdHook:
        def fn(act: torch.Tensor) -> None:
            resid[layer] = act
        return fn

    for site in writers.sites():
        hooks.append((site, record(site)))
    for (kind, layer), (rs, hs) in graph.reader_sites().items():
        if not bool(live[..., rs].any()):
            continue
        if kind in ("q", "k", "v"):
            hooks.append((Site("resid_pre", layer), keep_resid(layer)))
            hooks.append((Site(kind, layer), attn_reader(kind, layer, rs, hs)))
        elif kind == "mlp":
            hooks.append((Site("mlp_in", layer), resid_reader(rs)))
        else:
            hooks.append((Site("resid_final"), resid_reader(rs)))
    return hooks


def _live(graph: EdgeGraph, mask: torch.Tensor) -> torch.Tensor:
    """Where a mask may move a reader's input: its set (or non-zero) entries, and every existing edge
    when the mask takes gradients (a zero weight still has a derivative)."""
    if mask.dtype == torch.bool:
        return mask
    if mask.requires_grad:
        return graph.mask.to(mask.device).expand_as(mask)
    return mask != 0


def edge_masks(graph: EdgeGraph, sets: Sequence[Sequence[Edge]]) -> torch.Tensor:
    """Stack edge sets into ``[n_sets, P, W, R]`` masks (an edge without a position in a
    position-resolved graph stands for all its positions)."""
    masks = torch.zeros((len(sets), graph.P, graph.n_writers, graph.n_readers), dtype=torch.bool)
    for j, s in enumerate(sets):
        for e in s:
            w, r = graph.index_of(e)
            if graph.positional and e.position is None:
                masks[j, :, w, r] = True
            else:
                masks[j, graph.position_index(e), w, r] = True
    return masks


def patch_edges(setup: Setup, graph: EdgeGraph, sets: Sequence[Sequence[Edge] | Edge] | torch.Tensor,
                labels: Sequence[str] | None = None) -> PatchEffects:
    """Exact effects of patching each edge (or each set of edges jointly); ``sets`` may be a
    ``[n_sets, P, W, R]`` mask stack. Edges at one position may be patched on a
    position-aggregated graph too (it is resolved over the prompts' positions for the purpose)."""
    if isinstance(sets, torch.Tensor):
        masks = sets.bool()
    else:
        norm = [[x] if isinstance(x, Edge) else list(x) for x in sets]
        if not graph.positional and any(e.position is not None for s in norm for e in s):
            graph = graph.with_positions(setup.pairs.n_positions)
        masks = edge_masks(graph, norm)
        labels = labels or ["+".join(e.name for e in s) for s in norm]
    _check_graph(setup, graph)
    with setup.model.ungrouped(graph.ungrouped):
        return sweep(setup, EdgePatch(setup.model, graph, masks), labels, "edge patching")


def run_circuit(setup: Setup, graph: EdgeGraph, keep: torch.Tensor, knockout: bool = False) -> PatchEffects:
    """Whole-circuit runs: every edge outside ``keep`` (``[P, W, R]`` bool, or a stack of those)
    takes its source value; with ``knockout`` the kept edges are patched instead."""
    if keep.dim() not in (3, 4):
        raise EdgeatpError(f"keep must be [P, W, R] or a stack of those, got {tuple(keep.shape)}")
    keeps = keep[None] if keep.dim() == 3 else keep
    masks = keeps.bool() if knockout else ~keeps.bool()
    return patch_edges(setup, graph, masks & graph.mask, labels=[f"circuit{i}" for i in range(len(masks))])


def circuit_load(setup: Setup, graph: EdgeGraph, backward: bool = False) -> PatchLoad:
    """What a whole-circuit run on ``graph`` costs per pair and row at most (every edge may move):
    :func:`run_circuit`'s sweeps, or with ``backward`` a differentiable :func:`weighted_run`, which
    also keeps what the backward needs (:func:`~edgeatp.memory.saved_bytes`, the weight copies) and
    every reader site's moved writes."""
    load = EdgePatch(setup.model, graph, graph.full_mask[None]).load(setup.pairs.n_positions)
    if not backward:
        return load
    spec, T = setup.model.spec, setup.pairs.n_positions
    moved = sum(int(graph.mask[:, rs].any(1).sum()) for rs, _ in graph.reader_sites().values())
    kept = -(-saved_bytes(spec, 1, T, True, False) // spec.dtype_bytes) + T * moved * spec.shape.d_model
    return replace(load, fixed=load.fixed + kept, copies=spec.weight_copies)


def edge_sources(setup: Setup, graph: EdgeGraph, batch: PairBatch) -> MutableMapping:
    """The source run's writer activations of a batch (in host memory with ``offload``): what
    :func:`weighted_run` moves edges towards."""
    _check_graph(setup, graph)
    with setup.model.ungrouped(graph.ungrouped):
        return capture(setup.model, batch.source, WriterLayout(setup.model, graph).sites(), logits=False,
                       cache=setup.new_cache())[1]


def weighted_run(setup: Setup, graph: EdgeGraph, batch: PairBatch, weights: torch.Tensor,
                 source: MutableMapping, ref: torch.Tensor | None = None) -> torch.Tensor:
    """Metric values ``[S, B]`` of the base run of ``batch`` with every edge moved by ``weights[s]``
    (``[S, P, W, R]`` floats: the fraction of the edge's source-minus-current delta applied; 0/1
    weights give :func:`run_circuit`'s patches), differentiable in ``weights``. ``source`` comes from
    :func:`edge_sources`, ``ref`` from :meth:`Setup.reference` (metrics that compare with the clean run)."""
    model = setup.model
    S, B = int(weights.shape[0]), len(batch)
    pair_rows = torch.arange(B, device=model.device).repeat(S)
    set_rows = torch.arange(S, device=weights.device).repeat_interleave(B)
    rows = batch.repeat_rows(pair_rows)
    w = (weights * graph.full_mask.to(weights.device))[set_rows]
    with model.ungrouped(graph.ungrouped):
        hooks = edge_mask_hooks(model, graph, WriterLayout(model, graph), w,
                                {s: v[pair_rows.to(v.device)] for s, v in source.items()})
        logits = model.forward(rows.base, hooks)
    return setup.metric(logits, rows, ref[pair_rows.to(ref.device)] if ref is not None else None).view(S, B)


def _check_graph(setup: Setup, graph: EdgeGraph) -> None:
    """The graph must belong to the setup's model and, if position-resolved, to its prompts."""
    if graph.shape != setup.model.shape:
        raise EdgeatpError("the edge graph was built for a model of another shape")
    if graph.positional and graph.P != setup.pairs.n_positions:
        raise EdgeatpError(f"the graph has {graph.P} positions but the prompts have {setup.pairs.n_positions}")
