"""edgeatp: find the circuits inside transformer language models.

The library in one import::

    import edgeatp as ea
    model = ea.load_model("zoo:ioi")
    setup = ea.Setup(model, ea.make_task("ioi", model.tokenizer, n=64))
    edges = ea.attribute_edges(setup, "atp*")
    circuit = ea.measure(setup, ea.prune(edges, top_k=16))
    circuit = circuit.with_(verification=ea.verify(setup, circuit, edges))
    ea.write_outputs(circuit, "out", ["json", "svg", "md"])

Names load on first use (``import edgeatp`` does not import torch). The paper's research code
(patching baselines, the node diagnostic, cost curves, IRWRGM) is in :mod:`edgeatp.research`;
every export is in :mod:`edgeatp.export`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

_WHERE = {
    "load_model": ".model", "ModelAdapter": ".model",
    "make_task": ".tasks", "load_pairs": ".tasks", "PromptPairs": ".tasks",
    "Setup": ".setup", "METHODS": ".methods",
    "attribute_nodes": ".attribution", "attribute_edges": ".attribution", "attribute_groups": ".attribution",
    "patch_nodes": ".patching", "patch_edges": ".patching",
    "prune": ".circuit", "Circuit": ".circuit",
    "measure": ".verification", "verify": ".verification", "faithfulness_curve": ".verification",
    "EdgeScores": ".scores", "NodeScores": ".scores",
    "Node": ".graph", "Edge": ".graph", "EdgeGraph": ".graph",
    "read_circuit": ".export", "write_outputs": ".export", "to_networkx": ".export",
    "EdgeatpError": ".errors",
}
_MODULES = ("attribution", "export", "research")
__all__ = sorted([*_WHERE, *_MODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = import_module(f".{name}", __name__)
    elif name in _WHERE:
        value = getattr(import_module(_WHERE[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
