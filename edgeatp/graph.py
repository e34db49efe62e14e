"""Nodes, edges and the writer/reader graph of a residual-stream transformer.

Nothing here knows TransformerLens: a model is described by a :class:`ModelShape`, nodes are
frozen, hashable values with short readable names (``a1.h3``, ``a1.h3<q>``, ``m0``, ``m0.n17``,
``input``, ``logits``, ``@5`` for a position), and an :class:`EdgeGraph` holds the dense
``[writers, readers]`` index of every residual-stream edge. Names follow the EAP-IG / MIB
convention so scores can be exchanged with those tools.

Grouped-query attention is kept as it is: a key/value head shared by several query heads is one
node per input, ``a1.kv0<k>`` and ``a1.kv0<v>`` (key/value head 0 of layer 1, read by query heads
``a1.h0`` … of its group); queries and head outputs stay per query head. The per-query-head
("ungrouped") view that EAP-IG and MIB expect, ``a1.h3<k>`` meaning query head 3's own copy of its
key input, is a graph of its own (``EdgeGraph.from_shape(shape, ungrouped=True)``).

torch is imported only where a graph's tensors are built, so shapes, names and :func:`graph_size`
(the counts of a graph, without building it) load without it: the planner and the command line use them.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cached_property
from itertools import accumulate
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    import torch


class NodeKind(str, Enum):
    """What a node is: a residual writer, a reader, or both (``mlp``)."""

    INPUT = "input"  # token (+ positional) embedding: writer
    HEAD = "head"  # attention head output: writer and node-level site
    Q = "q"  # a head's query (node site) / query input (edge reader)
    K = "k"
    V = "v"
    MLP = "mlp"  # MLP output (writer) and MLP input (reader)
    NEURON = "neuron"  # one MLP hidden unit, post-nonlinearity
    LOGITS = "logits"  # the unembedding: reader


QKV = (NodeKind.Q, NodeKind.K, NodeKind.V)
_ATTN_KINDS = (NodeKind.HEAD, *QKV)
_NAME_RE = re.compile(
    r"^(?:(?P<input>input)|(?P<logits>logits)"
    r"|a(?P<al>\d+)\.h(?P<ah>\d+)(?:<(?P<qkv>[qkv])>)?"
    r"|a(?P<kl>\d+)\.kv(?P<kh>\d+)<(?P<kv>[kv])>"
    r"|m(?P<ml>\d+)(?:\.n(?P<mn>\d+))?)"
    r"(?:@(?P<pos>\d+))?$"
)


@dataclass(frozen=True)
class Node:
    """A model component, optionally at one token position. Immutable and hashable.

    ``kv`` marks a key or value node of a shared (grouped-query) key/value head: ``head`` is then
    the key/value head's index.
    """

    kind: NodeKind
    layer: int | None = None
    head: int | None = None
    neuron: int | None = None
    position: int | None = None
    kv: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", NodeKind(self.kind))
        needs_layer = self.kind not in (NodeKind.INPUT, NodeKind.LOGITS)
        needs_head = self.kind in _ATTN_KINDS
        needs_neuron = self.kind is NodeKind.NEURON
        for fld, needed in (("layer", needs_layer), ("head", needs_head), ("neuron", needs_neuron)):
            value = getattr(self, fld)
            if needed and value is None:
                raise ValueError(f"a {self.kind.value} node needs a {fld}")
            if not needed and value is not None:
                raise ValueError(f"a {self.kind.value} node has no {fld} (got {fld}={value})")
        for fld in ("layer", "head", "neuron", "position"):
            value = getattr(self, fld)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"node {fld} must be a non-negative int, got {value!r}")
        if self.kv and self.kind not in (NodeKind.K, NodeKind.V):
            raise ValueError(f"only key and value nodes belong to a shared key/value head, not {self.kind.value}")

    @property
    def name(self) -> str:
        """Short readable name, e.g. ``a1.h3<q>@5``."""
        kind = self.kind
        if kind is NodeKind.INPUT:
            base = "input"
        elif kind is NodeKind.LOGITS:
            base = "logits"
        elif kind is NodeKind.HEAD:
            base = f"a{self.layer}.h{self.head}"
        elif self.kv:
            base = f"a{self.layer}.kv{self.head}<{kind.value}>"
        elif kind in QKV:
            base = f"a{self.layer}.h{self.head}<{kind.value}>"
        elif kind is NodeKind.MLP:
            base = f"m{self.layer}"
        else:
            base = f"m{self.layer}.n{self.neuron}"
        return base if self.position is None else f"{base}@{self.position}"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Node({self.name!r})"

    @classmethod
    def parse(cls, name: str) -> "Node":
        """Inverse of :attr:`name`; raises ``ValueError`` with the accepted grammar."""
        m = _NAME_RE.match(name.strip())
        if m is None:
            raise ValueError(
                f"cannot parse node name {name!r}: expected input, logits, a<L>.h<H>, "
                "a<L>.h<H><q|k|v>, a<L>.kv<G><k|v>, m<L> or m<L>.n<N>, optionally followed by @<position>"
            )
        pos = int(m["pos"]) if m["pos"] is not None else None
        if m["input"]:
            return cls(NodeKind.INPUT, position=pos)
        if m["logits"]:
            return cls(NodeKind.LOGITS, position=pos)
        if m["al"] is not None:
            kind = NodeKind(m["qkv"]) if m["qkv"] else NodeKind.HEAD
            return cls(kind, layer=int(m["al"]), head=int(m["ah"]), position=pos)
        if m["kl"] is not None:
            return cls(NodeKind(m["kv"]), layer=int(m["kl"]), head=int(m["kh"]), position=pos, kv=True)
        if m["mn"] is not None:
            return cls(NodeKind.NEURON, layer=int(m["ml"]), neuron=int(m["mn"]), position=pos)
        return cls(NodeKind.MLP, layer=int(m["ml"]), position=pos)

    def at(self, position: int | None) -> "Node":
        """The same component at ``position`` (``None`` = all positions)."""
        return replace(self, position=position)

    @property
    def component(self) -> "Node":
        """This node without its position."""
        return replace(self, position=None)

    @property
    def is_attention(self) -> bool:
        return self.kind in _ATTN_KINDS

    @property
    def head_node(self) -> "Node":
        """For q/k/v nodes of one head, the head they belong to (position kept); other nodes,
        including inputs of shared key/value heads, unchanged."""
        if self.kind in QKV and not self.kv:
            return Node(NodeKind.HEAD, self.layer, self.head, position=self.position)
        return self


@dataclass(frozen=True)
class Edge:
    """A residual-stream edge: ``writer`` adds to the residual that ``reader`` reads."""

    writer: Node
    reader: Node
    position: int | None = None

    @property
    def name(self) -> str:
        base = f"{self.writer.name}->{self.reader.name}"
        return base if self.position is None else f"{base}@{self.position}"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Edge({self.name!r})"

    @classmethod
    def parse(cls, name: str) -> "Edge":
        """Parse ``writer->reader`` or ``writer->reader@pos``."""
        parts = name.strip().split("->")
        if len(parts) != 2:
            raise ValueError(f"cannot parse edge name {name!r}: expected 'writer->reader[@pos]'")
        writer = Node.parse(parts[0])
        reader = Node.parse(parts[1])
        position = reader.position
        if writer.position is not None:
            raise ValueError(f"edge {name!r}: put the position after the reader, e.g. 'a0.h1->m1@3'")
        return cls(writer, reader.component, position)


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts the graph needs, independent of any library."""

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int | None
    attn_only: bool = False
    parallel_attn_mlp: bool = False
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads shared by n_heads // n_kv_heads

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1:
            raise ValueError("a model needs at least one layer and one head")
        if not self.attn_only and not self.d_mlp:
            raise ValueError("a model with MLPs needs d_mlp")
        if self.n_kv_heads is not None:
            if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
                raise ValueError(f"{self.n_heads} query heads cannot share {self.n_kv_heads} key/value heads evenly")
            if self.n_kv_heads == self.n_heads:
                object.__setattr__(self, "n_kv_heads", None)

    @property
    def has_mlp(self) -> bool:
        return not self.attn_only

    @property
    def grouped(self) -> bool:
        """Whether query heads share key/value heads (grouped-query or multi-query attention)."""
        return self.n_kv_heads is not None

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer (``n_heads`` without grouping)."""
        return self.n_kv_heads or self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.kv_heads

    def kv_of(self, head: int) -> int:
        """The key/value head query head ``head`` reads."""
        return head // self.group_size

    def queries_of(self, kv_head: int) -> range:
        """The query heads that share key/value head ``kv_head``."""
        return range(kv_head * self.group_size, (kv_head + 1) * self.group_size)

    def io_points(self) -> tuple[dict[tuple[str, int], tuple[int, int]], int]:
        """``{("attn"|"mlp", layer): (read_point, write_point)}`` and the logits' read point.

        Residual "points" are the successive states of the residual stream; a writer that
        writes at point ``w`` is seen by every reader that reads at a point ``>= w``.
        Parallel blocks (GPT-NeoX) read one point for both attention and MLP.
        """
        points: dict[tuple[str, int], tuple[int, int]] = {}
        p = 0
        for layer in range(self.n_layers):
            points[("attn", layer)] = (p, p + 1)
            if self.attn_only:
                p += 1
            elif self.parallel_attn_mlp:
                points[("mlp", layer)] = (p, p + 1)
                p += 1
            else:
                points[("mlp", layer)] = (p + 1, p + 2)
                p += 2
        return points, p

    def block_of(self, node: Node) -> tuple[str, int] | None:
        """The sublayer ``("attn"|"mlp", layer)`` a node lives in (``None`` for input/logits)."""
        if node.is_attention:
            return ("attn", node.layer)  # type: ignore[return-value]
        if node.kind in (NodeKind.MLP, NodeKind.NEURON):
            return ("mlp", node.layer)  # type: ignore[return-value]
        return None


def _check_in_shape(shape: ModelShape, node: Node) -> None:
    """Raise a clear error if ``node`` does not exist in a model of this shape."""
    if node.layer is not None and node.layer >= shape.n_layers:
        raise ValueError(f"{node.name}: the model has layers 0..{shape.n_layers - 1}")
    if node.kv and not shape.grouped:
        raise ValueError(f"{node.name}: the model has no shared key/value heads; name its inputs a<L>.h<H><k|v>")
    if node.kv and node.head >= shape.kv_heads:  # type: ignore[operator]
        raise ValueError(f"{node.name}: the model has key/value heads 0..{shape.kv_heads - 1}")
    if node.head is not None and node.head >= shape.n_heads:
        raise ValueError(f"{node.name}: the model has heads 0..{shape.n_heads - 1}")
    if node.kind in (NodeKind.MLP, NodeKind.NEURON) and shape.attn_only:
        raise ValueError(f"{node.name}: the model is attention-only and has no MLPs")
    if node.neuron is not None and node.neuron >= (shape.d_mlp or 0):
        raise ValueError(f"{node.name}: the MLPs have neurons 0..{(shape.d_mlp or 0) - 1}")


def writer_nodes(shape: ModelShape, neurons: bool = False) -> list[Node]:
    """All residual writers in forward order: input, then per layer its heads and its MLP."""
    out = [Node(NodeKind.INPUT)]
    for layer in range(shape.n_layers):
        out += [Node(NodeKind.HEAD, layer, h) for h in range(shape.n_heads)]
        if shape.has_mlp:
            if neurons:
                out += [Node(NodeKind.NEURON, layer, neuron=i) for i in range(shape.d_mlp or 0)]
            else:
                out.append(Node(NodeKind.MLP, layer))
    return out


def attention_inputs(shape: ModelShape, layer: int, kind: NodeKind, ungrouped: bool = False) -> list[Node]:
    """The q, k or v inputs of one layer: per query head, or per shared key/value head for the
    keys and values of a grouped model (unless ``ungrouped``: each query head's own copy)."""
    if kind is not NodeKind.Q and shape.grouped and not ungrouped:
        return [Node(kind, layer, g, kv=True) for g in range(shape.kv_heads)]
    return [Node(kind, layer, h) for h in range(shape.n_heads)]


def reader_nodes(shape: ModelShape, ungrouped: bool = False) -> list[Node]:
    """All residual readers in forward order: per layer the q, k, v inputs and the MLP input; logits."""
    out: list[Node] = []
    for layer in range(shape.n_layers):
        for kind in QKV:
            out += attention_inputs(shape, layer, kind, ungrouped)
        if shape.has_mlp:
            out.append(Node(NodeKind.MLP, layer))
    out.append(Node(NodeKind.LOGITS))
    return out


def residual_points(shape: ModelShape, writers: Sequence[Node], readers: Sequence[Node]) -> tuple[list[int], list[int]]:
    """The residual point each writer writes at and each reader reads at: a reader sees a writer
    exactly when the writer's point is at most the reader's (see :meth:`ModelShape.io_points`)."""
    points, final = shape.io_points()
    wp = [0 if n.kind is NodeKind.INPUT else points[shape.block_of(n)][1] for n in writers]  # type: ignore[index]
    rp = [final if n.kind is NodeKind.LOGITS else points[shape.block_of(n)][0] for n in readers]  # type: ignore[index]
    return wp, rp


@dataclass(frozen=True)
class GraphSize:
    """How large a model's full edge graph is: writers, readers and edges (per position)."""

    writers: int
    readers: int
    edges: int


def graph_size(shape: ModelShape, *, neurons: bool = False, ungrouped: bool = False) -> GraphSize:
    """The counts of ``EdgeGraph.from_shape(shape, neurons=..., ungrouped=...)`` without building it
    (an MLP writer stands for its ``d_mlp`` neurons, which write at the same point)."""
    ws = writer_nodes(shape)
    weight = {w: (shape.d_mlp or 0) if neurons and w.kind is NodeKind.MLP else 1 for w in ws}
    rs = reader_nodes(shape, ungrouped)
    wp, rp = residual_points(shape, ws, rs)
    order = sorted(range(len(ws)), key=wp.__getitem__)
    points = [wp[i] for i in order]
    seen = [0, *accumulate(weight[ws[i]] for i in order)]  # writers at or before each sorted point
    edges = sum(seen[bisect_right(points, p)] for p in rp)
    return GraphSize(sum(weight.values()), len(rs), edges)


@dataclass(frozen=True, eq=False)
class EdgeGraph:
    """Dense index of writer→reader edges: ``mask[w, r]`` is True where the edge exists.

    ``n_positions`` set means a position-resolved graph: an edge exists at every position (a
    write at position p is read at position p). Every edge tensor has a leading position axis of
    length :attr:`P`: the number of positions, or 1 for a position-aggregated graph. In a grouped
    model, a graph whose key/value readers are per query head is the :attr:`ungrouped` view.
    """

    shape: ModelShape
    writers: tuple[Node, ...]
    readers: tuple[Node, ...]
    n_positions: int | None = None
    _mask: torch.Tensor = field(repr=False, default=None)  # type: ignore[assignment]

    @classmethod
    def from_shape(
        cls,
        shape: ModelShape,
        *,
        neurons: bool = False,
        n_positions: int | None = None,
        writers: Sequence[Node] | None = None,
        readers: Sequence[Node] | None = None,
        ungrouped: bool = False,
    ) -> "EdgeGraph":
        """The full graph of a model (per query head key/value readers with ``ungrouped``), or the
        one restricted to given writers/readers."""
        ws = tuple(writers) if writers is not None else tuple(writer_nodes(shape, neurons))
        rs = tuple(readers) if readers is not None else tuple(reader_nodes(shape, ungrouped))
        for node in (*ws, *rs):
            _check_in_shape(shape, node)
            if node.position is not None:
                raise ValueError(f"{node.name}: graph nodes carry no position; use n_positions")
        for node in ws:
            if node.kind not in (NodeKind.INPUT, NodeKind.HEAD, NodeKind.MLP, NodeKind.NEURON):
                raise ValueError(f"{node.name} is not a residual writer")
        for node in rs:
            if node.kind not in (*QKV, NodeKind.MLP, NodeKind.LOGITS):
                raise ValueError(f"{node.name} is not a residual reader")
        if len(set(ws)) != len(ws) or len(set(rs)) != len(rs):
            raise ValueError("duplicate writers or readers in the graph")
        if shape.grouped:
            shared = {n.kv for n in rs if n.kind in (NodeKind.K, NodeKind.V)}
            if len(shared) > 1:
                raise ValueError("a graph reads keys and values either per shared key/value head (a<L>.kv<G><k>) "
                                 "or per query head (a<L>.h<H><k>, the ungrouped view), not both")
        if n_positions is not None and n_positions < 1:
            raise ValueError("n_positions must be positive")
        import torch

        wp, rp = residual_points(shape, ws, rs)
        mask = torch.tensor(wp)[:, None] <= torch.tensor(rp)[None, :]
        return cls(shape, ws, rs, n_positions, mask)

    @property
    def mask(self) -> torch.Tensor:
        """``[n_writers, n_readers]`` bool: which edges exist."""
        return self._mask

    @property
    def n_writers(self) -> int:
        return len(self.writers)

    @property
    def n_readers(self) -> int:
        return len(self.readers)

    @property
    def ungrouped(self) -> bool:
        """Whether keys and values of a grouped model are read per query head (the MIB/EAP-IG view)."""
        return self.shape.grouped and any(r.kind in (NodeKind.K, NodeKind.V) and not r.kv for r in self.readers)

    def reader_targets(self, reader: Node) -> tuple[Node, ...]:
        """The components a reader feeds: its head, the query heads sharing a key/value head, the MLP
        (for an MLP input) or the logits."""
        if reader.kv:
            return tuple(Node(NodeKind.HEAD, reader.layer, h) for h in self.shape.queries_of(reader.head))  # type: ignore[arg-type]
        return (reader.head_node.component,)

    @property
    def positional(self) -> bool:
        """Whether edges are resolved per token position."""
        return self.n_positions is not None

    @property
    def P(self) -> int:
        """Length of the leading position axis of every edge tensor: the number of positions, or
        1 for a position-aggregated graph (whose single "position" stands for all of them)."""
        return self.n_positions or 1

    @property
    def n_edges(self) -> int:
        """Number of edges (times positions for a position-resolved graph)."""
        return int(self._mask.sum()) * self.P

    @property
    def full_mask(self) -> torch.Tensor:
        """``[P, W, R]`` bool: which edges exist at each position."""
        return self._mask.expand(self.P, -1, -1)

    @cached_property
    def writer_index(self) -> dict[Node, int]:
        return {n: i for i, n in enumerate(self.writers)}

    @cached_property
    def reader_index(self) -> dict[Node, int]:
        return {n: i for i, n in enumerate(self.readers)}

    @cached_property
    def edge_coords(self) -> torch.Tensor:
        """``[n_edges_per_position, 2]`` (writer, reader) indices of existing edges, canonical order."""
        return self._mask.nonzero()

    @cached_property
    def all_coords(self) -> torch.Tensor:
        """``[n_edges, 3]`` (position, writer, reader) coordinates of every edge, positions outermost."""
        import torch

        wr = self.edge_coords
        pos = torch.arange(self.P).repeat_interleave(len(wr))
        return torch.cat([pos[:, None], wr.repeat(self.P, 1)], 1)

    def index_of(self, edge: Edge | str) -> tuple[int, int]:
        """(writer, reader) index of an edge; clear error if it is not in the graph."""
        e = Edge.parse(edge) if isinstance(edge, str) else edge
        try:
            w, r = self.writer_index[e.writer], self.reader_index[e.reader]
        except KeyError:
            raise KeyError(f"edge {e.name} is not in this graph (unknown writer or reader)") from None
        if not bool(self._mask[w, r]):
            raise KeyError(f"edge {e.name} does not exist: the reader does not see the writer")
        return w, r

    def position_index(self, edge: Edge) -> int:
        """Index of an edge's position along the position axis (0 in an aggregated graph)."""
        if self.positional:
            if edge.position is None:
                raise KeyError(f"{edge.name}: this graph is position-resolved; name a position, e.g. {edge.name}@0")
            if not 0 <= edge.position < self.P:
                raise KeyError(f"{edge.name}: the graph has positions 0..{self.P - 1}")
            return edge.position
        if edge.position is not None:
            raise KeyError(f"{edge.name}: this graph has no positions")
        return 0

    def edge(self, w: int, r: int, position: int | None = None) -> Edge:
        return Edge(self.writers[w], self.readers[r], position)

    def edge_at(self, coord: tuple[int, int, int]) -> Edge:
        """The edge at a (position index, writer, reader) coordinate."""
        p, w, r = coord
        return Edge(self.writers[w], self.readers[r], p if self.positional else None)

    def edges(self) -> Iterator[Edge]:
        """Every edge in canonical order (positions outermost for position-resolved graphs)."""
        for c in self.all_coords.tolist():
            yield self.edge_at(tuple(c))

    def reader_sites(self) -> dict[tuple[str, int], tuple[list[int], list[int]]]:
        """Readers grouped by what they read: ``("q"|"k"|"v", layer)`` (the heads' inputs),
        ``("mlp", layer)`` or ``("logits", -1)`` → (reader indices, head of each, 0 if none; the
        key/value head's index for the inputs of shared key/value heads)."""
        out: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for r, node in enumerate(self.readers):
            if node.kind is NodeKind.LOGITS:
                key = ("logits", -1)
            else:
                key = ("mlp" if node.kind is NodeKind.MLP else node.kind.value, node.layer)  # type: ignore[assignment]
            rs, hs = out.setdefault(key, ([], []))
            rs.append(r)
            hs.append(node.head if node.head is not None else 0)
        return out

    def with_positions(self, n_positions: int | None) -> "EdgeGraph":
        """The same writers and readers, resolved over ``n_positions`` positions (``None``: aggregated)."""
        return EdgeGraph.from_shape(self.shape, n_positions=n_positions, writers=self.writers, readers=self.readers)

    def ungrouped_view(self) -> "EdgeGraph":
        """The same graph with every shared key/value reader replaced by its query heads' own copies."""
        readers: list[Node] = []
        for r in self.readers:
            readers += [Node(r.kind, r.layer, h) for h in self.shape.queries_of(r.head)] if r.kv else [r]  # type: ignore[arg-type]
        return EdgeGraph.from_shape(self.shape, n_positions=self.n_positions, writers=self.writers, readers=readers)

    def restrict(self, writers: Sequence[Node] | None = None, readers: Sequence[Node] | None = None) -> "EdgeGraph":
        """A smaller graph over a subset of this graph's writers/readers."""
        return EdgeGraph.from_shape(
            self.shape,
            n_positions=self.n_positions,
            writers=writers if writers is not None else self.writers,
            readers=readers if readers is not None else self.readers,
        )


@dataclass(frozen=True, eq=False)
class NodeIndex:
    """A dense, ordered set of nodes (attribution sites), with name lookup."""

    nodes: tuple[Node, ...]

    def __post_init__(self) -> None:
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError("duplicate nodes in a node index")

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    @cached_property
    def index(self) -> dict[Node, int]:
        return {n: i for i, n in enumerate(self.nodes)}

    def position_of(self, node: Node | str) -> int:
        n = Node.parse(node) if isinstance(node, str) else node
        try:
            return self.index[n]
        except KeyError:
            raise KeyError(f"node {n.name} is not in this node set") from None


NODE_FAMILIES = ("head", "q", "k", "v", "mlp", "neuron", "input")


def node_set(
    shape: ModelShape,
    families: Iterable[str] = ("head", "q", "k", "v", "mlp"),
    positions: int | None = None,
) -> NodeIndex:
    """Nodes of the given families, per position (``positions`` = sequence length) or aggregated.

    Families: ``head`` (head outputs), ``q``/``k``/``v``, ``mlp`` (MLP outputs), ``neuron``
    (MLP hidden units, post-nonlinearity) and ``input`` (the embedding). Keys and values of a
    grouped model are one node per shared key/value head.
    """
    fams = list(dict.fromkeys(families))
    unknown = [f for f in fams if f not in NODE_FAMILIES]
    if unknown:
        raise ValueError(f"unknown node families {unknown}; choose from {', '.join(NODE_FAMILIES)}")
    comps: list[Node] = []
    if "input" in fams:
        comps.append(Node(NodeKind.INPUT))
    for layer in range(shape.n_layers):
        if "head" in fams:
            comps += [Node(NodeKind.HEAD, layer, h) for h in range(shape.n_heads)]
        for fam in ("q", "k", "v"):
            if fam in fams:
                comps += attention_inputs(shape, layer, NodeKind(fam))
        if shape.has_mlp and "mlp" in fams:
            comps.append(Node(NodeKind.MLP, layer))
        if shape.has_mlp and "neuron" in fams:
            comps += [Node(NodeKind.NEURON, layer, neuron=i) for i in range(shape.d_mlp or 0)]
    if positions is None:
        return NodeIndex(tuple(comps))
    return NodeIndex(tuple(c.at(p) for c in comps for p in range(positions)))


def check_nodes(shape: ModelShape, nodes: Iterable[Node]) -> None:
    """Raise a clear error for any node that does not exist in this model."""
    for n in nodes:
        if n.kind is NodeKind.LOGITS:
            raise ValueError("logits is an output, not a patchable node")
        _check_in_shape(shape, n)
