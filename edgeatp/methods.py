"""The attribution methods as data: one registry that the library, the command line and the JSON read.

A :class:`Method` says what a method computes (QK fix, GradDrop), how (``kind``: gradient passes,
integrated gradients, or exact patching), at which levels it is implemented and what it costs in
forward/backward passes. :func:`get_method` is the one place where an unknown name or an
unsupported combination is refused. Nothing here imports torch, so the CLI can list methods at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

from .errors import option_error

LEVELS = ("edge", "node", "neuron", "group")
GradDropMode = Literal["block", "sublayer"]
Unit = tuple[str, int]


class Kind(str, Enum):
    """How a method gets its numbers."""

    GRADIENT = "gradient"  # a source forward, a base forward and one backward (+ one per GradDrop term)
    INTEGRATED = "integrated"  # a forward and a backward at every point of a path from base to source
    EXACT = "exact"  # one patched forward per component (ground truth)


@dataclass(frozen=True)
class Cost:
    """Work spent, in passes over the batch of prompt pairs (the AtP* paper's unit is a forward)."""

    forwards: int = 0
    backwards: int = 0

    def units(self, backward_cost: float = 2.0) -> float:
        """Cost in forward-pass units, a backward counted as ``backward_cost`` forwards."""
        return self.forwards + backward_cost * self.backwards

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.forwards + other.forwards, self.backwards + other.backwards)


@dataclass(frozen=True)
class Method:
    """One attribution method: its name, its fixes, its kind and the levels it works at."""

    name: str
    kind: Kind
    qk_fix: bool
    graddrop: bool
    levels: frozenset[str]
    description: str

    @property
    def is_estimate(self) -> bool:
        """Gradient and integrated methods estimate effects; exact methods measure them."""
        return self.kind is not Kind.EXACT

    def cost(self, *, graddrop_terms: int = 0, ig_steps: int = 8, reference: bool = False,
             patches: int = 0) -> Cost:
        """Passes over one batch: ``graddrop_terms`` extra backwards for GradDrop, ``ig_steps``
        points for integrated gradients, one clean ``reference`` forward per pass for metrics
        that compare with the clean run (KL), and ``patches`` patched forwards for exact methods."""
        ref = int(reference)
        if self.kind is Kind.EXACT:
            return Cost(forwards=2 + ref + patches)
        if self.kind is Kind.INTEGRATED:
            return Cost(forwards=2 + ig_steps * (1 + ref), backwards=ig_steps)
        return Cost(forwards=2 + ref, backwards=1 + (graddrop_terms if self.graddrop else 0))


_ALL = frozenset(LEVELS)
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("atp", Kind.GRADIENT, False, False, _ALL, "attribution patching (EAP for edges)"),
        Method("atp-qk", Kind.GRADIENT, True, False, _ALL, "AtP with the QK fix (exact softmax for queries and keys)"),
        Method("atp-gd", Kind.GRADIENT, False, True, _ALL, "AtP with GradDrop (one backward per dropped layer)"),
        Method("atp*", Kind.GRADIENT, True, True, _ALL, "AtP*: QK fix inside every GradDrop term"),
        Method("ig", Kind.INTEGRATED, False, False, _ALL,
               "integrated gradients along the embedding path (EAP-IG inputs)"),
        Method("exact", Kind.EXACT, False, False, _ALL, "exact activation/edge patching, one forward per component"),
    )
}


def graddrop_units(n_layers: int, attn_only: bool, mode: GradDropMode = "block") -> list[Unit]:
    """The units whose residual writes GradDrop drops one at a time (one extra backward each).

    ``block``: one unit per transformer block (attention + MLP writes together), the AtP*
    paper's ``L`` terms (exact for parallel blocks, our default for sequential ones);
    ``sublayer``: attention and MLP writes separately (``2L`` terms for sequential blocks).
    """
    if mode == "block" or attn_only:
        return [("block", layer) for layer in range(n_layers)]
    if mode != "sublayer":
        raise ValueError(f"unknown GradDrop granularity {mode!r}; use 'block' or 'sublayer'")
    return [(kind, layer) for layer in range(n_layers) for kind in ("attn", "mlp")]


def get_method(name: str | Method, level: str = "edge") -> Method:
    """The method called ``name`` if it works at ``level``; one clear error otherwise."""
    if isinstance(name, Method):
        method = name
    elif name in METHODS:
        method = METHODS[name]
    else:
        raise option_error(f"{{method}} {name!r} is unknown; choose from {', '.join(METHODS)}")
    if level not in LEVELS:
        raise option_error(f"{{level}} {level!r} is unknown; choose from {', '.join(LEVELS)}")
    if level not in method.levels:
        where = ", ".join(m.name for m in METHODS.values() if level in m.levels)
        raise option_error(f"{{method}} {method.name} works at {', '.join(sorted(method.levels))} level only; "
                           f"at {level} level use one of {where}")
    return method
