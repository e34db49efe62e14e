"""Circuit search: circuits better than any ranking, found and checked with exact whole-circuit runs.

:func:`refine` starts from the candidate edges of a ranking (the top ``M`` edges of any attribution
method's scores) and, at each requested size ``k``, looks for the circuit of at most ``k`` edges
with the best exact faithfulness:

1. **Exact re-ranking** (when it takes at most a quarter of the budget): every candidate patched
   alone, the oracle single-edge ranking restricted to the candidates.
2. **Learned mask** (a share of the budget): one hard-concrete gate per candidate edge and size
   (Louizos et al.'s L0 relaxation, as in Edge Pruning), warm-started from the ranking. A gate
   ``z`` keeps the edge's clean value with weight ``z``: the patched forward moves the edge by the
   fraction ``1 − z`` of its corrupt delta when noising (``z`` of its clean delta when denoising),
   edges outside the candidates patched as outside any circuit. The gates are trained on the
   faithfulness objective with a penalty that pushes their expected count down to ``k``, all
   sizes stacked in one forward; the candidates ordered by the learned gates seed step 3.
3. **Exact local search**: from the best of the seeds (the ranking's top-``k`` circuit, the
   ranking, the exact re-ranking and the mask order filled to ``k`` connected edges (the
   re-ranking's top ``k`` too), the signed ranking's top ``k`` (MIB's CPR circuit), a given
   circuit cut to ``k`` edges in score order, the previous size's result as it is and grown to
   ``k``), passes of single-edge removals and additions, all evaluated exactly, many circuits
   stacked per forward; when no single move helps, swaps of the most promising removals and
   additions; then seeded random restarts while the size's budget lasts (and they still reach
   circuits not yet run). When every circuit of
   at most ``k`` candidate edges fits the budget, they are all run instead (``exhaustive``: the
   result is then the best circuit of the candidates).

Circuits are kept connected (dangling edges — on no input→logits path — change nothing in a
whole-circuit run, so they only waste the size). The search ranks circuits by exact runs only, and
every reported circuit, before and after, is measured again at the end (faithfulness and
necessity): no estimate is ever reported as a result. What is reported at size ``k`` is the best of
those final measurements within ``k`` edges (the search's result, the ranking's and the signed
ranking's circuits, the given circuit, a smaller size's result), so it is never worse than any of
them. Costs are forwards as
:class:`~edgeatp.patching.PatchEffects` counts them (a training step's backward counts two); the
budget bounds everything, the final check included; ``seed`` makes the search deterministic.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations
from typing import Iterable, Literal, Sequence

import torch

from .circuit import Circuit, Refinement, RefinedSize, Selection, circuit_from_edges, connected, select_top_k
from .errors import option_error
from .graph import EdgeGraph
from .memory import PatchLoad
from .mib import helpfulness, top_edges
from .patching import circuit_load, edge_sources, patch_edges, sweep_forwards, weighted_run
from .progress import Bar, silent
from .scores import EdgeScores
from .setup import Setup
from .tasks.pairs import Direction
from .verification import Endpoints, endpoints, faithfulness_of

Objective = Literal["faithfulness", "distance"]
OBJECTIVES = ("faithfulness", "distance")
DEFAULT_BUDGET = 2000
MASK_SHARE = 0.3  # of the search budget, for the learned mask
EXACT_SHARE = 0.25  # the most of the search budget exact single-edge effects of the candidates may take
PASSES = 4  # greedy passes per size the candidate count is sized for
SWAP_WIDTH = 4  # the best removals times the best additions tried as swaps
RESTART_PATIENCE = 3  # restarts in a row that find no new circuit to run end a size's search
KICK = 2  # edges swapped at random by a restart
MASK_LR = 0.5
MASK_INIT = 0.5  # initial log-alpha of the ranking's first edge (the k-th sits at the gate's middle)
MASK_MIN_STEPS = 8
HC_LEFT, HC_RIGHT, HC_BETA = -0.1, 1.1, 2 / 3  # hard-concrete stretch and temperature (Edge Pruning's)
PENALTY = 4.0  # weight of the squared excess of the expected gate count over the size, at full strength
IMPROVEMENT = 1e-9

Key = frozenset[int]


@dataclass(frozen=True, eq=False)
class SizeResult:
    """One searched size: the ranking's top-``size`` circuit and the searched one, both measured
    exactly, which step found it and what searching at this size cost."""

    size: int
    before: Circuit
    after: Circuit
    found_by: str
    n_forwards: int


@dataclass(frozen=True, eq=False)
class SearchResult:
    """What :func:`refine` found: per size the circuit before and after, and the record a circuit
    file keeps (:class:`~edgeatp.circuit.Refinement`)."""

    sizes: tuple[SizeResult, ...]
    refinement: Refinement

    @property
    def n_forwards(self) -> int:
        """Everything the search spent, the final exact check included."""
        return self.refinement.n_forwards

    def at(self, size: int) -> SizeResult:
        """The result at one searched size."""
        for r in self.sizes:
            if r.size == size:
                return r
        raise KeyError(f"size {size} was not searched; searched sizes: {', '.join(str(r.size) for r in self.sizes)}")


class _Evaluator:
    """Exact faithfulness of circuits over the candidate edges, cached by their (connected) edge sets
    and charged to the budget."""

    def __init__(self, setup: Setup, graph: EdgeGraph, coords: torch.Tensor, ends: Endpoints,
                 objective: Objective, budget: int, bar: Bar, load: PatchLoad) -> None:
        self.setup, self.graph, self.coords, self.ends, self.load = setup, graph, coords, ends, load
        self.objective, self.left, self.bar = objective, budget, bar
        self.index = {tuple(c): i for i, c in enumerate(coords.tolist())}
        self.known: dict[Key, float] = {}
        self.spent = 0
        self._cost_of: dict[int, int] = {}

    def mask(self, key: Iterable[int]) -> torch.Tensor:
        """The ``[P, W, R]`` mask of candidate edges."""
        m = torch.zeros(self.graph.full_mask.shape, dtype=torch.bool)
        idx = sorted(key)
        if idx:
            m[tuple(self.coords[idx].T)] = True
        return m

    def clean(self, raw: Iterable[int]) -> Key:
        """The candidate edges of ``raw`` that lie on an input→logits path."""
        kept = connected(self.graph, self.mask(raw))
        return frozenset(self.index[tuple(c)] for c in kept.nonzero().tolist())

    def cost(self, n: int) -> int:
        """Forwards to evaluate ``n`` new circuits."""
        if n not in self._cost_of:
            self._cost_of[n] = sweep_forwards(self.setup, n, self.load) if n else 0
        return self._cost_of[n]

    def affordable(self, n: int) -> int:
        """How many of ``n`` new circuits the budget left can evaluate."""
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.cost(mid) <= self.left else (lo, mid - 1)
        return lo

    def value(self, f: float) -> float:
        """The objective: faithfulness itself, or minus its distance from 1."""
        return f if self.objective == "faithfulness" else -abs(1.0 - f)

    def run(self, keys: Sequence[Key]) -> dict[Key, float]:
        """Objective values of the circuits the budget affords (cached ones are free; the empty
        circuit is 0 by definition); circuits beyond the budget are left out."""
        new = [k for k in dict.fromkeys(keys) if k not in self.known and k]
        new = new[: self.affordable(len(new))]
        if new:
            f, _, forwards = faithfulness_of(self.setup, self.graph, torch.stack([self.mask(k) for k in new]),
                                             self.ends, necessity=False)
            self.known.update(zip(new, f.tolist()))
            self.charge(forwards)
        self.known.setdefault(frozenset(), 0.0)
        return {k: self.value(self.known[k]) for k in keys if k in self.known}

    def charge(self, forwards: int) -> None:
        """Count forwards against the budget and the progress display."""
        self.spent += forwards
        self.left -= forwards
        self.bar.update(forwards)


def _fill(ev: _Evaluator, order: Sequence[int], k: int, start: Iterable[int] = ()) -> Key:
    """Add candidates in ``order`` to ``start`` while the connected circuit stays within ``k`` edges
    (edges that dangle for now are kept: a later edge may connect them)."""
    raw = set(start)
    key = ev.clean(raw)
    for i in order:
        if len(key) >= k:
            break
        if i in raw:
            continue
        trial = ev.clean(raw | {i})
        if len(trial) <= k:
            raw.add(i)
            key = trial
    return key


def _local_search(ev: _Evaluator, key: Key, value: float, k: int, n_cand: int) -> tuple[Key, float]:
    """Best-improvement passes of single removals and additions, then swaps of the most promising
    of each, until no move helps or the budget is spent."""
    while ev.left > 0:
        removals = {ev.clean(key - {e}): e for e in key}
        additions = {}
        for f in range(n_cand):
            if f not in key:
                grown = ev.clean(key | {f})
                if grown != key:
                    additions.setdefault(grown, f)
        got = ev.run([*removals, *additions])
        feasible = [(v, c) for c, v in got.items() if len(c) <= k and c != key]
        best = max(feasible, key=lambda t: (t[0], -len(t[1])), default=None)
        if best is not None and best[0] > value + IMPROVEMENT:
            key, value = best[1], best[0]
            continue
        out = sorted((c for c in removals if c in got), key=lambda c: -got[c])[:SWAP_WIDTH]
        into = sorted((c for c in additions if c in got), key=lambda c: -got[c])[:SWAP_WIDTH]
        swaps = {ev.clean((key - {removals[r]}) | {additions[a]}) for r in out for a in into}
        got = ev.run([s for s in swaps if len(s) <= k and s != key])
        best = max(((v, c) for c, v in got.items()), key=lambda t: (t[0], -len(t[1])), default=None)
        if best is None or best[0] <= value + IMPROVEMENT:
            break
        key, value = best[1], best[0]
    return key, value


def _subsets(n: int, k: int) -> int:
    """Number of subsets of at most ``k`` of ``n`` items."""
    return sum(math.comb(n, j) for j in range(min(n, k) + 1))


def _search_size(ev: _Evaluator, k: int, seeds: dict[str, Key], rng: random.Random, n_cand: int
                 ) -> tuple[Key, str]:
    """The best circuit of at most ``k`` candidate edges found within the evaluator's budget, and
    the step that found it."""
    if ev.cost(_subsets(n_cand, k)) <= ev.left:
        keys = list(dict.fromkeys(ev.clean(c) for j in range(1, min(n_cand, k) + 1)
                                  for c in combinations(range(n_cand), j)))
        got = ev.run(keys)
        return max(got, key=lambda c: (got[c], -len(c))), "exhaustive"
    got = ev.run(list(seeds.values()))
    if not got:  # the budget is spent: the ranking's circuit stays (the final check measures it)
        return seeds["ranking"], "ranking"
    origin = {c: name for name, c in reversed(seeds.items())}
    start = max(got, key=lambda c: (got[c], -len(c)))
    best, best_value = _local_search(ev, start, got[start], k, n_cand)
    found = origin[start] if best == start else "greedy"
    stale = 0  # restarts run while the size's budget lasts and they still reach circuits not yet run
    while ev.left > 0 and stale < RESTART_PATIENCE and best:
        spent = ev.spent
        kicked = set(best)
        for e in rng.sample(sorted(kicked), min(KICK, len(kicked))):
            kicked.discard(e)
        outside = [i for i in range(n_cand) if i not in best]
        kicked.update(rng.sample(outside, min(KICK, len(outside))))
        key = _fill(ev, rng.sample(outside, len(outside)), k, ev.clean(kicked))
        got = ev.run([key])
        if key not in got:
            break
        key, value = _local_search(ev, key, got[key], k, n_cand)
        if value > best_value + IMPROVEMENT:
            best, best_value, found = key, value, "greedy"
        stale = stale + 1 if ev.spent == spent else 0
    return best, found


def _hard_concrete(log_alpha: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Gates in [0, 1]: a stretched, clamped concrete sample (deterministic at the mean when ``gen`` is None)."""
    if gen is None:
        s = torch.sigmoid(log_alpha)
    else:
        u = torch.rand(log_alpha.shape, generator=gen, dtype=log_alpha.dtype).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / HC_BETA)
    return (s * (HC_RIGHT - HC_LEFT) + HC_LEFT).clamp(0.0, 1.0)


def _expected_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """Expected number of open gates (the L0 relaxation's penalty term), per size."""
    return torch.sigmoid(log_alpha - HC_BETA * math.log(-HC_LEFT / HC_RIGHT)).sum(-1)


def _train_masks(ev: _Evaluator, sizes: Sequence[int], budget: int, seed: int) -> dict[int, list[int]]:
    """Hard-concrete gates over the candidates, one set per size, trained within ``budget``
    forwards (a step is a forward and a backward of one pair batch, sizes stacked as the batch size
    and the memory budget allow); returns each size's candidates ordered by their learned gates."""
    setup, graph, coords = ev.setup, ev.graph, ev.coords
    model = setup.model
    pair_bs, per_forward = setup.stacking(circuit_load(setup, graph, backward=True))
    chunks = [list(range(i, min(len(sizes), i + per_forward))) for i in range(0, len(sizes), per_forward)]
    batches = [b.to(model.device) for b in setup.pairs.batches(pair_bs, setup.direction,
                                                                 same_length=not model.causal)]
    setup_cost = len(batches) * (1 + int(setup.metric.needs_reference))
    steps = (budget - setup_cost) // (3 * len(chunks))
    if steps < MASK_MIN_STEPS:
        return {}
    sources = [edge_sources(setup, graph, b) for b in batches]
    refs = [setup.reference(b) for b in batches]
    ev.charge(setup_cost)
    M = len(coords)
    rank = torch.arange(M, dtype=torch.float64)
    k = torch.tensor(sizes, dtype=torch.float64)[:, None]
    log_alpha = (MASK_INIT * torch.tanh((k - 0.5 - rank[None]) / k)).requires_grad_()
    opt = torch.optim.Adam([log_alpha], lr=MASK_LR)
    gen = torch.Generator().manual_seed(seed)
    noising = setup.direction is Direction.NOISING
    outside = torch.full(graph.full_mask.shape, 1.0 if noising else 0.0, dtype=torch.float64)
    idx = tuple(coords.T)
    for step in range(steps):
        b = step % len(batches)
        strength = PENALTY * min(1.0, 2.0 * (step + 1) / steps)
        opt.zero_grad()
        for chunk in chunks:
            gates = _hard_concrete(log_alpha[chunk], gen)
            weights = outside.expand(len(chunk), *outside.shape).clone()
            weights[(slice(None), *idx)] = 1.0 - gates if noising else gates
            metric = weighted_run(setup, graph, batches[b], weights, sources[b], refs[b]).double().mean(1)
            f = ev.ends.normalise(metric)
            loss_f = -f if ev.objective == "faithfulness" else (1.0 - f) ** 2
            excess = torch.relu(_expected_gates(log_alpha[chunk]) - k[chunk, 0]) / k[chunk, 0]
            (loss_f + strength * excess ** 2).sum().backward()
            ev.charge(3)
        opt.step()
    order = torch.sort(-log_alpha.detach(), dim=1, stable=True).indices
    return {s: order[i].tolist() for i, s in enumerate(sizes)}


def _check_options(scores: EdgeScores, sizes: Sequence[int], budget: int, candidates: int | None,
                   objective: str) -> list[int]:
    """Sizes sorted and checked, with the other options; one-line errors naming the parameter."""
    n = scores.graph.n_edges
    if not sizes:
        raise option_error("{sizes} is empty; give one or more circuit sizes in edges")
    bad = [s for s in sizes if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= n]
    if bad:
        raise option_error(f"{{sizes}} must be edge counts between 1 and {n} (the graph's edges), got {bad[0]!r}")
    if not isinstance(budget, int) or budget < 1:
        raise option_error(f"{{budget}} must be a positive number of forwards, got {budget!r}")
    if objective not in OBJECTIVES:
        raise option_error(f"{{objective}} {objective!r} is unknown; choose from {', '.join(OBJECTIVES)}")
    if candidates is not None and not max(sizes) <= candidates <= n:
        raise option_error(f"{{candidates}} must lie between the largest size ({max(sizes)}) and the graph's {n} "
                           f"edges, got {candidates}")
    return sorted(set(sizes))


def _candidate_count(setup: Setup, n_edges: int, load: PatchLoad, sizes: Sequence[int], greedy_budget: int) -> int:
    """``M`` from the budget: as many candidates as let each size afford about :data:`PASSES`
    passes (a pass runs about ``M + SWAP_WIDTH²`` circuits), at least the largest size plus
    :data:`SWAP_WIDTH` and at most every edge."""
    per_circuit = max(sweep_forwards(setup, 64, load) - sweep_forwards(setup, 0, load), 1) / 64
    circuits = greedy_budget / len(sizes) / per_circuit
    fit = int(circuits / PASSES) - SWAP_WIDTH ** 2
    return min(n_edges, max(max(sizes) + SWAP_WIDTH, fit))


def refine(setup: Setup, scores: EdgeScores, sizes: Sequence[int], *, budget: int = DEFAULT_BUDGET, seed: int = 0,
           candidates: int | None = None, objective: Objective = "faithfulness",
           start: torch.Tensor | None = None) -> SearchResult:
    """Search, at each size, for the circuit of at most that many edges with the best exact
    faithfulness (``objective="distance"``: closest to 1), starting from the top ``candidates``
    edges of ``scores`` (default: as many as the budget affords) and from ``start`` (a circuit's
    ``[P, W, R]`` edge mask, e.g. the one being refined: its edges join the candidates), within
    ``budget`` forwards; every circuit reported is measured exactly at the end and is no worse than
    the ranking's, the start's or a smaller size's. See the module docstring for the steps."""
    ks = _check_options(scores, sizes, budget, candidates, objective)
    graph = scores.graph
    if start is not None and tuple(start.shape) != tuple(graph.full_mask.shape):
        raise option_error(f"{{start}} must be an edge mask of shape {tuple(graph.full_mask.shape)} (positions, "
                           f"writers, readers), got {tuple(start.shape)}")
    inner = setup.with_(progress=silent)
    ends = endpoints(inner)
    before = {k: circuit_from_edges(scores, select_top_k(scores, k), "top_k", k) for k in ks}
    helpful = helpfulness(scores, ends)  # MIB's CPR order: edges that carry the behaviour first
    signed = {k: connected(graph, top_edges(graph, helpful, k)) for k in ks}
    load = circuit_load(inner, graph)  # what a whole-circuit run holds: every cost below is counted with it
    final_cost = 2 * sweep_forwards(inner, (3 if start is None else 4) * len(ks), load)
    search_budget = budget - ends.n_forwards - final_cost
    if search_budget < 0:
        raise option_error(f"{{budget}} {budget} is below the {ends.n_forwards + final_cost} forwards that measuring "
                           "the circuits before and after takes; raise it")
    mask_budget = int(MASK_SHARE * search_budget)
    M = candidates or _candidate_count(inner, graph.n_edges, load, ks, search_budget - mask_budget)
    values, coords = scores.flat()
    ranked = coords[torch.sort(values, descending=True, stable=True).indices]
    coords = ranked[:M]
    # the edges of the signed ranking's circuits and of the start beyond the top M join the candidates
    joining = top_edges(graph, helpful, max(ks)) | (start.bool() if start is not None else False)
    beyond = ranked[M:]
    coords = torch.cat([coords, beyond[joining[tuple(beyond.T)]]])
    M = len(coords)
    given = [] if start is None else start.bool()[tuple(coords.T)].nonzero().flatten().tolist()
    with setup.progress("circuit search", budget) as bar:
        bar.update(ends.n_forwards)
        ev = _Evaluator(inner, graph, coords, ends, objective, search_budget, bar, load)
        cut = {k: _fill(ev, given, k) for k in ks} if given else {}  # the given circuit at each size
        exhaustive = _all_exhaustive(ev, ks, M)
        exact_order = _exact_order(ev) if not exhaustive and ev.cost(M) <= EXACT_SHARE * search_budget else None
        orders = _train_masks(ev, ks, mask_budget, seed) if not exhaustive else {}
        rng = random.Random(seed)
        found: dict[int, tuple[Key, str, int]] = {}
        ranking = list(range(M))
        for n_done, k in enumerate(ks):
            spent0 = ev.spent
            share = ev.left // (len(ks) - n_done)
            seeds = {"ranking": ev.clean(range(k)), "ranking, filled": _fill(ev, ranking, k),
                     "signed ranking": frozenset(ev.index[tuple(c)] for c in signed[k].nonzero().tolist())}
            if exact_order is not None:
                seeds["exact re-ranking"] = ev.clean(exact_order[:k])
                seeds["exact re-ranking, filled"] = _fill(ev, exact_order, k)
            if k in orders:
                seeds["mask"] = _fill(ev, orders[k], k)
            if k in cut:
                seeds["given circuit"] = cut[k]
            if found:
                seeds["smaller size"] = found[max(found)][0]
                seeds["smaller size, grown"] = _fill(ev, ranking, k, found[max(found)][0])
            reserve, ev.left = ev.left - share, share
            key, how = _search_size(ev, k, seeds, rng, M)
            ev.left += reserve
            found[k] = (key, how, ev.spent - spent0)
        searched = {k: (ev.mask(found[k][0]), found[k][1]) for k in ks}
        starts = {k: (ev.mask(c), "given circuit") for k, c in cut.items()}
        masks = [before[k].in_graph for k in ks] + list(signed.values()) + \
            [m for m, _ in (*searched.values(), *starts.values())]
        unique = list({_kept(m): m for m in masks}.values())
        f, nec, forwards = faithfulness_of(inner, graph, torch.stack(unique), ends)
        bar.update(forwards)
    measured = {_kept(m): (a, b) for m, a, b in zip(unique, f.tolist(), nec.tolist())}  # type: ignore[union-attr]
    total = ends.n_forwards + ev.spent + forwards
    results, records = [], []
    for k in ks:
        fb, nb = measured[_kept(before[k].in_graph)]
        pool = [searched[k], *(searched[j][:1] + (f"size {j}",) for j in ks if j < k),
                *((before[j].in_graph, "ranking") for j in ks if j <= k),
                *((signed[j], "signed ranking") for j in ks if j <= k), *(starts[j] for j in starts if j <= k)]
        mask, how = pool[0]
        for other, label in pool[1:]:  # the search's own result unless a measured circuit within k beats it
            if ev.value(measured[_kept(other)][0]) > ev.value(measured[_kept(mask)][0]) + IMPROVEMENT:
                mask, how = other, label
        fa, na = measured[_kept(mask)]
        after = circuit_from_edges(scores, mask, "refined", k)
        b = before[k].with_(faithfulness=fb, necessity=nb)
        a = after.with_(faithfulness=fa, necessity=na, selection=Selection("refined", k, k, after.n_edges))
        cost = found[k][2]
        results.append(SizeResult(k, b, a, how, cost))
        records.append(RefinedSize(k, tuple(e.name for e in a.edges()), fa, na, b.n_edges, fb, nb, how, cost))
    record = Refinement(scores.method, objective, budget, seed, M, total, ends.clean, ends.corrupt, tuple(records))
    return SearchResult(tuple(results), record)


def _exact_order(ev: _Evaluator) -> list[int]:
    """The candidates by exact single-edge effect (mean per-pair magnitude), each patched alone."""
    M = len(ev.coords)
    masks = torch.zeros(M, *ev.graph.full_mask.shape, dtype=torch.bool)
    masks[(torch.arange(M), *ev.coords.T)] = True
    eff = patch_edges(ev.setup, ev.graph, masks)
    ev.charge(eff.n_forwards)
    return torch.sort(-eff.mean_abs, stable=True).indices.tolist()


def _kept(mask: torch.Tensor) -> tuple[int, ...]:
    """A hashable form of a circuit mask."""
    return tuple(mask.nonzero().flatten().tolist())


def _all_exhaustive(ev: _Evaluator, sizes: Sequence[int], n_cand: int) -> bool:
    """Whether every size can run all its circuits anyway (no mask is then worth training)."""
    return ev.cost(sum(_subsets(n_cand, k) for k in sizes)) <= ev.left
