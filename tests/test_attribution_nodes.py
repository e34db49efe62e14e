"""Node attribution (AtP, QK fix, GradDrop, AtP*) against exact activation patching."""

import pytest
import torch

from edgeatp.attribution.nodes import attribute_nodes
from edgeatp.errors import EdgeatpError
from edgeatp.graph import Node, node_set
from edgeatp.patching import patch_nodes
from edgeatp.setup import Setup

from .conftest import random_pairs, tiny_model
from .handbuilt import cancellation_model, cancellation_pairs, random_pairs_for, saturated_model


def test_atp_equals_patching_where_the_model_is_linear_in_the_node():
    adapter = tiny_model(seed=1, attn_only=True, normalization=None, n_layers=2)
    pairs = random_pairs(n=5)
    last = [n for n in node_set(adapter.shape, ["head", "v"], positions=7) if n.layer == 1 or n.kind.value == "head"]
    linear = [n for n in last if n.layer == 1]  # last-layer outputs and values feed the logits linearly
    est = attribute_nodes(Setup(adapter, pairs), "atp", nodes=linear)
    exact = patch_nodes(Setup(adapter, pairs), linear)
    assert torch.allclose(est.per_pair, exact.per_pair, atol=1e-10)
    assert float(exact.per_pair.abs().max()) > 1e-3


def test_qk_fix_is_exact_when_only_the_softmax_is_nonlinear():
    adapter = saturated_model(n_layers=1)
    pairs = random_pairs_for(adapter)
    nodes = list(node_set(adapter.shape, ["q", "k"], positions=6)) + list(node_set(adapter.shape, ["q", "k"]))
    fixed = attribute_nodes(Setup(adapter, pairs), "atp-qk", nodes=nodes)
    plain = attribute_nodes(Setup(adapter, pairs), "atp", nodes=nodes)
    exact = patch_nodes(Setup(adapter, pairs), nodes)
    assert torch.allclose(fixed.per_pair, exact.per_pair, atol=1e-9)
    err_plain = (plain.per_pair - exact.per_pair).abs().max()
    assert float(err_plain) > 0.1 * float(exact.per_pair.abs().max()), "the saturated case must defeat plain AtP"


def test_graddrop_recovers_an_effect_hidden_by_exact_cancellation():
    adapter, pairs = cancellation_model(), cancellation_pairs()
    node = [Node.parse("a0.h0")]
    exact = patch_nodes(Setup(adapter, pairs), node).per_pair
    plain = attribute_nodes(Setup(adapter, pairs), "atp", nodes=node)
    dropped = attribute_nodes(Setup(adapter, pairs), "atp-gd", nodes=node)
    assert float(exact) == pytest.approx(-1.0)
    assert float(plain.per_pair) == 0.0 and float(plain.scores) == 0.0
    # term 0 (the head's own layer) is 0; term 1 (MLP1 dropped) keeps only the direct path: |Δx · 1| = 2
    assert float(dropped.scores) == pytest.approx(2.0)
    assert dropped.meta["n_terms"] == 2 and dropped.cost.backwards == 3


def test_atp_star_ranks_true_top_nodes_better_on_saturated_attention():
    adapter = saturated_model(seed=2, n_layers=2)
    pairs = random_pairs_for(adapter, n=8, seed=3)
    nodes = list(node_set(adapter.shape, ["head", "q", "k", "v"], positions=6))
    truth = patch_nodes(Setup(adapter, pairs), nodes).mean.abs()
    k = 10
    top_true = set(torch.topk(truth, k).indices.tolist())
    def recall(method: str) -> int:
        s = attribute_nodes(Setup(adapter, pairs), method, nodes=nodes).scores
        return len(top_true & set(torch.topk(s, k).indices.tolist()))
    r_atp, r_qk, r_star = recall("atp"), recall("atp-qk"), recall("atp*")
    assert r_star >= r_atp and r_qk > r_atp, (r_atp, r_qk, r_star)


def test_results_carry_method_direction_metric_and_views(zoo_ioi):
    from edgeatp.tasks import make_task

    pairs = make_task("ioi", zoo_ioi.tokenizer, 8, seed=0)
    res = attribute_nodes(Setup(zoo_ioi, pairs, metric="logprob", direction="denoising"), "atp*")
    assert res.method == "atp*" and res.direction.value == "denoising" and res.metric == "logprob"
    assert "corrupt run with clean values patched in" in res.sign_convention
    top = res.top(3)
    assert top[0][1] >= top[1][1] >= top[2][1] and res[top[0][0]] == top[0][1]
    table = res.to_table(5)
    assert set(table[0]) == {"node", "score", "signed", "stderr", "sign_agreement"}
    assert res.per_pair.shape == (8, len(res.nodes)) and bool((res.scores >= 0).all())
    positional = attribute_nodes(Setup(zoo_ioi, pairs), "atp", nodes=["mlp"], positions=True)
    aggregated = attribute_nodes(Setup(zoo_ioi, pairs), "atp", nodes=["mlp"])
    assert torch.allclose(positional.per_pair.view(8, 2, -1).sum(-1), aggregated.per_pair, atol=1e-8)


def test_node_attribution_input_errors(zoo_ioi):
    from edgeatp.tasks import make_task

    pairs = make_task("ioi", zoo_ioi.tokenizer, 2)
    with pytest.raises(EdgeatpError, match="method 'atp\\+\\+' is unknown"):
        attribute_nodes(Setup(zoo_ioi, pairs), "atp++")
    with pytest.raises(EdgeatpError, match="zero gradient at the clean run"):
        attribute_nodes(Setup(zoo_ioi, pairs, metric="kl"))
    with pytest.raises(ValueError, match="layers 0..1"):
        attribute_nodes(Setup(zoo_ioi, pairs), nodes=["a7.h0"])
    with pytest.raises(EdgeatpError, match="only 20 positions"):
        attribute_nodes(Setup(zoo_ioi, pairs), nodes=["a0.h0@25"])
    kl = attribute_nodes(Setup(zoo_ioi, pairs, metric="kl", direction="denoising"), "atp", nodes=["m0"])
    assert float(kl.scores[0]) > 0
