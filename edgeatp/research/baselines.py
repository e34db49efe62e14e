"""Activation-patching baselines that order nodes for verification (AtP* paper, §6).

Every method returns a :class:`Ranking`: the candidate nodes, the order in which they are
verified by exact patching, per-node scores where the method has them, and what the method
spent before the first verification.

* :func:`iterative` — a seeded random order (the "no prior" reference).
* :func:`subsampling` — Algorithm 1: ``m`` random subsets (inclusion probability ``p``), one
  joint patch each; per node the count, mean and sample variance of the effects of the subsets
  that included / excluded it; estimate ``ī+ − ī−``, ranked by ``|estimate|``.
* :func:`blocks` — contiguous (or random) blocks of ``B`` nodes, one joint patch each; nodes
  inherit their block's ``|effect|`` and are verified block by block.
* :func:`hierarchical` — coarse-to-fine groups in a max-priority queue keyed by ``|effect|``;
  a single node is emitted when popped (its own patch was its verification).
* :func:`attribution_ranking` — the same view of an AtP/AtP*/… :class:`~edgeatp.scores.NodeScores`.

COST UNIT: 1 unit = one forward pass over the whole prompt-pair set (all pairs, in as many
batches as the implementation needs). Verifying one node (patching it alone) costs 1; a joint
patch of a subset, block or group costs 1; an attribution method costs
``Cost.units(backward_cost)`` — its forwards plus ``backward_cost`` units per backward
(default 2). The unpatched clean and corrupt runs that every exact patch compares with are
shared by all patching methods, verification and the oracle, so no patching method is charged
for them. Stacking several patch sets into one batched forward changes the wall time, not the
cost.

Effects: a patch set's effect is the signed mean over prompt pairs ``c = E[I]`` and methods rank
by ``|c|`` (``effect="signed_mean"``, the default, matching the ground truth of the evaluation);
``effect="mean_abs"`` uses ``E|I|`` instead.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Literal, Sequence

import torch

from ..attribution.nodes import resolve_nodes
from ..errors import EdgeatpError
from ..graph import Node, NodeIndex
from ..patching import patch_nodes
from ..scores import NodeScores
from ..setup import Setup
from ..stats import SubsetStats, subset_statistics

EffectKind = Literal["signed_mean", "mean_abs"]
EFFECT_KINDS = ("signed_mean", "mean_abs")
NodesArg = NodeIndex | Sequence[Node] | Iterable[str] | None


# ------------------------------------------------------------------------------------ results
@dataclass(frozen=True, eq=False, kw_only=True)
class Ranking:
    """A verification order over candidate nodes and the cost units spent to produce it."""

    method: str
    nodes: NodeIndex
    order: torch.Tensor  # [n] long: indices into ``nodes``, verified first to last
    upfront: float  # units not spent verifying single nodes (before verification, or interleaved for Hierarchical)
    scores: torch.Tensor | None = None  # [n] float64 per node (index order); larger = earlier, nan = no estimate
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Reject orders that are not a permutation of the candidates, and misshapen scores."""
        n = len(self.nodes)
        if self.order.shape != (n,) or not torch.equal(torch.sort(self.order).values, torch.arange(n)):
            raise EdgeatpError(f"{self.method}: the order must be a permutation of the {n} candidate nodes")
        if self.scores is not None and self.scores.shape != (n,):
            raise EdgeatpError(f"{self.method}: scores must have one entry per candidate node ({n})")

    def __len__(self) -> int:
        """Number of candidate nodes."""
        return len(self.nodes)

    @property
    def ordered_nodes(self) -> tuple[Node, ...]:
        """The nodes in verification order."""
        return tuple(self.nodes[i] for i in self.order.tolist())

    @property
    def ranks(self) -> torch.Tensor:
        """1-based verification rank of every node, in the index's order."""
        ranks = torch.empty(len(self.nodes), dtype=torch.long)
        ranks[self.order] = torch.arange(1, len(self.nodes) + 1)
        return ranks

    def verification_costs(self) -> torch.Tensor:
        """Cost units spent once each node (index order) is verified: ``upfront + rank``."""
        return self.upfront + self.ranks.double()


@dataclass(frozen=True, eq=False, kw_only=True)
class SubsamplingResult(Ranking):
    """Subsampling's order plus the per-node subset statistics it came from."""

    stats: SubsetStats
    included: torch.Tensor  # [m, n] bool inclusion masks
    subset_effects: torch.Tensor  # [m] signed mean effect of each joint patch
    p: float
    m: int


@dataclass(frozen=True, eq=False, kw_only=True)
class BlocksResult(Ranking):
    """Blocks' order plus each node's block and each block's effect."""

    block_of: torch.Tensor  # [n] long
    block_effects: torch.Tensor  # [n_blocks] float64 (signed mean or mean |·|)
    block_size: int


@dataclass(frozen=True, eq=False, kw_only=True)
class HierarchicalResult(Ranking):
    """Hierarchical's emission order and the patches made up to each emission."""

    emission_cost: torch.Tensor  # [n] float64 per node (index order): units spent when it was emitted
    patches: int  # joint and single patches made by the search (leftover verification units excluded)

    def verification_costs(self) -> torch.Tensor:
        """Units spent when each node was emitted (search patches, then one unit per leftover node)."""
        return self.emission_cost.clone()


# ------------------------------------------------------------------------------------ shared pieces
def joint_effects(setup: Setup, sets: Sequence[Sequence[Node]]) -> torch.Tensor:
    """Exact ``[pairs, sets]`` effects of patching each set jointly, via :func:`patch_nodes` in
    slices of sets (its per-call mask tables grow with the number of sets)."""
    per_forward = max(1, setup.batch_size // max(1, min(setup.n_pairs, setup.batch_size)))
    step = 32 * per_forward
    parts = [patch_nodes(setup, sets[i: i + step]).per_pair for i in range(0, len(sets), step)]
    return torch.cat(parts, dim=1)


def _magnitude(per_pair: torch.Tensor, effect: EffectKind) -> torch.Tensor:
    """``|E[I]|`` or ``E|I|`` per column of ``[pairs, sets]`` effects."""
    return per_pair.mean(0).abs() if effect == "signed_mean" else per_pair.abs().mean(0)


def _check_effect(effect: str) -> None:
    """Reject unknown effect kinds with the accepted names."""
    if effect not in EFFECT_KINDS:
        raise EdgeatpError(f"unknown effect {effect!r}; use 'signed_mean' or 'mean_abs'")


def _order_by(scores: torch.Tensor) -> torch.Tensor:
    """Indices by decreasing score, nan last, ties in index order (stable)."""
    key = torch.where(torch.isnan(scores), torch.tensor(-math.inf, dtype=scores.dtype), scores)
    return torch.sort(key, descending=True, stable=True).indices


def _index(setup: Setup, nodes: NodesArg, positions: bool) -> NodeIndex:
    """The candidate node index (same defaults and checks as :func:`attribute_nodes`)."""
    index = resolve_nodes(setup.model, nodes, positions, setup.pairs.n_positions)
    if len(index) == 0:
        raise EdgeatpError("no candidate nodes: pass at least one node or node family")
    return index


def attribution_ranking(scores: NodeScores, backward_cost: float = 2.0) -> Ranking:
    """An attribution result as a verification order (decreasing score), upfront ``cost.units``."""
    return Ranking(method=scores.method, nodes=scores.nodes, order=scores.order(),
                   upfront=scores.cost.units(backward_cost), scores=scores.scores.double(),
                   meta={"backward_cost": backward_cost, "cost": scores.cost})


def order_ranking(order: Sequence[Node], method: str = "given", upfront: float = 0.0) -> Ranking:
    """A ranking from an explicit node order (the candidates are exactly the listed nodes)."""
    index = NodeIndex(tuple(order))
    return Ranking(method=method, nodes=index, order=torch.arange(len(index)), upfront=upfront)


# ------------------------------------------------------------------------------------ iterative
def iterative(nodes: NodeIndex | Sequence[Node], seed: int = 0) -> Ranking:
    """Verify nodes one by one in a seeded random order: no prior, no upfront cost."""
    index = nodes if isinstance(nodes, NodeIndex) else NodeIndex(tuple(nodes))
    if len(index) == 0:
        raise EdgeatpError("no candidate nodes: pass at least one node")
    gen = torch.Generator().manual_seed(seed)
    return Ranking(method="iterative", nodes=index, order=torch.randperm(len(index), generator=gen),
                   upfront=0.0, meta={"seed": seed})


# ------------------------------------------------------------------------------------ subsampling
def _per_pair_estimates(per_pair: torch.Tensor, included: torch.Tensor) -> torch.Tensor:
    """``[pairs, n]`` per-pair ``ī+ − ī−`` from ``[pairs, m]`` effects (nan where a side is empty)."""
    w = included.double()
    plus = per_pair @ w / w.sum(0)
    minus = per_pair @ (1 - w) / (1 - w).sum(0)
    return plus - minus


def subsampling(
    setup: Setup,
    nodes: NodesArg = None,
    p: float = 0.05,
    m: int = 256,
    seed: int = 0,
    effect: EffectKind = "signed_mean",
    positions: bool = False,
    design: torch.Tensor | None = None,
) -> SubsamplingResult:
    """Algorithm 1: ``m`` joint patches of random node subsets (each node in with probability
    ``p``); rank by ``|ī+ − ī−|`` (nodes never or always included: nan score, ranked last).

    ``design`` (``[m, n]`` bool) replaces the random draws, e.g. by a full factorial design.
    Cost: ``m`` units. With ``effect="mean_abs"`` the score is ``E_pairs|ī+ − ī−|`` per pair.
    """
    _check_effect(effect)
    index = _index(setup, nodes, positions)
    n = len(index)
    if design is not None:
        if design.dim() != 2 or design.shape[1] != n:
            raise EdgeatpError(f"the design must be a [subsets, {n}] bool mask over the candidate nodes")
        included = design.bool()
        m, p = int(included.shape[0]), float(included.double().mean())
    else:
        if not 0.0 < p < 1.0:
            raise EdgeatpError(f"inclusion probability p={p} must lie strictly between 0 and 1")
        if m < 1:
            raise EdgeatpError(f"the number of subsets m={m} must be at least 1")
        gen = torch.Generator().manual_seed(seed)
        included = torch.rand(m, n, generator=gen, dtype=torch.float64) < p
    sets = [[index[j] for j in row.nonzero()[:, 0].tolist()] for row in included]
    per_pair = joint_effects(setup, sets)
    subset_effects = per_pair.mean(0)
    stats = subset_statistics(subset_effects, included)
    if effect == "signed_mean":
        scores = stats.estimate.abs()
    else:
        scores = _per_pair_estimates(per_pair, included).abs().mean(0)
    return SubsamplingResult(method="subsampling", nodes=index, order=_order_by(scores), upfront=float(m),
                             scores=scores, meta={"seed": seed, "effect": effect, "design": design is not None},
                             stats=stats, included=included, subset_effects=subset_effects, p=p, m=m)


# ------------------------------------------------------------------------------------ blocks
def blocks(
    setup: Setup,
    nodes: NodesArg = None,
    block_size: int = 8,
    partition: Literal["contiguous", "random"] = "contiguous",
    seed: int = 0,
    effect: EffectKind = "signed_mean",
    positions: bool = False,
) -> BlocksResult:
    """Patch blocks of ``block_size`` nodes jointly (contiguous in the index's canonical order,
    or a seeded random partition); verify block by block in decreasing ``|block effect|``,
    within a block in a seeded random order. Cost: ``⌈n / block_size⌉`` units."""
    _check_effect(effect)
    if block_size < 1:
        raise EdgeatpError(f"block_size={block_size} must be at least 1")
    if partition not in ("contiguous", "random"):
        raise EdgeatpError(f"unknown partition {partition!r}; use 'contiguous' or 'random'")
    index = _index(setup, nodes, positions)
    n = len(index)
    gen = torch.Generator().manual_seed(seed)
    layout = torch.arange(n) if partition == "contiguous" else torch.randperm(n, generator=gen)
    members = list(layout.split(block_size))
    block_of = torch.empty(n, dtype=torch.long)
    for b, idx in enumerate(members):
        block_of[idx] = b
    per_pair = joint_effects(setup, [[index[j] for j in idx.tolist()] for idx in members])
    block_effects = per_pair.mean(0) if effect == "signed_mean" else per_pair.abs().mean(0)
    block_order = _order_by(_magnitude(per_pair, effect))
    order = torch.cat([members[b][torch.randperm(len(members[b]), generator=gen)] for b in block_order.tolist()])
    return BlocksResult(method="blocks", nodes=index, order=order, upfront=float(len(members)),
                        scores=block_effects.abs()[block_of], meta={"seed": seed, "partition": partition,
                                                                    "effect": effect},
                        block_of=block_of, block_effects=block_effects, block_size=block_size)


# ------------------------------------------------------------------------------------ hierarchical
@dataclass(frozen=True)
class TreeGroup:
    """A node of the hierarchical search tree: candidate indices and child groups (none for a leaf)."""

    members: tuple[int, ...]
    children: tuple["TreeGroup", ...] = ()

    @property
    def is_leaf(self) -> bool:
        """A single node: popping it emits (verifies) that node."""
        return len(self.members) == 1


def _structure_keys(node: Node) -> tuple[Any, ...]:
    """Tree levels of the structure-aware tree: layer, family, head/neuron, position."""
    unit = node.head if node.head is not None else node.neuron
    return (-1 if node.layer is None else node.layer, node.kind.value, unit, node.position)


def _cap(children: list[TreeGroup], max_children: int) -> list[TreeGroup]:
    """Wrap consecutive children into intermediate groups until at most ``max_children`` remain."""
    while len(children) > max_children:
        size = math.ceil(len(children) / max_children)
        children = [TreeGroup(tuple(itertools.chain.from_iterable(c.members for c in chunk)), tuple(chunk))
                    for chunk in (children[i: i + size] for i in range(0, len(children), size))]
    return children


def _structure_group(index: NodeIndex, members: list[int], level: int, max_children: int) -> TreeGroup:
    """Split members at the first level (from ``level``) whose key separates them."""
    if len(members) == 1:
        return TreeGroup((members[0],))
    keys = [_structure_keys(index[i]) for i in members]
    depth = len(keys[0])
    while level < depth and len({k[level] for k in keys}) == 1:
        level += 1
    parts: dict[Any, list[int]] = {}
    for i, k in zip(members, keys):
        parts.setdefault(k[level], []).append(i)
    children = [_structure_group(index, part, level + 1, max_children) for part in parts.values()]
    return TreeGroup(tuple(members), tuple(_cap(children, max_children)))


def _branching_group(members: list[int], branching: int) -> TreeGroup:
    """A fixed-branching tree over consecutive members (canonical order)."""
    if len(members) == 1:
        return TreeGroup((members[0],))
    size = math.ceil(len(members) / branching)
    return TreeGroup(tuple(members), tuple(_branching_group(members[i: i + size], branching)
                                       for i in range(0, len(members), size)))


def group_tree(index: NodeIndex, tree: Literal["structure", "branching"] = "structure", branching: int = 4,
               max_children: int = 4) -> TreeGroup:
    """The search tree over a node index: ``structure`` (layer → family → head/neuron groups →
    component → position, fan-out capped at ``max_children``) or ``branching`` (``b``-ary over
    the canonical order)."""
    if branching < 2 or max_children < 2:
        raise EdgeatpError("branching and max_children must be at least 2")
    members = list(range(len(index)))
    if tree == "structure":
        return _structure_group(index, members, 0, max_children)
    if tree == "branching":
        return _branching_group(members, branching)
    raise EdgeatpError(f"unknown tree {tree!r}; use 'structure' or 'branching'")


def hierarchical(
    setup: Setup,
    nodes: NodesArg = None,
    tree: Literal["structure", "branching"] = "structure",
    branching: int = 4,
    max_children: int = 4,
    effect: EffectKind = "signed_mean",
    positions: bool = False,
    max_patches: int | None = None,
    targets: Collection[Node] | None = None,
) -> HierarchicalResult:
    """Best-first search over a group tree: patch the top-level groups, then repeatedly pop the
    largest ``|effect|``; a single node is emitted (its patch verified it), a group's children
    are patched (1 unit each) and queued.

    The search stops when the queue is empty, when expanding would exceed ``max_patches``, or
    once every node of ``targets`` is emitted; leftover nodes follow in the priority order of
    their queued groups (canonical order inside a group), each costing one verification unit.
    """
    _check_effect(effect)
    index = _index(setup, nodes, positions)
    root = group_tree(index, tree, branching, max_children)
    waiting = {index.position_of(t) for t in targets} if targets is not None else None
    n = len(index)
    emission_cost = torch.full((n,), math.nan, dtype=torch.float64)
    priority = torch.full((n,), math.nan, dtype=torch.float64)
    order: list[int] = []
    heap: list[tuple[float, int, TreeGroup]] = []
    counter = itertools.count()
    patches = group_patches = 0

    def patch(groups: Sequence[TreeGroup]) -> None:
        """Patch each group jointly (1 unit each) and queue it by its |effect|."""
        nonlocal patches, group_patches
        per_pair = joint_effects(setup, [[index[i] for i in g.members] for g in groups])
        patches += len(groups)
        group_patches += sum(not g.is_leaf for g in groups)
        for g, value in zip(groups, _magnitude(per_pair, effect).tolist()):
            heapq.heappush(heap, (-value, next(counter), g))

    def emit(i: int, cost: float, value: float) -> None:
        """Record node ``i`` as verified at ``cost`` units with priority ``value``."""
        order.append(i)
        emission_cost[i], priority[i] = cost, value
        if waiting is not None:
            waiting.discard(i)

    patch(root.children if root.children else (root,))
    while heap and (waiting is None or waiting):
        neg, _, g = heap[0]
        if not g.is_leaf and max_patches is not None and patches + len(g.children) > max_patches:
            break
        heapq.heappop(heap)
        if g.is_leaf:
            emit(g.members[0], float(patches), -neg)
        else:
            patch(g.children)
    searched, emitted_by_search = patches, len(order)
    cost = float(patches)
    while heap:
        neg, _, g = heapq.heappop(heap)
        for i in g.members:
            cost += 0.0 if g.is_leaf else 1.0
            emit(i, cost, -neg)
    return HierarchicalResult(method="hierarchical", nodes=index, order=torch.tensor(order),
                              upfront=float(group_patches), scores=priority,
                              meta={"tree": tree, "branching": branching, "max_children": max_children,
                                    "effect": effect, "emitted_by_search": emitted_by_search},
                              emission_cost=emission_cost, patches=searched)
