"""Circuit search against brute force: every circuit of a restricted candidate set run exactly."""

from contextlib import contextmanager
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch

from edgeatp.attribution.edges import attribute_edges
from edgeatp.circuit import connected
from edgeatp.errors import OptionError
from edgeatp.patching import run_circuit
from edgeatp.search import refine
from edgeatp.setup import Setup

from .conftest import random_pairs, tiny_model

N_CAND = 8


def _problem(direction: str = "noising", batch_size: int = 32):
    adapter = tiny_model(seed=4, n_layers=2, n_heads=2, attn_only=True)
    setup = Setup(adapter, random_pairs(n=5, length=6, seed=1), direction=direction, batch_size=batch_size)
    scores = attribute_edges(setup, "atp")
    return setup, scores


def _brute_force(setup: Setup, scores, k: int) -> tuple[float, dict[frozenset, float]]:
    """Faithfulness of every subset of the top candidates with at most ``k`` edges, each run
    exactly with run_circuit, normalised by the empty and the full circuit's runs."""
    g = scores.graph
    values, coords = scores.flat()
    cand = coords[torch.sort(values, descending=True, stable=True).indices[:N_CAND]]
    subsets = [frozenset(c) for j in range(k + 1) for c in combinations(range(N_CAND), j)]
    masks = torch.zeros(len(subsets), *g.full_mask.shape, dtype=torch.bool)
    for i, s in enumerate(subsets):
        for j in s:
            masks[(i, *cand[j].tolist())] = True
    noising = setup.direction.value == "noising"
    ends = run_circuit(setup, g, torch.stack([torch.zeros_like(g.full_mask), g.full_mask.clone()]), knockout=not noising)
    m_empty, m_full = (ends.base_metric[:, None] + ends.per_pair).mean(0).tolist()
    runs = run_circuit(setup, g, masks, knockout=not noising)
    f = ((runs.base_metric[:, None] + runs.per_pair).mean(0) - m_empty) / (m_full - m_empty)
    table = {frozenset(g.edge_at(tuple(cand[j].tolist())).name for j in s): float(v) for s, v in zip(subsets, f)}
    return max(table.values()), table


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_exhaustive_search_finds_the_brute_force_optimum(direction):
    setup, scores = _problem(direction)
    result = refine(setup, scores, [2, 3], budget=5000, candidates=N_CAND, seed=0)
    for k in (2, 3):
        best, table = _brute_force(setup, scores, k)
        r = result.at(k)
        assert r.found_by == "exhaustive"
        assert r.after.n_edges <= k
        assert abs(r.after.faithfulness - best) < 1e-9
        names = frozenset(e.name for e in r.after.edges())
        assert abs(table[names] - r.after.faithfulness) < 1e-9, "the reported number is the circuit's exact run"
        assert torch.equal(connected(scores.graph, r.after.in_graph), r.after.in_graph)
        assert r.after.faithfulness >= r.before.faithfulness - 1e-12
        assert result.refinement.at(k).faithfulness == r.after.faithfulness
    assert result.n_forwards <= 5000


class _Recorder:
    """A progress display that keeps what it was shown."""

    def __init__(self) -> None:
        self.shown: list[tuple[str, int, list[int]]] = []

    @contextmanager
    def __call__(self, description: str, total: int):
        steps: list[int] = []
        self.shown.append((description, total, steps))
        yield SimpleNamespace(update=lambda n=1: steps.append(n))


def test_budgeted_search_is_exact_bounded_deterministic_and_no_worse_than_the_ranking():
    setup, scores = _problem(batch_size=5)  # one circuit per forward: the 93 circuits do not fit
    shown = _Recorder()
    runs = [refine(s, scores, [3], budget=80, candidates=N_CAND, seed=7) for s in (setup, setup.with_(progress=shown))]
    best, table = _brute_force(setup, scores, 3)
    r = runs[0].at(3)
    assert r.found_by != "exhaustive"
    assert runs[0].n_forwards <= 80
    assert r.before.faithfulness - 1e-12 <= r.after.faithfulness <= best + 1e-9
    assert abs(table[frozenset(e.name for e in r.after.edges())] - r.after.faithfulness) < 1e-9
    assert r.after.necessity is not None and r.before.necessity is not None
    assert [e.name for e in runs[1].at(3).after.edges()] == [e.name for e in r.after.edges()]
    assert runs[1].refinement == runs[0].refinement
    [(description, total, steps)] = shown.shown  # one display, counted in forwards up to what was spent
    assert description == "circuit search" and total == 80 and len(steps) > 3 and sum(steps) == runs[1].n_forwards


def test_the_learned_mask_runs_within_the_budget():
    setup, scores = _problem()
    result = refine(setup, scores, [4, 6], budget=900, candidates=20, seed=1)
    assert result.n_forwards <= 900
    for r in result.sizes:
        assert r.after.n_edges <= r.size and r.after.faithfulness >= r.before.faithfulness - 1e-12


@pytest.mark.parametrize("kwargs, message", [
    ({"sizes": []}, "sizes is empty"),
    ({"sizes": [0]}, "sizes must be edge counts between 1 and 29"),
    ({"sizes": [30]}, "sizes must be edge counts"),
    ({"sizes": [3], "budget": 3}, "budget 3 is below"),
    ({"sizes": [5], "candidates": 4}, "candidates must lie between the largest size (5)"),
    ({"sizes": [3], "objective": "best"}, "objective 'best' is unknown"),
])
def test_options_are_checked_with_one_line_errors(kwargs, message):
    setup, scores = _problem()
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        refine(setup, scores, **kwargs)
