"""Activation-patching baselines: Subsampling's estimator, Blocks, Hierarchical, Iterative and their costs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from edgeatp.attribution.nodes import attribute_nodes
from edgeatp.research.baselines import (TreeGroup, attribution_ranking, blocks, group_tree, hierarchical, iterative,
                                        joint_effects, subsampling)
from edgeatp.stats import subset_statistics
from edgeatp.errors import EdgeatpError
from edgeatp.graph import Node, NodeKind, node_set
from edgeatp.model import ModelAdapter
from edgeatp.patching import patch_nodes
from edgeatp.tasks.pairs import PromptPairs
from edgeatp.setup import Setup

T = 6


@pytest.fixture(scope="module")
def additive() -> tuple[ModelAdapter, PromptPairs]:
    """A 1-layer attention-only float64 model without LayerNorm: value vectors act linearly on the
    logits (attention patterns do not depend on them), so value-node patches add up exactly."""
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=3, d_head=8, n_ctx=8, d_vocab=11, attn_only=True,
                                  normalization_type=None, dtype=torch.float64, seed=0)
    adapter = ModelAdapter(HookedTransformer(cfg))
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 11, (4, T), generator=gen)
    corrupt = torch.randint(1, 11, (4, T), generator=gen)
    clean[:, 0] = corrupt[:, 0] = 0
    pairs = PromptPairs.from_lists(clean.tolist(), corrupt.tolist(), [1, 2, 3, 4], [5, 6, 7, 8])
    return adapter, pairs


def value_nodes(adapter: ModelAdapter, heads: range = range(3), positions: range = range(T)) -> list[Node]:
    """Per-position value nodes of the 1-layer model."""
    return [Node(NodeKind.V, 0, h, position=p) for h in heads for p in positions]


def single_effects(adapter: ModelAdapter, pairs: PromptPairs, nodes: list[Node]) -> torch.Tensor:
    """Exact ``c(n)`` of every node patched alone."""
    return patch_nodes(Setup(adapter, pairs), nodes).mean


def full_factorial(n: int) -> torch.Tensor:
    """All ``2^n`` inclusion masks over ``n`` nodes."""
    return torch.tensor(list(itertools.product([False, True], repeat=n)))


# ------------------------------------------------------------------------------------ subsampling
def test_estimator_is_exact_on_full_factorial_additive_design() -> None:
    """On all 2^n subsets of an additive effect function, ī+ − ī− is exactly each node's effect."""
    c = torch.tensor([0.7, -1.3, 0.0, 2.5, -0.2], dtype=torch.float64)
    design = full_factorial(5)
    stats = subset_statistics(design.double() @ c + 0.4, design)
    torch.testing.assert_close(stats.estimate, c, rtol=0, atol=1e-12)
    assert stats.n_plus.tolist() == [16] * 5 and stats.n_minus.tolist() == [16] * 5


def test_estimator_is_the_banzhaf_value_under_an_interaction() -> None:
    """With a pairwise interaction the full design gives the Banzhaf value (half the interaction to each node)."""
    c = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    design = full_factorial(3)
    effects = design.double() @ c + 0.8 * (design[:, 0] & design[:, 1]).double()
    stats = subset_statistics(effects, design)
    torch.testing.assert_close(stats.estimate, torch.tensor([1.4, 2.4, -0.5], dtype=torch.float64), rtol=0, atol=1e-12)


def test_subset_statistics_match_numpy() -> None:
    """Counts, means and ddof=1 variances agree with numpy; one inclusion leaves the variance nan."""
    gen = torch.Generator().manual_seed(1)
    included = torch.rand(40, 6, generator=gen) < 0.3
    included[:, 5] = False
    included[0, 5] = True  # one inclusion: mean defined, variance not
    effects = torch.randn(40, generator=gen, dtype=torch.float64)
    stats = subset_statistics(effects, included)
    e = effects.numpy()
    for j in range(5):
        plus, minus = e[included[:, j].numpy()], e[~included[:, j].numpy()]
        assert stats.n_plus[j] == len(plus) and stats.n_minus[j] == len(minus)
        assert stats.mean_plus[j].item() == pytest.approx(plus.mean(), abs=1e-12)
        assert stats.var_plus[j].item() == pytest.approx(plus.var(ddof=1), abs=1e-12)
        assert stats.var_minus[j].item() == pytest.approx(minus.var(ddof=1), abs=1e-12)
    assert stats.mean_plus[5].item() == pytest.approx(e[0]) and math.isnan(stats.var_plus[5].item())


def test_subsampling_recovers_exact_effects_on_an_additive_model(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """On a model where value patches add up, Subsampling over the full design returns the exact effects."""
    adapter, pairs = additive
    nodes = value_nodes(adapter, range(2), range(1, 4))
    truth = single_effects(adapter, pairs, nodes)
    joint = patch_nodes(Setup(adapter, pairs), [nodes]).mean
    torch.testing.assert_close(joint, truth.sum(0, keepdim=True), rtol=0, atol=1e-10)  # the model is additive
    design = full_factorial(len(nodes))
    result = subsampling(Setup(adapter, pairs), nodes, design=design)
    torch.testing.assert_close(result.stats.estimate, truth, rtol=0, atol=1e-10)
    assert result.upfront == result.m == 2 ** len(nodes)
    assert result.ordered_nodes[0] == nodes[int(truth.abs().argmax())]


def test_random_subsampling_is_seeded_and_costs_m(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """Random draws follow the seed, cost m units and their statistics come from the subset effects."""
    adapter, pairs = additive
    nodes = value_nodes(adapter)
    a = subsampling(Setup(adapter, pairs), nodes, p=0.2, m=30, seed=3)
    b = subsampling(Setup(adapter, pairs), nodes, p=0.2, m=30, seed=3)
    assert a.upfront == 30.0 and a.included.shape == (30, len(nodes))
    assert torch.equal(a.included, b.included) and torch.equal(a.order, b.order)
    ref = subset_statistics(a.subset_effects, a.included)
    torch.testing.assert_close(a.stats.estimate, ref.estimate, equal_nan=True)
    direct = joint_effects(Setup(adapter, pairs), [[nodes[j] for j in row.nonzero()[:, 0].tolist()] for row in a.included])
    torch.testing.assert_close(a.subset_effects, direct.mean(0))


def test_never_included_nodes_rank_last(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """A node no subset included has no estimate and is verified last."""
    adapter, pairs = additive
    nodes = value_nodes(adapter, range(1), range(1, 4))
    design = torch.tensor([[True, False, False], [False, False, True], [True, False, True]])
    result = subsampling(Setup(adapter, pairs), nodes, design=design)
    assert math.isnan(result.scores[1].item()) and int(result.order[-1]) == 1


def test_subsampling_rejects_bad_parameters(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """Bad p, effect kind or design shape give one-line errors that say what to change."""
    adapter, pairs = additive
    with pytest.raises(EdgeatpError, match="strictly between 0 and 1"):
        subsampling(Setup(adapter, pairs), value_nodes(adapter), p=1.0)
    with pytest.raises(EdgeatpError, match="signed_mean"):
        subsampling(Setup(adapter, pairs), value_nodes(adapter), effect="median")
    with pytest.raises(EdgeatpError, match="design"):
        subsampling(Setup(adapter, pairs), value_nodes(adapter), design=torch.ones(4, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------ blocks
def test_blocks_patch_jointly_and_verify_block_by_block(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """Block effects are joint patches (sums in the additive model), verified in decreasing |effect|."""
    adapter, pairs = additive
    nodes = value_nodes(adapter)
    truth = single_effects(adapter, pairs, nodes)
    result = blocks(Setup(adapter, pairs), nodes, block_size=4, seed=1)
    assert result.upfront == math.ceil(len(nodes) / 4) == len(result.block_effects)
    assert result.block_of.tolist() == [i // 4 for i in range(len(nodes))]
    sums = torch.zeros(len(result.block_effects), dtype=torch.float64).index_add_(0, result.block_of, truth)
    torch.testing.assert_close(result.block_effects, sums, rtol=0, atol=1e-10)
    seen = result.block_of[result.order]
    assert len(torch.unique_consecutive(seen)) == len(result.block_effects)  # each block verified in one run
    magnitudes = result.block_effects.abs()[torch.unique_consecutive(seen)]
    assert bool((magnitudes[:-1] >= magnitudes[1:]).all())
    torch.testing.assert_close(result.scores, result.block_effects.abs()[result.block_of])


def test_blocks_random_partition_and_tie_break_follow_the_seed(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """A random partition depends on the seed and still costs ceil(n / B) units."""
    adapter, pairs = additive
    nodes = value_nodes(adapter)
    a = blocks(Setup(adapter, pairs), nodes, block_size=5, partition="random", seed=0)
    b = blocks(Setup(adapter, pairs), nodes, block_size=5, partition="random", seed=1)
    assert a.upfront == b.upfront == 4.0
    assert not torch.equal(a.block_of, b.block_of)
    assert sorted(torch.bincount(a.block_of).tolist()) == [3, 5, 5, 5]


# ------------------------------------------------------------------------------------ hierarchical
def count_groups(group: TreeGroup) -> int:
    """Groups below a tree's root (each is patched once when the search runs to completion)."""
    return sum(1 + count_groups(c) for c in group.children)


def positive_nodes(adapter: ModelAdapter, pairs: PromptPairs) -> list[Node]:
    """Value nodes with a positive effect: in the additive model no group of them can cancel."""
    candidates = value_nodes(adapter)
    c = single_effects(adapter, pairs, candidates)
    nodes = [n for n, v in zip(candidates, c.tolist()) if v > 1e-9]
    assert len({n.head for n in nodes}) >= 2 and len(nodes) >= 4
    return nodes


def test_hierarchical_emits_in_decreasing_effect_without_cancellation(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """Without cancellation the best-first search emits nodes in decreasing exact effect."""
    adapter, pairs = additive
    nodes = positive_nodes(adapter, pairs)
    for tree in ("structure", "branching"):
        result = hierarchical(Setup(adapter, pairs), nodes, tree=tree, branching=2)
        emitted = single_effects(adapter, pairs, list(result.ordered_nodes))
        assert bool((emitted[:-1] >= emitted[1:] - 1e-12).all()), tree
        costs = result.verification_costs()[result.order]
        assert bool((costs[1:] >= costs[:-1]).all())
        assert result.patches == count_groups(group_tree(result.nodes, tree, 2)) == costs[-1].item()
        assert result.meta["emitted_by_search"] == len(nodes)


def test_hierarchical_costs_by_hand(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """Two head groups of four positions: 2 + 4 patches before the first emission (or 10), 10 in all."""
    adapter, pairs = additive
    nodes = value_nodes(adapter, range(2), range(2, 6))  # 2 heads x 4 positions: head groups, then positions
    c = single_effects(adapter, pairs, nodes)
    heads = c.view(2, 4)
    first_group = int(heads.sum(1).abs().argmax())
    other = float(heads.sum(1).abs()[1 - first_group])
    expected_first = 6.0 if float(heads[first_group].abs().max()) >= other else 10.0
    result = hierarchical(Setup(adapter, pairs), nodes)
    costs = result.verification_costs()[result.order]
    assert costs[0].item() == expected_first and costs[-1].item() == 10.0
    assert result.upfront == 2.0 and result.patches == 10


def test_hierarchical_stops_at_targets_and_charges_leftovers(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """The search stops at its targets or budget; leftover nodes cost one verification unit each."""
    adapter, pairs = additive
    nodes = positive_nodes(adapter, pairs)
    c = single_effects(adapter, pairs, nodes)
    top = nodes[int(c.abs().argmax())]
    result = hierarchical(Setup(adapter, pairs), nodes, targets=[top])
    assert result.ordered_nodes[0] == top and result.meta["emitted_by_search"] == 1
    at_once = hierarchical(Setup(adapter, pairs), nodes, targets=[])
    assert at_once.meta["emitted_by_search"] == 0 and at_once.patches == len(group_tree(at_once.nodes).children)
    costs = result.verification_costs()[result.order]
    assert bool((costs[1:] >= costs[:-1]).all()) and sorted(result.ordered_nodes, key=nodes.index) == nodes
    # every node is verified once, by its own patch or by one leftover unit; groups are the overhead
    assert costs[-1].item() == len(nodes) + result.upfront
    capped = hierarchical(Setup(adapter, pairs), value_nodes(adapter, range(2), range(2, 6)), max_patches=2)
    assert capped.patches == 2 and capped.verification_costs().max().item() == 2 + 8


# ------------------------------------------------------------------------------------ iterative and attribution
def test_iterative_is_a_seeded_permutation_without_upfront_cost(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """Iterative is a seeded random order whose k-th node costs k units."""
    adapter, _ = additive
    nodes = value_nodes(adapter)
    a, b, other = iterative(nodes, seed=5), iterative(nodes, seed=5), iterative(nodes, seed=6)
    assert torch.equal(a.order, b.order) and not torch.equal(a.order, other.order)
    assert a.upfront == 0.0 and torch.equal(a.verification_costs()[a.order], torch.arange(1.0, len(nodes) + 1).double())


def test_attribution_costs_count_backwards_as_two_forwards(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """AtP costs 2 forwards + 1 backward, AtP* adds one backward per layer; backward_cost scales them."""
    adapter, pairs = additive
    nodes = node_set(adapter.shape, ["head", "v"], T)
    atp = attribution_ranking(attribute_nodes(Setup(adapter, pairs), "atp", nodes=nodes))
    star = attribute_nodes(Setup(adapter, pairs), "atp*", nodes=nodes)
    assert atp.upfront == 2 + 2 * 1
    assert attribution_ranking(star).upfront == 2 + 2 * (1 + adapter.shape.n_layers)
    assert attribution_ranking(star, backward_cost=1.0).upfront == 2 + 1 + adapter.shape.n_layers
    assert atp.verification_costs()[atp.order][0].item() == 5.0


def test_joint_effects_slices_agree_with_one_patch_nodes_call(additive: tuple[ModelAdapter, PromptPairs]) -> None:
    """Slicing the sets across patch_nodes calls changes nothing in the effects."""
    adapter, pairs = additive
    nodes = value_nodes(adapter)
    sets = [[nodes[i], nodes[(i * 7) % len(nodes)]] for i in range(len(nodes))] * 4
    sliced = joint_effects(Setup(adapter, pairs, batch_size=8), sets)  # 2 sets per forward, 64 per call
    whole = patch_nodes(Setup(adapter, pairs, batch_size=8), sets).per_pair
    assert sliced.shape == whole.shape == (len(pairs), len(sets))
    np.testing.assert_allclose(sliced.numpy(), whole.numpy(), rtol=0, atol=1e-12)
