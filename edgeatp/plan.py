"""The cost planner: a run's graph size, passes, peak memory and time, from the model's config alone.

Everything here is a pure function of a :class:`ModelSpec` (the graph's :class:`ModelShape` plus the
vocabulary, dtype and the few TransformerLens facts that set memory) and a :class:`Workload`; nothing
imports torch, so ``edgeatp plan`` answers from a ``config.json`` without weights. Counts come from
the code's own rules: forwards and backward calls from :meth:`Method.cost` and
:func:`graddrop_units`, GradDrop's truncated backwards from the layers below each dropped unit,
graph sizes from :func:`graph_size`, edge attribution's pairs per batch and writers per QK-fix
chunk from :class:`MemoryBudget`, the rule edge attribution itself uses, and exact patching's pairs
per batch and patch sets per forward from :func:`edgeatp.memory.fit_sweep`, the rule every sweep uses.

**Memory** is the peak of live tensor bytes on the model's device: the weights; the copies of the
projection weights TransformerLens 3.9 makes in every forward (a backward-able forward keeps them);
the source run's cached writes; what the base run keeps for the backward; the gradients of every
backward pass; edgeatp's buffers (writer differences, reader-input gradients, estimates, the QK fix's
recomputed softmaxes). It is the largest of the phases a batch goes through; the previous batch's
results are still alive while the next batch's runs are made. Per-pair estimates kept for analyses
live on the host. Allocator caching and fragmentation are not included.

**Time** is expected CPU time in units of one plain forward+backward over the same pairs, counted in
flop-equivalents: matrix-multiply flops plus :data:`ELEMENTWISE_FLOPS` per element an elementwise
kernel touches. Fixed per-call overheads are not modelled, so tiny models (the zoo) run slower than
planned relative to their fast passes. ``benchmarks/plan_check.py`` and ``tests/test_plan.py`` compare
every figure with measured runs.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

from .graph import ModelShape, NodeKind, graph_size, node_set, reader_nodes, residual_points, writer_nodes
from .memory import (MB, PatchLoad, cache_mb_per_pair, edge_patch_load, fit_sweep, forward_copies,
                     forward_row_bytes, gradient_run_flags, node_patch_load, saved_bytes, site_numel, sweep_bytes)
from .methods import METHODS, Kind, Method, Unit, get_method, graddrop_units

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
#: Flop-equivalents of one element of an elementwise kernel, next to matrix-multiply flops: one CPU core
#: here does ~50 GFLOP/s in matrix products and ~1 G elements/s in elementwise kernels.
ELEMENTWISE_FLOPS = 40.0
KEEP_PER_PAIR_MB = 256.0  # as edgeatp.setup: per-pair estimates are kept up to this size
IG_STEPS = 8  # attribute_edges' and attribute_nodes' default
COMPOSITE_ACTIVATIONS = frozenset({"gelu_new", "gelu_fast", "solu_ln"})
#: Elements of one recomputed-softmax buffer ``[writers, b, H, T, T]`` of a QK-fix chunk at most: larger
#: chunks are bound by memory traffic, not arithmetic (GPT-2 small, one thread, edge AtP+QK fix at
#: 8 x 128 tokens: 4.9x a forward+backward with this cap, 5.7x without it; 8 x 32: 3.7x and 3.9x;
#: 2 ** 20 and 2 ** 23 were slower).
CHUNK_ELEMENTS = 2 ** 21


# ------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class ModelSpec:
    """What the planner knows of a model: its graph shape and what sets its memory and flops."""

    name: str
    shape: ModelShape
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    dtype: str  # float32, float64, bfloat16 or float16
    norm: str | None  # TransformerLens normalization_type: LN, LNPre, RMS, RMSPre or None
    gated_mlp: bool = False
    learned_positions: bool = False  # an absolute, learned position embedding (W_pos)
    rotary: bool = False
    post_norm: bool = False  # sublayer outputs normalised too (Gemma-2)
    act_fn: str | None = None  # TransformerLens' name of the MLP nonlinearity

    @property
    def composite_activation(self) -> bool:
        """Whether the nonlinearity is built of several elementwise ops in TransformerLens (GPT-2's
        ``gelu_new``, ``gelu_fast``, SoLU), each of which autograd keeps an input of."""
        return self.act_fn in COMPOSITE_ACTIVATIONS

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def work_bytes(self) -> int:
        """Bytes per number of edgeatp's working precision: float64 for float64 models, else float32."""
        return 8 if self.dtype == "float64" else 4

    @property
    def d_mlp(self) -> int:
        return 0 if self.shape.attn_only else self.shape.d_mlp or 0

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of one MLP: 3 gated, 2 plain, 0 attention-only."""
        return 0 if self.shape.attn_only else 3 if self.gated_mlp else 2

    @property
    def params(self) -> int:
        """Parameters of the HookedTransformer (TransformerLens 3.9 keeps every bias, zero or not)."""
        return self.embed_params + self.shape.n_layers * self.block_params + self.head_params

    @property
    def embed_params(self) -> int:
        """The token (and learned position) embedding's parameters: they live with the first block."""
        return self.d_vocab * self.shape.d_model + (self.n_ctx * self.shape.d_model if self.learned_positions else 0)

    @property
    def block_params(self) -> int:
        """One block's parameters: norms, attention with every bias, the MLP."""
        s = self.shape
        d, dh, H, kv, m = s.d_model, s.d_head, s.n_heads, s.kv_heads, self.d_mlp
        attn = (H + 2 * kv) * dh * (d + 1) + H * dh * d + d  # W_Q, W_K, W_V with biases; W_O, b_O
        mlp = 0 if s.attn_only else self.mlp_matrices * d * m + m + d
        norms = (1 if s.attn_only else 2) * (2 if self.post_norm else 1)
        return norms * self._norm_params + attn + mlp

    @property
    def head_params(self) -> int:
        """The final norm's and the unembedding's parameters: they live with the last block."""
        return self._norm_params + (self.shape.d_model + 1) * self.d_vocab_out

    @property
    def _norm_params(self) -> int:
        return {"LN": 2 * self.shape.d_model, "RMS": self.shape.d_model}.get(self.norm or "", 0)

    @property
    def weight_copies(self) -> int:
        """Numbers TransformerLens 3.9 copies out of the weights in one forward (rearranged W_Q/W_K/W_V,
        contiguous W_O, transposed gated-MLP matrices and W_U): a backward-able forward keeps them all."""
        return self.shape.n_layers * self.block_weight_copies + self.shape.d_model * self.d_vocab_out

    @property
    def block_weight_copies(self) -> int:
        """One block's share of :attr:`weight_copies` (the rest is the unembedding's, on the last device)."""
        s = self.shape
        attn = (2 * s.n_heads + 2 * s.kv_heads) * s.d_head * s.d_model
        return attn + (3 * s.d_model * self.d_mlp if self.gated_mlp else 0)

    def layer_flops(self, T: int) -> float:
        """Matrix-multiply flops of one block's forward over one prompt of ``T`` tokens."""
        s = self.shape
        linear = (2 * s.n_heads + 2 * s.kv_heads) * s.d_head * s.d_model + self.mlp_matrices * s.d_model * self.d_mlp
        return 2 * T * linear + 4 * T * T * s.n_heads * s.d_head

    def layer_elements(self, T: int) -> float:
        """Elementwise work of one block's forward (norms, rotary, softmax, nonlinearity, residual adds)."""
        s = self.shape
        rotary = 6 * T * (s.n_heads + s.kv_heads) * s.d_head if self.rotary else 0
        return 30 * T * s.d_model + 8 * s.n_heads * T * T + (4 + 4 * self.gated_mlp) * T * self.d_mlp + rotary

    def unembed_flops(self, T: int) -> float:
        return 2 * T * self.shape.d_model * self.d_vocab_out + ELEMENTWISE_FLOPS * 2 * T * self.d_vocab_out


@dataclass(frozen=True)
class Workload:
    """What a run is asked to do, as far as cost goes."""

    level: str = "edge"  # edge, node or neuron
    n_pairs: int = 64
    seq_len: int = 32  # tokens per prompt
    shared_prefix: int = 0  # leading tokens every pair's two prompts share (edge attribution skips them)
    positions: bool = False
    batch_size: int = 32
    memory_budget: float = 1024.0
    graddrop: str = "block"
    ig_steps: int = IG_STEPS
    offload: bool = False  # cached activations and gradients in host memory
    n_devices: int = 1  # the model's blocks split over this many devices, as TransformerLens splits them

    def __post_init__(self) -> None:
        if self.level not in ("edge", "node", "neuron"):
            raise ValueError(f"unknown level {self.level!r}")
        if min(self.n_pairs, self.seq_len, self.batch_size, self.ig_steps, self.n_devices) < 1 \
                or self.memory_budget <= 0:
            raise ValueError("pairs, tokens, batch size, IG steps, devices and the memory budget must be positive")
        if not 0 <= self.shared_prefix < self.seq_len:
            raise ValueError("the shared prefix must be shorter than the prompts")

    @property
    def moved(self) -> int:
        """Positions from the first one where the two prompts differ (edge attribution's ``T'``)."""
        return self.seq_len - self.shared_prefix


# ------------------------------------------------------------------------------------ graph
_graph_size = lru_cache(maxsize=64)(graph_size)  # the planner asks for the same shapes' sizes many times


@dataclass(frozen=True)
class GraphCounts:
    """The size of what a run scores: the edge graph's writers, readers and edges, and the node sites."""

    writers: int
    readers: int
    edges: int  # times positions when position-resolved
    nodes: int  # node-level attribution sites (times positions when position-resolved)
    components: int  # heads and MLPs (or neurons) a node-level circuit is chosen from
    positions: int | None


@lru_cache(maxsize=64)
def graph_counts(spec: ModelSpec, work: Workload) -> GraphCounts:
    """Writers, readers and edges of the edge graph, and the sites node-level attribution scores
    (heads, queries, keys, values and MLPs; neurons instead of MLPs at the neuron level)."""
    s = spec.shape
    size = _graph_size(s)
    mlp = [] if s.attn_only else ["neuron" if work.level == "neuron" else "mlp"]
    nodes = node_set(s, ["head", "q", "k", "v", *mlp])
    components = len({n.component.head_node for n in nodes})
    P = work.seq_len if work.positions else 1
    return GraphCounts(size.writers, size.readers, size.edges * P, len(nodes) * P, components,
                       work.seq_len if work.positions else None)


@lru_cache(maxsize=64)
def reader_sites(shape: ModelShape) -> tuple[tuple[str, int, int, int], ...]:
    """``(kind, layer, readers, upstream writers)`` of every reader site of the full edge graph in
    forward order: the q, k, v inputs and the MLP input of each layer, then the logits (layer -1)."""
    ws, rs = writer_nodes(shape), reader_nodes(shape)
    wp, rp = residual_points(shape, ws, rs)
    points = sorted(wp)
    sites: dict[tuple[str, int], list[int]] = {}
    for node, p in zip(rs, rp):
        kind = "mlp" if node.kind is NodeKind.MLP else node.kind.value
        sites.setdefault((kind, node.layer if node.layer is not None else -1), []).append(bisect_right(points, p))
    return tuple((kind, layer, len(ups), ups[0]) for (kind, layer), ups in sites.items())


# ------------------------------------------------------------------------------------ the batch rule
@dataclass(frozen=True)
class MemoryBudget:
    """Pairs per batch and writers per QK-fix chunk that keep edge attribution's large buffers within a
    budget (the rule :func:`edgeatp.attribute_edges` uses; ``peak_mb`` is the rule's own estimate)."""

    batch_size: int
    writer_chunk: int
    peak_mb: float

    @classmethod
    def fit(cls, n_writers: int, n_readers: int, P: int, T: int, d_model: int, n_heads: int, qk: bool,
            batch_size: int, budget_mb: float, cache_mb: float = 0.0, integrated: bool = False) -> "MemoryBudget":
        """Per pair: writer differences ``[T, W, d]`` and one pass's reader gradients ``[T, R, d]``
        (float32), the signed and GradDrop estimates ``[P, W, R]`` (float64) and ``cache_mb`` of the
        runs' activation caches and autograd graph; per (pair, writer) of a QK chunk: about a dozen
        ``[H, T, T]`` softmax buffers. Integrated gradients keep the differences and the reader
        gradients' running mean through every path point's run and gradients: those count twice."""
        buffers = 4 * T * (n_writers + n_readers) * d_model * (2 if integrated else 1)
        per_pair = (buffers + 2 * 8 * P * n_writers * n_readers) / MB + cache_mb
        bs = max(1, min(batch_size, int(budget_mb // max(per_pair, 1e-9))))
        if not qk:
            return cls(bs, n_writers, round(bs * per_pair, 1))
        unit = 12 * 4 * n_heads * T * T / MB
        cached = max(1, CHUNK_ELEMENTS // (bs * n_heads * T * T))  # larger chunks only thrash the caches
        chunk = max(1, min(n_writers, cached, int((budget_mb - bs * per_pair) // max(unit * bs, 1e-9))))
        return cls(bs, chunk, round(bs * per_pair + chunk * bs * unit, 1))


class _Site(NamedTuple):
    """A site as :class:`edgeatp.model.Site` names it, without torch."""

    kind: str
    layer: int = -1


def _needs(spec: ModelSpec, work: Workload, method: Method) -> tuple[list[_Site], list[_Site], list[_Site]]:
    """The sites a gradient run over the full graph caches in both runs, in the base run only, and takes
    gradients at (what :class:`edgeatp.attribution.EdgePlan` and ``NodeTerms`` ask for)."""
    s, L = spec.shape, spec.shape.n_layers
    qk = method.qk_fix and method.kind is Kind.GRADIENT
    act: list[_Site] = []
    base: list[_Site] = []
    grad: list[_Site] = []
    if work.level == "edge":
        act = [_Site("resid_pre", 0)] + [_Site("z", layer) for layer in range(L)]
        act += [] if s.attn_only else [_Site("mlp_out", layer) for layer in range(L)]
        act += [_Site("attn_post_scale", layer) for layer in range(L)] if spec.post_norm else []
        for layer in range(L):
            base.append(_Site("resid_pre", layer))
            if qk:
                base += [_Site("rot_q", layer), _Site("rot_k", layer), _Site("scores", layer)]
            grad += [_Site("pattern", layer)] if qk else [_Site("q", layer), _Site("k", layer)]
            grad += [_Site("v", layer)] + ([] if s.attn_only else [_Site("mlp_in", layer)])
        return act, base, grad + [_Site("resid_final")]
    mlp = [] if s.attn_only else ["mlp_post" if work.level == "neuron" else "mlp_out"]
    for layer in range(L):
        for kind in ["z", "q", "k", "v", *mlp]:
            if qk and kind in ("q", "k"):
                act += [_Site("rot_q", layer), _Site("rot_k", layer)]
                base += [_Site("scores", layer), _Site("pattern", layer)]
                grad.append(_Site("pattern", layer))
            else:
                act.append(_Site(kind, layer))
                grad.append(_Site(kind, layer))
    return list(dict.fromkeys(act)), list(dict.fromkeys(base)), list(dict.fromkeys(grad))


def pair_cache_mb(spec: ModelSpec, work: Workload, method: Method) -> float:
    """Device megabytes one pair's gradient run takes by the batch rule (``Setup.device_mb_per_pair``):
    the base forward's autograd graph, plus the cached activations and gradients unless offloaded."""
    T, size = work.seq_len, spec.dtype_bytes
    act, base, grad = _needs(spec, work, method)
    graph = saved_bytes(spec, 1, T, *gradient_run_flags(base, grad)) / MB
    if work.offload:
        return graph
    return graph + cache_mb_per_pair(spec.shape, size, T, act, base, grad, 1 + len(units_of(spec, work, method)))


def edge_budget(spec: ModelSpec, work: Workload, method: Method) -> MemoryBudget:
    """The batch and chunk edge attribution with ``method`` picks for this workload."""
    size = _graph_size(spec.shape)
    return MemoryBudget.fit(size.writers, size.readers, work.seq_len if work.positions else 1, work.seq_len,
                            spec.shape.d_model, spec.shape.n_heads, method.qk_fix, work.batch_size, work.memory_budget,
                            pair_cache_mb(spec, work, method), method.kind is Kind.INTEGRATED)


def batch_of(spec: ModelSpec, work: Workload, method: Method) -> int:
    """Pairs per batch of an attribution run (gradient methods fit their batches to the memory budget)."""
    if method.kind is Kind.EXACT:
        return exact_stacking(spec, work, method)[0]
    if work.level == "edge":
        return min(work.n_pairs, edge_budget(spec, work, method).batch_size)
    fitted = int(work.memory_budget // max(pair_cache_mb(spec, work, method), 1e-9))
    return min(work.n_pairs, max(1, min(work.batch_size, fitted)))


# ------------------------------------------------------------------------------------ passes
def _below(unit: Unit) -> float:
    """Blocks a GradDrop pass with ``unit`` dropped runs backward through: every block below the unit
    (and, for a sequential MLP unit, its own block's attention)."""
    kind, layer = unit
    own = 0.5 if kind == "mlp" else 0.0
    return layer + own


def units_of(spec: ModelSpec, work: Workload, method: Method) -> list[Unit]:
    """GradDrop's units of a run (none without GradDrop)."""
    s = spec.shape
    return graddrop_units(s.n_layers, s.attn_only, work.graddrop) if method.graddrop else []  # type: ignore[arg-type]


@dataclass(frozen=True)
class Passes:
    """Work of a run in passes over the prompt pairs: forwards (a forward of ``k`` stacked patch sets
    counts ``k``), backward calls per batch, and those backwards in full-backward equivalents (GradDrop's
    truncated backwards cover only the blocks below the dropped unit)."""

    forwards: float = 0
    backwards: float = 0
    backward_equivalents: float = 0
    forward_calls: int = 0  # model calls over the whole run


def sweep_passes(n_pairs: int, pair_rows: int, per_forward: int, n_sets: int, reference: bool = False) -> Passes:
    """Exact patching of ``n_sets`` patch sets (:func:`edgeatp.patching.sweep`): per batch of ``pair_rows``
    pairs a base and a source forward, then the sets stacked ``per_forward`` per forward (the batch
    size and the memory budget's rule, :func:`exact_stacking`)."""
    batches = math.ceil(n_pairs / pair_rows)
    ref = int(reference)
    return Passes(2 + ref + n_sets, 0, 0, batches * (2 + ref + math.ceil(n_sets / per_forward)))


def attribution_passes(spec: ModelSpec, work: Workload, method: Method, reference: bool = False) -> Passes:
    """Passes of one attribution run with ``method`` (:meth:`Method.cost`, in the batches it uses)."""
    counts = graph_counts(spec, work)
    if method.kind is Kind.EXACT:
        return sweep_passes(work.n_pairs, *exact_stacking(spec, work, method),
                            counts.edges if work.level == "edge" else counts.nodes, reference)
    units = units_of(spec, work, method)
    cost = method.cost(graddrop_terms=len(units), ig_steps=work.ig_steps, reference=reference)
    batches = math.ceil(work.n_pairs / batch_of(spec, work, method))
    backwards = 1 + sum(1 for u in units if _below(u) > 0) if method.kind is Kind.GRADIENT else cost.backwards
    equivalents = cost.backwards if method.kind is Kind.INTEGRATED else \
        1 + sum(_below(u) for u in units) * _block_share(spec, work.seq_len)
    return Passes(cost.forwards, backwards, equivalents, batches * cost.forwards)


def _block_share(spec: ModelSpec, T: int) -> float:
    """One block's share of a full backward's work."""
    block = _backward_work(spec, T, blocks=1, logits=False)
    return block / _backward_work(spec, T)


# ------------------------------------------------------------------------------------ time
def _forward_work(spec: ModelSpec, T: int, logits: bool = True) -> float:
    """Flop-equivalents of one forward over one prompt."""
    s = spec.shape
    work = s.n_layers * (spec.layer_flops(T) + ELEMENTWISE_FLOPS * spec.layer_elements(T))
    return work + (spec.unembed_flops(T) if logits else 0.0)


def _backward_work(spec: ModelSpec, T: int, blocks: float | None = None, logits: bool = True) -> float:
    """Flop-equivalents of the input-gradient backward through ``blocks`` blocks (all by default) and the
    unembedding: attention's two products twice, every projection once (weights are frozen)."""
    s = spec.shape
    n = s.n_layers if blocks is None else blocks
    layer = spec.layer_flops(T) + 4 * T * T * s.n_heads * s.d_head + 2 * ELEMENTWISE_FLOPS * spec.layer_elements(T)
    return n * layer + (spec.unembed_flops(T) if logits else 0.0)


def _fb(spec: ModelSpec, T: int) -> float:
    """One plain forward+backward over one prompt: the time unit."""
    return _forward_work(spec, T) + _backward_work(spec, T)


def _reader_side_work(spec: ModelSpec, Tm: int, projected: int, readers: int) -> float:
    """Reader-input gradients of one layer's q/k/v inputs: the transposed projections of ``projected``
    heads' gradients, the norm's closed-form backward (two in-place passes and a reduction) and the copy
    of ``readers`` into the contraction's layout."""
    d = spec.shape.d_model
    return 4 * Tm * projected * spec.shape.d_head * d + ELEMENTWISE_FLOPS * Tm * d * (3 * projected + readers)


def _edge_work(spec: ModelSpec, work: Workload, method: Method, b: int) -> float:
    """Flop-equivalents per prompt of edge attribution's own arithmetic (``b`` pairs per batch): writer
    differences, reader-input gradients and their contraction with the differences per pass (integrated
    gradients: gradients per path point, one contraction), the estimates' bookkeeping, and the QK fix
    (patched projections, scores and softmaxes per upstream writer once; their products with the pattern
    gradient per pass)."""
    s, el = spec.shape, ELEMENTWISE_FLOPS
    T, Tm, d, dh, L = work.seq_len, work.moved, s.d_model, s.d_head, s.n_layers
    size = _graph_size(s)
    W, R, P = size.writers, size.readers, work.seq_len if work.positions else 1
    qk = method.qk_fix and method.kind is Kind.GRADIENT
    integrated = method.kind is Kind.INTEGRATED
    units = units_of(spec, work, method)
    sites = reader_sites(s)
    # passes reaching a layer: the plain one and every GradDrop pass whose dropped unit is above it
    reach = {layer: 1 + sum(1 for u in units if _below(u) > layer) for layer in range(L)}
    total = 2 * T * L * s.n_heads * dh * d + el * (3 * T + Tm) * W * d  # differences, first difference, flat
    for layer in range(L):
        linear = [(kind, r, w) for kind, lay, r, w in sites
                  if lay == layer and not (qk and kind in ("q", "k"))]
        readers = sum(r for kind, r, _ in linear if kind != "mlp")
        projected = s.kv_heads if qk else s.n_heads + 2 * s.kv_heads
        mlps = sum(kind == "mlp" for kind, _, _ in linear)
        side = _reader_side_work(spec, Tm, projected, readers) + el * Tm * d * mlps
        contract = sum(2 * Tm * d * r * w + el * (Tm * d * r + 2 * r * w * P) for _, r, w in linear)
        total += (work.ig_steps if integrated else reach[layer]) * side + (1 if integrated else reach[layer]) * contract
    _, _, r_log, w_log = sites[-1]
    total += 2 * Tm * d * r_log * w_log + el * 2 * r_log * w_log * P
    total += el * 4 * (len(units) + 1) * P * W * R  # zeroed targets, magnitudes, the sum of dropped passes
    for kind, layer, r, w in sites if qk else ():
        if kind not in ("q", "k"):
            continue
        n = r if kind == "q" else r * s.group_size  # query heads whose softmax the readers move
        dense = 1 + (0 if s.attn_only else layer)  # the embedding and MLP writers; the others are heads
        factored = dh * (d + b * Tm) < b * Tm * d  # a head's write through its rank-d_head factors
        per_head = (2 * dh * d * r * dh / b + 2 * Tm * dh * r * dh) if factored else 2 * Tm * d * r * dh
        projections = (w - dense) * per_head + dense * 2 * Tm * d * r * dh
        single_keys = kind == "k" and work.positions  # the closed form of single-key patches, per pass
        per_writer = el * (3 * Tm * d + (3 + 6 * spec.rotary) * Tm * r * dh + Tm * n * dh) \
            + 2 * Tm * T * n * dh + el * (24 if single_keys else 5) * n * Tm * T
        per_pass = el * 3 * n * Tm * T if single_keys else 2 * n * Tm * T  # else one batched product
        total += projections + w * per_writer + w * reach[layer] * per_pass
        total += el * 6 * n * Tm * T + 4 * T * T * n * dh  # base scores, probabilities and inputs per group
    return total


def _node_work(spec: ModelSpec, work: Workload, method: Method) -> float:
    """Flop-equivalents per prompt of node attribution's arithmetic: products of differences with
    gradients per pass, and the QK fix's recomputed scores and softmaxes per query/key family."""
    s, el, T = spec.shape, ELEMENTWISE_FLOPS, work.seq_len
    units = units_of(spec, work, method)
    passes = 1 + len(units)
    width = _node_width(spec, work.level, False)
    total = el * 3 * passes * T * width
    if method.qk_fix and method.kind is Kind.GRADIENT:
        total += 2 * s.n_layers * (4 * T * T * s.n_heads * s.d_head + el * (20 + 3 * passes) * s.n_heads * T * T)
    return total


def attribution_time(spec: ModelSpec, work: Workload, method: Method, reference: bool = False) -> float:
    """Expected time of one attribution run with ``method``, in units of one plain forward+backward over
    the same pairs."""
    T = work.seq_len
    passes = attribution_passes(spec, work, method, reference)
    fb = _fb(spec, T)
    if method.kind is Kind.EXACT:
        return passes.forwards * (_forward_work(spec, T) + _patch_work(spec, work)) / fb
    full = _backward_work(spec, T)
    if method.kind is Kind.INTEGRATED:
        runs = 2 * _forward_work(spec, T, logits=False) + work.ig_steps * (_forward_work(spec, T) + full)
    else:
        runs = _forward_work(spec, T, logits=False) + _forward_work(spec, T) + passes.backward_equivalents * full
    references = passes.forwards - method.cost(ig_steps=work.ig_steps).forwards  # clean runs for KL
    runs += references * _forward_work(spec, T)
    if work.level == "edge":
        own = _edge_work(spec, work, method, batch_of(spec, work, method))
    else:
        own = _node_work(spec, work, method)
    return (runs + own) / fb


def _patch_work(spec: ModelSpec, work: Workload) -> float:
    """Flop-equivalents per patched prompt of exact edge patching's hooks: every writer's write in the
    source and the patched run, and their differences."""
    if work.level != "edge":
        return 0.0
    s = spec.shape
    writers = _graph_size(s).writers
    return 4 * work.seq_len * s.n_layers * s.n_heads * s.d_head * s.d_model \
        + ELEMENTWISE_FLOPS * 4 * work.seq_len * writers * s.d_model


# ------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class Memory:
    """Peak bytes of one run: the device's fixed parts, the live bytes beyond them in each phase of a
    batch (the device's peak is the fixed parts plus the largest phase) and the host's."""

    fixed: dict[str, int]  # weights (and, with a backward, TransformerLens' weight copies)
    phases: dict[str, int]
    parts: dict[str, int]  # the main tensors, each at its largest (they overlap in phases, not in sum)
    host: int
    batch_size: int
    writer_chunk: int | None = None
    per_device: tuple[int, ...] = ()  # each device's peak when the model is split (fixed parts included)

    @property
    def device_peak(self) -> int:
        """The peak of the fullest device."""
        return max(self.per_device) if self.per_device else sum(self.fixed.values()) + max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    def as_mb(self) -> dict[str, Any]:
        """The figures in megabytes, for reports and JSON."""
        return {"device_peak": _mb(self.device_peak), "peak_phase": self.peak_phase, "host": _mb(self.host),
                "fixed": {k: _mb(v) for k, v in self.fixed.items()},
                "parts": {k: _mb(v) for k, v in self.parts.items()},
                "phases": {k: _mb(v) for k, v in self.phases.items()},
                "per_device": [_mb(v) for v in self.per_device] or None,
                "batch_size": self.batch_size, "writer_chunk": self.writer_chunk}


def _mb(n: float) -> float:
    return round(n / MB, 1)


def _writer_width(spec: ModelSpec) -> int:
    """Numbers per token of the sites a run caches for the writer differences: the embedding, head
    outputs and MLP outputs."""
    s = spec.shape
    return s.d_model + s.n_layers * (s.n_heads * s.d_head + (0 if s.attn_only else s.d_model))


def _node_width(spec: ModelSpec, level: str, qk: bool) -> int:
    """Numbers per token of node attribution's sites: head outputs, queries, keys, values (rotated ones
    under the QK fix) and MLP outputs or neurons."""
    s = spec.shape
    mlp = 0 if s.attn_only else spec.d_mlp if level == "neuron" else s.d_model
    return s.n_layers * ((2 * s.n_heads + 2 * s.kv_heads) * s.d_head + mlp)


def _per_layer_grads(spec: ModelSpec, T: int, qk: bool, edge: bool, level: str) -> int:
    """Numbers per pair of one layer's gradients a backward pass returns: q, k, v and the MLP input
    (edges; the pattern under the QK fix), or the node sites."""
    s = spec.shape
    if edge:
        return T * ((s.kv_heads if qk else s.n_heads + 2 * s.kv_heads) * s.d_head + (0 if s.attn_only else s.d_model)) \
            + (s.n_heads * T * T if qk else 0)
    width = _node_width(spec, level, False) // s.n_layers - ((s.n_heads + s.kv_heads) * s.d_head if qk else 0)
    return T * width + (s.n_heads * T * T if qk else 0)


def _batch_terms(spec: ModelSpec, work: Workload, method: Method, b: int) -> dict[str, int]:
    """Bytes of each tensor group one batch of ``b`` pairs makes (all of them grow with ``b``)."""
    s, T, Tm = spec.shape, work.seq_len, work.moved
    d, dh, H, kv, L = s.d_model, s.d_head, s.n_heads, s.kv_heads, s.n_layers
    dt, wk = spec.dtype_bytes, spec.work_bytes
    edge = work.level == "edge"
    qk = method.qk_fix and method.kind is Kind.GRADIENT
    units = units_of(spec, work, method)
    counts = graph_counts(spec, work)
    entries = (T if work.positions else 1) * counts.writers * counts.readers if edge else counts.nodes
    width = _writer_width(spec) if edge else _node_width(spec, work.level, qk)
    t: dict[str, int] = {"entries": entries, "score": 8 * b * entries, "cache": b * T * width * dt}
    if edge:  # residuals at every block input and, under the QK fix, rotated q/k, scores and pattern
        t["kept"] = b * T * ((L - 1) * d + (L * (H + kv) * dh + 2 * L * H * T if qk else 0)) * dt
    else:
        t["kept"] = b * T * 2 * L * H * T * dt if qk else 0
    t["layer_grads"] = b * _per_layer_grads(spec, T, qk, edge, work.level) * dt
    t["plain"] = L * t["layer_grads"] + (b * T * d * dt if edge else 0)  # + the final residual's
    cut = b * T * d * dt * (L + (L if work.graddrop == "sublayer" and not s.attn_only else 0)) if units else 0
    dropped = sum(math.ceil(_below(u)) for u in units) * t["layer_grads"]  # truncated passes: layers below
    t["grads"] = t["plain"] + cut + dropped
    t["saved"] = saved_bytes(spec, b, T, edge, qk)
    t["transient"] = b * dt * max(2 * T * spec.d_vocab_out, 4 * H * T * T, 3 * T * spec.d_mlp)  # a backward's largest
    if qk and not edge:  # each query/key family's base scores, score change and recomputed softmax, float64
        t["qk_fix"] = 3 * 2 * L * b * H * T * T * 8
    if edge:
        n_lin = kv if qk else H + 2 * kv  # q/k/v readers per layer read through the projection
        t["delta"] = b * T * counts.writers * d * wk
        t["deltas"] = t["delta"] + (0 if work.positions else b * Tm * counts.writers * d * wk)  # and flattened
        t["sides"] = b * Tm * L * (n_lin * d * wk + (d * wk if wk != dt and not s.attn_only else 0))
        t["reader_grads"] = t["sides"] + b * Tm * n_lin * d * max(dt, wk)  # and one contraction's layout copy
        if qk:  # a group's base scores, pattern and pattern gradients; per writer of a chunk its softmaxes
            chunk = min(edge_budget(spec, work, method).writer_chunk, max(H, 1))  # chunks stay within a site
            t["qk_fix"] = b * wk * (H * T * T * (4 + len(units)) + 4 * T * H * dh + 2 * Tm * d
                                    + chunk * (4 * Tm * d + 4 * Tm * H * dh + 5 * H * Tm * T))
    if work.offload:  # cached activations and gradients wait in host memory (read one site at a time)
        t["offloaded"] = 2 * t["cache"] + t["kept"] + t["grads"]
        t.update(cache=0, kept=0, grads=0, plain=0, layer_grads=0)
    return t


def attribution_memory(spec: ModelSpec, work: Workload, method: Method) -> Memory:
    """Peak memory of ``method`` over the workload's pairs at its level, in the batches edgeatp uses: the
    first batch alone, then each later one while the previous batch's results are still alive."""
    if method.kind is Kind.EXACT:
        return _exact_memory(spec, work, method)
    b = batch_of(spec, work, method)
    batches = math.ceil(work.n_pairs / b)
    later = ([b] if batches > 2 else []) + ([work.n_pairs - b * (batches - 1)] if batches > 1 else [])
    first = _batch_terms(spec, work, method, b)
    rest = [_batch_terms(spec, work, method, size) for size in later]

    def peak_phases(device: int | None) -> dict[str, int]:
        """Each phase's largest live bytes over the batches, on one device of a split model (or all)."""
        on = (lambda t: t) if device is None else (lambda t: _on_device(spec, work, t, device))
        copies = _device_copies(spec, work, device)
        phases = _phases(spec, work, method, on(first), None, copies)
        for t in rest:
            later_phases = _phases(spec, work, method, on(t), on(first), copies)
            phases = {k: max(v, later_phases[k]) for k, v in phases.items()}
        return phases

    phases = peak_phases(None)
    per_device = tuple(_device_weights(spec, work, k) + max(peak_phases(k).values()) for k in range(work.n_devices)) \
        if work.n_devices > 1 else ()
    entries = first["entries"]
    parts = {"weight_copies": _device_copies(spec, work, None), "source_cache": first["cache"], "base_run": first["saved"] + first["kept"],
             "gradients": first["grads"]}
    parts.update({k: first[k] for k in ("deltas", "reader_grads", "qk_fix") if k in first})
    parts["estimates"] = (6 if units_of(spec, work, method) else 3) * first["score"]
    host = 16 * work.n_pairs * entries if 16 * work.n_pairs * entries / MB <= KEEP_PER_PAIR_MB else 0
    host += first.get("offloaded", 0)
    qk = method.qk_fix and method.kind is Kind.GRADIENT and work.level == "edge"
    return Memory({"weights": spec.params * spec.dtype_bytes}, phases, parts, host, b,
                  edge_budget(spec, work, method).writer_chunk if qk else None, per_device)


#: Batch terms that live with their layers on a split model (the rest is gathered on the first device).
LAYER_TERMS = frozenset({"cache", "kept", "grads", "plain", "layer_grads", "saved", "offloaded"})


def block_counts(n_layers: int, n_devices: int) -> list[int]:
    """Blocks on each device of a split model: TransformerLens puts block ``i`` on device ``i·n // L``."""
    counts = [0] * n_devices
    for i in range(n_layers):
        counts[i * n_devices // n_layers] += 1
    return counts


def _on_device(spec: ModelSpec, work: Workload, t: dict[str, int], device: int) -> dict[str, int]:
    """A batch's terms on one device of a split model: per-layer activations, gradients and autograd's
    saved tensors by its share of the blocks; the largest transient of a backward on every device;
    writer differences, reader gradients, the QK fix's buffers and the estimates on the first device."""
    share = block_counts(spec.shape.n_layers, work.n_devices)[device] / spec.shape.n_layers
    return {k: int(v * share) if k in LAYER_TERMS else v if k == "transient" or device == 0 else 0
            for k, v in t.items()}


def _device_weights(spec: ModelSpec, work: Workload, device: int) -> int:
    """Weight bytes on one device of a split model: its blocks, the embedding on the first, the final
    norm and unembedding on the last."""
    blocks = block_counts(spec.shape.n_layers, work.n_devices)[device]
    own = blocks * spec.block_params + (spec.embed_params if device == 0 else 0) \
        + (spec.head_params if device == work.n_devices - 1 else 0)
    return own * spec.dtype_bytes


def _device_copies(spec: ModelSpec, work: Workload, device: int | None) -> int:
    """Bytes of TransformerLens' weight copies on one device (all of them when ``device`` is None)."""
    if device is None:
        return spec.weight_copies * spec.dtype_bytes
    blocks = block_counts(spec.shape.n_layers, work.n_devices)[device]
    head = spec.shape.d_model * spec.d_vocab_out if device == work.n_devices - 1 else 0
    return (blocks * spec.block_weight_copies + head) * spec.dtype_bytes


def _phases(spec: ModelSpec, work: Workload, method: Method, t: dict[str, int], prev: dict[str, int] | None,
            copies: int) -> dict[str, int]:
    """Live bytes beyond the weights in each phase of a batch with terms ``t``; ``prev``: the previous
    batch's terms (its runs and differences are freed before this batch's runs are made; its estimates
    live until this batch's are made); ``copies``: TransformerLens' weight copies, which the autograd
    graph keeps while it lives."""
    units = units_of(spec, work, method)
    stats = 5 * 8 * t["entries"] if prev else 0  # running statistics, merged batch by batch
    last = (3 if units else 1) * prev["score"] if prev else 0
    held = 2 * t["cache"] + t["kept"] + t["grads"]  # a batch's runs, once its backward passes are done
    edge = work.level == "edge"
    scores = (6 if units else 3) * t["score"]
    out: dict[str, int] = {}
    if method.kind is Kind.INTEGRATED:
        mean = t["sides"] if edge else t["plain"]  # the gradient sides' running mean
        point = t["cache"] + t["kept"] + t["grads"]  # one path point's run and gradients
        base = stats + last + 3 * t["cache"] + t.get("deltas", 0) + mean
        # each point's run is freed before the next point's is made
        out["backward"] = base + t["saved"] + copies + t["kept"] + t["transient"]
        out["gradient_side"] = base + point + t.get("reader_grads", 0)
    else:
        out["backward"] = stats + last + 2 * t["cache"] + t["saved"] + copies + t["kept"] \
            + t["grads"] - t["layer_grads"] + t["transient"]
        if edge:
            out["prepare"] = stats + last + held + 2 * t["delta"]
            out["estimate"] = stats + last + held + t["deltas"] + t["reader_grads"] + scores
            if "qk_fix" in t:
                out["qk_fix"] = stats + last + held + t["deltas"] + (2 if units else 1) * t["score"] + t["qk_fix"]
        elif "qk_fix" in t:
            out["qk_fix"] = stats + last + held + t["qk_fix"]
    out["batch_end"] = last + held + (9 if units else 6) * t["score"] + 3 * stats
    return out


def exact_load(spec: ModelSpec, work: Workload, method: Method) -> PatchLoad:
    """What exact attribution's sweep holds (:class:`~edgeatp.memory.PatchLoad`): every edge alone,
    moving one writer (of a site of at most ``n_heads`` writers) into one reader, or every node alone."""
    s, T = spec.shape, work.seq_len
    numel = [site_numel(s, site, T) for site in _needs(spec, work, method)[0]]
    if work.level != "edge":
        return node_patch_load(sum(numel), max(numel))
    counts = graph_counts(spec, work)
    P = T if work.positions else 1
    return edge_patch_load(s, T, sum(numel) // T, s.n_heads, counts.writers, 1, 1,
                           P * counts.writers * counts.readers)


def exact_stacking(spec: ModelSpec, work: Workload, method: Method) -> tuple[int, int]:
    """Pairs per batch and patch sets per forward of exact attribution: the rule every sweep uses."""
    return fit_sweep(spec, work.seq_len, exact_load(spec, work, method), work.n_pairs, work.batch_size,
                     work.memory_budget, work.offload)


def _exact_memory(spec: ModelSpec, work: Workload, method: Method) -> Memory:
    """Exact patching: per pair batch the source run's cached sites; per stacked row of a patched forward
    what :func:`exact_load` counts (for edges the writers' sites gathered and recorded, the moved writes,
    the readers' private inputs, the mask) and the forward's own activations and logits; on the host,
    the per-pair effects and, for edges, a dense ``[P, W, R]`` mask per edge (twice, as built and as
    checked)."""
    n, s = work.n_pairs, spec.shape
    load = exact_load(spec, work, method)
    pairs, sets = exact_stacking(spec, work, method)
    rows, T, dt = pairs * sets, work.seq_len, spec.dtype_bytes
    counts = graph_counts(spec, work)
    cache = pairs * load.source * dt
    held = rows * (dt * (load.fixed + min(load.touched, sets * load.per_set)) + load.mask_bytes)
    forward = rows * forward_row_bytes(spec, T) + forward_copies(spec)
    dense = (T if work.positions else 1) * counts.writers * counts.readers
    host = 8 * n * (counts.edges + dense) + 2 * counts.edges * dense if work.level == "edge" else 8 * n * counts.nodes
    if work.offload:  # the source run's cache waits in host memory
        cache, host = 0, host + cache
    peak = sweep_bytes(spec, T, load, pairs, sets, work.offload)
    assert peak == cache + held + forward, "the parts are the rule's"
    parts = {"source_cache": cache, "patched_rows": held, "forward": forward}
    counts_on = block_counts(s.n_layers, work.n_devices)
    per_device = tuple(_device_weights(spec, work, k) + cache * c // s.n_layers + forward + (held if k == 0 else 0)
                       for k, c in enumerate(counts_on)) if work.n_devices > 1 else ()
    return Memory({"weights": spec.params * dt}, {"patched_forward": peak}, parts, host, pairs, per_device=per_device)


# ------------------------------------------------------------------------------------ the plan
#: Memory of common accelerators, in GB (decimal, as sold), smallest first.
DEVICES_GB = (16, 24, 40, 48, 80, 141, 192)


def device_for(peak: int) -> str:
    """The smallest common accelerator memory that holds ``peak`` bytes with 10% to spare for the allocator."""
    need = peak * 1.1 / 1e9
    for gb in DEVICES_GB:
        if need <= gb:
            return f"{gb} GB"
    return f"more than {DEVICES_GB[-1]} GB: split the model over devices or lower the batch and budget"


@dataclass(frozen=True)
class MethodPlan:
    """One attribution method's cost on a workload."""

    method: str
    passes: Passes
    memory: Memory
    time: float  # in units of one plain forward+backward over the same pairs

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "passes": asdict(self.passes), "memory_mb": self.memory.as_mb(),
                "device": device_for(self.memory.device_peak), "time_vs_forward_backward": round(self.time, 3)}


@dataclass(frozen=True)
class Plan:
    """What ``edgeatp plan`` reports: the model, the workload, the graph and every method's cost."""

    spec: ModelSpec
    work: Workload
    graph: GraphCounts
    methods: dict[str, MethodPlan]
    forward_backward_flops: float = field(default=0.0)  # flop-equivalents of the time unit, per pair

    def as_dict(self) -> dict[str, Any]:
        s = self.spec
        return {
            "model": {"name": s.name, "params": s.params, "dtype": s.dtype, **asdict(s.shape),
                      "d_vocab": s.d_vocab, "normalization": s.norm, "gated_mlp": s.gated_mlp, "rotary": s.rotary},
            "workload": asdict(self.work),
            "graph": asdict(self.graph),
            "time_unit": {"what": "one plain forward+backward over every pair",
                          "flop_equivalents": self.forward_backward_flops * self.work.n_pairs},
            "methods": {k: v.as_dict() for k, v in self.methods.items()},
        }


def plan(spec: ModelSpec, work: Workload, methods: list[str] | None = None, metric_reference: bool = False) -> Plan:
    """Every figure ``edgeatp plan`` prints, for ``methods`` (default: every method of the level)."""
    level = "node" if work.level == "neuron" else work.level
    names = methods or [m for m in METHODS if level in METHODS[m].levels]
    out = {}
    for name in names:
        m = get_method(name, level)
        out[m.name] = MethodPlan(m.name, attribution_passes(spec, work, m, metric_reference),
                                 attribution_memory(spec, work, m), attribution_time(spec, work, m, metric_reference))
    return Plan(spec, work, graph_counts(spec, work), out, _fb(spec, work.seq_len))
