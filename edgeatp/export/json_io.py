"""Circuits as JSON: a versioned edgeatp format that round-trips exactly, and the EAP-IG/MIB format.

**edgeatp format, version 2** (``mode="edgeatp"``; JSON Schema in ``circuit.schema.json``)::

    {"format": "edgeatp.circuit", "version": 2,
     "level": "edge" | "node" | "neuron" | "group", "method": "atp-qk", "direction": "noising" | "denoising",
     "metric": "logit_diff", "sign_convention": "...",          # informational, ignored on read
     "shape": {"n_layers", "n_heads", "d_model", "d_head", "d_mlp", "attn_only", "parallel_attn_mlp"},
     "graph": {"writers": ["input", "a0.h0", ...], "readers": ["a0.h0<q>", ..., "logits"],
               "n_positions": null | T},
     "dtype": {"score": "float64", "signed": "float64"},
     "n_edges": 16,                                              # kept edges, checked on read
     "edges": {"name": ["input->a0.h0<q>", ...],  "position": [null | p, ...],
               "score": [...], "signed": [...], "in_graph": [true, ...]},
     "selection": null | {"rule", "value", "requested", "kept", "notes": [...]},
     "warnings": [...],                                          # the selection's notes (informational)
     "faithfulness": 0.86 | null, "necessity": 0.002 | null,     # the circuit's own
     "units": [{"name", "kind", "score", "signed", "exact", "in_circuit", "members"?}, ...],  # components,
                                                                 # groups (with members), coarse edges
     "curve": null | {"sizes", "faithfulness", "necessity", "clean_metric", "corrupt_metric", "label"},
     "verification": null | {"checks": [{"name", "estimate", "exact", "score", "in_circuit"}, ...], "n_ranked",
                             "rank_correlation", "sign_agreement", "largest_miss", "largest_miss_size",
                             "outside_max", "outside_checked", "bound", "bound_alpha", "n_forwards"},
     "refinement": null | {"ranking", "objective", "budget", "seed", "n_candidates", "n_forwards",   # optional:
                           "clean_metric", "corrupt_metric",                   # the exact circuit search
                           "sizes": [{"size", "edges": [...], "faithfulness", "necessity", "before_edges",
                                      "before_faithfulness", "before_necessity", "found_by", "n_forwards"}, ...]},
     "circuit_metrics": [{"label", "n_edges", "grid", "cpr_sizes", "cpr_faithfulness", "cmd_sizes",  # optional:
                          "cmd_faithfulness", "cpr", "cmd", "n_forwards"}, ...],  # MIB's CPR/CMD
     "meta": {...}}

``edges`` is columnar (one entry per edge, ``pandas.DataFrame(data["edges"])`` gives a table) and
lists every existing edge of the graph in canonical order (positions outermost), kept or not;
``circuit_to_json(..., all_edges=False)`` lists only kept edges, and on reading, unlisted edges
get score 0 and stay out of the circuit. Positional edge names carry ``@p``. ``score`` is the
non-negative ranking score (mean over prompt pairs of per-pair ``|estimate|``), ``signed`` the
signed mean estimate. A real number is a JSON number or, when not finite, one of the strings
``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (the output is strict JSON); ``null`` means "none".
Floats are written with Python's shortest round-trip repr, so tensors come back bit-identical.
``meta`` must hold JSON-able values: tuples come back as lists, enums as their values, tensors as
lists, non-finite floats as the strings above and other objects as ``str(obj)``. Files are
checked against the schema on reading; version 1 files (the curve under ``faithfulness``, the
circuit's own numbers and the selection rule in ``meta``) are read too, and so are version 2 files
written before ``refinement`` and ``circuit_metrics`` existed (both optional: none).

**MIB mode** (``mode="mib"``): the EAP-IG ``Graph.to_json`` / MIB circuit-track format,
``{"cfg": {n_layers, n_heads, parallel_attn_mlp, d_model}, "nodes": {name: {"in_graph", "score"?}},
"edges": {"a0.h0->a1.h2<q>": {"score", "in_graph"}}}``. Conventions:

* edge ``score`` is edgeatp's non-negative ranking score, so MIB tools ranking by ``|score|``
  reproduce edgeatp's order; the signed estimate is kept in an extra ``signed`` key per edge
  (EAP-IG ignores unknown keys). Reading a file without ``signed`` (written by EAP-IG) takes its
  signed ``score`` as the estimate and ``|score|`` as the ranking score.
* MIB has no positions: a position-resolved circuit is reduced per edge with
  ``position_reduce="sum"`` (scores and signed estimates summed over positions; the signed sum is
  the position-aggregated first-order estimate) or ``"max"`` (the position with the largest
  score, its signed estimate); an edge is in the graph if it is kept at any position.
* neuron writers ``m{l}.n{i}`` are merged into their MLP ``m{l}`` (scores summed, kept if any
  neuron edge is kept), as MIB neurons are a different thing (``d_model`` output dimensions).
* nodes: every component of the model; ``in_graph`` = touched by a kept edge (``logits`` always
  true, as in EAP-IG); ``score`` only for node- and neuron-level circuits (neuron scores summed
  into their MLP; components that were not scored get 0, so MIB's node ranking puts them last).
* ``cfg`` also carries ``d_head``, ``d_mlp`` and ``attn_only``, and a top-level ``edgeatp`` block
  carries level, method, direction, metric, ``n_positions``, ``position_reduce`` and meta;
  EAP-IG ignores both. When reading a file without them: ``d_head = d_model // n_heads``,
  ``d_mlp = 4 * d_model``, ``attn_only = false``, method ``"mib"``, direction noising (EAP-IG
  patches corrupt activations into the clean run), metric ``logit_diff``, level ``edge``. A
  neuron-level circuit reads back as ``level="node"`` on MLP-level nodes. Node scores of 0 or
  NaN (EAP-IG's "unscored") read back as absent. Verification and faithfulness are not stored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import torch

from ..circuit import (LEVELS, Check, Circuit, CircuitMetrics, FaithfulnessCurve, KVView, RefinedSize, Refinement,
                       Selection, Unit, Verification)
from ..errors import EdgeatpError
from ..graph import EdgeGraph, ModelShape, Node, NodeKind
from ..tasks.pairs import Direction
from .files import atomic_write
from .schema import FORMAT, VERSION, check_circuit_data, load_json_data, malformed

MIB_EXTENSION = "edgeatp.circuit.mib"
MODES = ("edgeatp", "mib")
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
PositionReduce = Literal["sum", "max"]


# ------------------------------------------------------------------------------------ values
def encode_real(x: float) -> float | str:
    """A float as strict JSON: itself when finite, else ``"NaN"``/``"Infinity"``/``"-Infinity"``."""
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else "Infinity" if x > 0 else "-Infinity"


def decode_real(value: Any, where: str) -> float:
    """Inverse of :func:`encode_real`, with an error naming the field when the value is no real."""
    if isinstance(value, str) and value in NON_FINITE:
        return NON_FINITE[value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise EdgeatpError(f"{where}: expected a number (or 'NaN', 'Infinity', '-Infinity'), got {value!r}")


def _optional_real(value: Any, where: str) -> float | None:
    """A real that may be ``null``."""
    return None if value is None else decode_real(value, where)


def _reals(values: list[float]) -> list[float | str]:
    """A list of floats as strict JSON reals (fast path when all are finite)."""
    return values if all(math.isfinite(v) for v in values) else [encode_real(v) for v in values]


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data (see the module docstring for what changes on the way)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, float):
        return encode_real(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _dtype_name(t: torch.Tensor) -> str:
    """``torch.float64`` → ``"float64"``."""
    return str(t.dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    """Inverse of :func:`_dtype_name`, restricted to floating dtypes."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise EdgeatpError(f"unknown score dtype {name!r}; expected e.g. 'float64' or 'float32'")
    return dtype


def _edge_lookup(graph: EdgeGraph) -> dict[str, tuple[int, int]]:
    """``"writer->reader"`` edge name → (writer, reader) index, for every existing edge."""
    return {f"{graph.writers[w].name}->{graph.readers[r].name}": (w, r) for w, r in graph.edge_coords.tolist()}


# ------------------------------------------------------------------------------------ edgeatp format
def _native(circuit: Circuit, all_edges: bool) -> dict[str, Any]:
    """The edgeatp-format dictionary of a circuit."""
    g = circuit.graph
    exists = g.full_mask
    coords = (exists if all_edges else exists & circuit.in_graph).nonzero()
    idx = tuple(coords.T)
    edges = [g.edge_at(tuple(c)) for c in coords.tolist()]
    return {
        "format": FORMAT, "version": VERSION, "level": circuit.level, "method": circuit.method,
        "direction": circuit.direction.value, "metric": circuit.metric, "sign_convention": circuit.sign_convention,
        "shape": asdict(g.shape),
        "graph": {"writers": [w.name for w in g.writers], "readers": [r.name for r in g.readers],
                  "n_positions": g.n_positions},
        "dtype": {"score": _dtype_name(circuit.score), "signed": _dtype_name(circuit.signed)},
        "n_edges": circuit.n_edges,
        "edges": {"name": [e.name for e in edges], "position": [e.position for e in edges],
                  "score": _reals(circuit.score[idx].tolist()), "signed": _reals(circuit.signed[idx].tolist()),
                  "in_graph": circuit.in_graph[idx].tolist()},
        "selection": None if circuit.selection is None else jsonable(asdict(circuit.selection)),
        "warnings": list(circuit.warnings),
        "faithfulness": None if circuit.faithfulness is None else encode_real(circuit.faithfulness),
        "necessity": None if circuit.necessity is None else encode_real(circuit.necessity),
        "units": [_unit_json(u) for u in circuit.units],
        "curve": None if circuit.curve is None else jsonable(asdict(circuit.curve)),
        "verification": None if circuit.verification is None else jsonable(asdict(circuit.verification)),
        "kv_view": _kv_view(circuit),
        "refinement": None if circuit.refinement is None else jsonable(asdict(circuit.refinement)),
        "circuit_metrics": [jsonable(asdict(m)) for m in circuit.circuit_metrics],
        "meta": jsonable(circuit.meta),
    }


def _kv_view(circuit: Circuit) -> dict[str, Any] | None:
    """The per-query-head key/value scores of a grouped circuit, columnar over those edges."""
    if circuit.kv_view is None:
        return None
    view = circuit.graph.ungrouped_view()
    kv = torch.tensor([r.kind in (NodeKind.K, NodeKind.V) for r in view.readers])
    coords = (view.full_mask & kv).nonzero()
    idx = tuple(coords.T)
    edges = [view.edge_at(tuple(c)) for c in coords.tolist()]
    return {"name": [e.name for e in edges], "position": [e.position for e in edges],
            "score": _reals(circuit.kv_view.score[idx].tolist()), "signed": _reals(circuit.kv_view.signed[idx].tolist())}


def _kv_view_from(d: dict[str, Any] | None, graph: EdgeGraph) -> KVView | None:
    """Rebuild :class:`KVView` over the ungrouped view of ``graph``."""
    if d is None:
        return None
    view = graph.ungrouped_view()
    coords = _edge_coords(view, d["name"], d["position"])
    idx = tuple(coords.T)
    score = torch.zeros(view.full_mask.shape, dtype=torch.float64)
    signed = torch.zeros(view.full_mask.shape, dtype=torch.float64)
    score[idx] = torch.tensor([decode_real(x, "kv_view.score") for x in d["score"]], dtype=torch.float64)
    signed[idx] = torch.tensor([decode_real(x, "kv_view.signed") for x in d["signed"]], dtype=torch.float64)
    return KVView(score, signed)


def _unit_json(unit: Unit) -> dict[str, Any]:
    """A unit as JSON; ``members`` only for units that have them (groups)."""
    d = jsonable(asdict(unit))
    if not unit.members:
        d.pop("members")
    return d


def _real_list(values: list[Any], where: str) -> tuple[float, ...]:
    return tuple(decode_real(x, where) for x in values)


def _check_from(c: dict[str, Any], name_key: str) -> Check:
    return Check(str(c[name_key]), decode_real(c["estimate"], "verification.checks.estimate"),
                 decode_real(c["exact"], "verification.checks.exact"),
                 decode_real(c["score"], "verification.checks.score"), bool(c["in_circuit"]))


def _verification_from(d: dict[str, Any], version: int, n_ranked_hint: int | None) -> Verification:
    """Rebuild :class:`Verification` (version 1 files: renamed fields, ranked count from the config)."""
    if version == 1:
        checks = tuple(_check_from(c, "edge") for c in d["checks"])
        n_ranked = min(len(checks), n_ranked_hint if n_ranked_hint is not None else len(checks))
        outside = [abs(c.exact) for c in checks if not c.in_circuit]
        return Verification(checks, n_ranked, decode_real(d["rank_correlation"], "verification.rank_correlation"),
                            decode_real(d["sign_agreement"], "verification.sign_agreement"), str(d["largest_miss"]),
                            decode_real(d["largest_miss_size"], "verification.largest_miss_size"),
                            max(outside, default=0.0), len(outside),
                            _optional_real(d["below_cut_bound"], "verification.below_cut_bound"),
                            _optional_real(d["bound_alpha"], "verification.bound_alpha"), int(d["n_forwards"]))
    return Verification(
        tuple(_check_from(c, "name") for c in d["checks"]), int(d["n_ranked"]),
        decode_real(d["rank_correlation"], "verification.rank_correlation"),
        decode_real(d["sign_agreement"], "verification.sign_agreement"), str(d["largest_miss"]),
        decode_real(d["largest_miss_size"], "verification.largest_miss_size"),
        decode_real(d["outside_max"], "verification.outside_max"), int(d["outside_checked"]),
        _optional_real(d["bound"], "verification.bound"), _optional_real(d["bound_alpha"], "verification.bound_alpha"),
        int(d["n_forwards"]))


def _curve_from(d: dict[str, Any]) -> FaithfulnessCurve:
    """Rebuild :class:`FaithfulnessCurve` from its JSON data."""
    return FaithfulnessCurve(tuple(int(s) for s in d["sizes"]), _real_list(d["faithfulness"], "curve.faithfulness"),
                             _real_list(d["necessity"], "curve.necessity"),
                             decode_real(d["clean_metric"], "curve.clean_metric"),
                             decode_real(d["corrupt_metric"], "curve.corrupt_metric"), str(d.get("label", "")))


def _refinement_from(d: dict[str, Any] | None, graph: EdgeGraph) -> Refinement | None:
    """Rebuild :class:`Refinement` from its JSON data (its circuits' edges checked against the graph)."""
    if d is None:
        return None
    lookup = _edge_lookup(graph)
    for r in d["sizes"]:
        if len(r["edges"]) > int(r["size"]):
            raise EdgeatpError(f"refinement: the size-{r['size']} circuit lists {len(r['edges'])} edges")
        for name in map(str, r["edges"]):
            base, at, pos = name.partition("@")
            if base not in lookup or bool(at) != graph.positional or (at and not (pos.isdigit() and int(pos) < graph.P)):
                raise EdgeatpError(f"refinement: edge {name!r} of the size-{r['size']} circuit is not an edge of the "
                                   "graph described in the file")
    sizes = tuple(RefinedSize(int(r["size"]), tuple(map(str, r["edges"])), decode_real(r["faithfulness"], "refinement"),
                              decode_real(r["necessity"], "refinement"), int(r["before_edges"]),
                              decode_real(r["before_faithfulness"], "refinement"),
                              decode_real(r["before_necessity"], "refinement"), str(r["found_by"]), int(r["n_forwards"]))
                  for r in d["sizes"])
    return Refinement(str(d["ranking"]), d["objective"], int(d["budget"]), int(d["seed"]), int(d["n_candidates"]),
                      int(d["n_forwards"]), decode_real(d["clean_metric"], "refinement.clean_metric"),
                      decode_real(d["corrupt_metric"], "refinement.corrupt_metric"), sizes)


def _metrics_from(d: dict[str, Any]) -> CircuitMetrics:
    """Rebuild :class:`CircuitMetrics` from its JSON data."""
    return CircuitMetrics(str(d["label"]), int(d["n_edges"]), _real_list(d["grid"], "circuit_metrics.grid"),
                          tuple(map(int, d["cpr_sizes"])), _real_list(d["cpr_faithfulness"], "circuit_metrics"),
                          tuple(map(int, d["cmd_sizes"])), _real_list(d["cmd_faithfulness"], "circuit_metrics"),
                          decode_real(d["cpr"], "circuit_metrics.cpr"), decode_real(d["cmd"], "circuit_metrics.cmd"),
                          int(d["n_forwards"]))


def _selection_from(d: dict[str, Any] | None) -> Selection | None:
    if d is None:
        return None
    return Selection(str(d["rule"]), _optional_real(d["value"], "selection.value"), d["requested"], int(d["kept"]),
                     tuple(str(n) for n in d["notes"]))


def _edge_coords(graph: EdgeGraph, names: list[str], positions: list[int | None]) -> torch.Tensor:
    """Dense ``[n, 3]`` (position, writer, reader) coordinates of listed edges, with clear errors."""
    lookup = _edge_lookup(graph)
    out = []
    for name, pos in zip(names, positions):
        base, at, suffix = name.partition("@")
        if base not in lookup:
            raise EdgeatpError(f"edge {name!r} is not an edge of the graph described in the file")
        if not graph.positional:
            if at or pos is not None:
                raise EdgeatpError(f"edge {name!r} has a position but the graph is position-aggregated")
            out.append((0, *lookup[base]))
        else:
            if not isinstance(pos, int) or not 0 <= pos < graph.P or suffix != str(pos):
                raise EdgeatpError(f"edge {name!r}: position {pos!r} must match its '@p' suffix and lie in "
                                   f"0..{graph.P - 1}")
            out.append((pos, *lookup[base]))
    return torch.tensor(out, dtype=torch.long).reshape(len(out), 3)


def _graph_from(d: dict[str, Any]) -> EdgeGraph:
    """The graph a file describes, checked against its own shape."""
    gd = d["graph"]
    try:
        shape = ModelShape(**d["shape"])
        writers = [Node.parse(n) for n in gd["writers"]]
        readers = [Node.parse(n) for n in gd["readers"]]
        graph = EdgeGraph.from_shape(shape, n_positions=gd["n_positions"], writers=writers, readers=readers)
    except (ValueError, TypeError) as exc:
        raise EdgeatpError(f"the file's graph does not fit its shape: {exc}") from None
    top = max((n.layer for n in (*writers, *readers) if n.layer is not None), default=-1)
    if top + 1 != shape.n_layers:
        raise EdgeatpError(f"shape.n_layers is {shape.n_layers} but the graph's nodes reach layer {top}; "
                           "the file was edited or is corrupt")
    return graph


def _from_native(d: dict[str, Any]) -> Circuit:
    """Rebuild a circuit from edgeatp-format data (versions 1 and 2) that passed :func:`check_circuit_data`."""
    version = d["version"]
    if d["level"] not in LEVELS:
        raise EdgeatpError(f"unknown circuit level {d['level']!r}; expected one of {', '.join(LEVELS)}")
    graph = _graph_from(d)
    dims = graph.full_mask.shape
    e = d["edges"]
    n = len(e["name"])
    if any(len(e[k]) != n for k in ("position", "score", "signed", "in_graph")):
        raise EdgeatpError("edges: the name, position, score, signed and in_graph lists must have equal lengths")
    coords = _edge_coords(graph, e["name"], e["position"])
    if len({tuple(c) for c in coords.tolist()}) != n:
        raise EdgeatpError("edges: an edge is listed twice")
    idx = tuple(coords.T)
    score = torch.zeros(dims, dtype=_dtype(d["dtype"]["score"]))
    signed = torch.zeros(dims, dtype=_dtype(d["dtype"]["signed"]))
    in_graph = torch.zeros(dims, dtype=torch.bool)
    scores = [decode_real(x, "edges.score") for x in e["score"]]
    if any(x < 0 for x in scores):
        raise EdgeatpError("edges.score holds a negative value; scores are magnitudes (the signed estimate is "
                           "edges.signed)")
    score[idx] = torch.tensor(scores, dtype=torch.float64).to(score.dtype)
    signed[idx] = torch.tensor([decode_real(x, "edges.signed") for x in e["signed"]],
                               dtype=torch.float64).to(signed.dtype)
    if not all(isinstance(b, bool) for b in e["in_graph"]):
        raise EdgeatpError("edges.in_graph must hold true/false values")
    in_graph[idx] = torch.tensor(e["in_graph"], dtype=torch.bool)
    if int(in_graph.sum()) != d["n_edges"]:
        raise EdgeatpError(f"the file says n_edges={d['n_edges']} but {int(in_graph.sum())} edges are in_graph")
    meta = dict(d["meta"])
    if version == 1:
        units = tuple(Unit(str(k), "component", decode_real(v, f"node_scores.{k}"), math.nan, None, True)
                      for k, v in d["node_scores"].items())
        rule, value = meta.pop("rule", None), meta.pop("value", None)
        selection = Selection(str(rule), value if isinstance(value, (int, float)) else None, None,
                              int(in_graph.sum())) if rule is not None else None
        n_verify = (meta.get("config") or {}).get("n_verify")
        return Circuit(graph, in_graph, score, signed, d["level"], str(d["method"]), Direction(d["direction"]),
                       str(d["metric"]), selection, units,
                       _optional_real(meta.pop("faithfulness", None), "meta.faithfulness"),
                       _optional_real(meta.pop("necessity", None), "meta.necessity"),
                       None if d["faithfulness"] is None else _curve_from(d["faithfulness"]),
                       None if d["verification"] is None else _verification_from(d["verification"], 1, n_verify),
                       meta)
    units = tuple(Unit(str(u["name"]), u["kind"], decode_real(u["score"], "units.score"),
                       decode_real(u["signed"], "units.signed"), _optional_real(u["exact"], "units.exact"),
                       bool(u["in_circuit"]), tuple(map(str, u.get("members", ())))) for u in d["units"])
    return Circuit(graph, in_graph, score, signed, d["level"], str(d["method"]), Direction(d["direction"]),
                   str(d["metric"]), _selection_from(d["selection"]), units,
                   _optional_real(d["faithfulness"], "faithfulness"), _optional_real(d["necessity"], "necessity"),
                   None if d["curve"] is None else _curve_from(d["curve"]),
                   None if d["verification"] is None else _verification_from(d["verification"], 2, None), meta,
                   _kv_view_from(d.get("kv_view"), graph), _refinement_from(d.get("refinement"), graph),
                   tuple(_metrics_from(m) for m in d.get("circuit_metrics", ())))


# ------------------------------------------------------------------------------------ MIB format
def _mib_name(node: Node) -> str:
    """The EAP-IG name of a writer: neurons become their MLP."""
    return f"m{node.layer}" if node.kind is NodeKind.NEURON else node.name


def _reduce_positions(circuit: Circuit, how: PositionReduce) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[W, R]`` score, signed and kept of a circuit, positions reduced by ``how`` (sum or max score)."""
    kept = circuit.in_graph & circuit.graph.full_mask
    score, signed = circuit.score.double(), circuit.signed.double()
    if how == "sum":
        return score.sum(0), signed.sum(0), kept.any(0)
    if how == "max":
        at = score.argmax(0, keepdim=True)
        return score.gather(0, at)[0], signed.gather(0, at)[0], kept.any(0)
    raise EdgeatpError(f"position_reduce must be 'sum' or 'max', got {how!r}")


def _mib(circuit: Circuit, position_reduce: PositionReduce) -> dict[str, Any]:
    """The EAP-IG/MIB dictionary of a circuit (conventions in the module docstring)."""
    circuit = circuit.per_query_head()
    g, shape = circuit.graph, circuit.graph.shape
    score, signed, kept = _reduce_positions(circuit, position_reduce)
    names = list(dict.fromkeys(_mib_name(w) for w in g.writers))
    group = torch.tensor([names.index(_mib_name(w)) for w in g.writers])
    dims = (len(names), g.n_readers)
    score_m = torch.zeros(dims, dtype=torch.float64).index_add_(0, group, score)
    signed_m = torch.zeros(dims, dtype=torch.float64).index_add_(0, group, signed)
    kept_m = torch.zeros(dims, dtype=torch.long).index_add_(0, group, kept.long()) > 0
    exists = torch.zeros(dims, dtype=torch.long).index_add_(0, group, g.mask.long()) > 0
    edges: dict[str, dict[str, Any]] = {}
    touched = {"logits"}
    coords = exists.nonzero()
    idx = tuple(coords.T)
    for (w, r), s, k, x in zip(coords.tolist(), score_m[idx].tolist(), kept_m[idx].tolist(), signed_m[idx].tolist()):
        reader = g.readers[r]
        edges[f"{names[w]}->{reader.name}"] = {"score": encode_real(s), "in_graph": k, "signed": encode_real(x)}
        if k:
            touched |= {names[w], _mib_name(reader.head_node)}
    node_scores: dict[str, float] = {}
    for name, value in circuit.node_scores.items():
        key = _mib_name(Node.parse(name))
        node_scores[key] = node_scores.get(key, 0.0) + float(value)
    nodes: dict[str, dict[str, Any]] = {}
    for name in ["input", *(f"a{layer}.h{h}" for layer in range(shape.n_layers) for h in range(shape.n_heads)),
                 *(f"m{layer}" for layer in range(shape.n_layers) if shape.has_mlp)]:
        nodes[name] = {"in_graph": name in touched}
        if circuit.level != "edge":
            nodes[name]["score"] = encode_real(node_scores.get(name, 0.0))
    nodes["logits"] = {"in_graph": True}
    return {
        "cfg": {"n_layers": shape.n_layers, "n_heads": shape.n_heads, "parallel_attn_mlp": shape.parallel_attn_mlp,
                "d_model": shape.d_model, "d_head": shape.d_head, "d_mlp": shape.d_mlp, "attn_only": shape.attn_only},
        "nodes": nodes, "edges": edges,
        "edgeatp": {"format": MIB_EXTENSION, "version": VERSION, "level": circuit.level, "method": circuit.method,
                    "direction": circuit.direction.value, "metric": circuit.metric,
                    "n_positions": g.n_positions, "position_reduce": position_reduce, "meta": jsonable(circuit.meta)},
    }


def _from_mib(d: dict[str, Any]) -> Circuit:
    """Rebuild a (position-aggregated, full-graph) circuit from EAP-IG/MIB data."""
    cfg = d["cfg"]
    n_layers, n_heads, d_model = int(cfg["n_layers"]), int(cfg["n_heads"]), int(cfg["d_model"])
    attn_only = bool(cfg.get("attn_only", False))
    shape = ModelShape(n_layers, n_heads, d_model, int(cfg.get("d_head") or d_model // n_heads),
                       None if attn_only else int(cfg.get("d_mlp") or 4 * d_model), attn_only,
                       bool(cfg.get("parallel_attn_mlp", False)))
    graph = EdgeGraph.from_shape(shape)
    lookup = _edge_lookup(graph)
    score = torch.zeros(graph.mask.shape, dtype=torch.float64)
    signed = torch.zeros(graph.mask.shape, dtype=torch.float64)
    in_graph = torch.zeros(graph.mask.shape, dtype=torch.bool)
    for name, entry in d["edges"].items():
        if name not in lookup:
            raise EdgeatpError(f"MIB edge {name!r} does not exist in a model with cfg {cfg}")
        w, r = lookup[name]
        value = decode_real(entry["score"], f"edges[{name!r}].score")
        signed[w, r] = decode_real(entry["signed"], f"edges[{name!r}].signed") if "signed" in entry else value
        score[w, r] = value if "signed" in entry else abs(value)
        in_graph[w, r] = bool(entry["in_graph"])
    units = []
    for name, entry in d["nodes"].items():
        value = decode_real(entry["score"], f"nodes[{name!r}].score") if "score" in entry else 0.0
        if name != "logits" and value == value and value != 0.0:
            units.append(Unit(name, "component", abs(value), value, None, bool(entry.get("in_graph", False))))
    ext = d.get("edgeatp") or {}
    level = "node" if ext.get("level") == "neuron" else ext.get("level", "edge")
    return Circuit(graph, in_graph[None], score[None], signed[None], level, str(ext.get("method", "mib")),
                   Direction(ext.get("direction", "noising")), str(ext.get("metric", "logit_diff")),
                   units=tuple(units), meta={**ext.get("meta", {}), "imported_from": "mib"})


# ------------------------------------------------------------------------------------ public API
def circuit_to_json(circuit: Circuit, mode: str = "edgeatp", *, all_edges: bool = True,
                    position_reduce: PositionReduce = "sum") -> dict[str, Any]:
    """A circuit as strict-JSON data: ``mode="edgeatp"`` (exact, versioned) or ``"mib"`` (EAP-IG/MIB)."""
    if mode == "edgeatp":
        return _native(circuit, all_edges)
    if mode == "mib":
        return _mib(circuit, position_reduce)
    raise EdgeatpError(f"unknown JSON mode {mode!r}; choose from {', '.join(MODES)}")


def circuit_from_json(data: dict[str, Any] | str | Path) -> Circuit:
    """Rebuild a circuit from either format, given as a dict, a JSON string or a file path."""
    d = load_json_data(data)
    kind = check_circuit_data(d)
    try:
        return _from_native(d) if kind == "edgeatp" else _from_mib(d)
    except EdgeatpError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise malformed(err) from None


def write_json(circuit: Circuit, path: str | Path, mode: str = "edgeatp", *, indent: int | None = None,
               all_edges: bool = True, position_reduce: PositionReduce = "sum") -> Path:
    """Write :func:`circuit_to_json` to ``path`` as strict JSON (UTF-8), atomically; returns the path."""
    data = circuit_to_json(circuit, mode, all_edges=all_edges, position_reduce=position_reduce)
    return atomic_write(Path(path), json.dumps(data, indent=indent, allow_nan=False, ensure_ascii=False))
