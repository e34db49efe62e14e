"""Pruning, connectivity, verification against exact patching, faithfulness on the zoo."""

import pytest
import torch

import edgeatp as ea
from edgeatp.circuit import (Check, connected, node_circuit, prune, select_cumulative, select_greedy, select_threshold,
                             select_top_k)
from edgeatp.errors import EdgeatpError
from edgeatp.graph import Edge, EdgeGraph, ModelShape, Node
from edgeatp.patching import run_circuit
from edgeatp.scores import EdgeScores
from edgeatp.setup import Setup
from edgeatp.tasks.pairs import Direction
from edgeatp.verification import faithfulness_curve, measure, same_sign, summarise, verify, verify_nodes

SHAPE = ModelShape(2, 2, 8, 4, 16)


def fake_scores(values: dict[str, float]) -> EdgeScores:
    g = EdgeGraph.from_shape(SHAPE)
    t = torch.zeros(1, 1, g.n_writers, g.n_readers, dtype=torch.float64)
    for name, v in values.items():
        w, r = g.index_of(name)
        t[0, 0, w, r] = v
    return EdgeScores.from_per_pair(t, None, "test", Direction.NOISING, "logit_diff", g)


CHAIN = {"input->a0.h0<v>": -3.0, "a0.h0->a1.h1<k>": 2.0, "a1.h1->logits": -1.5, "m0->logits": 0.5,
         "a0.h1->m1": 4.0, "input->m0": 0.25}


def names(mask: torch.Tensor, scores: EdgeScores) -> set[str]:
    return {scores.graph.edge(w, r).name for _, w, r in mask.nonzero().tolist()}


def test_selection_rules():
    s = fake_scores(CHAIN)
    assert names(select_top_k(s, 2), s) == {"a0.h1->m1", "input->a0.h0<v>"}
    assert names(select_threshold(s, 1.5), s) == {"a0.h1->m1", "input->a0.h0<v>", "a0.h0->a1.h1<k>", "a1.h1->logits"}
    total = sum(abs(v) for v in CHAIN.values())
    assert names(select_cumulative(s, 7.0 / total), s) == {"a0.h1->m1", "input->a0.h0<v>"}
    assert names(select_greedy(s, 3), s) == {"a1.h1->logits", "a0.h0->a1.h1<k>", "input->a0.h0<v>"}
    with pytest.raises(EdgeatpError, match="exactly one of"):
        prune(s, top_k=2, threshold=1.0)
    with pytest.raises(EdgeatpError, match="non-negative"):
        select_threshold(s, -1)


def test_connectivity_keeps_only_input_to_logits_paths():
    s = fake_scores(CHAIN)
    kept = names(connected(s.graph, select_top_k(s, 6)), s)
    assert kept == {"input->a0.h0<v>", "a0.h0->a1.h1<k>", "a1.h1->logits", "m0->logits", "input->m0"}
    assert "a0.h1->m1" not in kept  # a0.h1 is fed by nothing and m1 feeds nothing
    c = prune(s, top_k=6)
    assert [e.name for e in c.edges()][0] == "input->a0.h0<v>"
    assert {n.name for n in c.nodes()} == {"input", "a0.h0", "m0", "a1.h1", "logits"}


def test_verification_numbers_equal_exact_patching(zoo_ioi):
    pairs = ea.make_task("ioi", zoo_ioi.tokenizer, 16, seed=4)
    scores = ea.attribute_edges(Setup(zoo_ioi, pairs), "atp-qk")
    circuit = prune(scores, top_k=10)
    v = verify(Setup(zoo_ioi, pairs), circuit, scores, top=6, sample_below=5, seed=1)
    exact = ea.patch_edges(Setup(zoo_ioi, pairs), scores.graph, [Edge.parse(c.name) for c in v.checks])
    assert [c.exact for c in v.checks] == pytest.approx(exact.mean.tolist(), abs=1e-9)
    assert [c.estimate for c in v.checks[:6]] == pytest.approx([scores.signed_of(e) for e, *_ in scores.top(6)])
    assert v.largest_miss_size == pytest.approx(max(abs(c.estimate - c.exact) for c in v.checks))
    assert v.outside_max == pytest.approx(max(abs(c.exact) for c in v.checks if not c.in_circuit))
    assert v.outside_checked == sum(not c.in_circuit for c in v.checks) and v.n_ranked == 6
    assert all(not c.in_circuit for c in v.checks[6:])
    nodes = ea.attribute_nodes(Setup(zoo_ioi, pairs), "atp-qk")
    nc = node_circuit(nodes, scores.graph, top_k=3)
    vn = verify_nodes(Setup(zoo_ioi, pairs), nc, nodes, top=4, sample_below=2)
    exact_n = ea.patch_nodes(Setup(zoo_ioi, pairs), [Node.parse(c.name) for c in vn.checks])
    assert [c.exact for c in vn.checks] == pytest.approx(exact_n.mean.tolist(), abs=1e-9)


def test_edge_bound_runs_and_reports(zoo_induction):
    pairs = ea.make_task("induction", zoo_induction.tokenizer, 16, seed=4)
    scores = ea.attribute_edges(Setup(zoo_induction, pairs), "atp-qk")
    circuit = prune(scores, top_k=8)
    v = verify(Setup(zoo_induction, pairs), circuit, scores, top=8, sample_below=4, bound=True, bound_samples=300, bound_p=0.05)
    assert v.bound is not None and v.bound >= v.outside_max - 1e-9
    assert v.bound_alpha == 0.05


# The sizes stated in the README's zoo table: faithfulness >= 0.8 and the known mechanism inside.
ZOO_BAR = {"induction": (8, {"a0.h1->a1.h0<k>", "a0.h1->a1.h1<k>", "input->a0.h1<v>"}),
           "ioi": (16, {"input->a0.h1<v>", "input->a0.h3<v>", "m0->logits", "m1->logits"}),
           "dup": (48, {"a1.h1->logits", "a1.h0->logits"}),
           "llama-induction": (28, {"a0.h0->a1.kv0<k>", "a0.h0->a1.kv1<k>", "input->a0.kv0<v>", "a1.h0->m1",
                                    "a1.h2->m1", "a1.h3->m1", "m1->logits"})}


@pytest.mark.parametrize("name", list(ZOO_BAR))
def test_zoo_circuits_are_faithful_and_contain_the_known_mechanism(name):
    model = ea.load_model(f"zoo:{name}")
    pairs = ea.make_task(model.card["task"], model.tokenizer, 64, seed=0)
    scores = ea.attribute_edges(Setup(model, pairs), "atp-qk")
    size, mechanism = ZOO_BAR[name]
    circuit = prune(scores, top_k=size)
    measured = measure(Setup(model, pairs), circuit)
    assert measured.faithfulness >= 0.8, measured.faithfulness
    assert measured.necessity < 0.5
    assert mechanism <= {e.name for e in circuit.edges()}
    curve = faithfulness_curve(Setup(model, pairs), scores, [size])
    assert curve.faithfulness[0] == pytest.approx(measured.faithfulness, abs=1e-6)


def test_denoising_faithfulness_uses_the_same_circuit_semantics(zoo_ioi):
    pairs = ea.make_task("ioi", zoo_ioi.tokenizer, 16, seed=5)
    s_noise = ea.attribute_edges(Setup(zoo_ioi, pairs), "atp")
    full = prune(s_noise, top_k=s_noise.graph.n_edges, cleanup=False)
    assert measure(Setup(zoo_ioi, pairs), full).faithfulness == pytest.approx(1.0, abs=1e-6)
    s_denoise = ea.attribute_edges(Setup(zoo_ioi, pairs, direction="denoising"), "atp")
    full_d = prune(s_denoise, top_k=s_denoise.graph.n_edges, cleanup=False)
    f = measure(Setup(zoo_ioi, pairs, direction="denoising"), full_d)
    assert f.faithfulness == pytest.approx(1.0, abs=1e-6) and f.necessity == pytest.approx(0.0, abs=1e-6)


def test_circuits_over_coarse_groups(zoo_ioi):
    from edgeatp.attribution.grouping import attribute_groups, coarse_edges, layer_groups
    from edgeatp.circuit import coarse_edge_circuit, group_circuit

    pairs = ea.make_task("ioi", zoo_ioi.tokenizer, 16, seed=6)
    groups = attribute_groups(Setup(zoo_ioi, pairs), layer_groups(zoo_ioi.shape), "atp-qk")
    graph = EdgeGraph.from_shape(zoo_ioi.shape)
    c = group_circuit(groups, graph, top_k=2)
    best = [g for g, *_ in groups.top(2)]
    assert [u.name for u in c.units_of("group") if u.in_circuit] == [g.name for g in best]
    members = {m.head_node.component.name for g in best for m in g.members}
    assert c.level == "group" and len(c.units) == len(groups.groups)
    assert {n.name for n in c.nodes()} <= members | {"input", "logits"}
    fine = ea.attribute_edges(Setup(zoo_ioi, pairs), "atp-qk")
    coarse = coarse_edges(fine)
    ce = coarse_edge_circuit(coarse, fine, top_k=3, cleanup=False)
    names = dict((n, (i, j)) for n, i, j in coarse.names())
    union = torch.zeros_like(graph.full_mask)
    for name, *_ in coarse.top(3):
        union[0] |= coarse.members[names[name]]
    kept = [u.name for u in ce.units_of("coarse_edge") if u.in_circuit]
    assert torch.equal(ce.in_graph, union) and kept == [n for n, *_ in coarse.top(3)]


def test_neuron_circuits_keep_their_neuron_edges(zoo_ioi):
    pairs = ea.make_task("ioi", zoo_ioi.tokenizer, 8, seed=7)
    scores = ea.attribute_edges(Setup(zoo_ioi, pairs), "atp", neurons=True)
    circuit = prune(scores, top_k=200)
    kept_writers = {e.writer.kind.value for e in circuit.edges()}
    assert "neuron" in kept_writers, kept_writers
    assert any(e.reader.name in ("m0", "m1") for e in circuit.edges()), "neurons read through their MLP's input"
    greedy = prune(scores, greedy=30)
    assert any(e.writer.kind.value == "neuron" for e in greedy.edges())


def test_positional_circuits_on_prompts_of_different_lengths():
    from .conftest import tiny_model

    adapter = tiny_model(seed=21)
    pairs = ea.PromptPairs.from_lists([[1, 2, 3, 4, 5], [6, 7, 8]], [[1, 9, 3, 4, 5], [6, 9, 8]], [1, 2], [3, 4])
    scores = ea.attribute_edges(Setup(adapter, pairs), "atp", positions=True)
    circuit = prune(scores, top_k=10)
    one = measure(Setup(adapter, pairs, batch_size=1), circuit)
    two = measure(Setup(adapter, pairs, batch_size=2), circuit)  # padded batch: same answer
    assert one.faithfulness == pytest.approx(two.faithfulness, abs=1e-9)
    assert one.necessity == pytest.approx(two.necessity, abs=1e-9)
    full = run_circuit(Setup(adapter, pairs, batch_size=1), scores.graph, scores.graph.full_mask.clone())
    assert full.per_pair.abs().max() < 1e-12  # a single position-resolved mask, not a stack of five
    late = ea.patch_nodes(Setup(adapter, pairs, batch_size=1), [Node.parse("a1.h0@4")])
    assert late.per_pair[1, 0] == 0.0  # position 4 does not exist in the 3-token pair
    with pytest.raises(KeyError, match="positions 0..4"):
        ea.patch_edges(Setup(adapter, pairs), scores.graph, [Edge.parse("a0.h0->m1@7")])


def test_sign_agreement_rules():
    assert same_sign(1.0, 2.0) and same_sign(-1.0, -0.5) and same_sign(0.0, 0.0)
    assert not same_sign(0.0, -1.0) and not same_sign(1.0, -1.0)
    only_sample = summarise((Check("a->b", 1.0, 2.0, 1.0, False),), 0)
    assert only_sample.sign_agreement != only_sample.sign_agreement  # NaN: nothing was ranked


def test_kl_sign_convention_is_reversed():
    from edgeatp.metrics import sign_convention

    assert "negative = the patch destroys" in sign_convention("noising", "logit_diff")
    assert "positive = the patch destroys" in sign_convention("noising", "kl")
    assert "negative = the patch restores" in sign_convention("denoising", "kl")
