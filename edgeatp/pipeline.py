"""The discover pipeline behind ``edgeatp discover``: load, attribute, select, measure, verify.

Kept apart from the CLI so scripts can run exactly what the command runs::

    result = run_discover(DiscoverConfig(model="zoo:ioi"))
    write_outputs(result.circuit, Path("out"), ["json", "svg", "md"])
"""

from __future__ import annotations

import datetime as _dt
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import __version__
from .attribution.edges import attribute_edges, per_head_kv
from .attribution.grouping import attribute_groups, coarse_edges, parse_groups, patch_coarse_edges, patch_groups
from .attribution.nodes import attribute_nodes
from .circuit import (Circuit, FaithfulnessCurve, Selection, circuit_from_edges, coarse_edge_units, group_circuit,
                      node_circuit, prune, top_k_circuits)
from .config import DiscoverConfig, check_config, parse_sizes
from .errors import EdgeatpError, ModelError, OptionError
from .graph import EdgeGraph, node_set
from .model import ModelAdapter, load_model
from .model.loading import resolve_backend
from .progress import Progress, silent
from .scores import EdgeScores
from .setup import Setup
from .mib import grid_sizes, ranking_metrics, refined_metrics
from .search import refine
from .tasks import PromptPairs, load_pairs, make_task
from .timings import mark
from .verification import (circuits_faithfulness, component_curve, measure, verify, verify_components,
                           with_exact_units)

CURVE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
SMALL_MODEL_PARAMS = 20_000_000
Log = Callable[[str], None]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads (restored afterwards); ``None`` leaves the setting alone."""
    if n is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextmanager
def loaded_model(cfg: DiscoverConfig) -> Iterator[ModelAdapter]:
    """The model a config names, run under the config's thread policy (restored afterwards):
    as asked, else one thread for small models (more only add overhead there), else torch's default."""
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, allow_download=cfg.allow_download,
                       backend=cfg.backend, n_devices=cfg.n_devices)
    threads = cfg.threads
    if threads is None and sum(p.numel() for p in model.model.parameters()) < SMALL_MODEL_PARAMS:
        threads = 1
    with torch_threads(threads):
        yield model


def load_inputs(cfg: DiscoverConfig, model: ModelAdapter) -> tuple[PromptPairs, str]:
    """The prompt pairs a config names for this model, plus a label for the data."""
    if cfg.data:
        pairs = load_pairs(cfg.data, model.tokenizer, prepend_bos=model.prepend_bos, n_ctx=model.n_ctx)
        return pairs, f"file {cfg.data}"
    task = cfg.task or model.card.get("task") or "ioi"
    pairs = make_task(task, model.tokenizer, cfg.n_pairs, seed=cfg.seed, prepend_bos=model.prepend_bos)
    return pairs, f"task {task} ({cfg.n_pairs} pairs, seed {cfg.seed})"


def make_setup(cfg: DiscoverConfig, model: ModelAdapter, progress: Progress = silent) -> tuple[Setup, str]:
    """The :class:`Setup` a config describes on a loaded model, and a label for its data."""
    pairs, label = load_inputs(cfg, model)
    return Setup(model, pairs, cfg.metric, cfg.direction, cfg.batch_size, progress,
                 memory_budget_mb=cfg.memory_budget, offload=cfg.offload), label


@dataclass
class DiscoverResult:
    """A discovered circuit with what produced it."""

    circuit: Circuit
    config: DiscoverConfig
    data_label: str
    n_pairs: int
    scores: EdgeScores | None = None  # the edge estimates the circuit was cut from (for stderr in reports)

    def summary(self, top: int = 10) -> dict[str, Any]:
        """Short JSON-able summary for scripts (``--json``)."""
        c = self.circuit
        v = c.verification
        out: dict[str, Any] = {
            "model": self.config.model, "data": self.data_label, "n_pairs": self.n_pairs, "method": c.method,
            "level": c.level, "direction": c.direction.value, "metric": c.metric, "n_edges": c.n_edges,
            "n_components": len(c.components()), "faithfulness": c.faithfulness, "necessity": c.necessity,
            "target": self.config.target, "selection": None if c.selection is None else asdict(c.selection),
            "warnings": list(c.warnings), "sign_convention": c.sign_convention,
        }
        if c.level == "edge":
            rows = []
            for e in c.edges()[:top]:
                at = (c.graph.position_index(e), *c.graph.index_of(e))
                rows.append({"edge": e.name, "score": float(c.score[at]), "signed": float(c.signed[at])})
            out["top_edges"] = rows
        for kind in ("component", "group", "coarse_edge"):
            units = c.units_of(kind)  # type: ignore[arg-type]
            if units:
                out[f"top_{kind}s"] = [asdict(u) for u in units[:top]]
        if c.circuit_metrics:
            out["circuit_metrics"] = [{"label": m.label, "cpr": m.cpr, "cmd": m.cmd, "n_edges": m.n_edges}
                                      for m in c.circuit_metrics]
        if c.refinement is not None:
            r = c.refinement
            out["refinement"] = {"ranking": r.ranking, "budget": r.budget, "n_forwards": r.n_forwards, "seed": r.seed,
                                 "n_candidates": r.n_candidates, "objective": r.objective,
                                 "sizes": [{"size": x.size, "before": x.before_faithfulness, "after": x.faithfulness,
                                            "edges": len(x.edges), "found_by": x.found_by} for x in r.sizes]}
        if v is not None:
            out["verification"] = {"n_checked": len(v.checks), "n_ranked": v.n_ranked,
                                   "rank_correlation": v.rank_correlation, "sign_agreement": v.sign_agreement,
                                   "largest_miss": v.largest_miss, "largest_miss_size": v.largest_miss_size,
                                   "outside_max": v.outside_max, "outside_checked": v.outside_checked,
                                   "bound": v.bound}
        return out

    def describe(self) -> str:
        """A few human-readable lines."""
        s, c = self.summary(5), self.circuit
        what = {"edge": "edges", "node": "components", "neuron": "components", "group": "groups"}[c.level]
        lines = [f"{s['model']} on {s['data']}: {c.level} circuit by {c.method} ({s['direction']}, {s['metric']})",
                 f"  {c.n_edges} edges, {s['n_components']} components; faithfulness {_fmt(c.faithfulness)}, "
                 f"necessity {_fmt(c.necessity)} (1 = full clean behaviour, 0 = corrupt)"]
        v = c.verification
        if v is not None:
            lines.append(f"  verified {len(v.checks)} {what} exactly: rank correlation {_fmt(v.rank_correlation)}, "
                         f"sign agreement {_fmt(v.sign_agreement)}, largest miss {v.largest_miss} "
                         f"({_fmt(v.largest_miss_size)}), largest |exact| of the {v.outside_checked} checked "
                         f"outside the circuit {_fmt(v.outside_max)}" + (f", bound {_fmt(v.bound)}"
                                                                         if v.bound is not None else ""))
        for m in c.circuit_metrics:
            lines.append(f"  MIB {m.label}: CPR {_fmt(m.cpr)} (higher is better), CMD {_fmt(m.cmd)} (lower is better)")
        if c.refinement is not None:
            r = c.refinement
            steps = ", ".join(f"{x.size}: {x.before_faithfulness:.3f} -> {x.faithfulness:.3f}" for x in r.sizes)
            lines.append(f"  refined with exact circuit search ({r.n_forwards} forwards of {r.budget}): faithfulness "
                         f"by size {steps}")
        if c.level == "edge":
            lines.append("  top edges: " + ", ".join(e["edge"] for e in s["top_edges"]))
        for kind, label in (("component", "top components"), ("group", "top groups"),
                            ("coarse_edge", "layer-to-layer edges")):
            for u in c.units_of(kind)[:5]:  # type: ignore[arg-type]
                lines.append(f"  {label[:-1] if label.endswith('s') else label} {u.name}: signed estimate "
                             f"{_fmt(u.signed)}, exact {_fmt(u.exact)}" + (" (in circuit)" if u.in_circuit else ""))
        return "\n".join(lines)


def _fmt(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def _curve_sizes(n: int) -> list[int]:
    """Circuit sizes for a faithfulness curve over ``n`` items."""
    return sorted(k for k in {*CURVE_SIZES, n} if 0 < k <= n)


def run_discover(cfg: DiscoverConfig, progress: Progress = silent, log: Log = lambda s: None,
                 per_head_view: bool = False) -> DiscoverResult:
    """Attribute, select, measure, verify: the whole ``discover`` command as a function.
    ``per_head_view`` adds, for grouped-query models, the per-query-head key/value scores the
    EAP-IG/MIB format needs (one more attribution run on that view)."""
    rule = check_config(cfg)
    with loaded_model(cfg) as model:
        setup, label = make_setup(cfg, model, progress)
        mark("load")
        log(f"{model.name}: {model.shape.n_layers} layers x {model.shape.n_heads} heads; {label}")
        if cfg.level == "edge":
            circuit, scores = _edge_circuit(setup, cfg, rule, log)
            if per_head_view and model.shape.grouped:
                circuit = circuit.with_(kv_view=per_head_kv(setup, scores))
                mark("attribute")
        elif cfg.group:
            circuit, scores = _group_circuit(setup, cfg, log), None
        else:
            circuit, scores = _node_circuit(setup, cfg, log), None
        meta = {"model": model.name, "model_info": model.describe(), "data": label, "n_pairs": setup.n_pairs,
                "data_path": str(Path(cfg.data).resolve()) if cfg.data else None,
                "data_fingerprint": setup.pairs.fingerprint(), "config": asdict(cfg),
                "edgeatp_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        circuit = circuit.with_(meta={**circuit.meta, **meta})
    return DiscoverResult(circuit, cfg, label, setup.n_pairs, scores)


def _target_note(circuit: Circuit, target: float) -> Circuit:
    """Record, when the circuit misses the faithfulness target, that it does."""
    f = circuit.faithfulness
    if f is None or f >= target or circuit.selection is None:
        return circuit
    return circuit.with_(selection=circuit.selection.with_note(
        f"faithfulness {f:.3g} is below the target {target:g}: the circuit does not carry the behaviour; "
        "try a larger circuit or another method"))


def _pick(curve: FaithfulnessCurve, target: float) -> int:
    """The smallest size reaching the target, else the most faithful one."""
    reach = [i for i, f in enumerate(curve.faithfulness) if f >= target]
    return reach[0] if reach else max(range(len(curve.sizes)), key=lambda i: curve.faithfulness[i])


def _edge_circuit(setup: Setup, cfg: DiscoverConfig, rule: str | None, log: Log) -> tuple[Circuit, EdgeScores]:
    scores = attribute_edges(setup, cfg.method, positions=cfg.positions)  # within the setup's memory budget
    mark("attribute")
    log(f"scored {scores.graph.n_edges} edges with {cfg.method}")
    candidates = top_k_circuits(scores, _curve_sizes(scores.graph.n_edges))
    curve = circuits_faithfulness(setup, [c for _, c in candidates], label=f"top-k of {cfg.method}")
    if rule is not None:
        circuit = prune(scores, **{rule: getattr(cfg, rule)})
    else:
        pick = _pick(curve, cfg.target)
        k, chosen = candidates[pick]
        circuit = circuit_from_edges(scores, chosen.in_graph, "target", cfg.target)
        circuit = circuit.with_(selection=replace(circuit.selection, requested=k))  # type: ignore[arg-type]
    circuit = _target_note(measure(setup, circuit), cfg.target)
    mark("select")
    log(f"kept {circuit.n_edges} edges; faithfulness {circuit.faithfulness:.3f}")
    circuit = circuit.with_(circuit_metrics=(ranking_metrics(setup, scores),))
    mark("metrics")
    if cfg.refine:
        circuit = refined_circuit(setup, scores, circuit, cfg, log)
        mark("refine")
    if cfg.n_verify or cfg.sample_below:
        circuit = circuit.with_(verification=verify(
            setup, circuit, scores, top=cfg.n_verify, sample_below=cfg.sample_below, seed=cfg.seed, bound=cfg.bound,
            bound_samples=cfg.bound_samples, bound_p=cfg.bound_p))
    if cfg.group == "layer":
        coarse = coarse_edges(scores)
        exact = patch_coarse_edges(setup, coarse, scores.graph)
        circuit = circuit.with_(units=coarse_edge_units(coarse, set(), dict(zip(exact.labels, exact.mean.tolist()))))
    mark("verify")
    return circuit.with_(curve=curve), scores


def search_sizes(spec: str | None, n_edges: int, own: int) -> list[int]:
    """Sizes to search: the given edge counts, MIB's grid sizes (``"mib"``), or the faithfulness
    curve's sizes up to the circuit's own; the circuit's own size always."""
    sizes = parse_sizes(spec, "refine_sizes")
    if sizes == "mib":
        chosen = {k for k in grid_sizes(n_edges) if 0 < k < n_edges}
    elif sizes is None:
        chosen = {k for k in CURVE_SIZES if k <= own}
    else:
        chosen = set(sizes)  # type: ignore[arg-type]
    beyond = sorted(k for k in chosen if k > n_edges)
    if beyond:
        raise OptionError(f"{{refine_sizes}} {beyond[0]} is more than the graph's {n_edges} edges",
                          refine_sizes="refine_sizes")
    return sorted(chosen | {own})


def refined_circuit(setup: Setup, scores: EdgeScores, circuit: Circuit, cfg: DiscoverConfig, log: Log,
                    seed: int | None = None) -> Circuit:
    """The circuit replaced by the result of an exact circuit search from ``scores`` (at the size its
    selection asked for or, when it was chosen by the faithfulness target, the smallest searched size
    reaching it),
    with the search's record and, when the search covered MIB's grid, the searched circuits' CPR/CMD."""
    requested = circuit.selection.requested if circuit.selection is not None else None
    own = max(1, min(scores.graph.n_edges, requested or circuit.n_edges))  # the size the rule asked for
    result = refine(setup, scores, search_sizes(cfg.refine_sizes, scores.graph.n_edges, own),
                    budget=cfg.refine_budget, seed=cfg.seed if seed is None else seed, start=circuit.in_graph)
    by_target = circuit.selection is not None and circuit.selection.rule == "target"
    reach = [r for r in result.sizes if r.after.faithfulness is not None and r.after.faithfulness >= cfg.target]
    pick = reach[0] if by_target and reach else result.at(own)
    given = circuit.faithfulness if circuit.faithfulness is not None else pick.before.faithfulness
    log(f"refined: {circuit.n_edges} edges, faithfulness {given:.3f} -> {pick.after.n_edges} edges, "
        f"{pick.after.faithfulness:.3f} ({result.n_forwards} forwards)")
    mib = refined_metrics(result.refinement, scores.graph.n_edges)
    chosen = pick.after.with_(curve=circuit.curve, units=circuit.units, meta=circuit.meta, kv_view=circuit.kv_view,
                              refinement=result.refinement,
                              circuit_metrics=circuit.circuit_metrics + ((mib,) if mib is not None else ()))
    return _target_note(chosen, cfg.target)


def _smallest_faithful(setup: Setup, cfg: DiscoverConfig, n_max: int, build: Callable[[int], Circuit],
                       label: str) -> Circuit:
    """Component circuits of growing size and the one to keep: the ``top_k`` one, else the
    smallest reaching the target (else the most faithful), with its curve."""
    sizes = [cfg.top_k] if cfg.top_k is not None else _curve_sizes(n_max)
    circuits = [build(k) for k in sizes]  # type: ignore[arg-type]
    curve = component_curve(setup, circuits, label)
    pick = 0 if cfg.top_k is not None else _pick(curve, cfg.target)
    chosen = circuits[pick]
    if cfg.top_k is None:
        sel = Selection("target", cfg.target, sizes[pick], chosen.selection.kept if chosen.selection else 0)
        chosen = chosen.with_(selection=sel)
    chosen = chosen.with_(faithfulness=curve.faithfulness[pick], necessity=curve.necessity[pick], curve=curve)
    return _target_note(chosen, cfg.target)


def _node_circuit(setup: Setup, cfg: DiscoverConfig, log: Log) -> Circuit:
    """A circuit of the best components (heads, MLPs or neurons) by node attribution."""
    model = setup.model
    if cfg.level == "neuron" and model.shape.attn_only:
        raise OptionError("{level} neuron needs a model with MLPs", level="level")
    fams = ["head", "q", "k", "v"] + ([] if model.shape.attn_only else ["neuron" if cfg.level == "neuron" else "mlp"])
    graph = EdgeGraph.from_shape(model.shape, neurons=cfg.level == "neuron")
    nodes = node_set(model.shape, fams, setup.pairs.n_positions if cfg.positions else None)
    scores = attribute_nodes(setup, cfg.method, nodes, positions=cfg.positions)
    mark("attribute")
    n_comp = len({n.component.head_node for n in nodes})
    circuit = _smallest_faithful(setup, cfg, n_comp, lambda k: node_circuit(scores, graph, top_k=k),
                                 f"top-k components of {cfg.method}")
    mark("select")
    kept = sum(u.in_circuit for u in circuit.units)
    log(f"kept {kept} of {len(circuit.units)} components; faithfulness {circuit.faithfulness:.3f}")
    if cfg.n_verify or cfg.sample_below:
        circuit = verify_components(setup, circuit, top=cfg.n_verify, sample_below=cfg.sample_below, seed=cfg.seed)
    mark("verify")
    return circuit


def _group_circuit(setup: Setup, cfg: DiscoverConfig, log: Log) -> Circuit:
    """A circuit over the best coarse groups of nodes (``--group`` with a node level)."""
    model = setup.model
    groups = parse_groups(cfg.group, model.shape, setup.pairs.n_positions)  # type: ignore[arg-type]
    graph = EdgeGraph.from_shape(model.shape)
    est = attribute_groups(setup, groups, cfg.method)
    mark("attribute")
    circuit = _smallest_faithful(setup, cfg, len(groups), lambda k: group_circuit(est, graph, top_k=k),
                                 f"top-k groups of {cfg.method}")
    mark("select")
    exact = est.signed.tolist() if cfg.method == "exact" else None
    eff = None if exact is not None else patch_groups(setup, groups)
    values = dict(zip([g.name for g in groups], exact if exact is not None else eff.mean.tolist()))  # type: ignore[union-attr]
    circuit = with_exact_units(circuit, values, 0 if eff is None else eff.n_forwards)
    mark("verify")
    kept = sum(u.in_circuit for u in circuit.units)
    log(f"kept {kept} of {len(groups)} groups; faithfulness {circuit.faithfulness:.3f}")
    return circuit


# ------------------------------------------------------------------------------------ re-verification
def resolve_data_path(circuit_file: Path, circuit: Circuit, recorded: str) -> str:
    """Where the data a saved circuit was found on lives now: the absolute path recorded at
    discovery if it still exists, else the recorded path relative to the circuit file."""
    absolute = circuit.meta.get("data_path")
    if absolute and Path(absolute).is_file():
        return str(absolute)
    beside = circuit_file.parent / recorded
    if beside.is_file():
        return str(beside)
    if Path(recorded).is_file():
        return recorded
    raise OptionError(f"the data file {recorded!r} recorded in {circuit_file} cannot be found (neither at "
                      f"{absolute or 'its recorded absolute path'} nor next to the circuit); pass {{data}}",
                      data="data")


def reverify(path: Path, *, model: str | None = None, task: str | None = None, data: str | None = None,
             n_pairs: int | None = None, n_verify: int = 20, sample_below: int = 20, bound: bool = False,
             batch_size: int = 32, seed: int | None = None, device: str | None = None, n_devices: int | None = None,
             backend: str | None = None, allow_download: bool = False, progress: Progress = silent) -> DiscoverResult:
    """Verify a saved circuit again (on its own data and backend unless told otherwise): its own
    faithfulness and necessity, and fresh exact patches of its top edges (or components, or groups)."""
    overrides: dict[str, Any] = {"batch_size": batch_size, "allow_download": allow_download, "n_verify": n_verify,
                                 "sample_below": sample_below, "bound": bound}
    with _saved(path, overrides, model=model, task=task, data=data, n_pairs=n_pairs, seed=seed, device=device,
                n_devices=n_devices, backend=backend, progress=progress) as (circuit, cfg, setup, label):
        circuit = _reverified(setup, cfg, circuit)
        meta = {**circuit.meta, "reverified": {"data": label, "n_pairs": setup.n_pairs,
                                               "data_fingerprint": setup.pairs.fingerprint()}}
    return DiscoverResult(circuit.with_(meta=meta), cfg, label, setup.n_pairs)


def refine_saved(path: Path, *, sizes: str | None = None, budget: int = 2000, seed: int | None = None,
                 data: str | None = None, batch_size: int = 32, backend: str | None = None,
                 allow_download: bool = False, device: str | None = None, progress: Progress = silent,
                 log: Log = lambda s: None) -> DiscoverResult:
    """Search a saved edge circuit's sizes for better circuits (on its own model and data, from its
    stored estimates as the ranking; ``seed`` seeds the search, default the recorded seed; ``backend``
    and ``device`` default the recorded ones), measure them exactly and verify the result again."""
    from .export import read_circuit

    saved = read_circuit(path)
    if saved.level != "edge":
        raise OptionError(f"{path} is a {saved.level}-level circuit; refine searches edge circuits (discover them "
                          "with {level} edge)", level="level")
    overrides: dict[str, Any] = {"batch_size": batch_size, "allow_download": allow_download, "refine": True,
                                 "refine_budget": budget, "refine_sizes": sizes}
    with _saved(path, overrides, data=data, backend=backend, device=device, progress=progress,
                circuit=saved) as (circuit, cfg, setup, label):
        scores = _stored_scores(circuit)
        circuit = circuit.with_(circuit_metrics=(ranking_metrics(setup, scores),))
        circuit = refined_circuit(setup, scores, circuit, cfg, log, seed)
        if cfg.n_verify or cfg.sample_below:
            circuit = circuit.with_(verification=verify(
                setup, circuit, scores, top=cfg.n_verify, sample_below=cfg.sample_below, seed=cfg.seed,
                bound=cfg.bound, bound_samples=cfg.bound_samples, bound_p=cfg.bound_p))
    return DiscoverResult(circuit, cfg, label, setup.n_pairs)


@contextmanager
def _saved(path: Path, overrides: dict[str, Any], *, model: str | None = None, task: str | None = None,
           data: str | None = None, n_pairs: int | None = None, seed: int | None = None, device: str | None = None,
           n_devices: int | None = None, backend: str | None = None, progress: Progress = silent,
           circuit: Circuit | None = None) -> Iterator[tuple[Circuit, DiscoverConfig, Setup, str]]:
    """A saved circuit (read from ``path`` unless given) with its recorded configuration (updated by
    ``overrides`` and any of the other arguments given), its model loaded and its data (the recorded
    data unless other data is given, refused when it changed). The recorded backend is only a
    default: ``backend`` replaces it."""
    from .export import read_circuit

    circuit = circuit if circuit is not None else read_circuit(path)
    recorded = dict(circuit.meta.get("config") or {})
    if not recorded and model is None:
        raise OptionError(f"{path} does not record its model; pass {{model}} (and {{task}} or {{data}})",
                          model="model", task="task", data="data")
    base = DiscoverConfig.from_dict(recorded, f"{path}'s saved configuration") if recorded else DiscoverConfig()
    overrides = dict(overrides)
    overrides.update({k: v for k, v in {"model": model, "n_pairs": n_pairs, "seed": seed, "device": device,
                                        "n_devices": n_devices, "backend": backend}.items() if v is not None})
    own_data = not (task or data)
    if task or data:
        overrides.update(task=task, data=data)
    elif base.data:
        overrides["data"] = resolve_data_path(path, circuit, base.data)
    cfg = replace(base, **overrides)
    check_config(cfg)
    if backend is None:
        _recorded_backend(path, cfg.backend)
    with loaded_model(cfg) as adapter:
        setup, label = make_setup(cfg, adapter, progress)
        if circuit.graph.shape != adapter.shape:
            raise EdgeatpError(f"{path} was found on a model of another shape than {adapter.name}")
        if circuit.graph.positional and circuit.graph.P != setup.pairs.n_positions:
            raise EdgeatpError(f"{path} is position-resolved over {circuit.graph.P} positions but these prompts have "
                               f"{setup.pairs.n_positions}; verify it on prompts of that length")
        recorded_print = circuit.meta.get("data_fingerprint")
        if own_data and n_pairs is None and recorded_print and recorded_print != setup.pairs.fingerprint():
            raise OptionError(f"the data for {path} ({label}, {setup.n_pairs} pairs) is not the data it was found "
                              f"on ({recorded_print.get('n_pairs')} pairs with another content); pass the original "
                              "file, or {data}/{task} to verify on other data on purpose", data="data", task="task")
        yield circuit, cfg, setup, label


def _recorded_backend(path: Path, backend: str) -> None:
    """Refuse, in one line naming the file, a backend recorded in a saved circuit that this environment lacks."""
    try:
        resolve_backend(backend)
    except ModelError as exc:
        raise ModelError(f"{path} records {{backend}} {backend}, used unless {{backend}} is given; {exc.template}",
                         **exc.options) from None


def _reverified(setup: Setup, cfg: DiscoverConfig, circuit: Circuit) -> Circuit:
    circuit = measure(setup, circuit)
    if not (cfg.n_verify or cfg.sample_below):
        return circuit.with_(verification=None)
    if circuit.level == "edge":
        return circuit.with_(verification=verify(
            setup, circuit, _stored_scores(circuit), top=cfg.n_verify, sample_below=cfg.sample_below, seed=cfg.seed,
            bound=cfg.bound, bound_samples=cfg.bound_samples, bound_p=cfg.bound_p))
    if circuit.level == "group":
        groups = parse_groups(cfg.group, setup.model.shape, setup.pairs.n_positions)  # type: ignore[arg-type]
        eff = patch_groups(setup, groups)
        return with_exact_units(circuit, dict(zip(eff.labels, eff.mean.tolist())), eff.n_forwards)
    return verify_components(setup, circuit, top=cfg.n_verify, sample_below=cfg.sample_below, seed=cfg.seed)


def _stored_scores(circuit: Circuit) -> EdgeScores:
    """An :class:`EdgeScores` view of a saved circuit's mean estimates (one pseudo-pair)."""
    return EdgeScores.from_per_pair(circuit.signed[None].double(), circuit.score[None].double(), circuit.method,
                                    circuit.direction, circuit.metric, circuit.graph, meta={"stored": True})
