"""Node methods against exhaustive activation patching: AtP, AtP+QKfix, AtP*, Subsampling, Blocks,
Hierarchical (and Iterative as the no-prior reference) on the zoo models.

Per model and node family (attention nodes = head output, query, key, value per position;
MLP neurons per position, separately) it prints IRWRGM (1 = oracle), the recall of the true
top-10 / top-50 in each method's top-10 / top-50, the cost in forward-pass units (upfront, and
until the whole true top-X is verified) and the measured wall time of each method as a ratio to
one plain forward+backward pass of the same model on the same batch (median of repeats, one
thread). Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/node_methods.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/node_methods.py --model zoo:dup --task dup --no-neurons
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgeatp.errors import EdgeatpError  # noqa: E402
from edgeatp.evaluation import EvaluationTable, MethodSpec, evaluate_methods  # noqa: E402
from edgeatp.graph import node_set  # noqa: E402
from edgeatp.metrics import get_metric  # noqa: E402
from edgeatp.model import ModelAdapter, load_model  # noqa: E402
from edgeatp.tasks import PromptPairs, make_task  # noqa: E402
from edgeatp.zoo import ZOO  # noqa: E402

ATTRIBUTION = ("iterative", "atp", "atp-qk", "atp*")
FAMILIES = {"attention": ("head", "q", "k", "v"), "neurons": ("neuron",)}


@dataclass(frozen=True)
class Case:
    """A model spec and the task its prompt pairs come from."""

    spec: str
    task: str


def forward_backward_seconds(adapter: ModelAdapter, pairs: PromptPairs, repeats: int) -> float:
    """Median wall time of one plain forward+backward pass over all pairs in one batch."""
    batch = pairs.batch(torch.arange(len(pairs)))
    metric = get_metric("logit_diff")
    times = []
    with adapter.session():
        for _ in range(repeats):
            t0 = time.perf_counter()
            metric(adapter.model(batch.base), batch).sum().backward()
            times.append(time.perf_counter() - t0)
            adapter.model.zero_grad(set_to_none=True)
    return statistics.median(times)


def baseline_specs(n_nodes: int) -> list[MethodSpec]:
    """The baselines' settings: Subsampling m = N/8 subsets with p = min(0.1, 100/N), Blocks of 8,
    Hierarchical on the structure tree with fan-out 4."""
    p = min(0.1, 100.0 / n_nodes)
    return [MethodSpec("subsampling", {"p": p, "m": max(8, n_nodes // 8)}),
            MethodSpec("blocks", {"block_size": 8}), MethodSpec("hierarchical", {"max_children": 4})]


def run_family(adapter: ModelAdapter, pairs: PromptPairs, families: tuple[str, ...], repeats: int,
               batch_size: int) -> tuple[EvaluationTable, EvaluationTable, float]:
    """Ground truth once; attribution methods timed over ``repeats``, baselines once."""
    n_nodes = len(node_set(adapter.shape, families, pairs.n_positions))
    fast = evaluate_methods(adapter, pairs, ATTRIBUTION, nodes=list(families), batch_size=batch_size,
                            repeats=repeats)
    slow = evaluate_methods(adapter, pairs, baseline_specs(n_nodes), nodes=list(families),
                            batch_size=batch_size, truth=fast.truth)
    return fast, slow, forward_backward_seconds(adapter, pairs, max(5, repeats))


def markdown(title: str, fast: EvaluationTable, slow: EvaluationTable, fwd_bwd: float) -> str:
    """One markdown table for a model and node family."""
    n, X = len(fast.truth.nodes), fast.horizon
    lines = [f"**{title}** — {n} nodes, {fast.truth.per_pair.shape[0]} pairs, horizon X = {X} "
             f"(nodes with |c| > 0.1% of the largest); forward+backward = {1e3 * fwd_bwd:.1f} ms",
             "",
             "| method | IRWRGM | recall@10 | recall@50 | upfront units | units to verify top-X | wall time / fwd+bwd |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in (*fast.rows, *slow.rows):
        lines.append(f"| {r.label} | {r.irwrgm:.2f} | {r.recall[10]:.2f} | {r.recall[50]:.2f} | {r.upfront:g} | "
                     f"{r.cost_at_horizon:g} | {r.wall_time / fwd_bwd:.1f} |")
    lines.append(f"| *exhaustive patching* | — | 1.00 | 1.00 | {n} | {n} | {fast.truth_wall_time / fwd_bwd:.1f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run every case, print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="extra model spec (repeat; pair with --task)")
    parser.add_argument("--task", action="append", default=[], help="task of each --model")
    parser.add_argument("--no-zoo", action="store_true", help="skip the zoo models")
    parser.add_argument("--pairs", type=int, default=32, help="prompt pairs for attention nodes")
    parser.add_argument("--neuron-pairs", type=int, default=16, help="prompt pairs for neuron nodes")
    parser.add_argument("--no-neurons", action="store_true", help="skip the neuron family")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats of the attribution methods")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per forward")
    parser.add_argument("--seed", type=int, default=0, help="prompt-pair seed")
    args = parser.parse_args()
    if len(args.model) != len(args.task):
        raise EdgeatpError("give one --task per --model")
    torch.set_num_threads(1)
    cases = [] if args.no_zoo else [Case(f"zoo:{name}", entry.task) for name, entry in ZOO.items()
                                    if not entry.grouped_query]  # GQA: not supported by the adapter yet
    cases += [Case(m, t) for m, t in zip(args.model, args.task)]
    start = time.perf_counter()
    for case in cases:
        adapter = load_model(case.spec)
        for family, kinds in FAMILIES.items():
            if family == "neurons" and (args.no_neurons or not adapter.shape.has_mlp):
                continue
            n = args.neuron_pairs if family == "neurons" else args.pairs
            pairs = make_task(case.task, adapter.tokenizer, n, seed=args.seed, prepend_bos=adapter.prepend_bos)
            fast, slow, fwd_bwd = run_family(adapter, pairs, kinds, args.repeats, args.batch_size)
            print(markdown(f"{case.spec} ({case.task}), {family}", fast, slow, fwd_bwd), end="\n\n", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
