"""Circuit search against brute force: every circuit of a restricted candidate set run exactly."""

import random
import re
from contextlib import contextmanager
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch

from edgeatp.attribution.edges import attribute_edges
from edgeatp.circuit import connected
from edgeatp.errors import OptionError
from edgeatp.patching import circuit_load, run_circuit
from edgeatp.progress import silent
from edgeatp.search import _Evaluator, _fill, _search_size, _train_masks, refine
from edgeatp.setup import Setup
from edgeatp.verification import endpoints

from .conftest import random_pairs, tiny_model

N_CAND = 8


def _problem(direction: str = "noising", batch_size: int = 32):
    adapter = tiny_model(seed=4, n_layers=2, n_heads=2, attn_only=True)
    setup = Setup(adapter, random_pairs(n=5, length=6, seed=1), direction=direction, batch_size=batch_size)
    scores = attribute_edges(setup, "atp")
    return setup, scores


def _brute_force(setup: Setup, scores, k: int, n: int = N_CAND) -> tuple[float, dict[frozenset, float]]:
    """Faithfulness of every subset of the top ``n`` candidates with at most ``k`` edges, each run
    exactly with run_circuit, normalised by the empty and the full circuit's runs."""
    g = scores.graph
    values, coords = scores.flat()
    cand = coords[torch.sort(values, descending=True, stable=True).indices[:n]]
    subsets = [frozenset(c) for j in range(k + 1) for c in combinations(range(n), j)]
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


def test_the_distance_objective_finds_the_circuit_closest_to_the_full_behaviour():
    setup, scores = _problem()
    result = refine(setup, scores, [3], budget=5000, candidates=N_CAND, seed=0, objective="distance")
    _, table = _brute_force(setup, scores, 3)
    closest = min(abs(1.0 - v) for v in table.values())
    r = result.at(3)
    assert r.found_by == "exhaustive" and result.refinement.objective == "distance"
    assert abs(abs(1.0 - r.after.faithfulness) - closest) < 1e-9
    assert abs(1.0 - r.after.faithfulness) <= abs(1.0 - r.before.faithfulness) + 1e-12


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
    result = refine(setup, scores, [4, 6], budget=400, candidates=20, seed=1)
    assert result.n_forwards <= 400
    for r in result.sizes:
        assert r.after.n_edges <= r.size and r.after.faithfulness >= r.before.faithfulness - 1e-12


def _evaluator(setup: Setup, scores, budget: int) -> _Evaluator:
    """The search's exact evaluator over every edge of the graph, in score order."""
    values, coords = scores.flat()
    inner = setup.with_(progress=silent)
    return _Evaluator(inner, scores.graph, coords[torch.sort(values, descending=True, stable=True).indices],
                      endpoints(inner), "faithfulness", budget, SimpleNamespace(update=lambda n=1: None),
                      circuit_load(inner, scores.graph))


def _names(scores, mask) -> frozenset:
    return frozenset(scores.graph.edge_at(tuple(c)).name for c in mask.nonzero().tolist())


@pytest.fixture(scope="module")
def every_edge():
    """The problem run one circuit per forward, and the exact faithfulness of every circuit of at
    most 3 of its 29 edges (4090 circuits)."""
    setup, scores = _problem(batch_size=5)
    return setup, scores, _brute_force(setup.with_(batch_size=160), scores, 3, n=scores.graph.n_edges)[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_local_search_and_restarts_climb_from_a_useless_start_to_the_optimum(seed, every_edge):
    # every edge a candidate: the 4090 circuits are far beyond the budget, so only the moves and
    # restarts can find the best one; the ranking's own top-k circuits keep nothing of the behaviour
    setup, scores, table = every_edge
    for k in (2, 3):
        ev = _evaluator(setup, scores, 400)
        start = ev.clean(range(k))
        assert ev.run([start])[start] < 0.01
        key, how = _search_size(ev, k, {"ranking": start}, random.Random(seed), scores.graph.n_edges)
        optimum = max(v for c, v in table.items() if len(c) <= k)
        assert how == "greedy" and len(key) <= k and ev.spent <= 400
        assert abs(table[_names(scores, ev.mask(key))] - optimum) < 1e-9


def test_the_learned_mask_orders_edges_better_than_the_ranking_it_starts_from(every_edge):
    setup, scores, _ = every_edge
    ev = _evaluator(setup, scores, 100)
    orders = _train_masks(ev, [2, 3], 100, seed=0)
    assert ev.spent <= 100 and sorted(orders) == [2, 3]
    check = _evaluator(setup, scores, 100)
    for k, order in orders.items():
        mask_circuit, ranking_circuit = _fill(check, order, k), check.clean(range(k))
        got = check.run([mask_circuit, ranking_circuit])
        assert got[mask_circuit] > got[ranking_circuit] + 0.1


def test_nothing_reported_is_worse_than_the_start_the_ranking_or_a_smaller_size(every_edge):
    setup, scores, table = every_edge
    best3 = max(table, key=table.get)
    start = torch.zeros_like(scores.graph.full_mask)
    for c in scores.graph.all_coords.tolist():
        if scores.graph.edge_at(tuple(c)).name in best3:
            start[tuple(c)] = True
    values, _ = scores.flat()
    order = torch.sort(values, descending=True, stable=True).indices.tolist()
    assert any(order.index(i) >= N_CAND for i, c in enumerate(scores.graph.all_coords.tolist())
               if scores.graph.edge_at(tuple(c)).name in best3), "the start needs an edge beyond the candidates"
    plain, started = (refine(setup, scores, [1, 2, 3], budget=30, candidates=N_CAND, seed=0, start=s)
                      for s in (None, start))
    assert plain.at(3).after.faithfulness < table[best3] - 0.05  # too few forwards to find it alone
    assert abs(started.at(3).after.faithfulness - table[best3]) < 1e-9
    assert _names(scores, started.at(3).after.in_graph) == best3
    for result in (plain, started):
        assert result.n_forwards <= 30
        afters = [r.after.faithfulness for r in result.sizes]
        assert afters == sorted(afters), "a size may keep a smaller size's circuit"
        assert all(r.after.faithfulness >= r.before.faithfulness - 1e-12 for r in result.sizes)
    # a budget that affords nothing but measuring the circuits at the end: the start still wins there
    with pytest.raises(OptionError, match="is below the") as exc:
        refine(setup, scores, [1, 2, 3], budget=1, candidates=N_CAND, start=start)
    least = int(re.search(r"below the (\d+) forwards", str(exc.value))[1])
    bare = refine(setup, scores, [1, 2, 3], budget=least, candidates=N_CAND, start=start)
    assert bare.at(3).found_by == "given circuit" and abs(bare.at(3).after.faithfulness - table[best3]) < 1e-9
    assert bare.n_forwards <= least
    with pytest.raises(OptionError, match=r"start must be an edge mask of shape"):
        refine(setup, scores, [3], start=start[0])


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
