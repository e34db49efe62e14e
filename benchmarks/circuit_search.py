"""Circuit search against rankings: MIB's CPR/CMD and faithfulness at 5, 10 and 20 edges.

For every zoo model (its own task, ``--pairs`` pairs, seed 0, noising, logit difference): the
rankings of AtP, AtP+QKfix, AtP*, IG and exact single-edge patching (the oracle ranking), each
as top-k circuits (dangling edges dropped) at 5/10/20 edges and at MIB's grid (CPR by signed
score, CMD by magnitude); then :func:`edgeatp.search.refine` from AtP+QKfix at 5/10/20 edges and
at the grid's sizes. Every faithfulness is an exact whole-circuit run. Costs: forwards as counted
by the patching engine (a backward counts two), and wall time over one plain forward+backward of
all pairs. On the smallest model, every connected circuit of at most 5 edges run exactly and a long
search (4 seeds, a large budget, every edge a candidate) at 5 and 10 edges are the reference for the
best circuit of each size.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/circuit_search.py [--pairs 32] [--budget 1500]
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


def plain_fb_seconds(setup: Setup, repeats: int = 5) -> float:
    """Median wall time of one forward + backward of all clean prompts (no hooks)."""
    batch = setup.pairs.batch(torch.arange(setup.n_pairs))
    metric, model = get_metric("logit_diff"), setup.model.model
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        metric(model(batch.base), batch).sum().backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def top_k_faithfulness(setup: Setup, scores: ea.EdgeScores, sizes: tuple[int, ...]) -> list[tuple[int, float]]:
    """(kept edges, exact faithfulness) of the top-k circuit of each size (empty circuits: 0)."""
    circuits = [circuit_from_edges(scores, select_top_k(scores, k), "top_k", k) for k in sizes]
    ends = endpoints(setup)
    nonempty = [c for c in circuits if c.n_edges]
    f, _, _ = faithfulness_of(setup, scores.graph, torch.stack([c.in_graph for c in nonempty]), ends, necessity=False)
    values = iter(f.tolist())
    return [(c.n_edges, next(values) if c.n_edges else 0.0) for c in circuits]


def exhaustive_best(setup: Setup, graph, k: int) -> tuple[float, int]:
    """The best exact faithfulness of any circuit of at most ``k`` edges (every edge on an
    input→logits path; circuits with dangling edges equal their connected part) and how many
    such circuits there are: all of them run exactly, many per forward."""
    coords = graph.all_coords.tolist()
    masks = []
    for j in range(1, k + 1):
        for combo in combinations(range(len(coords)), j):
            m = torch.zeros(graph.full_mask.shape, dtype=torch.bool)
            for i in combo:
                m[tuple(coords[i])] = True
            if torch.equal(connected(graph, m), m):
                masks.append(m)
    wide = setup.with_(batch_size=setup.n_pairs * 32)
    f, _, _ = faithfulness_of(wide, graph, torch.stack(masks), endpoints(wide), necessity=False)
    return float(f.max()), len(masks)


def cell(kept: int, f: float, k: int) -> str:
    return f"{f:.3f}" + (f" ({kept})" if kept != k else "")


def run_model(name: str, pairs_n: int, budget: int, reference_budget: int) -> None:
    model = ea.load_model(f"zoo:{name}")
    pairs = ea.make_task(ZOO[name].task, model.tokenizer, pairs_n, seed=0, prepend_bos=model.prepend_bos)
    setup = Setup(model, pairs, batch_size=pairs_n)  # a forward = one pass over all pairs, as for the rankings
    fb = plain_fb_seconds(setup)
    n = attribute_edges(setup, "atp").graph.n_edges
    print(f"\n#### zoo:{name} ({n} edges, {pairs_n} pairs; grid sizes {grid_sizes(n)}; "
          f"forward+backward = {fb * 1e3:.1f} ms)\n")
    print("| circuits | CPR ↑ | CMD ↓ | f @ 5 | f @ 10 | f @ 20 | forwards | time / (fwd+bwd) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows: dict[str, list[float]] = {}
    qk = None
    for method in METHODS:
        t = time.perf_counter()
        scores = attribute_edges(setup, method)
        seconds = time.perf_counter() - t
        units = scores.cost.units()
        mib = ranking_metrics(setup, scores)
        at = top_k_faithfulness(setup, scores, SIZES)
        rows[method] = [f for _, f in at]
        qk = scores if method == "atp-qk" else qk
        print(f"| top-k of {method} | {mib.cpr:.3f} | {mib.cmd:.3f} | "
              + " | ".join(cell(kept, f, k) for (kept, f), k in zip(at, SIZES))
              + f" | {units:.0f} | {seconds / fb:.1f} |")
    t = time.perf_counter()
    small = refine(setup, qk, list(SIZES), budget=budget, seed=0)
    seconds_small = time.perf_counter() - t
    grid = sorted({k for k in grid_sizes(n) if 0 < k < n})
    t = time.perf_counter()
    big = refine(setup, qk, grid, budget=budget, seed=0)
    seconds_big = time.perf_counter() - t
    mib = refined_metrics(big.refinement, n)
    rows["refined"] = [r.after.faithfulness for r in small.sizes]
    print(f"| refined from atp-qk (5/10/20: {small.n_forwards} fwd, {seconds_small / fb:.0f}x; grid: {big.n_forwards} "
          f"fwd, {seconds_big / fb:.0f}x) | {mib.cpr:.3f} | {mib.cmd:.3f} | "
          + " | ".join(cell(r.after.n_edges, r.after.faithfulness, r.size) for r in small.sizes)
          + f" | {small.n_forwards} + {big.n_forwards} | {(seconds_small + seconds_big) / fb:.0f} |")
    print("\nfound by: " + ", ".join(f"{r.size}: {r.found_by}" for r in (*small.sizes, *big.sizes))
          + f"; candidates M = {small.refinement.n_candidates} (5/10/20), {big.refinement.n_candidates} (grid)")
    oracle = rows["exact"]
    ok = all(a >= b - 1e-9 for a, b in zip(rows["refined"], oracle))
    below = [i for i, f in enumerate(oracle) if f < 0.8]
    strict = not below or rows["refined"][below[0]] > oracle[below[0]] + 1e-9
    print(f"targets: refined >= oracle ranking at every size: {'yes' if ok else 'NO'}; strictly better at the "
          f"smallest size where the oracle is below 0.8"
          + (f" ({SIZES[below[0]]} edges): {'yes' if strict else 'NO'}" if below else ": (none below 0.8)"))
    if reference_budget:
        best_5, count = exhaustive_best(setup, qk.graph, 5)
        print(f"reference (exhaustive): best of the {count} connected circuits of at most 5 edges {best_5:.3f}")
        best = {}
        for seed in range(4):
            long = refine(setup, qk, [5, 10], budget=reference_budget, seed=seed, candidates=n)
            for r in long.sizes:
                best[r.size] = max(best.get(r.size, -1e9), r.after.faithfulness)
        print("reference (long search over every edge, 4 seeds x " + f"{reference_budget} forwards): "
              + ", ".join(f"best at {k} edges {v:.3f}" for k, v in best.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--budget", type=int, default=1500)
    parser.add_argument("--reference-budget", type=int, default=6000)
    parser.add_argument("--models", default=",".join(ZOO))
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}; budget {args.budget} forwards per refine call; MIB grid {GRID}")
    for i, name in enumerate(args.models.split(",")):
        run_model(name, args.pairs, args.budget, args.reference_budget if i == 0 else 0)


if __name__ == "__main__":
    main()
