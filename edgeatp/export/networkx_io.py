"""A circuit as a ``networkx.MultiDiGraph`` of components.

Nodes are components named like the rest of edgeatp (``input``, ``a1.h3``, ``m0``, ``m0.n17``,
``logits``; ``a1.h3@5`` per position in position-resolved circuits). A q/k/v reader is drawn as
its head, so up to three edges join the same writer and head: the graph is a ``MultiDiGraph``
whose edge *key* is the reader type (``"q"``, ``"k"``, ``"v"``, ``"mlp"`` or ``"logits"``), e.g.
``G.edges["a0.h1", "a1.h2", "k"]["signed"]``. Call ``nx.DiGraph(G)`` for a simple graph (it keeps
the attributes of one of the parallel edges only).

Node attributes: ``kind``, ``layer``, ``head``, ``neuron``, ``position``, ``component`` (name
without position), ``score`` (edge circuits: sum of the scores of kept edges touching the node;
node circuits: the node score, ``None`` if unscored), ``in_graph``.
Edge attributes: ``name`` (edgeatp edge name, e.g. ``a0.h1->a1.h2<k>@5``), ``reader`` (type),
``position``, ``score`` (non-negative ranking score), ``signed`` (signed mean estimate),
``exact`` (verified exact effect or ``None``), ``in_graph``.
Graph attributes: ``model``, ``method``, ``direction``, ``metric``, ``sign_convention``,
``level``, ``n_positions``.
"""

from __future__ import annotations

import networkx as nx

from ..circuit import Circuit
from ._view import edge_rows, kept_nodes, node_score_map, node_sort_key


def to_networkx(circuit: Circuit, include_all: bool = False) -> nx.MultiDiGraph:
    """The circuit's kept edges (``include_all``: every edge of the graph, ``in_graph`` telling
    which are kept) as a MultiDiGraph keyed by reader type, for analysis with networkx."""
    rows = edge_rows(circuit, include_all)
    scores = node_score_map(circuit, rows)
    kept = kept_nodes(rows)
    G = nx.MultiDiGraph(model=circuit.meta.get("model", ""), method=circuit.method,
                        direction=circuit.direction.value, metric=circuit.metric,
                        sign_convention=circuit.sign_convention, level=circuit.level,
                        n_positions=circuit.graph.n_positions)
    for node in sorted(scores, key=lambda n: node_sort_key(n, circuit.graph.shape)):
        G.add_node(node.name, kind=node.kind.value, layer=node.layer, head=node.head, neuron=node.neuron,
                   position=node.position, component=node.component.name, score=scores[node], in_graph=node in kept)
    for row in rows:
        G.add_edge(row.writer.name, row.reader.name, key=row.reader_type, name=row.edge.name,
                   reader=row.reader_type, position=row.edge.position, score=row.score, signed=row.signed,
                   exact=row.exact, in_graph=row.in_graph)
    return G
