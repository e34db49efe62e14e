"""Cost-of-verification curves, IRWRGM, recall and the method table against exact patching."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeatp.research.baselines import HierarchicalResult, Ranking
from edgeatp.errors import EdgeatpError
from edgeatp.research.evaluation import (GroundTruth, MethodSpec, compute_ground_truth, cost_curve, default_horizon,
                                evaluate_methods, evaluate_ranking, irwrgm, oracle_curve, recall_at_k)
from edgeatp.graph import Node, NodeIndex, NodeKind, node_set
from edgeatp.model import ModelAdapter
from edgeatp.patching import patch_nodes
from edgeatp.tasks import Direction, PromptPairs, make_task
from edgeatp.setup import Setup


def heads(n: int) -> NodeIndex:
    """``n`` distinct nodes (head outputs at positions) for hand-made rankings."""
    return NodeIndex(tuple(Node(NodeKind.HEAD, 0, 0, position=p) for p in range(n)))


def ranking(order: list[int], upfront: float = 0.0) -> Ranking:
    """A ranking over ``heads(len(order))`` in the given order."""
    return Ranking(method="hand", nodes=heads(len(order)), order=torch.tensor(order), upfront=upfront)


def truth_of(values: list[float]) -> GroundTruth:
    """A one-pair ground truth with the given signed effects."""
    per_pair = torch.tensor([values], dtype=torch.float64)
    return GroundTruth(heads(len(values)), per_pair, "signed_mean", "logit_diff", Direction.NOISING)


# ------------------------------------------------------------------------------------ pure curves
def test_cost_curve_by_hand_with_tied_truth() -> None:
    """A hand-computed curve with tied true effects, independent of how the tied nodes are indexed."""
    magnitude = torch.tensor([5.0, 3.0, 3.0, 1.0])
    costs = torch.tensor([2.0, 1.0, 4.0, 3.0])
    # x=1: {0} -> 2; x=2: {0,1} is a valid top-2 (tie with 2) -> 2; x=3: {0,1,2} -> 4; x=4 -> 4
    assert cost_curve(magnitude, costs).tolist() == [2.0, 2.0, 4.0, 4.0]
    assert cost_curve(magnitude, costs, horizon=2).tolist() == [2.0, 2.0]
    swapped = cost_curve(magnitude[[0, 2, 1, 3]], costs[[0, 2, 1, 3]])
    assert swapped.tolist() == [2.0, 2.0, 4.0, 4.0]  # independent of how tied nodes are indexed


def test_oracle_scores_one_and_reversed_order_by_hand() -> None:
    """The oracle's curve is the diagonal (IRWRGM 1); the reversed order matches a hand computation."""
    truth = truth_of([3.0, -2.0, 1.0])
    oracle = evaluate_ranking(truth, truth.oracle(), horizon=3)
    assert oracle.curve.tolist() == oracle_curve(3).tolist() == [1.0, 2.0, 3.0] and oracle.irwrgm == 1.0
    reverse = evaluate_ranking(truth, ranking([2, 1, 0]), horizon=3)
    assert reverse.curve.tolist() == [3.0, 3.0, 3.0]
    expected = math.exp((math.log(3) + 0.5 * math.log(1.5)) / (1 + 0.5 + 1 / 3))
    assert reverse.irwrgm == pytest.approx(expected, rel=1e-12) and reverse.irwrgm > 1
    late = evaluate_ranking(truth, ranking([0, 1, 2], upfront=4.0), horizon=3)
    assert late.curve.tolist() == [5.0, 6.0, 7.0] and late.upfront == 4.0 and late.cost_at_horizon == 7.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=30), st.randoms(use_true_random=False),
       st.integers(0, 10))
def test_curves_are_monotone_and_above_the_diagonal(values: list[int], rnd: random.Random, upfront: int) -> None:
    """Any order with any upfront cost gives a non-decreasing curve at or above x + upfront."""
    order = list(range(len(values)))
    rnd.shuffle(order)
    mag = torch.tensor(values, dtype=torch.float64)
    curve = cost_curve(mag, ranking(order, float(upfront)).verification_costs())
    x = oracle_curve(len(values))
    assert bool((curve[1:] >= curve[:-1]).all()) and bool((curve >= x + upfront).all())
    assert irwrgm(curve) >= 1.0


def test_hierarchical_curves_read_emission_costs() -> None:
    """Hierarchical curves use the recorded emission costs, not upfront + rank."""
    nodes = heads(3)
    result = HierarchicalResult(method="hierarchical", nodes=nodes, order=torch.tensor([1, 0, 2]), upfront=2.0,
                                emission_cost=torch.tensor([5.0, 4.0, 9.0], dtype=torch.float64), patches=9)
    evaluation = evaluate_ranking(truth_of([1.0, 2.0, 0.5]), result, horizon=3)
    assert evaluation.curve.tolist() == [4.0, 5.0, 9.0]


def test_recall_counts_ties_for_the_method() -> None:
    """Recall@k counts any node tied at the true k-th value and caps k at the number of nodes."""
    mag = torch.tensor([5.0, 3.0, 3.0, 1.0, 0.0])
    assert recall_at_k(mag, torch.tensor([0, 2, 1, 3, 4]), 2) == 1.0
    assert recall_at_k(mag, torch.tensor([1, 2, 0, 3, 4]), 2) == 0.5  # misses the 5, one tied 3 counts
    assert recall_at_k(mag, torch.tensor([3, 4, 0, 1, 2]), 2) == 0.0
    assert recall_at_k(mag, torch.tensor([4, 3, 2, 1, 0]), 10) == 1.0  # k beyond the nodes: all of them


def test_default_horizon_and_bad_inputs() -> None:
    """The default horizon skips negligible effects; bad horizons and mismatched nodes are refused."""
    assert default_horizon(torch.tensor([10.0, 0.5, 0.001, 0.0])) == 2
    assert default_horizon(torch.zeros(3)) == 3
    with pytest.raises(EdgeatpError, match="horizon"):
        cost_curve(torch.ones(3), torch.ones(3), horizon=4)
    with pytest.raises(EdgeatpError, match="same nodes"):
        evaluate_ranking(truth_of([1.0, 2.0]), ranking([0, 1, 2]), horizon=2)


# ------------------------------------------------------------------------------------ on a model
@pytest.fixture(scope="module")
def induction(zoo_induction: ModelAdapter) -> tuple[ModelAdapter, PromptPairs]:
    """The zoo induction model with 8 prompt pairs."""
    return zoo_induction, make_task("induction", zoo_induction.tokenizer, 8, seed=0)


def test_ground_truth_is_exact_patching(induction: tuple[ModelAdapter, PromptPairs]) -> None:
    """The ground truth is exhaustive single-node patching, as signed mean and mean |effect|."""
    adapter, pairs = induction
    nodes = node_set(adapter.shape, ["head", "k"], pairs.n_positions)
    truth = compute_ground_truth(Setup(adapter, pairs), nodes, kind="mean_abs")
    exact = patch_nodes(Setup(adapter, pairs), list(nodes))
    torch.testing.assert_close(truth.signed, exact.mean)
    torch.testing.assert_close(truth.magnitude, exact.mean_abs)
    assert truth.cost == len(nodes)


def test_evaluate_methods_table(induction: tuple[ModelAdapter, PromptPairs]) -> None:
    """The method table on the induction model: documented costs, sane metrics, AtP beats Iterative."""
    adapter, pairs = induction
    table = evaluate_methods(Setup(adapter, pairs, batch_size=512), ["iterative", "atp", "atp-qk", "atp*", MethodSpec("subsampling", {"p": 0.1, "m": 40}),
                                      MethodSpec("blocks", {"block_size": 32}), "hierarchical"], nodes=["head", "q", "k", "v"])
    n = len(table.truth.nodes)
    L = adapter.shape.n_layers
    rows = {r.label: r for r in table.rows}
    assert [r["method"] for r in table.to_rows()] == ["iterative", "atp", "atp-qk", "atp*", "subsampling", "blocks",
                                                      "hierarchical"]
    assert rows["iterative"].upfront == 0 and rows["atp"].upfront == 4 and rows["atp-qk"].upfront == 4
    assert rows["atp*"].upfront == 2 + 2 * (1 + L)
    assert rows["subsampling"].upfront == 40 and rows["blocks"].upfront == math.ceil(n / 32)
    assert 1 <= table.horizon <= n and table.horizon == default_horizon(table.truth.magnitude)
    for r in table.rows:
        assert r.irwrgm >= 1.0 and 0.0 <= r.recall[10] <= 1.0 and 0.0 <= r.recall[50] <= 1.0
        assert len(r.curve) == table.horizon and r.cost_at_horizon >= table.horizon
        assert r.wall_time >= 0.0
    assert rows["atp"].irwrgm < rows["iterative"].irwrgm
    oracle = evaluate_ranking(table.truth, table.truth.oracle(), table.horizon)
    assert oracle.irwrgm == 1.0 and oracle.recall[10] == 1.0
    with pytest.raises(EdgeatpError, match="unknown method"):
        evaluate_methods(Setup(adapter, pairs), ["magic"], truth=table.truth)
