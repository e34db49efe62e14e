"""edgeatp: find the circuits inside transformer language models.

The library API in one import::

    import edgeatp as ea
    model = ea.load_model("zoo:ioi")
    pairs = ea.make_task("ioi", model.tokenizer, n=64)
    edges = ea.attribute_edges(model, pairs, method="atp*")
    exact = ea.patch_edges(model, pairs, edges.graph, [e for e, *_ in edges.top(10)])
"""

from .attribution.edges import EDGE_METHODS, attribute_edges
from .attribution.grouping import Group, attribute_groups, coarse_to_fine, patch_groups
from .baselines import Ranking, attribution_ranking, blocks, hierarchical, iterative, subsampling
from .circuit import Circuit, faithfulness_curve, prune, verify
from .diagnostics import edge_false_negative_bound, false_negative_bound
from .attribution.nodes import NODE_METHODS, attribute_nodes
from .errors import DataError, EdgeatpError, ModelError
from .evaluation import MethodSpec, cost_curve, evaluate_methods, irwrgm, recall_at_k
from .graph import Edge, EdgeGraph, ModelShape, Node, NodeIndex, NodeKind, node_set
from .metrics import METRICS, Metric, get_metric
from .model import ModelAdapter, Site, load_model
from .patching import PatchEffects, patch_edges, patch_nodes, run_circuit
from .scores import Cost, EdgeScores, NodeScores
from .tasks import TASKS, Direction, PromptPairs, load_pairs, make_task

__version__ = "0.1.0"

__all__ = [
    "Circuit", "Group", "MethodSpec", "Ranking", "attribute_groups", "attribution_ranking", "blocks", "coarse_to_fine",
    "cost_curve", "edge_false_negative_bound", "evaluate_methods", "faithfulness_curve", "false_negative_bound",
    "hierarchical", "irwrgm", "iterative", "patch_groups", "prune", "recall_at_k", "subsampling", "verify",
    "EDGE_METHODS", "NODE_METHODS", "METRICS", "TASKS", "Cost", "DataError", "Direction", "Edge", "EdgeGraph",
    "EdgeScores", "EdgeatpError", "Metric", "ModelAdapter", "ModelError", "ModelShape", "Node", "NodeIndex",
    "NodeKind", "NodeScores", "PatchEffects", "PromptPairs", "Site", "attribute_edges", "attribute_nodes",
    "get_metric", "load_model", "load_pairs", "make_task", "node_set", "patch_edges", "patch_nodes", "run_circuit",
]
