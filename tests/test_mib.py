"""MIB's circuit metrics: the areas by hand, and a ranking's circuits against exact runs."""

import pytest
import torch

from edgeatp.attribution.edges import attribute_edges
from edgeatp.circuit import RefinedSize, Refinement, connected
from edgeatp.mib import GRID, cmd, cpr, grid_sizes, ranking_metrics, refined_metrics
from edgeatp.patching import run_circuit
from edgeatp.setup import Setup

from .conftest import random_pairs, tiny_model


def test_areas_and_grid_sizes_follow_mib():
    assert grid_sizes(110) == (0, 0, 0, 1, 2, 5, 11, 22, 55, 110)
    assert grid_sizes(29) == (0, 0, 0, 0, 0, 1, 2, 5, 14, 29)
    f = [0.0, 0.1, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.2, 1.0]
    by_hand = sum((GRID[i + 1] - GRID[i]) * (f[i] + f[i + 1]) / 2 for i in range(9))
    assert cpr(GRID, f) == pytest.approx(by_hand)
    assert cmd(GRID, f) == pytest.approx(sum((GRID[i + 1] - GRID[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2
                                             for i in range(9)))
    assert cpr(GRID, [1.0] * 10) == pytest.approx(0.999) and cmd(GRID, [1.0] * 10) == 0.0
    with pytest.raises(ValueError):
        cpr(GRID, f[:3])


@pytest.mark.parametrize("direction", ["noising", "denoising"])
@pytest.mark.parametrize("method", ["atp", "atp*"])  # AtP*'s ranking score is not its signed mean's magnitude
def test_ranking_metrics_run_the_method_s_top_edges_exactly(direction, method):
    adapter = tiny_model(seed=5, n_layers=2, n_heads=2)
    setup = Setup(adapter, random_pairs(n=4, seed=2), direction=direction)
    scores = attribute_edges(setup, method)
    g = scores.graph
    grid = (0.05, 0.2, 0.5, 1.0)
    got = ranking_metrics(setup, scores, grid)
    noising = direction == "noising"
    empty_full = run_circuit(setup, g, torch.stack([torch.zeros_like(g.full_mask), g.full_mask.clone()]),
                             knockout=not noising)
    m0, m1 = (empty_full.base_metric[:, None] + empty_full.per_pair).mean(0).tolist()
    at = tuple(g.all_coords.T)
    signed, score = scores.signed.double()[at], scores.scores.double()[at]
    towards = (1.0 if m1 > m0 else -1.0) * (1.0 if not noising else -1.0)
    helps = score * torch.sign(signed * towards)
    for key, sizes, faith in ((helps, got.cpr_sizes, got.cpr_faithfulness),
                              (score, got.cmd_sizes, got.cmd_faithfulness)):
        for x, kept, f in zip(grid, sizes, faith):
            k = int(x * g.n_edges)
            mask = torch.zeros(g.full_mask.shape, dtype=torch.bool)
            mask[tuple(g.all_coords[torch.sort(key, descending=True, stable=True).indices[:k]].T)] = True
            mask = connected(g, mask)
            assert kept == int(mask.sum())
            run = run_circuit(setup, g, mask, knockout=not noising)
            assert f == pytest.approx(float(((run.base_metric + run.per_pair[:, 0]).mean() - m0) / (m1 - m0)), abs=1e-9)
    assert got.cpr == pytest.approx(cpr(grid, got.cpr_faithfulness)) and got.cmd == pytest.approx(cmd(grid, got.cmd_faithfulness))
    assert got.cpr_faithfulness[-1] == 1.0 and got.n_forwards > 0


def test_refined_metrics_need_every_grid_size():
    sized = lambda k, f: RefinedSize(k, tuple(f"e{i}" for i in range(k)), f, 0.0, k, f / 2, 0.0, "greedy", 1)
    grid = (0.1, 0.5, 1.0)
    full = Refinement("atp", "faithfulness", 100, 0, 10, 90, 1.0, 0.0, (sized(2, 0.5), sized(10, 0.9)))
    got = refined_metrics(full, 20, grid)
    assert got.cpr_faithfulness == (0.5, 0.9, 1.0) and got.cpr_sizes == (2, 10, 20)
    assert got.cpr == pytest.approx(cpr(grid, [0.5, 0.9, 1.0])) and got.cmd == pytest.approx(cmd(grid, [0.5, 0.9, 1.0]))
    assert refined_metrics(full, 30, grid) is None, "sizes 3 and 15 were not searched"
