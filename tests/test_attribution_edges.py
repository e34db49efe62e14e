"""Edge attribution (EAP, edge AtP*, IG) against exact edge patching and slow references."""

import pytest
import torch

from edgeatp.attribution.edges import attribute_edges
from edgeatp.attribution.nodes import attribute_nodes
from edgeatp.errors import EdgeatpError
from edgeatp.graph import Edge, EdgeGraph, Node, NodeKind
from edgeatp.metrics import get_metric
from edgeatp.patching import patch_edges
from edgeatp.setup import Setup

from .conftest import random_pairs, tiny_model
from .handbuilt import cancellation_model, cancellation_pairs, random_pairs_for, saturated_model


def test_edge_atp_equals_exact_patching_on_linear_paths():
    adapter = tiny_model(seed=5, attn_only=True, normalization=None, n_layers=2)
    pairs = random_pairs(n=4)
    est = attribute_edges(Setup(adapter, pairs), "atp")
    g = est.graph
    linear = [e for e in g.edges() if e.reader.kind is NodeKind.LOGITS
              or (e.reader.kind is NodeKind.V and e.reader.layer == 1)]
    exact = patch_edges(Setup(adapter, pairs), g, linear)
    for j, e in enumerate(linear):
        w, r = g.index_of(e)
        assert torch.allclose(est.per_pair[:, 0, w, r], exact.per_pair[:, j], atol=1e-10), e.name


def test_outgoing_edges_sum_to_the_writer_node_score(variant):
    pairs = random_pairs(n=4)
    est = attribute_edges(Setup(variant, pairs), "atp")
    node = attribute_nodes(Setup(variant, pairs), "atp", nodes=list(est.graph.writers))
    assert torch.allclose(est.writer_totals(), node.per_pair, atol=1e-10)


def _split_input_reference(adapter, pairs):
    """Slow reference: per-edge Δw · grad of TransformerLens' split per-head inputs, edge by edge."""
    m = adapter.model
    g = EdgeGraph.from_shape(adapter.shape)
    saved = (m.cfg.use_split_qkv_input, m.cfg.use_attn_result, m.cfg.use_hook_mlp_in)
    m.cfg.use_split_qkv_input = m.cfg.use_attn_result = True
    m.cfg.use_hook_mlp_in = not m.cfg.attn_only
    L = m.cfg.n_layers
    try:
        batch = pairs.batch(torch.arange(len(pairs)))
        _, cb = m.run_with_cache(batch.base)
        _, cs = m.run_with_cache(batch.source)
        store = {}
        def keep(t, hook):
            t.retain_grad()
            store[hook.name] = t
        names = [f"blocks.{l}.hook_{k}_input" for l in range(L) for k in "qkv"] + [f"blocks.{L - 1}.hook_resid_post"]
        names += [] if m.cfg.attn_only else [f"blocks.{l}.hook_mlp_in" for l in range(L)]
        get_metric("logit_diff")(m.run_with_hooks(batch.base, fwd_hooks=[(n, keep) for n in names]), batch).sum().backward()
    finally:
        m.cfg.use_split_qkv_input, m.cfg.use_attn_result, m.cfg.use_hook_mlp_in = saved
        m.zero_grad(set_to_none=True)
    def write(c, w):
        if w.kind is NodeKind.INPUT:
            return c["blocks.0.hook_resid_pre"]
        if w.kind is NodeKind.HEAD:
            result = c[f"blocks.{w.layer}.attn.hook_result"][:, :, w.head]
            if m.cfg.use_normalization_before_and_after:  # the output norm is linear given its scale
                result = result * m.blocks[w.layer].ln1_post.w / c[f"blocks.{w.layer}.ln1_post.hook_scale"]
            return result
        return c[f"blocks.{w.layer}.hook_mlp_out"]
    def grad(r):
        if r.kind in (NodeKind.Q, NodeKind.K, NodeKind.V):
            return store[f"blocks.{r.layer}.hook_{r.kind.value}_input"].grad[:, :, r.head]
        if r.kind is NodeKind.MLP:
            return store[f"blocks.{r.layer}.hook_mlp_in"].grad
        return store[f"blocks.{L - 1}.hook_resid_post"].grad
    ref = torch.zeros(len(pairs), g.n_writers, g.n_readers, dtype=torch.float64)
    for e in g.edges():
        w, r = g.index_of(e)
        ref[:, w, r] = ((write(cs, e.writer) - write(cb, e.writer)) * grad(e.reader)).sum((1, 2))
    return ref


def test_fast_edge_scores_equal_the_slow_per_edge_reference(variant):
    pairs = random_pairs(n=3)
    assert torch.allclose(attribute_edges(Setup(variant, pairs), "atp").per_pair[:, 0],
                          _split_input_reference(variant, pairs), atol=1e-10)


def test_edge_qk_fix_is_exact_when_only_the_softmax_is_nonlinear():
    adapter = saturated_model(seed=4, n_layers=1)
    pairs = random_pairs_for(adapter, n=5)
    for positions in (False, True):
        fixed = attribute_edges(Setup(adapter, pairs), "atp-qk", positions=positions)
        exact = attribute_edges(Setup(adapter, pairs), "exact", positions=positions)
        assert torch.allclose(fixed.per_pair, exact.per_pair, atol=1e-9)
    plain = attribute_edges(Setup(adapter, pairs), "atp", positions=True)
    assert float((plain.per_pair - exact.per_pair).abs().max()) > 0.1, "the saturated case must defeat plain AtP"


def test_edge_qk_fix_equals_brute_force_softmax_recomputation_with_layernorm():
    adapter = tiny_model(seed=6, rotary=True, parallel=True, scale=1.5)
    m = adapter.model
    pairs = random_pairs(n=2, length=5)
    fixed = attribute_edges(Setup(adapter, pairs), "atp-qk")
    g = fixed.graph
    batch = pairs.batch(torch.arange(2))
    store = {}
    def keep(t, hook):
        t.retain_grad()
        store["pattern"] = t
    layer = 1
    get_metric("logit_diff")(m.run_with_hooks(batch.base, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", keep)]),
                             batch).sum().backward()
    G, A = store["pattern"].grad.detach(), store["pattern"].detach()
    m.zero_grad(set_to_none=True)
    _, cb = m.run_with_cache(batch.base)
    _, cs = m.run_with_cache(batch.source)
    m.cfg.use_split_qkv_input = True
    try:
        for e in g.edges():
            if e.reader.layer != layer or e.reader.kind not in (NodeKind.Q, NodeKind.K):
                continue
            w = e.writer
            key = "blocks.0.hook_resid_pre" if w.kind is NodeKind.INPUT else (
                f"blocks.{w.layer}.hook_mlp_out" if w.kind is NodeKind.MLP else None)
            if key is None:
                z = cs[f"blocks.{w.layer}.attn.hook_z"][:, :, w.head] - cb[f"blocks.{w.layer}.attn.hook_z"][:, :, w.head]
                delta = z @ m.blocks[w.layer].attn.W_O[w.head]
            else:
                delta = cs[key] - cb[key]
            name = f"blocks.{layer}.hook_{e.reader.kind.value}_input"
            def add(act, hook, h=e.reader.head, delta=delta):
                act = act.clone()
                act[:, :, h] += delta
                return act
            new = {}
            def grab(t, hook):
                new["p"] = t
            with torch.no_grad():
                m.run_with_hooks(batch.base, fwd_hooks=[(name, add), (f"blocks.{layer}.attn.hook_pattern", grab)])
            ref = ((new["p"] - A) * G).sum((1, 2, 3))
            wi, ri = g.index_of(e)
            assert torch.allclose(fixed.per_pair[:, 0, wi, ri], ref, atol=1e-10), e.name
    finally:
        m.cfg.use_split_qkv_input = False


def test_edge_graddrop_recovers_a_cancelled_edge():
    adapter, pairs = cancellation_model(), cancellation_pairs()
    edge = Edge.parse("input->a0.h0<v>")
    exact = patch_edges(Setup(adapter, pairs), EdgeGraph.from_shape(adapter.shape), [edge]).per_pair
    plain = attribute_edges(Setup(adapter, pairs), "atp")
    dropped = attribute_edges(Setup(adapter, pairs), "atp-gd")
    assert float(exact) == pytest.approx(-1.0)
    assert plain[edge] == 0.0 and dropped[edge] == pytest.approx(2.0)
    star = attribute_edges(Setup(adapter, pairs), "atp*")
    assert star[edge] == pytest.approx(2.0)


def test_integrated_gradients_converge_to_the_input_total_effect():
    adapter = tiny_model(seed=7, scale=0.8)
    pairs = random_pairs(n=3)
    g = EdgeGraph.from_shape(adapter.shape)
    batch = pairs.batch(torch.arange(3))
    metric = get_metric("logit_diff")
    with torch.no_grad():
        total = metric(adapter.forward(batch.source), batch) - metric(adapter.forward(batch.base), batch)
    w = g.writer_index[Node.parse("input")]
    errors = []
    for steps in (1, 4, 32):
        ig = attribute_edges(Setup(adapter, pairs), "ig", ig_steps=steps)
        errors.append(float((ig.per_pair[:, 0, w].sum(-1) - total).abs().max()))
    assert errors[2] < errors[0] and errors[2] < 1e-2 * float(total.abs().max())
    assert ig.cost.backwards == 32


def test_positions_chunking_and_restricted_qk_fix():
    adapter = tiny_model(seed=8, scale=1.2)
    pairs = random_pairs(n=4)
    agg = attribute_edges(Setup(adapter, pairs), "atp*")
    pos = attribute_edges(Setup(adapter, pairs), "atp", positions=True)
    assert torch.allclose(pos.per_pair.sum(1, keepdim=True), attribute_edges(Setup(adapter, pairs), "atp").per_pair,
                          atol=1e-10)
    tight = attribute_edges(Setup(adapter, pairs), "atp*", memory_budget_mb=0.001)
    assert torch.allclose(tight.per_pair, agg.per_pair, atol=1e-10) and tight.meta["batch_size"] == 1
    plain = attribute_edges(Setup(adapter, pairs), "atp")
    only = [Node.parse("a1.h0<k>")]
    part = attribute_edges(Setup(adapter, pairs), "atp-qk", qk_readers=only)
    full = attribute_edges(Setup(adapter, pairs), "atp-qk")
    r = agg.graph.reader_index[only[0]]
    assert torch.allclose(part.per_pair[..., r], full.per_pair[..., r], atol=1e-12)
    others = [i for i in range(agg.graph.n_readers) if i != r]
    assert torch.allclose(part.per_pair[..., others], plain.per_pair[..., others], atol=1e-12)
    assert not torch.allclose(part.per_pair[..., r], plain.per_pair[..., r])


def test_edge_results_and_errors(zoo_ioi):
    from edgeatp.tasks import make_task

    pairs = make_task("ioi", zoo_ioi.tokenizer, 6)
    res = attribute_edges(Setup(zoo_ioi, pairs), "atp")
    top = res.top(5)
    assert res[top[0][0]] == top[0][1] and res.signed_of(top[0][0]) == top[0][2]
    assert len(res.to_table()) == res.graph.n_edges
    assert bool((res.stderr[res.graph.full_mask] >= 0).all())
    assert bool(((res.sign_agreement >= 0.5) | ~res.graph.full_mask).all())
    with pytest.raises(EdgeatpError, match="method 'eap' is unknown"):
        attribute_edges(Setup(zoo_ioi, pairs), "eap")
    with pytest.raises(EdgeatpError, match="the graph has 3 positions but the prompts have 20"):
        attribute_edges(Setup(zoo_ioi, pairs), graph=EdgeGraph.from_shape(zoo_ioi.shape, n_positions=3))
    with pytest.raises(EdgeatpError, match="not a query or key reader"):
        attribute_edges(Setup(zoo_ioi, pairs), "atp-qk", qk_readers=[Node.parse("m1")])
    with pytest.raises(KeyError, match="name a position"):
        attribute_edges(Setup(zoo_ioi, pairs), positions=True)["a0.h0->m1"]
