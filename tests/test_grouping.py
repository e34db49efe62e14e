"""Coarser nodes: group scores, joint QK recomputation, exact group patching, coarse-to-fine."""

import json

import pytest
import torch

from edgeatp.attribution.grouping import (Group, attribute_groups, coarse_to_fine, head_groups, layer_groups,
                                          parse_groups, patch_groups, span_groups)
from edgeatp.attribution.nodes import attribute_nodes
from edgeatp.errors import EdgeatpError
from edgeatp.graph import Node, node_set
from edgeatp.setup import Setup

from .conftest import random_pairs, tiny_model
from .handbuilt import cancellation_model, cancellation_pairs, random_pairs_for, saturated_model


def test_linear_group_scores_add_member_estimates_per_pair_before_abs():
    adapter = tiny_model(seed=11)
    pairs = random_pairs(n=5)
    groups = layer_groups(adapter.shape) + span_groups(node_set(adapter.shape, ["head"]), [(0, 2), (3, 6)])
    res = attribute_groups(Setup(adapter, pairs), groups, "atp")
    for i, g in enumerate(groups):
        fine = attribute_nodes(Setup(adapter, pairs), "atp", nodes=list(g.members)).per_pair.sum(1)
        assert torch.allclose(res.per_pair[:, i], fine, atol=1e-10), g.name
        assert torch.allclose(res.per_pair_abs[:, i], fine.abs(), atol=1e-10)


def test_grouped_queries_and_keys_are_recomputed_jointly_and_exactly():
    adapter = saturated_model(seed=5, n_layers=1)
    pairs = random_pairs_for(adapter, n=5)
    groups = [
        Group("keys a0.h1@1-3", tuple(Node.parse(f"a0.h1<k>@{p}") for p in (1, 2, 3))),
        Group("queries a0.h0+a0.h2@4-5", tuple(Node.parse(f"a0.h{h}<q>@{p}") for h in (0, 2) for p in (4, 5))),
        Group("all keys a0", tuple(Node.parse(f"a0.h{h}<k>") for h in range(3))),
        Group("mixed", (Node.parse("a0.h0<k>@2"), Node.parse("a0.h1<q>@5"), Node.parse("a0.h2<v>"))),
    ]
    fixed = attribute_groups(Setup(adapter, pairs), groups, "atp-qk")
    exact = patch_groups(Setup(adapter, pairs), groups)
    assert torch.allclose(fixed.per_pair[:, :3], exact.per_pair[:, :3], atol=1e-9)
    summed = attribute_nodes(Setup(adapter, pairs), "atp-qk", nodes=list(groups[0].members)).per_pair.sum(1)
    assert not torch.allclose(summed, exact.per_pair[:, 0], atol=1e-3), "keys do not add up through the softmax"
    assert exact.labels[0] == "keys a0.h1@1-3"


def test_group_graddrop_normaliser():
    adapter, pairs = cancellation_model(), cancellation_pairs()
    res = attribute_groups(Setup(adapter, pairs), [Group("g", (Node.parse("a0.h0"),)),
                                            Group("two layers", (Node.parse("a0.h0"), Node.parse("m1")))], "atp-gd")
    assert res["g"] == pytest.approx(2.0)  # one non-trivial term out of 2
    assert res.per_pair_abs.shape == (1, 2)


def test_coarse_to_fine_refines_only_what_matters(zoo_ioi):
    from edgeatp.tasks import make_task

    pairs = make_task("ioi", zoo_ioi.tokenizer, 16, seed=2)
    ctf = coarse_to_fine(Setup(zoo_ioi, pairs), "atp-qk", keep=0.6)
    assert [len(level.groups) for level in ctf.levels][0] == 4
    assert set(ctf.kept[0]) <= {"a0", "a1", "m0", "m1"} and len(ctf.kept[0]) < 4
    finest = {g.name for g in ctf.final.groups}
    assert all("@" in name for name in finest)
    assert ctf.cost.backwards == 3


def test_parse_groups(tmp_path):
    adapter = tiny_model()
    assert [g.name for g in parse_groups("layer", adapter.shape, 7)][:2] == ["a0", "m0"]
    assert len(parse_groups("head", adapter.shape, 7)) == 6
    spans = parse_groups("span:0-2,3-6", adapter.shape, 7)
    assert spans[0].name == "a0.h0@0-2" and len(spans[0].members) == 3
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"movers": ["a1.h0", "a1.h1@3"], "early": ["m0"]}))
    assert [g.name for g in parse_groups(str(path), adapter.shape, 7)] == ["movers", "early"]
    with pytest.raises(EdgeatpError, match="write spans as start-end"):
        parse_groups("span:0..2", adapter.shape, 7)
    with pytest.raises(EdgeatpError, match="positions 0..6"):
        parse_groups("span:0-9", adapter.shape, 7)
    with pytest.raises(EdgeatpError, match="neither layer, head, span"):
        parse_groups("heads", adapter.shape, 7)
    path.write_text(json.dumps({"bad": ["a1.x"]}))
    with pytest.raises(EdgeatpError, match="group 'bad'"):
        parse_groups(str(path), adapter.shape, 7)
    with pytest.raises(EdgeatpError, match="has no members"):
        Group("empty", ())
    assert len(head_groups(adapter.shape, ("q", "k"))[0].members) == 2


def test_coarse_edges_add_member_edges_per_pair_and_patch_exactly():
    from edgeatp.attribution.edges import attribute_edges
    from edgeatp.attribution.grouping import coarse_edges, patch_coarse_edges
    from edgeatp.graph import EdgeGraph

    adapter = tiny_model(seed=12, attn_only=True, normalization=None, n_layers=2)
    pairs = random_pairs(n=4)
    fine = attribute_edges(Setup(adapter, pairs), "atp")
    coarse = coarse_edges(fine)
    assert [n for n, _, _ in coarse.names()][:3] == ["input->a0<q>", "input->a0<k>", "input->a0<v>"]
    g = fine.graph
    i = [wg.name for wg in coarse.writer_groups].index("a0")
    j = [rg.name for rg in coarse.reader_groups].index("logits")
    ws = [g.writer_index[Node.parse(f"a0.h{h}")] for h in range(2)]
    assert torch.allclose(coarse.per_pair[:, i, j], fine.per_pair[:, 0, ws, g.reader_index[Node.parse("logits")]].sum(1))
    exact = patch_coarse_edges(Setup(adapter, pairs), coarse, g)
    by_name = dict(zip(exact.labels, exact.per_pair.T))
    # direct edges into the logits and into last-layer values are linear here: first order is exact
    for name in ("a0->logits", "input->logits", "a0->a1<v>", "input->a1<v>"):
        n_i, n_j = (coarse.writer_groups.index(next(w for w in coarse.writer_groups if w.name == name.split("->")[0])),
                    coarse.reader_groups.index(next(r for r in coarse.reader_groups if r.name == name.split("->")[1])))
        assert torch.allclose(coarse.per_pair[:, n_i, n_j], by_name[name], atol=1e-10), name
    with pytest.raises(EdgeatpError, match="not a writer of this graph"):
        coarse_edges(fine, writer_groups=[Group("bad", (Node.parse("a0.h0<q>"),))])
    with pytest.raises(EdgeatpError, match="drop positions"):
        coarse_edges(attribute_edges(Setup(adapter, pairs), "atp", positions=True))
    assert EdgeGraph.from_shape(adapter.shape).n_edges == g.n_edges


def test_top_zero_groups_is_empty():
    adapter = tiny_model(seed=13)
    res = attribute_groups(Setup(adapter, random_pairs(n=3)), layer_groups(adapter.shape), "atp")
    assert res.top(0) == [] and len(res.top()) == len(res.groups)
