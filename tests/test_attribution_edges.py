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


def _split_input_reference(adapter, pairs, drop=None):
    """Slow reference: per-edge Δw · grad of TransformerLens' split per-head inputs, edge by edge.
    ``drop`` (a GradDrop unit ``("block"|"attn"|"mlp", layer)``) takes the gradients from a full
    backward with that unit's residual write cut by a hook (value kept, gradient stopped)."""
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
        hooks = [(n, keep) for n in names]
        if drop is not None:
            kind, layer = drop
            parts = ["attn", "mlp"] if kind == "block" and not m.cfg.attn_only else ["attn" if kind == "block" else kind]
            hooks += [(f"blocks.{layer}.hook_{part}_out", lambda t, hook: t.detach()) for part in parts]
        get_metric("logit_diff")(m.run_with_hooks(batch.base, fwd_hooks=hooks), batch).sum().backward()
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
        name = (f"blocks.{r.layer}.hook_{r.kind.value}_input" if r.kind in (NodeKind.Q, NodeKind.K, NodeKind.V) else
                f"blocks.{r.layer}.hook_mlp_in" if r.kind is NodeKind.MLP else f"blocks.{L - 1}.hook_resid_post")
        got = store[name].grad if store[name].grad is not None else torch.zeros_like(store[name])  # cut: no gradient
        return got[:, :, r.head] if r.kind in (NodeKind.Q, NodeKind.K, NodeKind.V) else got
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


@pytest.mark.parametrize("mode", ["block", "sublayer"])
def test_truncated_graddrop_equals_full_backwards_with_the_write_cut(variant, mode):
    """Each dropped pass starts at the unit's input with the ordinary gradient of the residual it
    writes to; the reference runs a full backward per unit with the write cut by a hook."""
    from edgeatp.attribution.passes import nonzero_terms
    from edgeatp.methods import graddrop_units

    pairs = random_pairs(n=3)
    shape = variant.shape
    units = graddrop_units(shape.n_layers, shape.attn_only, mode)
    g = EdgeGraph.from_shape(shape)
    total = sum(_split_input_reference(variant, pairs, drop=u).abs() for u in units)
    n_terms = torch.tensor([nonzero_terms(units, {shape.block_of(r)}) for r in g.readers], dtype=torch.float64)
    fast = attribute_edges(Setup(variant, pairs), "atp-gd", graddrop=mode)
    assert torch.allclose(fast.per_pair_abs[:, 0], total / n_terms, atol=1e-10)
    assert torch.allclose(fast.per_pair[:, 0], _split_input_reference(variant, pairs), atol=1e-10)


def _prefix_pairs(n: int = 3, length: int = 7, start: int = 3, d_vocab: int = 20, seed: int = 1):
    """Pairs whose prompts agree before ``start`` (so every writer difference is zero there)."""
    from edgeatp.tasks.pairs import PromptPairs

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (n, length), generator=g)
    corrupt = clean.clone()
    corrupt[:, start:] = (clean[:, start:] + torch.randint(1, d_vocab, (n, length - start), generator=g)) % d_vocab
    return PromptPairs.from_lists(clean.tolist(), corrupt.tolist(), [1] * n, [[2, 3]] * n)


def _brute_force_qk(adapter, pairs, positions):
    """``[n, P, W, R]`` edge QK-fix reference for query and key readers: every (edge, position) is
    patched into TransformerLens' split per-head input and the whole pattern recomputed."""
    m = adapter.model
    g = EdgeGraph.from_shape(adapter.shape, n_positions=pairs.n_positions if positions else None)
    batch = pairs.batch(torch.arange(len(pairs)))
    L, T = m.cfg.n_layers, batch.base.shape[1]
    store = {}
    def keep(t, hook):
        t.retain_grad()
        store[hook.name] = t
    get_metric("logit_diff")(m.run_with_hooks(batch.base, fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", keep)
                                                                      for l in range(L)]), batch).sum().backward()
    m.zero_grad(set_to_none=True)
    _, cb = m.run_with_cache(batch.base)
    _, cs = m.run_with_cache(batch.source)
    def delta(w):
        if w.kind is NodeKind.HEAD:
            z = cs[f"blocks.{w.layer}.attn.hook_z"][:, :, w.head] - cb[f"blocks.{w.layer}.attn.hook_z"][:, :, w.head]
            return z @ m.blocks[w.layer].attn.W_O[w.head]
        key = "blocks.0.hook_resid_pre" if w.kind is NodeKind.INPUT else f"blocks.{w.layer}.hook_mlp_out"
        return cs[key] - cb[key]
    ref = torch.zeros(len(pairs), g.P, g.n_writers, g.n_readers, dtype=torch.float64)
    m.cfg.use_split_qkv_input = True
    try:
        for e in g.edges():
            r = e.reader
            if r.kind not in (NodeKind.Q, NodeKind.K) or (positions and e.position >= T):
                continue
            pattern = f"blocks.{r.layer}.attn.hook_pattern"
            d = delta(e.writer)
            if positions:
                d = torch.zeros_like(d).index_copy(1, torch.tensor([e.position]), d[:, e.position:e.position + 1])
            def add(act, hook, h=r.head, d=d):
                act = act.clone()
                act[:, :, h] += d
                return act
            new = {}
            with torch.no_grad():
                m.run_with_hooks(batch.base, fwd_hooks=[(f"blocks.{r.layer}.hook_{r.kind.value}_input", add),
                                                        (pattern, lambda t, hook: new.setdefault("p", t))])
            wi, ri = g.index_of(e)
            ref[:, e.position or 0, wi, ri] = ((new["p"] - store[pattern]) * store[pattern].grad).sum((1, 2, 3))
    finally:
        m.cfg.use_split_qkv_input = False
    return ref, g


@pytest.mark.parametrize("positions", [False, True])
@pytest.mark.parametrize("prefix", [False, True], ids=["random", "shared-prefix"])
def test_edge_qk_fix_equals_brute_force_on_every_architecture(variant, positions, prefix):
    """The factored projections, skipped shared prefix and rotary offsets against whole-pattern
    recomputation with the patched per-head input (queries, shared keys, all positions or one)."""
    if positions and not (prefix and variant.cfg.positional_embedding_type == "rotary"):
        pytest.skip("per-position brute force is slow: run where it matters most (rotary offsets after a prefix)")
    pairs = _prefix_pairs(n=2, length=6) if prefix else random_pairs(n=3)
    ref, g = _brute_force_qk(variant, pairs, positions)
    fixed = attribute_edges(Setup(variant, pairs), "atp-qk", positions=positions).per_pair
    qk = torch.tensor([r.kind in (NodeKind.Q, NodeKind.K) for r in g.readers])
    assert torch.allclose(fixed[..., qk], ref[..., qk], atol=1e-10)
    assert float(ref[..., qk].abs().max()) > 1e-3
    if prefix:
        assert float(fixed[:, :3].abs().max()) == 0.0 if positions else True
        linear = attribute_edges(Setup(variant, pairs), "atp").per_pair[:, 0]
        assert torch.allclose(linear, _split_input_reference(variant, pairs), atol=1e-10)


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


@pytest.mark.parametrize("path", ["factored", "dense", "no-closed-form"])
def test_edge_qk_fix_projection_paths_agree(variant, path, monkeypatch):
    """The three ways of projecting patched residuals (writer factors through the folded
    projection, dense differences, or the norm module itself) give the brute-force numbers."""
    from edgeatp.attribution import qk_edges
    from edgeatp.model.adapter import ModelAdapter

    if path == "no-closed-form":
        monkeypatch.setattr(ModelAdapter, "normed_projection", lambda self, *args, **kwargs: None)
    else:
        monkeypatch.setattr(qk_edges, "_factored_is_cheaper", lambda rank, d, rows: path == "factored")
    pairs = _prefix_pairs(start=2)
    ref, g = _brute_force_qk(variant, pairs, positions=False)
    qk = torch.tensor([r.kind in (NodeKind.Q, NodeKind.K) for r in g.readers])
    fixed = attribute_edges(Setup(variant, pairs), "atp-qk").per_pair
    assert torch.allclose(fixed[..., qk], ref[..., qk], atol=1e-10)
