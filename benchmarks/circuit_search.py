"""Circuit search against rankings: MIB's CPR/CMD and faithfulness at 5, 10 and 20 edges.

For every zoo model (its own task, ``--pairs`` pairs, seed 0, noising, logit difference): the
rankings of AtP, AtP+QKfix, AtP*, IG and exact single-edge patching (the oracle ranking), each as
top-k circuits (dangling edges dropped) at 5/10/20 edges and at MIB's grid (CPR by the ranking
score signed by the estimate's direction, CMD by the ranking score); then
:func:`edgeatp.search.refine` from AtP+QKfix at 5/10/20 edges and at the grid's sizes. Every
faithfulness is an exact whole-circuit run. Costs: forwards as counted by the patching engine (a
backward counts two), and process CPU time over one plain forward+backward of all pairs. On the
smallest model, every connected circuit of at most 5 edges run exactly and a long search (4 seeds,
a large budget, every edge a candidate) at 5 and 10 edges are the reference for the best circuit
of each size; ``--other-reference-seeds N`` runs the long search (N seeds) on the other models too.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/circuit_search.py [--pairs 32] [--budget 1500] \
        [--other-reference-seeds 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from itertools import combinations

import torch

import edgeatp as ea
from edgeatp.attribution.edges import attribute_edges
from edgeatp.circuit import circuit_from_edges, connected, select_top_k
from edgeatp.metrics import get_metric
from edgeatp.mib import GRID, grid_sizes, ranking_metrics, refined_metrics
from edgeatp.search import refine
from edgeatp.setup import Setup
from edgeatp.verification import endpoints, faithfulness_of
from edgeatp.zoo import ZOO

METHODS = ("atp", "atp-qk", "atp*", "ig", "exact")
SIZES = (5, 10, 20)
TOL = 1e-5  # float32: a circuit measured in two sweeps, or the empty one run against its defined 0, differs by ~1e-7


def plain_fb_seconds(setup: Setup, repeats: int = 5) -> float:
    """Median process CPU time of one forward + backward of all clean prompts (no hooks)."""
    batch = setup.pairs.batch(torch.arange(setup.n_pairs))
    metric, model = get_metric("logit_diff"), setup.model.model
    times = []
    for _ in range(repeats):
        t = time.process_time()
        metric(model(batch.base), batch).sum().backward()
        model.zero_grad(set_to_none=True)
        times.append(time.process_time() - t)
    return statistics.median(times)


def top_k_faithfulness(setup: Setup, scores: ea.EdgeScores, sizes: tuple[int, ...]) -> list[tuple[int, float]]:
    """(kept edges, exact faithfulness) of the top-k circuit of each size (empty circuits: 0)."""
    circuits = [circuit_from_edges(scores, select_top_k(scores, k), "top_k", k) for k in sizes]
    ends = endpoints(setup)
    nonempty = [c.in_graph for c in circuits if c.n_edges]
    values = iter(faithfulness_of(setup, scores.graph, torch.stack(nonempty), ends, necessity=False)[0].tolist()
                  if nonempty else [])
    return [(c.n_edges, next(values) if c.n_edges else 0.0) for c in circuits]


def exhaustive_best(setup: Setup, graph, k: int) -> tuple[dict[int, float], int]:
    """The best exact faithfulness of any circuit of at most ``j`` edges, for ``j`` up to ``k`` (every
    edge on an input→logits path; circuits with dangling edges equal their connected part), and how
    many such circuits there are: all of them run exactly, many per forward."""
    coords = graph.all_coords.tolist()
    masks, sizes = [], []
    for j in range(1, k + 1):
        for combo in combinations(range(len(coords)), j):
            m = torch.zeros(graph.full_mask.shape, dtype=torch.bool)
            for i in combo:
                m[tuple(coords[i])] = True
            if torch.equal(connected(graph, m), m):
                masks.append(m)
                sizes.append(j)
    wide = setup.with_(batch_size=setup.n_pairs * 32)
    f, _, _ = faithfulness_of(wide, graph, torch.stack(masks), endpoints(wide), necessity=False)
    size = torch.tensor(sizes)
    return {j: float(f[size <= j].max()) for j in range(1, k + 1) if bool((size <= j).any())}, len(masks)


def cell(kept: int, f: float, k: int) -> str:
    return f"{f:.3f}" + (f" ({kept})" if kept != k else "")


def run_model(name: str, pairs_n: int, budget: int, reference_budget: int, seeds: int, exhaustive: bool) -> None:
    model = ea.load_model(f"zoo:{name}")
    pairs = ea.make_task(ZOO[name].task, model.tokenizer, pairs_n, seed=0, prepend_bos=model.prepend_bos)
    setup = Setup(model, pairs, batch_size=pairs_n)  # a forward = one pass over all pairs, as for the rankings
    fb = plain_fb_seconds(setup)
    n = attribute_edges(setup, "atp").graph.n_edges
    print(f"\n#### zoo:{name} ({n} edges, {pairs_n} pairs; grid sizes {grid_sizes(n)}; "
          f"forward+backward = {fb * 1e3:.1f} ms)\n")
    print("| circuits | CPR ↑ | CMD ↓ | f @ 5 | f @ 10 | f @ 20 | forwards | time / (fwd+bwd) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    qk = oracle_scores = None
    for method in METHODS:
        t = time.process_time()
        scores = attribute_edges(setup, method)
        seconds = time.process_time() - t
        units = scores.cost.units()
        mib = ranking_metrics(setup, scores)
        at = top_k_faithfulness(setup, scores, SIZES)
        qk = scores if method == "atp-qk" else qk
        oracle_scores = scores if method == "exact" else oracle_scores
        print(f"| top-k of {method} | {mib.cpr:.3f} | {mib.cmd:.3f} | "
              + " | ".join(cell(kept, f, k) for (kept, f), k in zip(at, SIZES))
              + f" | {units:.0f} | {seconds / fb:.1f} |")
    t = time.process_time()
    small = refine(setup, qk, list(SIZES), budget=budget, seed=0)
    seconds_small = time.process_time() - t
    grid = sorted({k for k in grid_sizes(n) if 0 < k < n})
    t = time.process_time()
    big = refine(setup, qk, grid, budget=budget, seed=0)
    seconds_big = time.process_time() - t
    mib = refined_metrics(big.refinement, n)
    print(f"| refined from atp-qk (5/10/20: {small.n_forwards} fwd, {seconds_small / fb:.0f}x; grid: {big.n_forwards} "
          f"fwd, {seconds_big / fb:.0f}x) | {mib.cpr:.3f} | {mib.cmd:.3f} | "
          + " | ".join(cell(r.after.n_edges, r.after.faithfulness, r.size) for r in small.sizes)
          + f" | {small.n_forwards} + {big.n_forwards} | {(seconds_small + seconds_big) / fb:.0f} |")
    print("\nfound by: " + ", ".join(f"{r.size}: {r.found_by}" for r in (*small.sizes, *big.sizes))
          + f"; candidates M = {small.refinement.n_candidates} (5/10/20), {big.refinement.n_candidates} (grid)")
    every = tuple(sorted({*SIZES, *grid}))
    oracle = {k: f for k, (_, f) in zip(every, top_k_faithfulness(setup, oracle_scores, every))}
    refined = {r.size: r.after.faithfulness for r in (*big.sizes, *small.sizes)}
    best: dict[int, float] = {}
    if exhaustive:
        smallest, count = exhaustive_best(setup, qk.graph, 5)
        print(f"reference (exhaustive over the {count} connected circuits of at most 5 edges): "
              + ", ".join(f"best at {k} edges {v:.3f}" for k, v in smallest.items()))
    if seeds:
        for seed in range(seeds):
            long = refine(setup, qk, [5, 10], budget=reference_budget, seed=seed, candidates=n)
            for r in long.sizes:
                best[r.size] = max(best.get(r.size, -1e9), r.after.faithfulness)
        print(f"reference (long search over every edge, {seeds} seeds x {reference_budget} forwards): "
              + ", ".join(f"best at {k} edges {v:.3f}" for k, v in best.items()))
    if exhaustive:
        best.update({k: max(v, best.get(k, v)) for k, v in smallest.items()})
    print_targets(oracle, refined, best, exhaustive_up_to=5 if exhaustive else 0)


def print_targets(oracle: dict[int, float], refined: dict[int, float], best: dict[int, float],
                  exhaustive_up_to: int) -> None:
    """The issue's targets, size by size: refined against the oracle ranking's top-k circuit (at
    5/10/20 edges and the grid's sizes), strictly better at the first of 5/10/20 edges where the
    oracle is below 0.8, and at 10 edges or fewer faithfulness 0.9 where some circuit reaches it."""
    sizes = sorted(oracle)
    short = [(k, oracle[k] - refined[k]) for k in sizes if refined[k] < oracle[k] - TOL]
    print("target 1, refined >= oracle ranking at every size (" + ", ".join(map(str, sizes)) + f"; tolerance {TOL:g}): "
          + ("yes" if not short else "NO, short by " + ", ".join(f"{d:.2g} at {k}" for k, d in short)))
    below = [k for k in SIZES if oracle[k] < 0.8]
    if not below:
        print("target 1, strictly better where the oracle is first below 0.8 (of 5/10/20 edges): it never is")
    else:
        k = below[0]
        gain = refined[k] - oracle[k]
        verdict = f"yes (+{gain:.4f})" if gain > TOL else "NO"
        if gain <= TOL and k <= exhaustive_up_to and oracle[k] >= best[k] - TOL:
            verdict += " (impossible: the oracle's circuit is already the best of its size, exhaustively)"
        print(f"target 1, strictly better where the oracle is first below 0.8 ({k} edges: oracle {oracle[k]:.3f}, "
              f"refined {refined[k]:.3f}): {verdict}")
    for k in (s for s in sorted(refined) if s <= 10):
        reach = refined[k] >= 0.9
        known = f"; reference {best[k]:.3f}" if k in best else ""
        if reach:
            verdict = "yes"
        elif k not in best:
            verdict = "not reached; unknown whether any circuit can (no reference for this model)"
        elif best[k] >= 0.9:
            verdict = "NO"
        else:
            verdict = ("no circuit of this size reaches 0.9 (exhaustive)" if k <= exhaustive_up_to
                       else "not reached; the long search found no circuit reaching it either")
        print(f"target 2 at {k} edges: refined {refined[k]:.3f}{known}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--budget", type=int, default=1500)
    parser.add_argument("--reference-budget", type=int, default=6000)
    parser.add_argument("--reference-seeds", type=int, default=4, help="long-search seeds on the first model")
    parser.add_argument("--no-exhaustive", action="store_true", help="skip the exhaustive reference on the first model")
    parser.add_argument("--other-reference-seeds", type=int, default=0, help="long-search seeds on the others")
    parser.add_argument("--models", default=",".join(ZOO))
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}; budget {args.budget} forwards per refine call; MIB grid {GRID}")
    for i, name in enumerate(args.models.split(",")):
        run_model(name, args.pairs, args.budget, args.reference_budget,
                  args.reference_seeds if i == 0 else args.other_reference_seeds,
                  exhaustive=i == 0 and not args.no_exhaustive)


if __name__ == "__main__":
    main()
