"""The false-negative diagnostic: Welch upper bounds on raw statistics and the end-to-end bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from edgeatp.attribution.nodes import attribute_nodes
from edgeatp.research.baselines import attribution_ranking
from edgeatp.research.diagnostics import false_negative_bound
from edgeatp.stats import SubsetStats, subset_statistics, theta_star, welch_upper_bounds
from edgeatp.verification import edge_false_negative_bound
from edgeatp.errors import EdgeatpError
from edgeatp.graph import EdgeGraph, NodeIndex, node_set
from edgeatp.model import ModelAdapter
from edgeatp.patching import patch_edges, patch_nodes
from edgeatp.tasks import PromptPairs, make_task
from edgeatp.setup import Setup

T_6_95 = 1.943180  # Student t, 6 degrees of freedom, 95th percentile (printed tables)


def stats_of(n_plus: list[int], mean_plus: list[float], var_plus: list[float], n_minus: list[int],
             mean_minus: list[float], var_minus: list[float]) -> SubsetStats:
    """Statistics from raw numbers."""
    vectors = [torch.tensor(x, dtype=torch.float64) for x in (mean_plus, mean_minus, var_plus, var_minus)]
    return SubsetStats(torch.tensor(n_plus), torch.tensor(n_minus), *vectors)


def test_welch_bound_by_hand() -> None:
    """SE, Welch–Satterthwaite ν and the bound agree with hand-computed values and a printed t table."""
    # node 0: SE^2 = 0.5/4 + 0.5/4 = 0.25, nu = 0.25^2 / (2 * 0.125^2 / 3) = 6
    # node 1: SE^2 = 0.5/5 + 0.3/10 = 0.13, nu = 0.13^2 / (0.1^2/4 + 0.03^2/9) = 0.0169 / 0.0026 = 6.5
    s = stats_of([4, 5], [1.3, -0.4], [0.5, 0.5], [4, 10], [1.0, 0.1], [0.5, 0.3])
    w = welch_upper_bounds(s, alpha=0.05)
    torch.testing.assert_close(w.estimate, torch.tensor([0.3, -0.5], dtype=torch.float64))
    torch.testing.assert_close(w.se, torch.tensor([0.5, math.sqrt(0.13)], dtype=torch.float64))
    torch.testing.assert_close(w.df, torch.tensor([6.0, 6.5], dtype=torch.float64))
    assert w.t_quantile[0].item() == pytest.approx(T_6_95, abs=1e-6)
    assert w.upper[0].item() == pytest.approx(0.3 + T_6_95 * 0.5, abs=1e-6)
    assert w.upper[1].item() == pytest.approx(0.5 + scipy_stats.t.ppf(0.95, 6.5) * math.sqrt(0.13), abs=1e-12)
    theta, worst = theta_star(s, 0.05)
    assert worst == 0 and theta == pytest.approx(1.27159, abs=1e-5)


def test_bound_is_where_welchs_one_sided_test_reaches_alpha() -> None:
    """At θ = |ĉ| + t·SE scipy's one-sided Welch test has p-value exactly α (and the same df)."""
    rng = np.random.default_rng(0)
    plus, minus = rng.normal(1.0, 0.7, 9), rng.normal(0.2, 0.4, 23)
    effects = torch.from_numpy(np.concatenate([plus, minus]))
    included = torch.tensor([True] * 9 + [False] * 23)[:, None]
    w = welch_upper_bounds(subset_statistics(effects, included), alpha=0.1)
    test = scipy_stats.ttest_ind(plus - w.upper[0].item(), minus, equal_var=False, alternative="less")
    assert test.pvalue == pytest.approx(0.1, abs=1e-9)
    assert test.df == pytest.approx(w.df[0].item(), rel=1e-12)


def test_zero_variance_gives_the_estimate_itself() -> None:
    """Zero variance on both sides gives ν = ∞ and the bound |ĉ|; on one side ν = m − 1 of the other."""
    w = welch_upper_bounds(stats_of([3], [2.0], [0.0], [5], [0.5], [0.0]))
    assert math.isinf(w.df[0].item()) and w.upper[0].item() == pytest.approx(1.5)
    one_sided = welch_upper_bounds(stats_of([3], [2.0], [0.0], [5], [0.5], [0.2]))
    assert one_sided.df[0].item() == pytest.approx(4.0)


def test_too_few_samples_ask_for_more_subsets() -> None:
    """Fewer than 2 included/excluded samples, or a bad alpha, raise errors that say what to change."""
    with pytest.raises(EdgeatpError, match="raise m"):
        welch_upper_bounds(stats_of([4, 1], [1.0, 1.0], [0.5, math.nan], [4, 7], [0.0, 0.0], [0.5, 0.5]))
    with pytest.raises(EdgeatpError, match="alpha"):
        welch_upper_bounds(stats_of([4], [1.0], [0.5], [4], [0.0], [0.5]), alpha=1.5)


@pytest.fixture(scope="module")
def induction(zoo_induction: ModelAdapter) -> tuple[ModelAdapter, PromptPairs, NodeIndex, torch.Tensor]:
    """The zoo induction model, 8 pairs, per-position attention nodes and their exact effects."""
    adapter = zoo_induction
    pairs = make_task("induction", adapter.tokenizer, 8, seed=0)
    nodes = node_set(adapter.shape, ["head", "q", "k", "v"], pairs.n_positions)
    truth = patch_nodes(Setup(adapter, pairs, batch_size=512), list(nodes)).mean
    return adapter, pairs, nodes, truth


def test_false_negative_bound_covers_the_unverified_nodes(induction: tuple[ModelAdapter, PromptPairs, NodeIndex, torch.Tensor]) -> None:
    """After verifying AtP's top 20, θ* bounds the exact effect of every other node."""
    adapter, pairs, nodes, truth = induction
    scores = attribute_nodes(Setup(adapter, pairs), "atp", nodes=nodes)
    bound = false_negative_bound(Setup(adapter, pairs, batch_size=512), scores, 20, p=0.05, m=300, alpha=0.05)
    verified = set(bound.verified)
    assert len(verified) == 20 and verified == {nodes[i] for i in scores.order()[:20].tolist()}
    assert len(bound.unverified) == len(nodes) - 20 and not verified & set(bound.unverified)
    assert bound.cost == 300 and bound.m == 300 and bound.k == 20
    assert bound.theta == pytest.approx(float(bound.welch.upper.max()))
    assert bound.worst == bound.unverified[int(bound.welch.upper.argmax())]
    rest = torch.tensor([nodes.position_of(n) for n in bound.unverified])
    assert float(truth[rest].abs().max()) <= bound.theta


def test_bound_accepts_orders_and_rankings(induction: tuple[ModelAdapter, PromptPairs, NodeIndex, torch.Tensor]) -> None:
    """Rankings and explicit node orders verify the same top k; too few subsets and k = n are refused."""
    adapter, pairs, nodes, _ = induction
    ranking = attribution_ranking(attribute_nodes(Setup(adapter, pairs), "atp", nodes=nodes))
    a = false_negative_bound(Setup(adapter, pairs, batch_size=512), ranking, 5, m=300, p=0.05)
    b = false_negative_bound(Setup(adapter, pairs, batch_size=512), list(ranking.ordered_nodes), 5, m=300, p=0.05)
    assert a.verified == b.verified == ranking.ordered_nodes[:5] and set(a.unverified) == set(b.unverified)
    with pytest.raises(EdgeatpError, match=r"first: a\d\.h\d.*raise m"):
        false_negative_bound(Setup(adapter, pairs), ranking, 5, m=4, p=0.05)
    with pytest.raises(EdgeatpError, match="unverified"):
        false_negative_bound(Setup(adapter, pairs), ranking, len(nodes))


def test_edge_bound_covers_the_listed_edges(induction: tuple[ModelAdapter, PromptPairs, NodeIndex, torch.Tensor]) -> None:
    """At small p (few edges per subset, weak interactions) the edge bound covers every listed edge."""
    adapter, pairs, _, _ = induction
    graph = EdgeGraph.from_shape(adapter.shape)
    edges = list(graph.edges())
    exact = patch_edges(Setup(adapter, pairs), graph, edges).mean.abs()
    rest = [edges[i] for i in torch.argsort(exact, descending=True)[3:].tolist()]
    bound = edge_false_negative_bound(Setup(adapter, pairs), graph, rest, samples=400, p=0.03)
    assert bound.cost == 400 and bound.edges == tuple(rest) and bound.n_forwards >= 1
    assert float(exact.sort(descending=True).values[3]) <= bound.theta == pytest.approx(float(bound.welch.upper.max()))
    with pytest.raises(EdgeatpError, match="raise bound_samples"):
        edge_false_negative_bound(Setup(adapter, pairs), graph, rest, samples=3, p=0.1)
