"""Nodes, edges and the writer/reader graph."""

import pytest
import torch

from edgeatp.graph import Edge, EdgeGraph, ModelShape, Node, NodeKind, node_set

GPT2 = ModelShape(n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072)


@pytest.mark.parametrize("name", ["input", "logits", "a1.h3", "a1.h3<q>", "a0.h0<k>", "a11.h7<v>", "m0", "m2.n17",
                                  "a1.h3@5", "m0.n3@0", "input@2"])
def test_node_names_round_trip(name):
    node = Node.parse(name)
    assert node.name == name
    assert Node.parse(str(node)) == node
    assert hash(node) == hash(Node.parse(name))


@pytest.mark.parametrize("bad", ["a1", "h3", "a1.h", "m", "a1.h3<x>", "mlp0", "a1.h3@", "a-1.h2", ""])
def test_bad_node_names_are_rejected_with_the_grammar(bad):
    with pytest.raises(ValueError, match="expected input, logits"):
        Node.parse(bad)


def test_node_validation():
    with pytest.raises(ValueError, match="needs a head"):
        Node(NodeKind.HEAD, layer=1)
    with pytest.raises(ValueError, match="has no layer"):
        Node(NodeKind.INPUT, layer=0)
    with pytest.raises(ValueError, match="non-negative"):
        Node(NodeKind.MLP, layer=-1)
    assert Node.parse("a1.h3<q>@4").head_node == Node.parse("a1.h3@4")
    assert Node.parse("a1.h3@4").component == Node.parse("a1.h3")


def test_edge_names():
    e = Edge.parse("a0.h1->a2.h3<q>")
    assert e.writer == Node.parse("a0.h1") and e.reader == Node.parse("a2.h3<q>") and e.position is None
    assert Edge.parse("input->m1@3").position == 3
    assert Edge.parse("input->m1@3").name == "input->m1@3"
    with pytest.raises(ValueError):
        Edge.parse("a0.h1")


def test_gpt2_small_graph_size_matches_eap_ig():
    g = EdgeGraph.from_shape(GPT2)
    assert g.n_writers == 1 + 12 * 13 and g.n_readers == 12 * 37 + 1
    assert g.n_edges == 32491


def test_sequential_topology():
    g = EdgeGraph.from_shape(ModelShape(2, 2, 8, 4, 16))
    def has(edge: str) -> bool:
        w, r = Edge.parse(edge).writer, Edge.parse(edge).reader
        return bool(g.mask[g.writer_index[w], g.reader_index[r]])
    assert has("input->a0.h0<q>") and has("a0.h1->m0") and has("m0->a1.h0<k>") and has("a1.h1->logits")
    assert not has("a0.h0->a0.h1<q>") and not has("m0->m0") and not has("a1.h0->m0")
    with pytest.raises(KeyError, match="does not exist"):
        g.index_of("a1.h0->m0")


def test_parallel_blocks_do_not_read_their_own_attention():
    g = EdgeGraph.from_shape(ModelShape(2, 2, 8, 4, 16, parallel_attn_mlp=True))
    w, r = g.writer_index[Node.parse("a0.h0")], g.reader_index[Node.parse("m0")]
    assert not bool(g.mask[w, r])
    assert bool(g.mask[w, g.reader_index[Node.parse("m1")]])


def test_attention_only_and_neuron_graphs():
    g = EdgeGraph.from_shape(ModelShape(2, 3, 8, 4, None, attn_only=True))
    assert all(n.kind is not NodeKind.MLP for n in (*g.writers, *g.readers))
    assert g.n_edges == 9 * 1 + 9 * 4 + 7  # layer-0 q/k/v see the input, layer 1 also layer 0; logits all 7
    gn = EdgeGraph.from_shape(ModelShape(1, 1, 8, 8, 5), neurons=True)
    assert [w.name for w in gn.writers] == ["input", "a0.h0", "m0.n0", "m0.n1", "m0.n2", "m0.n3", "m0.n4"]


def test_position_resolved_graph_and_restriction():
    shape = ModelShape(2, 2, 8, 4, 16)
    g = EdgeGraph.from_shape(shape, n_positions=3)
    assert g.n_edges == 3 * EdgeGraph.from_shape(shape).n_edges
    assert list(g.edges())[0].position == 0
    small = g.restrict(writers=[Node.parse("a0.h0")], readers=[Node.parse("m1"), Node.parse("logits")])
    assert small.n_edges == 2 * 3 and small.mask.all()


def test_node_sets():
    shape = ModelShape(2, 2, 8, 4, 16)
    assert len(node_set(shape, ["head"])) == 4
    assert len(node_set(shape, ["head", "q", "mlp"], positions=5)) == (4 + 4 + 2) * 5
    assert len(node_set(shape, ["neuron"])) == 32
    with pytest.raises(ValueError, match="unknown node families"):
        node_set(shape, ["heads"])
    with pytest.raises(ValueError, match="layers 0..1"):
        EdgeGraph.from_shape(shape, writers=[Node.parse("a5.h0")])
    assert torch.equal(EdgeGraph.from_shape(shape).mask, EdgeGraph.from_shape(shape).mask)
