"""Attribution methods (nodes, edges, groups) and the pieces they share.

* :mod:`.passes` — gradient runs, the GradDrop combination, the one batch loop (GradDrop's units are
  in :mod:`edgeatp.methods`, with the costs they add).
* :mod:`.qk_fix` — the QK fix as pure tensor math.
* :mod:`.nodes`, :mod:`.edges`, :mod:`.grouping` — the three levels.
"""

from ..methods import GradDropMode, graddrop_units
from .edges import EdgeEstimator, EdgePlan, MemoryBudget, ReaderGroup, attribute_edges, per_head_kv
from .grouping import (CoarseEdgeScores, CoarseToFine, Group, GroupScores, attribute_groups, coarse_edges,
                       coarse_to_fine, head_groups, layer_groups, parse_groups, patch_coarse_edges, patch_groups,
                       span_groups)
from .nodes import NodeEstimator, NodeTerms, attribute_nodes, resolve_nodes
from .passes import (Estimator, GradRun, SiteNeeds, estimate_pairs, fold_passes, gradient_run, graddrop_magnitude,
                     nonzero_terms)

__all__ = [
    "CoarseEdgeScores", "CoarseToFine", "EdgeEstimator", "EdgePlan", "Estimator", "GradDropMode", "GradRun", "Group",
    "GroupScores", "MemoryBudget", "NodeEstimator", "NodeTerms", "ReaderGroup", "SiteNeeds", "attribute_edges",
    "attribute_groups", "attribute_nodes", "coarse_edges", "coarse_to_fine", "estimate_pairs", "fold_passes",
    "gradient_run", "graddrop_magnitude", "graddrop_units", "head_groups", "layer_groups", "nonzero_terms",
    "parse_groups", "patch_coarse_edges", "patch_groups", "per_head_kv", "resolve_nodes", "span_groups",
]
