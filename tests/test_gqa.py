"""Grouped-query attention as it is: key/value nodes per shared key/value head, checked in float64
against exact patching, brute-force softmax recomputation and the per-query-head (ungrouped) view."""

from __future__ import annotations

import pytest
import torch

import edgeatp as ea
from edgeatp.graph import Edge, EdgeGraph, Node, NodeKind, node_set
from edgeatp.metrics import get_metric
from edgeatp.setup import Setup

from .conftest import random_pairs, tiny_model


def gqa(seed: int = 0, **kw) -> ea.ModelAdapter:
    """4 query heads sharing 2 key/value heads (Llama-shaped unless told otherwise)."""
    args = dict(normalization="RMS", rotary=True, n_heads=4, n_key_value_heads=2, gated_mlp=True, act_fn="silu")
    return tiny_model(seed, **{**args, **kw})


def softmax_only(seed: int = 0) -> ea.ModelAdapter:
    """One attention-only layer without norms: only the softmax is nonlinear, so AtP is exact for
    values and outputs and the QK fix is exact for queries and keys."""
    return tiny_model(seed, attn_only=True, normalization=None, n_layers=1, n_heads=4, n_key_value_heads=2,
                      rotary=True, scale=1.2)


def test_keys_and_values_are_nodes_of_the_shared_heads() -> None:
    shape = gqa().shape
    assert shape.grouped and (shape.kv_heads, shape.group_size) == (2, 2)
    g = EdgeGraph.from_shape(shape)
    per_layer = [r.name for r in g.readers if r.layer == 1]
    assert per_layer == ["a1.h0<q>", "a1.h1<q>", "a1.h2<q>", "a1.h3<q>", "a1.kv0<k>", "a1.kv1<k>", "a1.kv0<v>",
                         "a1.kv1<v>", "m1"]
    assert Node.parse("a1.kv1<v>@3") == Node(NodeKind.V, 1, 1, position=3, kv=True)
    assert [h.name for h in g.reader_targets(Node.parse("a1.kv1<k>"))] == ["a1.h2", "a1.h3"]
    assert not g.ungrouped and g.ungrouped_view().ungrouped
    assert len(g.ungrouped_view().readers) == len(g.readers) + 2 * 2 * shape.n_layers
    assert [n.name for n in node_set(shape, ["k"])][:2] == ["a0.kv0<k>", "a0.kv1<k>"]
    with pytest.raises(ValueError, match="key/value heads 0..1"):
        EdgeGraph.from_shape(shape, readers=[Node.parse("a0.kv2<k>")])
    with pytest.raises(ValueError, match="no shared key/value heads"):
        EdgeGraph.from_shape(tiny_model().shape, readers=[Node.parse("a0.kv0<k>")])


def test_value_nodes_and_edges_are_exact_where_the_model_is_linear() -> None:
    adapter = softmax_only(1)
    pairs = random_pairs(n=4, length=6)
    setup = Setup(adapter, pairs)
    nodes = list(node_set(adapter.shape, ["v", "head"], positions=6))
    est = ea.attribute_nodes(setup, "atp", nodes)
    exact = ea.patch_nodes(setup, nodes)
    torch.testing.assert_close(est.per_pair, exact.per_pair, atol=1e-10, rtol=0)
    edges = ea.attribute_edges(setup, "atp", positions=True)
    linear = [e for e in edges.graph.edges() if e.reader.kind in (NodeKind.V, NodeKind.LOGITS)]
    exact_e = ea.patch_edges(setup, edges.graph, linear)
    for j, e in enumerate(linear):
        at = (e.position, *edges.graph.index_of(e))
        torch.testing.assert_close(edges.per_pair[(slice(None), *at)], exact_e.per_pair[:, j], atol=1e-10, rtol=0)


@pytest.mark.parametrize("positions", [False, True])
def test_qk_fix_on_shared_keys_is_exact_when_only_the_softmax_is_nonlinear(positions: bool) -> None:
    adapter = softmax_only(2)
    setup = Setup(adapter, random_pairs(n=5, length=6, seed=3))
    nodes = list(node_set(adapter.shape, ["q", "k"], positions=6 if positions else None))
    fixed = ea.attribute_nodes(setup, "atp-qk", nodes)
    exact = ea.patch_nodes(setup, nodes)
    torch.testing.assert_close(fixed.per_pair, exact.per_pair, atol=1e-9, rtol=0)
    assert any(n.kv for n in nodes)
    edges_fixed = ea.attribute_edges(setup, "atp-qk", positions=positions)
    edges_exact = ea.attribute_edges(setup, "exact", positions=positions)
    torch.testing.assert_close(edges_fixed.per_pair, edges_exact.per_pair, atol=1e-9, rtol=0)


def test_qk_fix_on_a_shared_key_equals_brute_force_recomputation_over_its_query_heads() -> None:
    adapter = gqa(3, scale=1.0)
    m = adapter.model
    pairs = random_pairs(n=2, length=5, seed=4)
    layer, kv_head, pos = 1, 1, 2
    node = Node(NodeKind.K, layer, kv_head, position=pos, kv=True)
    fixed = ea.attribute_nodes(Setup(adapter, pairs), "atp-qk", [node]).per_pair[:, 0]
    batch = pairs.batch(torch.arange(2))
    store = {}

    def keep(t, hook):
        t.retain_grad()
        store["pattern"] = t
    get_metric("logit_diff")(m.run_with_hooks(batch.base, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", keep)]),
                             batch).sum().backward()
    G, A = store["pattern"].grad.detach(), store["pattern"].detach()
    m.zero_grad(set_to_none=True)
    _, source = m.run_with_cache(batch.source, names_filter=f"blocks.{layer}.attn.hook_k")

    def patch_key(k, hook):
        k = k.clone()
        k[:, pos, kv_head] = source[hook.name][:, pos, kv_head]
        return k
    new = {}
    with torch.no_grad():
        m.run_with_hooks(batch.base, fwd_hooks=[(f"blocks.{layer}.attn.hook_k", patch_key),
                                                (f"blocks.{layer}.attn.hook_pattern",
                                                 lambda t, hook: new.__setitem__("p", t))])
    heads = list(adapter.shape.queries_of(kv_head))
    brute = ((new["p"] - A) * G)[:, heads].sum((1, 2, 3))
    assert float(((new["p"] - A)[:, [h for h in range(4) if h not in heads]]).abs().max()) == 0.0
    torch.testing.assert_close(fixed, brute, atol=1e-10, rtol=0)


def test_shared_head_edges_are_the_sum_of_their_per_query_head_pieces() -> None:
    adapter = gqa(5)
    setup = Setup(adapter, random_pairs(n=3, length=6, seed=6))
    grouped = ea.attribute_edges(setup, "atp")
    g = grouped.graph
    ungrouped = ea.attribute_edges(setup, "atp", g.ungrouped_view())
    u = ungrouped.graph
    for reader in g.readers:
        if not reader.kv:
            continue
        r = g.reader_index[reader]
        pieces = [u.reader_index[Node(reader.kind, reader.layer, h)] for h in adapter.shape.queries_of(reader.head)]
        torch.testing.assert_close(grouped.per_pair[..., r], ungrouped.per_pair[..., pieces].sum(-1), atol=1e-10,
                                   rtol=0)
    q = [i for i, r in enumerate(g.readers) if r.kind is not NodeKind.K and r.kind is not NodeKind.V]
    q_u = [u.reader_index[g.readers[i]] for i in q]
    torch.testing.assert_close(grouped.per_pair[..., q], ungrouped.per_pair[..., q_u], atol=1e-12, rtol=0)


def test_the_ungrouped_view_is_patched_for_real() -> None:
    adapter = softmax_only(7)
    setup = Setup(adapter, random_pairs(n=4, length=6, seed=8))
    view = EdgeGraph.from_shape(adapter.shape, ungrouped=True)
    est = ea.attribute_edges(setup, "atp", view)
    values = [e for e in view.edges() if e.reader.kind is NodeKind.V]
    exact = ea.patch_edges(setup, view, values)
    for j, e in enumerate(values):
        torch.testing.assert_close(est.per_pair[(slice(None), 0, *view.index_of(e))], exact.per_pair[:, j],
                                   atol=1e-10, rtol=0)
    one_copy = ea.patch_edges(setup, view, [Edge.parse("input->a0.h0<v>")]).per_pair[:, 0]
    shared = ea.patch_edges(setup, EdgeGraph.from_shape(adapter.shape), [Edge.parse("input->a0.kv0<v>")]).per_pair[:, 0]
    assert not torch.allclose(one_copy, shared), "patching one query head's copy is not patching the shared value"
    assert adapter.model.cfg.ungroup_grouped_query_attention is False


@pytest.mark.parametrize("method", ["atp", "atp-qk", "atp-gd", "atp*", "ig", "exact"])
def test_every_method_runs_on_grouped_attention(method: str) -> None:
    adapter = gqa(9)
    setup = Setup(adapter, random_pairs(n=3, length=6, seed=10))
    edges = ea.attribute_edges(setup, method, ig_steps=2)
    nodes = ea.attribute_nodes(setup, method, ig_steps=2)
    groups = ea.attribute_groups(setup, ea.attribution.head_groups(adapter.shape), method, ig_steps=2)
    for result in (edges, nodes, groups):
        assert bool(torch.isfinite(result.scores).all()) and float(result.scores.max()) > 0
    if method in ("atp", "atp-qk"):  # first-order writer totals = node AtP for the plain method
        plain = ea.attribute_edges(setup, "atp")
        writers = ea.attribute_nodes(setup, "atp", list(plain.graph.writers))
        torch.testing.assert_close(plain.writer_totals(), writers.per_pair, atol=1e-10, rtol=0)
    circuit = ea.measure(setup, ea.prune(edges, top_k=12))
    check = ea.verify(setup, circuit, edges, top=4, sample_below=2)
    assert circuit.faithfulness is not None and len(check.checks) == 6


def test_mib_export_of_a_grouped_circuit_names_query_head_copies(tmp_path) -> None:
    from edgeatp.export import circuit_to_json, read_circuit, write_json

    adapter = gqa(11)
    setup = Setup(adapter, random_pairs(n=3, length=6, seed=12))
    scores = ea.attribute_edges(setup, "atp-qk")
    circuit = ea.prune(scores, top_k=20, cleanup=False)
    with pytest.raises(ea.EdgeatpError, match="per-query-head key/value scores"):
        circuit_to_json(circuit, "mib")
    circuit = circuit.with_(kv_view=ea.attribution.per_head_kv(setup, scores))
    mib = circuit_to_json(circuit, "mib")
    assert "a1.kv0<k>" not in str(mib["edges"]) and "input->a1.h3<k>" in mib["edges"]
    view = ea.attribute_edges(setup, "atp-qk", scores.graph.ungrouped_view())
    assert mib["edges"]["input->a1.h3<k>"]["signed"] == pytest.approx(view.signed_of("input->a1.h3<k>"), rel=1e-12)
    kept = {e.name for e in circuit.edges()}
    for h in range(4):
        name = f"input->a1.h{h}<v>"
        assert mib["edges"][name]["in_graph"] == (f"input->a1.kv{h // 2}<v>" in kept)
    back = read_circuit(write_json(circuit, tmp_path / "c.json"))
    assert torch.equal(back.kv_view.signed, circuit.kv_view.signed) and back.graph.shape.n_kv_heads == 2
