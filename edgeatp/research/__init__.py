"""The AtP* paper's research apparatus: patching baselines, the node false-negative diagnostic and
the evaluation of node rankings (cost-of-verification curves, IRWRGM); :mod:`.measure` measures runs'
passes, memory and time for the cost planner (imported on its own: it is not part of the paper)."""

from .baselines import (BlocksResult, HierarchicalResult, Ranking, SubsamplingResult, attribution_ranking, blocks,
                        hierarchical, iterative, joint_effects, order_ranking, subsampling)
from .diagnostics import FalseNegativeBound, false_negative_bound
from .evaluation import (EvaluationTable, GroundTruth, MethodSpec, compute_ground_truth, cost_curve,
                         evaluate_methods, irwrgm, oracle_curve, recall_at_k)

__all__ = [
    "BlocksResult", "EvaluationTable", "FalseNegativeBound", "GroundTruth", "HierarchicalResult", "MethodSpec",
    "Ranking", "SubsamplingResult", "attribution_ranking", "blocks", "compute_ground_truth", "cost_curve",
    "evaluate_methods", "false_negative_bound", "hierarchical", "irwrgm", "iterative", "joint_effects",
    "oracle_curve", "order_ranking", "recall_at_k", "subsampling",
]
