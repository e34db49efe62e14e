"""Measuring circuits exactly: faithfulness and necessity, targeted verification, the missed-edge bound.

* Faithfulness of a circuit: every edge outside it takes its corrupt value (noising) — or, when
  denoising, every edge inside it takes its clean value — normalised so 1 is the clean and 0 the
  corrupt metric. Necessity: the circuit's own edges are patched instead.
* Verification: exact patches of the top-ranked edges (or nodes, or groups) and of a random sample
  of those outside the circuit, compared with their estimates.
* The bound (AtP* diagnostic applied to edges): joint patches of random subsets of the unverified
  edges and a Welch test give a level beyond which, with confidence ``1 − α``, no unverified
  edge's ``|effect|`` lies.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from scipy.stats import spearmanr

from .circuit import Check, Circuit, FaithfulnessCurve, Verification, member_components, top_k_circuits
from .errors import EdgeatpError, option_error
from .graph import Edge, EdgeGraph, Node, NodeKind
from .memory import PatchLoad
from .model import capture
from .patching import patch_edges, patch_nodes, run_circuit
from .scores import EdgeScores, NodeScores
from .setup import Setup
from .stats import SubsetStats, WelchStats, subset_statistics, welch_upper_bounds
from .tasks.pairs import Direction


# ------------------------------------------------------------------------------------ faithfulness
@dataclass(frozen=True)
class Endpoints:
    """The mean metric on the clean and on the corrupt prompts (faithfulness 1 and 0) and the
    forwards that measured them."""

    clean: float
    corrupt: float
    n_forwards: int

    @property
    def gap(self) -> float:
        """``clean − corrupt``; refused when the two are the same (faithfulness is then undefined)."""
        gap = self.clean - self.corrupt
        if not math.isfinite(gap) or abs(gap) < 1e-9:
            raise EdgeatpError("the clean and corrupt prompts give the same mean metric, so faithfulness is "
                               "undefined; check the corrupt prompts or the answer tokens")
        return gap

    def normalise(self, metric: torch.Tensor) -> torch.Tensor:
        """Mean metric values as ``(m − corrupt)/(clean − corrupt)``."""
        return (metric.double() - self.corrupt) / self.gap


def endpoints(setup: Setup) -> Endpoints:
    """Mean metric on the clean and on the corrupt prompts (pairs per batch within the memory
    budget; the same sums whatever the batches)."""
    pair_bs = setup.stacking(PatchLoad())[0]
    values = torch.zeros(2, setup.n_pairs, dtype=torch.float64, device=setup.model.device)
    for batch in setup.batches("clean and corrupt runs", batch_size=pair_bs):
        ref = setup.reference(batch)
        for i, tokens in enumerate((batch.clean, batch.corrupt)):
            logits, _ = capture(setup.model, tokens, [])
            values[i, batch.index] = setup.metric(logits, batch, ref).double().to(values.device)
    setup.ranks.check("clean and corrupt runs", layout=f"{setup.n_pairs} prompt pairs")  # each ran its own pairs
    clean, corrupt = setup.ranks.sum_values(values.sum(1).tolist())
    forwards = setup.n_batches(pair_bs) * (2 + int(setup.metric.needs_reference))  # one process's count
    ends = Endpoints(clean / setup.n_pairs, corrupt / setup.n_pairs, forwards)
    ends.gap  # noqa: B018 - refuse an undefined faithfulness at once
    return ends


def clean_corrupt_means(setup: Setup) -> tuple[float, float]:
    """Mean metric on the clean and on the corrupt prompts."""
    ends = endpoints(setup)
    return ends.clean, ends.corrupt


def faithfulness_of(setup: Setup, graph: EdgeGraph, keep: torch.Tensor, ends: Endpoints, necessity: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Exact faithfulness (and, if asked, necessity) of circuits given as ``[S, P, W, R]`` masks, and
    the forwards spent. Noising patches corrupt values into the clean run and denoising clean
    values into the corrupt run, so the two directions swap which edges are patched for
    faithfulness: the edges outside the circuit when noising, the circuit's own when denoising."""
    noising = setup.direction is Direction.NOISING
    faithful = run_circuit(setup, graph, keep, knockout=not noising)
    values = ends.normalise(faithful.base_metric.mean() + faithful.mean)
    if not necessity:
        return values, None, faithful.n_forwards
    knocked = run_circuit(setup, graph, keep, knockout=noising)
    return values, ends.normalise(knocked.base_metric.mean() + knocked.mean), faithful.n_forwards + knocked.n_forwards


def circuits_faithfulness(setup: Setup, circuits: Sequence[Circuit], label: str = "") -> FaithfulnessCurve:
    """Faithfulness and necessity of several edge circuits of one graph, in one sweep each."""
    if not circuits:
        raise EdgeatpError("no circuit to evaluate: every requested size leaves no edge after cleanup; "
                           "try larger sizes")
    ends = endpoints(setup)
    faithful, necessary, _ = faithfulness_of(setup, circuits[0].graph, torch.stack([c.in_graph for c in circuits]),
                                             ends)
    return FaithfulnessCurve(tuple(c.n_edges for c in circuits), tuple(faithful.tolist()),
                             tuple(necessary.tolist()), ends.clean, ends.corrupt, label)  # type: ignore[union-attr]


def faithfulness_curve(setup: Setup, scores: EdgeScores, sizes: Sequence[int], cleanup: bool = True
                       ) -> FaithfulnessCurve:
    """Faithfulness and necessity of the distinct top-``k`` circuits for ``k`` in ``sizes`` (sizes
    reported as kept edge counts, after cleanup)."""
    circuits = [c for _, c in top_k_circuits(scores, sizes, cleanup)]
    return circuits_faithfulness(setup, circuits, label=f"top-k of {scores.method}")


def component_curve(setup: Setup, circuits: Sequence[Circuit], label: str = "") -> FaithfulnessCurve:
    """Faithfulness and necessity of node- or group-level circuits (sizes = kept units: components,
    or groups of group circuits): the components outside (faithfulness) or inside (necessity) each
    circuit patched as nodes, all circuits in one sweep."""
    if not circuits:
        raise EdgeatpError("no circuit to evaluate")
    ends = endpoints(setup)
    writers = [w for w in circuits[0].graph.writers if w.kind is not NodeKind.INPUT]
    sets = []
    for c in circuits:
        kept = set(c.nodes())
        outside, inside = [w for w in writers if w not in kept], [w for w in writers if w in kept]
        sets += [outside, inside] if setup.direction is Direction.NOISING else [inside, outside]
    eff = patch_nodes(setup, sets, labels=[f"{i // 2}{'fn'[i % 2]}" for i in range(len(sets))])
    base = eff.base_metric.mean().item()
    values = ends.normalise(base + eff.mean).tolist()
    sizes = tuple(sum(u.in_circuit for u in c.units) for c in circuits)  # kept components or groups
    return FaithfulnessCurve(sizes, tuple(values[0::2]), tuple(values[1::2]), ends.clean, ends.corrupt, label)


def measure(setup: Setup, circuit: Circuit) -> Circuit:
    """The circuit with its own faithfulness and necessity measured (edge circuits by edge
    patching, node and group circuits by patching the components outside/inside)."""
    curve = circuits_faithfulness(setup, [circuit]) if circuit.level == "edge" else component_curve(setup, [circuit])
    return circuit.with_(faithfulness=curve.faithfulness[0], necessity=curve.necessity[0])


# ------------------------------------------------------------------------------------ verification
def same_sign(estimate: float, exact: float) -> bool:
    """Whether an estimate has the sign of the exact effect (zero only matches zero)."""
    return (estimate > 0) == (exact > 0) and (estimate < 0) == (exact < 0)


def summarise(checks: Sequence[Check], n_ranked: int, bound: float | None = None, alpha: float | None = None,
              forwards: int = 0) -> Verification:
    """Agreement of estimates and exact effects over the first ``n_ranked`` checks, and the
    largest exact effect among the checked items outside the circuit."""
    head = list(checks[:n_ranked])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant inputs: spearman is NaN, which is what we report
        rho = float(spearmanr([abs(c.estimate) for c in head], [abs(c.exact) for c in head]).correlation) \
            if len(head) > 2 else float("nan")
    signs = sum(same_sign(c.estimate, c.exact) for c in head) / len(head) if head else float("nan")
    miss = max(checks, key=lambda c: abs(c.estimate - c.exact))
    outside = [abs(c.exact) for c in checks if not c.in_circuit]
    return Verification(tuple(checks), n_ranked, rho, signs, miss.name, abs(miss.estimate - miss.exact),
                        max(outside, default=0.0), len(outside), bound, alpha, forwards)


def _in(circuit: Circuit, edge: Edge) -> bool:
    w, r = circuit.graph.index_of(edge)
    if circuit.graph.positional and edge.position is not None:
        return bool(circuit.in_graph[edge.position, w, r])
    return bool(circuit.in_graph[:, w, r].any())


def verify(setup: Setup, circuit: Circuit, scores: EdgeScores, *, top: int = 20, sample_below: int = 20,
           seed: int = 0, bound: bool = False, alpha: float = 0.05, bound_samples: int = 256,
           bound_p: float = 0.05) -> Verification:
    """Exactly patch the ``top`` best edges and ``sample_below`` random edges outside the circuit;
    compare with the estimates. ``bound`` adds the false-negative diagnostic over every edge left
    unverified (subsampling + Welch test; see :func:`edge_false_negative_bound`)."""
    if top < 0 or sample_below < 0:
        raise option_error("{top} and {sample_below} must be non-negative")
    ranked = [e for e, *_ in scores.top(top)]
    ranked_set = set(ranked)
    outside = [e for e in scores.graph.edges() if not _in(circuit, e)]
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(outside), generator=gen)[: min(sample_below, len(outside))].tolist()
    todo = ranked + [outside[i] for i in pick if outside[i] not in ranked_set]
    if not todo:
        raise EdgeatpError("nothing to verify: the graph has no edges")
    eff = patch_edges(setup, scores.graph, todo)
    checks = [Check(e.name, scores.signed_of(e), x, scores[e], _in(circuit, e)) for e, x in zip(todo, eff.mean.tolist())]
    theta = None
    forwards = eff.n_forwards
    if bound:
        verified = {c.name for c in checks}
        unverified = [e for e in outside if e.name not in verified]
        theta = 0.0  # every edge outside the circuit was patched exactly: nothing is left to bound
        if unverified:
            result = edge_false_negative_bound(setup, scores.graph, unverified, samples=bound_samples, p=bound_p,
                                               alpha=alpha, seed=seed)
            theta = result.theta
            forwards += result.n_forwards
    return summarise(checks, len(ranked), theta, alpha if bound else None, forwards)


def verify_nodes(setup: Setup, circuit: Circuit, scores: NodeScores, *, top: int = 20, sample_below: int = 20,
                 seed: int = 0) -> Verification:
    """Node-level verification: exact patches of the ``top`` best nodes and a random sample of the rest."""
    ranked = [n for n, *_ in scores.top(top)]
    rest = [n for n in scores.nodes if n not in set(ranked)]
    gen = torch.Generator().manual_seed(seed)
    sample = [rest[i] for i in torch.randperm(len(rest), generator=gen)[: min(sample_below, len(rest))].tolist()]
    todo = ranked + sample
    if not todo:
        raise EdgeatpError("nothing to verify: no nodes were scored")
    eff = patch_nodes(setup, todo)
    kept = set(circuit.node_scores)
    checks = [Check(n.name, scores.signed_of(n), x, scores[n],
                    any(c.name in kept for c in member_components(circuit.graph, n)))
              for n, x in zip(todo, eff.mean.tolist())]
    return summarise(checks, len(ranked), forwards=eff.n_forwards)


def with_exact_units(circuit: Circuit, exact: dict[str, float], n_forwards: int, n_ranked: int | None = None
                     ) -> Circuit:
    """The circuit with exact effects filled into its units and a verification over the units
    that have one (the first ``n_ranked`` of them by score are the ranked ones; default all)."""
    units = tuple(replace(u, exact=exact.get(u.name, u.exact)) for u in circuit.units)
    checked = sorted((u for u in units if u.exact is not None), key=lambda u: -u.score)
    if not checked:
        return circuit.with_(units=units)
    ranked = [u for u in checked if u.name in exact][: n_ranked if n_ranked is not None else len(checked)]
    rest = [u for u in checked if u not in ranked]
    checks = [Check(u.name, u.signed, u.exact, u.score, u.in_circuit) for u in (*ranked, *rest)]  # type: ignore[arg-type]
    return circuit.with_(units=units, verification=summarise(checks, len(ranked), forwards=n_forwards))


def verify_components(setup: Setup, circuit: Circuit, *, top: int = 20, sample_below: int = 20, seed: int = 0
                      ) -> Circuit:
    """Node-level circuits: exactly patch the ``top`` best components (a head's output, an MLP's
    output, a neuron) and a random sample of the components outside the circuit."""
    ranked = circuit.units_of("component")
    if not ranked:
        raise EdgeatpError("the circuit has no scored components to verify")
    head = ranked[:top]
    rest = [u for u in ranked[top:] if not u.in_circuit]
    gen = torch.Generator().manual_seed(seed)
    sample = [rest[i] for i in torch.randperm(len(rest), generator=gen)[: min(sample_below, len(rest))].tolist()]
    todo = head + sample
    eff = patch_nodes(setup, [Node.parse(u.name) for u in todo], labels=[u.name for u in todo])
    exact = dict(zip(eff.labels, eff.mean.tolist()))
    fresh = circuit.with_(units=tuple(replace(u, exact=None) for u in circuit.units))
    return with_exact_units(fresh, exact, eff.n_forwards, len(head))


# ------------------------------------------------------------------------------------ the bound on missed edges
@dataclass(frozen=True, eq=False)
class EdgeFalseNegativeBound:
    """θ* over edges: with confidence ``1 − alpha`` no listed unverified edge has ``|c| ≥ theta``."""

    theta: float
    alpha: float
    m: int
    p: float
    edges: tuple[Edge, ...]
    stats: SubsetStats
    welch: WelchStats
    worst: Edge
    cost: float  # units (m joint patches)
    n_forwards: int  # forwards actually run (patch sets are stacked several per forward)


def edge_false_negative_bound(setup: Setup, graph: EdgeGraph, unverified: Sequence[Edge], *, samples: int = 256,
                              p: float = 0.05, alpha: float = 0.05, seed: int = 0) -> EdgeFalseNegativeBound:
    """``samples`` joint patches of random subsets of the unverified edges (inclusion probability
    ``p``), then ``θ* = max_e (|ĉ(e)| + t·SE_e)`` (see :mod:`edgeatp.stats`)."""
    edges = tuple(unverified)
    if not edges:
        raise EdgeatpError("no unverified edges to bound: pass the edges left outside verification")
    if not 0.0 < p < 1.0 or samples < 1:
        raise option_error(f"need 0 < {{bound_p}} < 1 and at least one of {{bound_samples}} (got p={p}, "
                           f"samples={samples})")
    gen = torch.Generator().manual_seed(seed)
    included = torch.rand(samples, len(edges), generator=gen, dtype=torch.float64) < p
    sets = [[edges[j] for j in row.nonzero()[:, 0].tolist()] for row in included]
    effects = patch_edges(setup, graph, sets, labels=[f"subset{j}" for j in range(samples)])
    stats = subset_statistics(effects.mean, included)
    welch = welch_upper_bounds(stats, alpha, [e.name for e in edges], kind="edge", samples_option="bound_samples",
                               p_option="bound_p")
    worst = int(torch.argmax(welch.upper))
    return EdgeFalseNegativeBound(float(welch.upper[worst]), alpha, samples, p, edges, stats, welch, edges[worst],
                                  float(samples), effects.n_forwards)
