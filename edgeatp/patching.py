"""Exact activation patching: nodes, edges and whole circuits, batched.

One batch loop (:func:`sweep`) runs any :class:`Intervention`: many independent patches are
stacked along the batch axis (row = one prompt pair under one patch set), so a sweep of N
patches over P pairs costs about ``N * P / batch_size`` forwards.

* :class:`NodePatch` replaces node activations (head output ``z``, q/k/v per head, MLP
  output, single neurons, the embedding; one position or all) by their source-run values.
* :class:`EdgePatch` gives each patched reader a private copy of its residual input in which
  the writer's contribution takes its source-run value (``r + w_src − w_current``); everything
  downstream is recomputed. A mask over all edges at once gives whole-circuit runs.

Effects are ``metric(base run with the patch) − metric(base run)``: base = clean for noising,
corrupt for denoising.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from tqdm.auto import tqdm

from .graph import Edge, EdgeGraph, Node, NodeKind, check_nodes
from .metrics import Metric, get_metric, sign_convention
from .model import FwdHook, ModelAdapter, Site
from .tasks.pairs import Direction, PairBatch, PromptPairs



@dataclass(frozen=True)
class PatchEffects:
    """Signed exact effects of patch sets, per prompt pair and averaged."""

    labels: tuple[str, ...]
    per_pair: torch.Tensor  # [n_pairs, n_sets]
    base_metric: torch.Tensor  # [n_pairs]
    direction: Direction
    metric: str
    n_forwards: int

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

    def hooks(self, source: dict[Site, torch.Tensor], pair_rows: torch.Tensor,
              set_rows: torch.Tensor) -> list[tuple[Site, FwdHook]]:
        """Hooks for a forward whose row ``i`` is pair ``pair_rows[i]`` of the batch under set ``set_rows[i]``."""


def capture(adapter: ModelAdapter, tokens: torch.Tensor, sites: Sequence[Site], logits: bool = True
            ) -> tuple[torch.Tensor | None, dict[Site, torch.Tensor]]:
    """Logits (``None`` unless ``logits``) and the values at ``sites`` of one forward (no gradient)."""
    cache: dict[Site, torch.Tensor] = {}

    def keep(site: Site) -> FwdHook:
        def fn(t: torch.Tensor) -> None:
            cache[site] = t.detach()
        return fn

    with torch.no_grad():
        out = adapter.forward(tokens, [(s, keep(s)) for s in dict.fromkeys(sites)], logits=logits)
    return out, cache


def reference_logprobs(adapter: ModelAdapter, batch: PairBatch, metric: Metric) -> torch.Tensor | None:
    """Clean-run log-probabilities at the answer position, for metrics that compare with them."""
    if not metric.needs_reference:
        return None
    with torch.no_grad():
        logits = adapter.forward(batch.clean)
    rows = torch.arange(len(batch), device=logits.device)
    return torch.log_softmax(logits[rows, batch.answer_pos.to(logits.device)], -1)


def sweep(
    adapter: ModelAdapter,
    pairs: PromptPairs,
    intervention: Intervention,
    metric: str | Metric = "logit_diff",
    direction: Direction | str = Direction.NOISING,
    batch_size: int = 64,
    labels: Sequence[str] | None = None,
    progress: bool = False,
) -> PatchEffects:
    """Exact effect of every patch set of ``intervention`` on every prompt pair."""
    metric_obj = get_metric(metric)
    direction = Direction(direction)
    adapter.check_pairs(pairs)
    n, s = len(pairs), intervention.n_sets
    if s == 0:
        raise ValueError("nothing to patch: the list of patch sets is empty")
    pair_bs = max(1, min(n, batch_size))
    chunk = max(1, batch_size // pair_bs)
    per_pair = torch.zeros(n, s, dtype=torch.float64)
    base_metric = torch.zeros(n, dtype=torch.float64)
    forwards = 0
    total = -(-n // pair_bs) * -(-s // chunk)
    with adapter.session(), tqdm(total=total, disable=not progress, desc="exact patching", leave=False) as bar:
        for batch in pairs.batches(pair_bs, direction, same_length=not adapter.causal):
            batch = batch.to(adapter.device)
            B = len(batch)
            ref = reference_logprobs(adapter, batch, metric_obj)
            base_logits = capture(adapter, batch.base, [])[0]
            base = metric_obj(base_logits, batch, ref)
            base_metric[batch.index] = base.double().cpu()
            _, source = capture(adapter, batch.source, intervention.source_sites(), logits=False)
            forwards += 2
            for start in range(0, s, chunk):
                sets = torch.arange(start, min(s, start + chunk), device=adapter.device)
                C = len(sets)
                pair_rows = torch.arange(B, device=adapter.device).repeat(C)
                set_rows = sets.repeat_interleave(B)
                rows = batch.repeat_rows(pair_rows)
                with torch.no_grad():
                    logits = adapter.forward(rows.base, intervention.hooks(source, pair_rows, set_rows))
                value = metric_obj(logits, rows, ref[pair_rows] if ref is not None else None)
                eff = (value - base[pair_rows]).double().cpu().view(C, B)
                per_pair[batch.index[:, None].cpu(), sets.cpu()[None, :]] = eff.T
                forwards += 1
                bar.update(1)
    names = tuple(labels) if labels is not None else tuple(f"set{i}" for i in range(s))
    return PatchEffects(names, per_pair, base_metric, direction, metric_obj.name, forwards)


# ------------------------------------------------------------------------------------ nodes
NODE_SITE = {  # the site each kind of node lives at
    NodeKind.HEAD: "z", NodeKind.Q: "q", NodeKind.K: "k", NodeKind.V: "v",
    NodeKind.MLP: "mlp_out", NodeKind.NEURON: "mlp_post", NodeKind.INPUT: "resid_pre"}


def node_site(node: Node) -> tuple[Site, int | None]:
    """The site a node lives at and its index along the site's head/neuron axis."""
    if node.kind is NodeKind.LOGITS:
        raise ValueError("logits is an output, not a patchable node")
    site = Site(NODE_SITE[node.kind], node.layer if node.layer is not None else 0)
    index = node.head if node.is_attention else node.neuron
    return site, index


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

    def hooks(self, source: dict[Site, torch.Tensor], pair_rows: torch.Tensor,
              set_rows: torch.Tensor) -> list[tuple[Site, FwdHook]]:
        out = []
        for site, by_set in self._entries.items():
            src = source[site][pair_rows]
            mask = self._mask(site, by_set, set_rows, src)
            if mask is not None:
                out.append((site, _replace(mask, src)))
        return out

    def _mask(self, site: Site, by_set: dict[int, list[tuple[int | None, int | None]]], set_rows: torch.Tensor,
              src: torch.Tensor) -> torch.Tensor | None:
        """Bool mask shaped like the site's leading axes (``[R, T]`` or ``[R, T, heads|neurons]``),
        built only for the sets in this forward."""
        per_set = site.kind not in ("mlp_out", "resid_pre")
        width = src.shape[2] if per_set else 1
        mask = torch.zeros(len(set_rows), src.shape[1], width, dtype=torch.bool, device=src.device)
        rows_of = {}
        for r, j in enumerate(set_rows.tolist()):
            rows_of.setdefault(j, []).append(r)
        for j, rows in rows_of.items():
            for pos, index in by_set.get(j, ()):
                if pos is not None and pos >= src.shape[1]:
                    continue  # beyond this batch's prompts: only padding could sit there
                mask[rows, slice(None) if pos is None else pos, 0 if index is None else index] = True
        if not bool(mask.any()):
            return None
        return mask if per_set else mask[:, :, 0]


def _replace(mask: torch.Tensor, src: torch.Tensor) -> FwdHook:
    """A hook that takes ``src`` wherever ``mask`` (broadcast over trailing axes) is set."""
    def fn(act: torch.Tensor) -> torch.Tensor:
        m = mask.reshape(*mask.shape, *([1] * (act.dim() - mask.dim())))
        return torch.where(m, src.to(act.dtype), act)
    return fn


def patch_nodes(
    adapter: ModelAdapter,
    pairs: PromptPairs,
    sets: Sequence[Sequence[Node] | Node],
    metric: str | Metric = "logit_diff",
    direction: Direction | str = Direction.NOISING,
    batch_size: int = 64,
    progress: bool = False,
) -> PatchEffects:
    """Exact effects of patching each node (or each set of nodes jointly)."""
    norm = [[x] if isinstance(x, Node) else list(x) for x in sets]
    labels = ["+".join(n.name for n in s) for s in norm]
    return sweep(adapter, pairs, NodePatch(adapter, norm, pairs.n_positions), metric, direction, batch_size,
                 labels, progress)


# ------------------------------------------------------------------------------------ edges
class WriterLayout:
    """Residual writes of the graph's writers, recorded as a forward reaches them."""

    def __init__(self, adapter: ModelAdapter, graph: EdgeGraph) -> None:
        self.adapter = adapter
        self.graph = graph
        self.groups: dict[Site, tuple[list[int], list[int] | None]] = {}
        for i, w in enumerate(graph.writers):
            if w.kind is NodeKind.INPUT:
                key, idx = Site("resid_pre", 0), None
            elif w.kind is NodeKind.HEAD:
                key, idx = Site("z", w.layer), w.head  # type: ignore[arg-type]
            elif w.kind is NodeKind.MLP:
                key, idx = Site("mlp_out", w.layer), None  # type: ignore[arg-type]
            else:
                key, idx = Site("mlp_post", w.layer), w.neuron  # type: ignore[arg-type]
            rows, sel = self.groups.setdefault(key, ([], [] if idx is not None else None))
            rows.append(i)
            if sel is not None:
                sel.append(idx)  # type: ignore[arg-type]

    def sites(self) -> list[Site]:
        return list(self.groups)

    def writes(self, site: Site, act: torch.Tensor) -> torch.Tensor:
        """``[R, T, n, d_model]`` writes of this site's writers from the site's activation."""
        _, sel = self.groups[site]
        if site.kind == "z":
            return self.adapter.head_writes(site.layer, act[:, :, sel])
        if site.kind == "mlp_post":
            return self.adapter.neuron_writes(site.layer, act[:, :, sel])
        return act[:, :, None, :]


@dataclass
class EdgePatch:
    """Edge patch masks: row ``i`` patches the edges ``masks[set_rows[i]]`` (``[W, R]`` or ``[T, W, R]``)."""

    adapter: ModelAdapter
    graph: EdgeGraph
    masks: torch.Tensor  # [n_sets, (T,) W, R] bool

    def __post_init__(self) -> None:
        self.n_sets = int(self.masks.shape[0])
        self.positional = self.masks.dim() == 4
        self.writers = WriterLayout(self.adapter, self.graph)
        self.masks = self.masks & self.graph.mask.to(self.masks.device)

    def source_sites(self) -> list[Site]:
        return self.writers.sites()

    def hooks(self, source: dict[Site, torch.Tensor], pair_rows: torch.Tensor,
              set_rows: torch.Tensor) -> list[tuple[Site, FwdHook]]:
        return edge_mask_hooks(self.adapter, self.graph, self.writers, self.masks[set_rows.to(self.masks.device)],
                               {s: v[pair_rows] for s, v in source.items()})


def edge_mask_hooks(adapter: ModelAdapter, graph: EdgeGraph, writers: WriterLayout, mask: torch.Tensor,
                    source: dict[Site, torch.Tensor]) -> list[tuple[Site, FwdHook]]:
    """Hooks that patch, for every row, the edges set in ``mask`` ``[rows, (T,) W, R]``."""
    mask = mask.to(adapter.device)
    if mask.dim() == 4:  # position-resolved: this batch may be shorter than the longest prompt
        mask = mask[:, : next(iter(source.values())).shape[1]]
    src_writes = {s: writers.writes(s, v) for s, v in source.items()}
    delta: dict[int, torch.Tensor] = {}  # writer index -> [R, T, d] source minus current write
    resid: dict[int, torch.Tensor] = {}
    hooks: list[tuple[Site, FwdHook]] = []

    def record(site: Site) -> FwdHook:
        idx, _ = writers.groups[site]
        def fn(act: torch.Tensor) -> None:
            d = src_writes[site].to(act.dtype) - writers.writes(site, act)
            for k, w in enumerate(idx):
                delta[w] = d[:, :, k]
        return fn

    def summed(readers: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``[R, T, n, d]`` summed deltas into these readers and the ``[R, T, n]`` touched flags."""
        m = mask[..., readers]
        if not bool(m.any()):
            return None
        ws = [w for w in sorted(delta) if bool(m[..., w, :].any())]
        D = torch.stack([delta[w] for w in ws], dim=2)  # [R, T, w, d]
        mw = m[..., ws, :].to(D.dtype)
        if mw.dim() == 3:
            out = torch.einsum("rtwd,rwn->rtnd", D, mw)
            touched = m.any(1)[:, None, :].expand(-1, D.shape[1], -1)
        else:
            out = torch.einsum("rtwd,rtwn->rtnd", D, mw)
            touched = m.any(2)
        return out, touched

    def attn_reader(kind: str, layer: int, readers: list[int], heads: list[int]) -> FwdHook:
        def fn(act: torch.Tensor) -> torch.Tensor | None:
            got = summed(readers)
            if got is None:
                return None
            D, touched = got
            h = torch.tensor(heads, device=act.device)
            new = adapter.qkv_from_residual(layer, kind, resid[layer][:, :, None, :] + D, h)
            out = act.clone()
            out[:, :, h] = torch.where(touched[..., None], new.to(act.dtype), act[:, :, h])
            return out
        return fn

    def resid_reader(readers: list[int]) -> FwdHook:
        def fn(act: torch.Tensor) -> torch.Tensor | None:
            got = summed(readers)
            return None if got is None else act + got[0][:, :, 0].to(act.dtype)
        return fn

    def keep_resid(layer: int) -> FwdHook:
        def fn(act: torch.Tensor) -> None:
            resid[layer] = act
        return fn

    for site in writers.sites():
        hooks.append((site, record(site)))
    for (kind, layer), (rs, hs) in graph.reader_sites().items():
        if not bool(mask[..., rs].any()):
            continue
        if kind in ("q", "k", "v"):
            hooks.append((Site("resid_pre", layer), keep_resid(layer)))
            hooks.append((Site(kind, layer), attn_reader(kind, layer, rs, hs)))
        elif kind == "mlp":
            hooks.append((Site("mlp_in", layer), resid_reader(rs)))
        else:
            hooks.append((Site("resid_final"), resid_reader(rs)))
    return hooks


def edge_masks(graph: EdgeGraph, sets: Sequence[Sequence[Edge]], n_positions: int | None = None) -> torch.Tensor:
    """Stack edge sets into ``[n_sets, W, R]`` masks (``[n_sets, T, W, R]`` if any edge has a position)."""
    positional = any(e.position is not None for s in sets for e in s)
    if positional and n_positions is None:
        raise ValueError("position-resolved edges need n_positions")
    shape = (len(sets), n_positions, graph.n_writers, graph.n_readers) if positional else (
        len(sets), graph.n_writers, graph.n_readers)
    masks = torch.zeros(shape, dtype=torch.bool)
    for j, s in enumerate(sets):
        for e in s:
            w, r = graph.index_of(e)
            if e.position is not None and e.position >= (n_positions or 0):
                raise ValueError(f"edge {e.name}: position {e.position} is beyond the prompts' {n_positions} tokens")
            if positional:
                masks[j, slice(None) if e.position is None else e.position, w, r] = True
            else:
                masks[j, w, r] = True
    return masks


def patch_edges(
    adapter: ModelAdapter,
    pairs: PromptPairs,
    graph: EdgeGraph,
    sets: Sequence[Sequence[Edge] | Edge] | torch.Tensor,
    metric: str | Metric = "logit_diff",
    direction: Direction | str = Direction.NOISING,
    batch_size: int = 64,
    labels: Sequence[str] | None = None,
    progress: bool = False,
) -> PatchEffects:
    """Exact effects of patching each edge (or each set of edges jointly); ``sets`` may be a mask stack."""
    if isinstance(sets, torch.Tensor):
        masks = sets.bool()
    else:
        norm = [[x] if isinstance(x, Edge) else list(x) for x in sets]
        masks = edge_masks(graph, norm, pairs.n_positions)
        labels = labels or ["+".join(e.name for e in s) for s in norm]
    return sweep(adapter, pairs, EdgePatch(adapter, graph, masks), metric, direction, batch_size, labels, progress)


def run_circuit(
    adapter: ModelAdapter,
    pairs: PromptPairs,
    graph: EdgeGraph,
    keep: torch.Tensor,
    metric: str | Metric = "logit_diff",
    direction: Direction | str = Direction.NOISING,
    batch_size: int = 64,
    knockout: bool = False,
) -> PatchEffects:
    """Whole-circuit runs: every edge outside ``keep`` (``[W, R]`` bool, one or a stack
    ``[S, W, R]``) takes its source value; with ``knockout`` the kept edges are patched instead."""
    single = 3 if graph.n_positions is not None else 2
    if keep.dim() not in (single, single + 1):
        raise ValueError(f"keep must be [{'T, ' if single == 3 else ''}W, R] or a stack of those, got {tuple(keep.shape)}")
    keeps = keep[None] if keep.dim() == single else keep
    masks = keeps.bool() if knockout else ~keeps.bool()
    return patch_edges(adapter, pairs, graph, masks & graph.mask, metric, direction, batch_size,
                       labels=[f"circuit{i}" for i in range(len(masks))])

