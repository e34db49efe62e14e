"""Exhaustive exact-patching reference tables of the zoo models:
``python -m edgeatp.zoo.reference NAME``.

For a fixed, seeded set of prompt pairs and both directions the table records the exact
effect (mean, mean of |effect|, standard error over pairs) of patching every head output,
query, key and value (per position and over all positions), every MLP output (per position
and over all positions), every MLP neuron (over all positions) and every edge of the
position-aggregated graph. Tests recompute entries from the committed weights.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..graph import EdgeGraph, node_set
from ..model import ModelAdapter, load_zoo_model
from ..patching import PatchEffects, patch_edges, patch_nodes
from ..setup import Setup
from ..tasks.builtin import make_task
from . import WEIGHTS, ZOO

TABLE_PAIRS = 64
TABLE_SEED = 1234


def reference_nodes(adapter: ModelAdapter, n_positions: int) -> list:
    """Every node the table covers, in table order."""
    shape = adapter.shape
    fams = ["head", "q", "k", "v"] + (["mlp"] if shape.has_mlp else [])
    nodes = list(node_set(shape, fams)) + list(node_set(shape, fams, n_positions))
    if shape.has_mlp:
        nodes += list(node_set(shape, ["neuron"]))
    return nodes


def _rows(effects: PatchEffects) -> dict[str, list[float]]:
    se = effects.per_pair.std(0) / effects.per_pair.shape[0] ** 0.5
    return {name: [round(m, 6), round(a, 6), round(s, 6)]
            for name, m, a, s in zip(effects.labels, effects.mean.tolist(), effects.mean_abs.tolist(), se.tolist())}


def build_table(name: str, n_pairs: int = TABLE_PAIRS, seed: int = TABLE_SEED, batch_size: int = 256) -> dict[str, Any]:
    """Compute the reference table of a zoo model from its shipped weights."""
    torch.set_num_threads(1)
    adapter = load_zoo_model(name)
    pairs = make_task(ZOO[name].task, adapter.tokenizer, n_pairs, seed=seed)
    graph = EdgeGraph.from_shape(adapter.shape)
    nodes = reference_nodes(adapter, pairs.n_positions)
    table: dict[str, Any] = {
        "format_version": 1,
        "model": f"zoo:{name}",
        "task": ZOO[name].task,
        "n_pairs": n_pairs,
        "seed": seed,
        "metric": "logit_diff",
        "columns": ["mean_effect", "mean_abs_effect", "stderr"],
        "sign_convention": "effect = metric(patched base run) - metric(base run); base = clean for noising, corrupt for denoising",
    }
    for direction in ("noising", "denoising"):
        node_eff = patch_nodes(Setup(adapter, pairs, direction=direction, batch_size=batch_size), nodes)
        edges = list(graph.edges())
        edge_eff = patch_edges(Setup(adapter, pairs, direction=direction, batch_size=batch_size), graph, edges)
        table[direction] = {
            "base_metric_mean": round(float(node_eff.base_metric.mean()), 6),
            "nodes": _rows(node_eff),
            "edges": _rows(edge_eff),
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="+", choices=sorted(ZOO))
    args = parser.parse_args()
    for name in args.names:
        table = build_table(name)
        (WEIGHTS / f"{name}.reference.json").write_text(json.dumps(table, separators=(",", ":")) + "\n")
        print(f"{name}: {len(table['noising']['nodes'])} nodes, {len(table['noising']['edges'])} edges")


if __name__ == "__main__":
    main()
