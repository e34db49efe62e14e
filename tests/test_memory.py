"""The memory budget: what a prompt pair costs during attribution, batches that fit the budget,
and activation caches kept in host memory (``offload``) — with the same results every way."""

import json

import pytest
import torch

import edgeatp as ea
from edgeatp.attribution import attribute_edges, attribute_nodes
from edgeatp.attribution.edges import EdgePlan
from edgeatp.attribution.passes import gradient_run
from edgeatp.methods import graddrop_units
from edgeatp.errors import EdgeatpError
from edgeatp.graph import EdgeGraph
from edgeatp.memory import MB, HostCache, cache_mb_per_pair, gradient_run_flags, saved_bytes, sweep_bytes
from edgeatp.patching import EdgePatch, NodePatch, circuit_load, edge_masks, patch_edges, patch_nodes
from edgeatp.research.measure import measure
from edgeatp.setup import Setup
from edgeatp.verification import faithfulness_curve
from edgeatp.tasks import make_task

from .conftest import random_pairs, tiny_model
from .test_precision import gpt2_shaped, random_task


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _saved_mb(setup: Setup, needs, n: int) -> float:
    """Megabytes of the tensors autograd saves for the backward pass of one ``n``-pair gradient run."""
    batch = next(iter(setup.with_(batch_size=n).batches("measure")))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gradient_run(setup, batch, needs)
    return sum(seen.values()) / MB


@pytest.mark.parametrize("name", ["ioi", "dup", "induction", "llama-induction", "gpt2-shaped"])
def test_per_pair_estimates_bound_what_a_gradient_run_keeps(name):
    """Cached activations and gradients (exact up to GradDrop's truncated passes) and the autograd
    graph (measured as the growth of autograd's saved tensors from 4 to 8 pairs, weights frozen) are
    bounded by the estimates the budget divides by, within 2× (the graph within 2.5×: tiny models keep
    relatively less than the per-token rule counts)."""
    if name == "gpt2-shaped":
        model, pairs = gpt2_shaped(0), random_task(64, n=8)
    else:
        model = ea.load_model(f"zoo:{name}")
        pairs = make_task({"llama-induction": "induction"}.get(name, name), model.tokenizer, 8, seed=0)
    setup = Setup(model, pairs, batch_size=8)
    size = torch.empty((), dtype=model.dtype).element_size()
    for qk, graddrop in ((False, False), (True, False), (True, True)):
        plan = EdgePlan.build(model, EdgeGraph.from_shape(model.shape), qk)
        units = graddrop_units(model.shape.n_layers, model.shape.attn_only) if graddrop else []
        batch = next(iter(setup.batches("measure")))
        run = gradient_run(setup, batch, plan.needs, units)
        kept = (_nbytes(run.source) + _nbytes(run.point) + sum(_nbytes(g) for g in run.grads)) / MB / len(batch)
        n = plan.needs
        estimate = cache_mb_per_pair(model.shape, size, pairs.n_positions, n.act, n.base, n.grad, 1 + len(units))
        assert kept <= estimate <= (1.7 if graddrop else 1.1) * kept, (qk, graddrop, kept, estimate)
    saved = (_saved_mb(setup, plan.needs, 8) - _saved_mb(setup, plan.needs, 4)) / 4
    graph = saved_bytes(model.spec, 1, pairs.n_positions, *gradient_run_flags(plan.needs.base, plan.needs.grad)) / MB
    assert saved <= graph <= 2.5 * saved, (saved, graph)


def test_a_smaller_budget_means_smaller_batches_and_the_same_scores():
    model = tiny_model(seed=2)
    pairs = random_pairs(n=12, length=8)
    setup = Setup(model, pairs, batch_size=12)
    per_pair = setup.device_mb_per_pair(EdgePlan.build(model, EdgeGraph.from_shape(model.shape), True).needs, 1)
    full = attribute_edges(setup, "atp-qk")
    assert full.meta["batch_size"] == 12
    for pairs_that_fit in (5, 2):
        budget = pairs_that_fit * per_pair * 1.01
        bounded = attribute_edges(setup.with_(memory_budget_mb=budget), "atp-qk")
        assert 1 <= bounded.meta["batch_size"] <= pairs_that_fit
        assert bounded.meta["peak_buffer_mb"] <= budget + 0.05  # reported to 0.1 MB
        torch.testing.assert_close(bounded.scores, full.scores, rtol=1e-12, atol=0)
        nodes = attribute_nodes(setup.with_(memory_budget_mb=budget), "atp*")
        assert nodes.meta["batch_size"] <= pairs_that_fit
        torch.testing.assert_close(nodes.scores, attribute_nodes(setup, "atp*").scores, rtol=1e-12, atol=0)
    tiny = attribute_edges(setup.with_(memory_budget_mb=1e-6), "atp*")  # not even one pair fits: one at a time
    assert tiny.meta["batch_size"] == 1 and tiny.meta["writer_chunk"] == 1
    with pytest.raises(EdgeatpError, match="memory_budget_mb"):
        setup.with_(memory_budget_mb=0.0)


def test_offloaded_caches_give_the_same_results_and_leave_room_for_more_pairs():
    model = tiny_model(seed=4, rotary=True, normalization="RMS")
    pairs = random_pairs(n=6, length=7)
    here, away = Setup(model, pairs, batch_size=3), Setup(model, pairs, batch_size=3, offload=True)
    for method in ("atp*", "ig"):
        torch.testing.assert_close(attribute_edges(away, method, ig_steps=2).scores,
                                   attribute_edges(here, method, ig_steps=2).scores, rtol=0, atol=0)
    torch.testing.assert_close(attribute_nodes(away, "atp*").scores, attribute_nodes(here, "atp*").scores, rtol=0, atol=0)
    g = EdgeGraph.from_shape(model.shape)
    edges = [(w, r) for w, r in zip(*g.mask.nonzero(as_tuple=True))][:5]
    sets = torch.zeros(len(edges), g.P, g.n_writers, g.n_readers, dtype=torch.bool)
    for i, (w, r) in enumerate(edges):
        sets[i, :, w, r] = True
    torch.testing.assert_close(patch_edges(away, g, sets).per_pair, patch_edges(here, g, sets).per_pair, rtol=0, atol=0)
    needs = EdgePlan.build(model, g, True).needs
    assert away.device_mb_per_pair(needs, 3) < here.device_mb_per_pair(needs, 3)


def test_a_small_budget_bounds_exact_patching_and_faithfulness_with_the_same_numbers():
    """Exact edge and node patching and the faithfulness curve stack fewer pairs and patch sets per forward
    under a small budget: the measured peak stays within the rule's bound (the budget, or one row when not
    even that fits, plus the host's masks and results) and every number equals the unbounded run's."""
    model = ea.load_model("zoo:ioi")
    pairs = make_task("ioi", model.tokenizer, 8, seed=0)
    wide = Setup(model, pairs, batch_size=32)
    scores = attribute_edges(wide, "atp")
    graph, T, n = scores.graph, pairs.n_positions, len(pairs)
    top = [e for e, *_ in scores.top(12)]
    nodes = [w for w in graph.writers if w.kind.value != "input"]
    dense = graph.P * graph.n_writers * graph.n_readers
    runs = {  # a sweep, its load, and the host bytes it keeps besides the device's (masks, results)
        "edges": (lambda s: patch_edges(s, graph, top),
                  EdgePatch(model, graph, edge_masks(graph, [[e] for e in top])).load(T), 2 * 12 * dense + 8 * n * 13),
        "nodes": (lambda s: patch_nodes(s, nodes), NodePatch(model, [[x] for x in nodes], T).load(T),
                  8 * n * (len(nodes) + 1)),
        "curve": (lambda s: faithfulness_curve(s, scores, [4, 8, 16]), circuit_load(wide, graph),
                  4 * 3 * dense + 8 * n * 4),
    }
    for name, (run, load, host) in runs.items():
        full, unbounded = measure(wide, lambda: run(wide))
        one_row = sweep_bytes(model.spec, T, load, 1, 1, False) / MB
        for budget in (3 * one_row, 1e-3):  # about three rows, and not even one
            tight = wide.with_(memory_budget_mb=budget)
            pairs_per_batch, sets = tight.stacking(load)
            assert pairs_per_batch * sets <= (3 if budget > one_row else 1), (name, budget)
            got, bounded = measure(tight, lambda: run(tight))
            assert bounded.peak_mb <= max(budget, one_row) + host / MB, (name, budget, bounded.peak_mb)
            assert bounded.peak_mb < unbounded.peak_mb / 3, (name, budget)
            if name == "curve":
                assert got == full
            else:
                assert torch.equal(got.per_pair, full.per_pair) and torch.equal(got.base_metric, full.base_metric)
                assert got.n_forwards > full.n_forwards


def test_host_cache_keeps_detached_host_copies_and_hands_them_back_where_they_came_from():
    cache = HostCache()
    x = torch.randn(3, 4, requires_grad=True) * 2
    cache["x"] = x
    assert cache._kept["x"][0].device.type == "cpu" and not cache._kept["x"][0].requires_grad
    back = cache["x"]
    assert back.device == x.device and torch.equal(back, x.detach()) and not back.requires_grad
    assert list(cache) == ["x"] and len(cache) == 1 and cache.get("y") is None
    del cache["x"]
    assert len(cache) == 0


def test_memory_budget_and_offload_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from edgeatp.cli import main

    args = ["discover", "--model", "zoo:induction", "--n-pairs", "8", "--format", "json", "--verify", "0"]
    plain = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    tight = CliRunner().invoke(main, [*args, "--memory-budget", "0.05", "--offload", "--out", str(tmp_path / "b")])
    assert plain.exit_code == 0 and tight.exit_code == 0, (plain.output, tight.output)
    a, b = (json.loads((tmp_path / d / "circuit.json").read_text()) for d in "ab")
    assert a["edges"]["in_graph"] == b["edges"]["in_graph"]
    sa, sb = torch.tensor(a["edges"]["score"]), torch.tensor(b["edges"]["score"])
    assert float((sa - sb).abs().max()) <= 1e-6 * float(sa.abs().max())  # float32, other batches
    bad = CliRunner().invoke(main, [*args, "--memory-budget", "0", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "--memory-budget" in bad.output
    help_text = CliRunner().invoke(main, ["discover", "--help"]).output
    assert "--memory-budget" in help_text and "--offload" in help_text
