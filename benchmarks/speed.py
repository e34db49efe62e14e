"""Issue-11 speed targets and scaling tables: every method as a multiple of a plain forward + backward.

Run from the repository root with our venv::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py targets --shape 8x32 --threads 1
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py targets --shape 8x128 --threads 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py scaling

``targets`` times, on a random GPT-2-small-shaped model (second half of each prompt corrupted, all
pairs in one batch): all-edge ``atp``, ``atp-qk``, ``atp*``, node-level ``atp*`` (ratios to one plain
forward+backward), exact patching of K single edges (throughput relative to K plain forwards of the
same batch) and the peak extra memory of ``atp-qk`` relative to ``atp`` (RSS growth of one call and
edgeatp's own buffer estimate). ``scaling`` prints the ratios against tokens (32, 128, 512; 2 pairs),
layers (2, 6, 12, 24; 4 pairs × 32 tokens) and pairs (2, 8, 32; 32 tokens). Ratios use process CPU
time, medians of interleaved repeats (slow calls run once), measured side by side in one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import edgeatp as ea  # noqa: E402
from autocircuit_compare import code_version, random_case  # noqa: E402
from autocircuit_side import timed_runs  # noqa: E402
from edges import GPT2_CONFIG, plain_pass  # noqa: E402

Calls = dict[str, tuple[Callable[[], Any], int]]


def edge_call(setup: ea.Setup, method: str, metas: dict[str, dict]) -> Callable[[], None]:
    """All-edge attribution with ``method``, keeping its meta (buffer sizes) under ``method``."""
    def run() -> None:
        metas[method] = ea.attribute_edges(setup, method).meta
    return run


def node_call(setup: ea.Setup, method: str) -> Callable[[], None]:
    """Node-level attribution of every head output, q/k/v input and MLP."""
    def run() -> None:
        ea.attribute_nodes(setup, method)
    return run


def patch_calls(adapter: ea.ModelAdapter, pairs: ea.PromptPairs, k: int) -> Calls:
    """Exact patching of ``k`` single edges spread over the graph, and ``k`` plain forwards of the batch."""
    graph = ea.EdgeGraph.from_shape(adapter.shape)
    coords = graph.edge_coords
    pick = coords[torch.linspace(0, len(coords) - 1, k).long()]
    edges = [graph.edge(w, r) for w, r in pick.tolist()]
    setup = ea.Setup(adapter, pairs, batch_size=len(pairs) * 4)
    tokens = pairs.batch(torch.arange(len(pairs))).base

    def patch() -> None:
        ea.patch_edges(setup, graph, edges)

    def forwards() -> None:
        with torch.no_grad():
            for _ in range(k):
                adapter.model(tokens)
    return {f"{k} plain forwards": (forwards, 3), f"patch {k} edges": (patch, 3)}


def medians(runs: dict[str, list[tuple[float, float, float]]]) -> dict[str, tuple[float, float]]:
    """Median CPU seconds and the memory run's RSS growth per call."""
    return {k: (statistics.median(c for _, c, _ in v), v[0][2]) for k, v in runs.items()}


def targets(shape: str, threads: int, k: int, repeats: int) -> None:
    """One table of the issue's targets for a GPT-2-small-shaped model at ``shape`` (pairs x tokens)."""
    torch.set_num_threads(threads)
    b, t = (int(v) for v in shape.split("x"))
    case = random_case("gpt2-sized random", GPT2_CONFIG, b, t)
    adapter, pairs = case.adapter, case.pairs
    adapter.model.requires_grad_(False)
    setup = ea.Setup(adapter, pairs, batch_size=b)
    metas: dict[str, dict] = {}
    calls: Calls = {"plain f+b": (plain_pass(adapter, pairs), repeats)}
    for m in ("atp", "atp-qk", "atp*"):
        calls[m] = (edge_call(setup, m, metas), repeats if m == "atp" else 1)
    calls["node atp*"] = (node_call(setup, "atp*"), 1)
    calls.update(patch_calls(adapter, pairs, k))
    med = medians(timed_runs(calls))
    plain = med["plain f+b"][0]
    L = adapter.shape.n_layers
    fwd, patch = med[f"{k} plain forwards"][0], med[f"patch {k} edges"][0]
    rows = [
        ("edge atp", med["atp"][0] / plain, 2.0, "≤"),
        ("edge atp-qk", med["atp-qk"][0] / plain, 5.0, "≤"),
        ("edge atp*", med["atp*"][0] / plain, L + 4.0, "≤"),
        ("node atp*", med["node atp*"][0] / plain, L + 3.0, "≤"),
        (f"exact patching, throughput vs {k} plain forwards", fwd / patch, 0.8, "≥"),
    ]
    mem_qk, mem_atp = med["atp-qk"][1], med["atp"][1]
    buf_qk, buf_atp = metas["atp-qk"].get("peak_buffer_mb"), metas["atp"].get("peak_buffer_mb")
    print(f"\nedgeatp at {code_version()}, torch {torch.__version__}, {threads} thread(s), GPT-2-small shape, "
          f"{b} pairs × {t} tokens; plain f+b {plain:.3g} CPU s")
    print("| target | measured | bound | met |\n|---|---|---|---|")
    for name, value, bound, op in rows:
        ok = value <= bound if op == "≤" else value >= bound
        print(f"| {name} | {value:.2f}× | {op} {bound:g}× | {'yes' if ok else 'NO'} |")
    ratio = mem_qk / max(mem_atp, 1e-9)
    print(f"| atp-qk peak extra memory vs atp (RSS growth {mem_qk:.0f} / {mem_atp:.0f} MB; buffers "
          f"{buf_qk} / {buf_atp} MB) | {ratio:.2f}× | ≤ 2× | {'yes' if ratio <= 2 else 'NO'} |")


def scaling(threads: int) -> None:
    """Cost ratios of every method against tokens, layers and pairs (one run each)."""
    torch.set_num_threads(threads)
    grid = ([("tokens", 2, 12, t) for t in (32, 128, 512)] + [("layers", 4, n, 32) for n in (2, 6, 12, 24)]
            + [("pairs", p, 12, 32) for p in (2, 8, 32)])
    print(f"\nedgeatp at {code_version()}, torch {torch.__version__}, {threads} thread(s); GPT-2-small widths, "
          "ratios to a plain forward+backward of the same batch (CPU time)")
    print("| varied | pairs × tokens | layers | edges | edge atp | edge atp-qk | edge atp* | node atp* |")
    print("|---|---|---|---|---|---|---|---|")
    for varied, b, n_layers, t in grid:
        case = random_case("gpt2-widths", dict(GPT2_CONFIG, n_layers=n_layers), b, t)
        adapter, pairs = case.adapter, case.pairs
        adapter.model.requires_grad_(False)
        setup = ea.Setup(adapter, pairs, batch_size=b)
        metas: dict[str, dict] = {}
        calls: Calls = {"plain f+b": (plain_pass(adapter, pairs), 3)}
        for m in ("atp", "atp-qk", "atp*"):
            calls[m] = (edge_call(setup, m, metas), 1)
        calls["node atp*"] = (node_call(setup, "atp*"), 1)
        med = medians(timed_runs(calls))
        plain = med["plain f+b"][0]
        cells = " | ".join(f"{med[m][0] / plain:.2f}" for m in ("atp", "atp-qk", "atp*", "node atp*"))
        n_edges = ea.EdgeGraph.from_shape(adapter.shape).n_edges
        print(f"| {varied} | {b} × {t} | {n_layers} | {n_edges} | {cells} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("targets", "scaling"))
    ap.add_argument("--shape", default="8x32", help="pairs x tokens for targets")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--patch-edges", type=int, default=32, help="K single edges for the patching throughput")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the fast calls")
    args = ap.parse_args()
    if args.mode == "targets":
        targets(args.shape, args.threads, args.patch_edges, args.repeats)
    else:
        scaling(args.threads)


if __name__ == "__main__":
    main()
