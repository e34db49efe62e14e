"""The exact patching engine against independent, naive implementations."""

import pytest
import torch

from edgeatp.graph import Edge, EdgeGraph, Node, node_set
from edgeatp.metrics import get_metric
from edgeatp.model import load_model
from edgeatp.patching import edge_sources, patch_edges, patch_nodes, run_circuit, weighted_run
from edgeatp.tasks import make_task
from edgeatp.tasks.pairs import PromptPairs
from edgeatp.zoo import ZOO, read_reference
from edgeatp.zoo.reference import TABLE_PAIRS, TABLE_SEED, reference_nodes
from edgeatp.setup import Setup

from .conftest import random_pairs, tiny_model

HOOK = {"head": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v",
        "mlp": "hook_mlp_out", "neuron": "mlp.hook_post"}


def naive_node_effect(adapter, pairs: PromptPairs, node: Node, direction: str = "noising") -> torch.Tensor:
    """One pair, one node, one forward at a time, with plain TransformerLens hooks."""
    model, metric = adapter.model, get_metric("logit_diff")
    out = []
    for i in range(len(pairs)):
        batch = pairs.batch(torch.tensor([i]), direction)
        name = "blocks.0.hook_resid_pre" if node.kind.value == "input" else f"blocks.{node.layer}.{HOOK[node.kind.value]}"
        _, cache = model.run_with_cache(batch.source, names_filter=[name])
        src = cache[name]
        pos = slice(None) if node.position is None else node.position
        idx = node.head if node.is_attention else node.neuron

        def hook(act, hook):
            act = act.clone()
            if idx is None:
                act[:, pos] = src[:, pos]
            else:
                act[:, pos, idx] = src[:, pos, idx]
            return act
        with torch.no_grad():
            base = metric(model(batch.base), batch)
            patched = metric(model.run_with_hooks(batch.base, fwd_hooks=[(name, hook)]), batch)
        out.append(float(patched - base))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_batched_node_sweep_equals_naive_loop(variant, direction):
    pairs = random_pairs(n=4, length=6)
    fams = ["head", "q", "k", "v", "input"] + (["mlp", "neuron"] if variant.shape.has_mlp else [])
    nodes = list(node_set(variant.shape, fams))[::3] + list(node_set(variant.shape, fams, positions=6))[::17]
    fast = patch_nodes(Setup(variant, pairs, direction=direction, batch_size=7), nodes)
    for j, node in enumerate(nodes):
        assert torch.allclose(fast.per_pair[:, j], naive_node_effect(variant, pairs, node, direction), atol=1e-10), node.name
    assert fast.n_forwards < len(nodes) * len(pairs)


def test_joint_patch_of_several_nodes_and_variable_lengths():
    adapter = tiny_model(seed=1)
    pairs = PromptPairs.from_lists([[1, 2, 3, 4], [5, 6, 7]], [[1, 9, 3, 8], [5, 9, 7]], [1, 2], [3, 4])
    both = patch_nodes(Setup(adapter, pairs), [[Node.parse("a0.h0"), Node.parse("m1")]])
    only_first = patch_nodes(Setup(adapter, pairs.subset([0])), [[Node.parse("a0.h0"), Node.parse("m1")]])
    assert torch.allclose(both.per_pair[0], only_first.per_pair[0])
    assert both.labels == ("a0.h0+m1",)


def test_patching_with_own_values_changes_nothing(variant):
    pairs = random_pairs(n=3)
    same = PromptPairs.from_lists(pairs.clean.tolist(), pairs.clean.tolist(), [1] * 3, [2] * 3)
    eff = patch_nodes(Setup(variant, same), list(node_set(variant.shape, ["head", "q", "k", "v"])))
    assert eff.per_pair.abs().max() < 1e-12  # stacked batches may round differently, nothing more
    g = EdgeGraph.from_shape(variant.shape)
    assert patch_edges(Setup(variant, same), g, list(g.edges())).per_pair.abs().max() < 1e-12


def test_all_outgoing_edges_equal_the_writer_node(variant):
    pairs = random_pairs(n=4)
    g = EdgeGraph.from_shape(variant.shape)
    for w, writer in enumerate(g.writers):
        out_edges = [g.edge(w, r) for r in range(g.n_readers) if g.mask[w, r]]
        node = patch_nodes(Setup(variant, pairs), [writer]).per_pair[:, 0]
        edges = patch_edges(Setup(variant, pairs), g, [out_edges]).per_pair[:, 0]
        assert torch.allclose(node, edges, atol=1e-10), writer.name


def naive_edge_effect(adapter, pairs: PromptPairs, edge: Edge) -> torch.Tensor:
    """Edge patch through TransformerLens' split q/k/v inputs: the reader's own input copy gets Δw."""
    m = adapter.model
    saved = (m.cfg.use_split_qkv_input, m.cfg.use_attn_result, m.cfg.use_hook_mlp_in)
    m.cfg.use_split_qkv_input = m.cfg.use_attn_result = True
    m.cfg.use_hook_mlp_in = not m.cfg.attn_only
    metric = get_metric("logit_diff")
    w, r = edge.writer, edge.reader

    def write(cache):
        if w.kind.value == "input":
            return cache["blocks.0.hook_resid_pre"]
        if w.kind.value == "head":
            return cache[f"blocks.{w.layer}.attn.hook_result"][:, :, w.head]
        return cache[f"blocks.{w.layer}.hook_mlp_out"]
    out = []
    try:
        for i in range(len(pairs)):
            batch = pairs.batch(torch.tensor([i]))
            _, cb = m.run_with_cache(batch.base)
            _, cs = m.run_with_cache(batch.source)
            delta = write(cs) - write(cb)
            pos = slice(None) if edge.position is None else edge.position
            if r.kind.value in "qkv":
                name = f"blocks.{r.layer}.hook_{r.kind.value}_input"
                def hook(act, hook):
                    act = act.clone()
                    act[:, pos, r.head] += delta[:, pos]
                    return act
            else:
                name = f"blocks.{r.layer}.hook_mlp_in" if r.kind.value == "mlp" else f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"
                def hook(act, hook):
                    act = act.clone()
                    act[:, pos] += delta[:, pos]
                    return act
            with torch.no_grad():
                base = metric(m(batch.base), batch)
                patched = metric(m.run_with_hooks(batch.base, fwd_hooks=[(name, hook)]), batch)
            out.append(float(patched - base))
    finally:
        m.cfg.use_split_qkv_input, m.cfg.use_attn_result, m.cfg.use_hook_mlp_in = saved
    return torch.tensor(out, dtype=torch.float64)


def test_batched_edge_patches_equal_split_input_reference(variant):
    pairs = random_pairs(n=3, length=6)
    g = EdgeGraph.from_shape(variant.shape)
    edges = list(g.edges())[::5] + [Edge(e.writer, e.reader, 2) for e in list(g.edges())[1::11]]
    fast = patch_edges(Setup(variant, pairs, batch_size=16), g, edges)
    for j, e in enumerate(edges):
        assert torch.allclose(fast.per_pair[:, j], naive_edge_effect(variant, pairs, e), atol=1e-10), e.name


def test_whole_circuit_runs():
    adapter = tiny_model(seed=2)
    pairs = random_pairs(n=4)
    g = EdgeGraph.from_shape(adapter.shape)
    full, empty = g.full_mask.clone(), torch.zeros_like(g.full_mask)
    keep_all = run_circuit(Setup(adapter, pairs), g, full)
    assert keep_all.per_pair.abs().max() < 1e-12
    nothing = run_circuit(Setup(adapter, pairs), g, empty).per_pair[:, 0]
    corrupt = pairs.batch(torch.arange(4))
    metric = get_metric("logit_diff")
    with torch.no_grad():
        gap = metric(adapter.forward(corrupt.source), corrupt) - metric(adapter.forward(corrupt.base), corrupt)
    assert torch.allclose(nothing, gap.double(), atol=1e-10), "no edges kept = the corrupt run"
    knocked = run_circuit(Setup(adapter, pairs), g, full, knockout=True).per_pair[:, 0]
    assert torch.allclose(knocked, nothing, atol=1e-10)


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_weighted_runs_at_zero_one_equal_whole_circuit_runs_and_have_exact_gradients(variant, direction):
    pairs = random_pairs(n=4, length=6)
    setup = Setup(variant, pairs, direction=direction)
    g = EdgeGraph.from_shape(variant.shape)
    keep = (torch.rand(3, *g.full_mask.shape, generator=torch.Generator().manual_seed(0)) < 0.5) & g.full_mask
    exact = run_circuit(setup, g, keep)
    batch = pairs.batch(torch.arange(4), direction)
    source = edge_sources(setup, g, batch)
    weights = (~keep).double().requires_grad_()
    values = weighted_run(setup, g, batch, weights, source)
    assert torch.allclose(values.T.double() - exact.base_metric[:, None], exact.per_pair, atol=1e-10)
    plain = weighted_run(setup, g, batch, (~keep).double(), source)  # no gradient: only set edges are touched
    assert torch.allclose(plain, values.detach(), atol=1e-12)
    grad, = torch.autograd.grad(values[0].sum(), weights)
    for p, w, r in g.all_coords[::7].tolist():
        step = torch.zeros_like(weights)
        step[0, p, w, r] = 1e-6
        with torch.no_grad():
            fd = (weighted_run(setup, g, batch, weights + step, source)[0].sum()
                  - weighted_run(setup, g, batch, weights - step, source)[0].sum()) / 2e-6
        assert abs(float(grad[0, p, w, r]) - float(fd)) < 1e-6 * max(1.0, abs(float(fd))), (p, w, r)
    assert float(grad[1:].abs().max()) == 0.0, "each row's metric depends on its own weights only"


def test_a_weight_is_the_fraction_of_the_delta_applied():
    adapter = tiny_model(seed=3, attn_only=True, normalization=None)  # logits linear in the residual
    pairs = random_pairs(n=3)
    setup = Setup(adapter, pairs)
    g = EdgeGraph.from_shape(adapter.shape)
    w, r = g.index_of("a1.h0->logits")
    batch = pairs.batch(torch.arange(3))
    source = edge_sources(setup, g, batch)
    weights = torch.zeros(3, *g.full_mask.shape, dtype=torch.float64)
    weights[:, 0, w, r] = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    with torch.no_grad():
        m0, m3, m1 = weighted_run(setup, g, batch, weights, source)
    assert torch.allclose(m3, 0.7 * m0 + 0.3 * m1, atol=1e-10)
    full = patch_edges(setup, g, [Edge.parse("a1.h0->logits")]).per_pair[:, 0]
    assert torch.allclose((m1 - m0).double(), full, atol=1e-10)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_reference_tables_are_reproduced(name):
    adapter = load_model(f"zoo:{name}")
    table = read_reference(name)
    assert table["n_pairs"] == TABLE_PAIRS and table["seed"] == TABLE_SEED
    pairs = make_task(table["task"], adapter.tokenizer, TABLE_PAIRS, seed=TABLE_SEED)
    nodes = reference_nodes(adapter, pairs.n_positions)
    assert [n.name for n in nodes] == list(table["noising"]["nodes"])
    sample = nodes[: 4 * adapter.shape.n_heads * adapter.shape.n_layers] + nodes[::25]
    for direction in ("noising", "denoising"):
        eff = patch_nodes(Setup(adapter, pairs, direction=direction, batch_size=256), sample)
        for n, mean in zip(sample, eff.mean.tolist()):
            assert mean == pytest.approx(table[direction]["nodes"][n.name][0], abs=2e-5), (direction, n.name)
        g = EdgeGraph.from_shape(adapter.shape)
        edges = list(g.edges())
        eff = patch_edges(Setup(adapter, pairs, direction=direction, batch_size=256), g, edges)
        for e, mean in zip(edges, eff.mean.tolist()):
            assert mean == pytest.approx(table[direction]["edges"][e.name][0], abs=2e-5), (direction, e.name)
