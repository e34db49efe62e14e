"""The discover pipeline behind ``edgeatp discover``: load, attribute, select, verify, export.

Kept apart from the CLI so scripts can run exactly what the command runs::

    result = run_discover(DiscoverConfig(model="zoo:ioi"))
    result.write(Path("out"), ["json", "svg", "md"])
"""

from __future__ import annotations

import datetime as _dt
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import __version__
from .attribution.edges import attribute_edges
from .attribution.grouping import attribute_groups, coarse_edges, parse_groups, patch_coarse_edges, patch_groups
from .attribution.nodes import NODE_METHODS, attribute_nodes
from .circuit import (Circuit, EdgeCheck, Faithfulness, circuit_faithfulness, circuits_faithfulness, group_circuit,
                      node_circuit, prune, summarise_checks, top_k_circuits, verify, verify_nodes)
from .errors import EdgeatpError
from .graph import EdgeGraph, node_set
from .model import ModelAdapter, load_model
from .patching import patch_nodes
from .scores import Cost, EdgeScores, NodeScores
from .tasks import PromptPairs, load_pairs, make_task

CURVE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


@dataclass(frozen=True)
class DiscoverConfig:
    """Everything ``edgeatp discover`` was asked for (recorded in the circuit for re-verification)."""

    model: str = "zoo:ioi"
    task: str | None = None
    data: str | None = None
    n_pairs: int = 64
    metric: str = "logit_diff"
    method: str = "atp-qk"
    level: str = "edge"
    positions: bool = False
    group: str | None = None
    top_k: int | None = None
    threshold: float | None = None
    cumulative: float | None = None
    greedy: int | None = None
    target: float = 0.8
    n_verify: int = 20
    sample_below: int = 20
    bound: bool = False
    bound_samples: int = 256
    bound_p: float = 0.05
    direction: str = "noising"
    device: str = "cpu"
    dtype: str | None = None
    batch_size: int = 32
    seed: int = 0
    allow_download: bool = False
    threads: int | None = None  # None: one thread for small models (multi-threading only adds overhead there)


@contextmanager
def loaded_model(cfg: DiscoverConfig) -> Iterator[ModelAdapter]:
    """The model a config names, run under the config's thread policy (restored afterwards)."""
    adapter = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, allow_download=cfg.allow_download)
    with torch_threads(_threads(cfg, adapter)):
        yield adapter


def load_inputs(cfg: DiscoverConfig, adapter: ModelAdapter) -> tuple[ModelAdapter, PromptPairs, str]:
    """The prompt pairs a config names for this model, plus a label for the data."""
    if cfg.data:
        pairs = load_pairs(cfg.data, adapter.tokenizer, prepend_bos=adapter.prepend_bos, n_ctx=adapter.n_ctx)
        return adapter, pairs, f"file {cfg.data}"
    task = cfg.task or adapter.card.get("task") or "ioi"
    pairs = make_task(task, adapter.tokenizer, cfg.n_pairs, seed=cfg.seed, prepend_bos=adapter.prepend_bos)
    adapter.check_pairs(pairs)
    return adapter, pairs, f"task {task} ({cfg.n_pairs} pairs, seed {cfg.seed})"


@dataclass
class DiscoverResult:
    """A discovered circuit with what produced it."""

    circuit: Circuit
    config: DiscoverConfig
    data_label: str
    n_pairs: int
    scores: EdgeScores | None = None  # the edge estimates the circuit was cut from (for stderr in reports)

    def summary(self) -> dict[str, Any]:
        """Short JSON-able summary for scripts (``--json``)."""
        c = self.circuit
        v = c.verification
        out: dict[str, Any] = {
            "model": self.config.model, "data": self.data_label, "n_pairs": self.n_pairs, "method": c.method,
            "level": c.level, "direction": c.direction.value, "metric": c.metric, "n_edges": c.n_edges,
            "n_nodes": len(c.nodes()), "faithfulness": c.meta.get("faithfulness"),
            "necessity": c.meta.get("necessity"), "sign_convention": c.sign_convention,
        }
        if v is not None:
            out["verification"] = {"n_checked": len(v.checks), "rank_correlation": v.rank_correlation,
                                   "sign_agreement": v.sign_agreement, "largest_miss": v.largest_miss,
                                   "largest_miss_size": v.largest_miss_size, "below_cut_max": v.below_cut_max,
                                   "bound": v.below_cut_bound}
        if "groups" in c.meta:
            out["groups"] = c.meta["groups"][:10]
        if "groups_kept" in c.meta:
            out["groups_kept"] = c.meta["groups_kept"]
        return out

    def describe(self) -> str:
        """A few human-readable lines."""
        s = self.summary()
        lines = [f"{s['model']} on {s['data']}: {s['level']} circuit by {s['method']} ({s['direction']}, {s['metric']})",
                 f"  {s['n_edges']} edges, {s['n_nodes']} components; faithfulness {_fmt(s['faithfulness'])}, "
                 f"necessity {_fmt(s['necessity'])} (1 = full clean behaviour, 0 = corrupt)"]
        v = s.get("verification")
        if v:
            lines.append(f"  verified {v['n_checked']} exactly: rank correlation {_fmt(v['rank_correlation'])}, "
                         f"sign agreement {_fmt(v['sign_agreement'])}, largest miss {v['largest_miss']} "
                         f"({_fmt(v['largest_miss_size'])}), largest effect below the cut {_fmt(v['below_cut_max'])}"
                         + (f", bound {_fmt(v['bound'])}" if v["bound"] is not None else ""))
        top = self.circuit.edges()[:5] if self.circuit.level == "edge" else []
        if top:
            lines.append("  top edges: " + ", ".join(e.name for e in top))
        elif self.circuit.node_scores:
            lines.append("  top nodes: " + ", ".join(list(self.circuit.node_scores)[:5]))
        for g in s.get("groups", [])[:5]:
            lines.append(f"  group {g['group']}: estimate {_fmt(g['score'])}, exact {_fmt(g['exact'])}")
        return "\n".join(lines)

    def write(self, folder: Path, formats: Sequence[str], stem: str = "circuit") -> dict[str, Path]:
        return write_circuit(self.circuit, folder, formats, stem=stem, scores=self.scores)


def _fmt(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def _curve_sizes(n: int, extra: Sequence[int] = ()) -> list[int]:
    return sorted({k for k in (*CURVE_SIZES, *extra) if 0 < k <= n} | {n})


SMALL_MODEL_PARAMS = 20_000_000


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


def run_discover(cfg: DiscoverConfig, progress: bool = False, log: Callable[[str], None] = lambda s: None) -> DiscoverResult:
    """Attribute, select, verify: the whole ``discover`` command as a function."""
    rules = _check(cfg)
    with loaded_model(cfg) as adapter:
        return _run_discover(cfg, adapter, rules, progress, log)


def _check(cfg: DiscoverConfig) -> list[str]:
    """Reject contradictory options before any work; returns the selection rule given (if any)."""
    rules = [r for r in ("top_k", "threshold", "cumulative", "greedy") if getattr(cfg, r) is not None]
    if len(rules) > 1:
        raise EdgeatpError("choose one of --top-k, --threshold, --cumulative and --greedy")
    if cfg.level != "edge" and rules and rules[0] != "top_k":
        raise EdgeatpError(f"--{rules[0].replace('_', '-')} works on edges; node and neuron circuits use --top-k")
    if cfg.level != "edge" and cfg.method not in (*NODE_METHODS, "exact"):
        raise EdgeatpError(f"--method {cfg.method} is edge-only; node levels take atp, atp-qk, atp-gd, atp* or exact")
    if cfg.task and cfg.data:
        raise EdgeatpError("give either --task or --data, not both")
    if cfg.threads is not None and cfg.threads < 1:
        raise EdgeatpError("--threads must be at least 1")
    if cfg.level == "edge" and cfg.group not in (None, "layer"):
        raise EdgeatpError("at edge level --group takes 'layer' (edges between whole layers); node groups "
                           "(head, span:..., files) go with --level node")
    if cfg.greedy is not None and cfg.positions:
        raise EdgeatpError("--greedy works on position-aggregated graphs; drop --positions")
    if cfg.bound and cfg.level != "edge":
        raise EdgeatpError("--bound bounds missed edges; it works with --level edge")
    if cfg.group and cfg.level != "edge" and cfg.positions:
        raise EdgeatpError("node groups carry their own positions (e.g. span:0-3); drop --positions")
    return rules


def _threads(cfg: DiscoverConfig, adapter: ModelAdapter) -> int | None:
    """The thread count to run with: as asked, else one for small models, else torch's default."""
    if cfg.threads is not None:
        return cfg.threads
    return 1 if sum(p.numel() for p in adapter.model.parameters()) < SMALL_MODEL_PARAMS else None


def _run_discover(cfg: DiscoverConfig, adapter: ModelAdapter, rules: list[str], progress: bool,
                  log: Callable[[str], None]) -> DiscoverResult:
    adapter, pairs, label = load_inputs(cfg, adapter)
    log(f"{adapter.name}: {adapter.shape.n_layers} layers x {adapter.shape.n_heads} heads; {label}")
    common = dict(metric=cfg.metric, direction=cfg.direction, batch_size=cfg.batch_size)
    meta: dict[str, Any] = {"model": adapter.name, "model_info": adapter.describe(), "data": label,
                            "n_pairs": len(pairs), "config": asdict(cfg), "edgeatp_version": __version__,
                            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    scores = None
    if cfg.level == "edge":
        circuit, scores = _edge_circuit(adapter, pairs, cfg, rules, common, progress, log)
        if cfg.group:
            circuit = circuit.with_(meta={**circuit.meta,
                                          "groups": _coarse_edges(adapter, pairs, cfg, scores, progress)})
    else:
        circuit = _node_circuit(adapter, pairs, cfg, rules, common, progress, log)
    return DiscoverResult(circuit.with_(meta={**circuit.meta, **meta}), cfg, label, len(pairs), scores)


def _edge_circuit(adapter: ModelAdapter, pairs: PromptPairs, cfg: DiscoverConfig, rules: list[str], common: dict,
                  progress: bool, log: Callable[[str], None]) -> tuple[Circuit, EdgeScores]:
    scores = attribute_edges(adapter, pairs, cfg.method, positions=cfg.positions, progress=progress, **common)
    log(f"scored {scores.graph.n_edges} edges with {cfg.method}")
    candidates = top_k_circuits(scores, _curve_sizes(scores.graph.n_edges))
    curve = circuits_faithfulness(adapter, pairs, [c for _, c in candidates], cfg.batch_size)
    if rules:
        circuit = prune(scores, **{rules[0]: getattr(cfg, rules[0])})
    else:
        reach = [i for i, f in enumerate(curve.faithfulness) if f >= cfg.target]
        pick = reach[0] if reach else max(range(len(candidates)), key=lambda i: curve.faithfulness[i])
        k, circuit = candidates[pick]
        circuit = circuit.with_(meta={**circuit.meta, "rule": f"smallest top-k reaching faithfulness {cfg.target}",
                                      "value": k})
    own = circuit_faithfulness(adapter, pairs, circuit, cfg.batch_size)
    log(f"kept {circuit.n_edges} edges; faithfulness {own.faithfulness[0]:.3f}")
    checked = verify(adapter, pairs, circuit, scores, top=cfg.n_verify, sample_below=cfg.sample_below, seed=cfg.seed,
                     bound=cfg.bound, bound_samples=cfg.bound_samples, bound_p=cfg.bound_p,
                     batch_size=cfg.batch_size) if cfg.n_verify or cfg.sample_below else None
    return circuit.with_(verification=checked, faithfulness=curve,
                         meta={**circuit.meta, "faithfulness": own.faithfulness[0], "necessity": own.necessity[0],
                               "clean_metric": own.clean_metric, "corrupt_metric": own.corrupt_metric}), scores


def _node_circuit(adapter: ModelAdapter, pairs: PromptPairs, cfg: DiscoverConfig, rules: list[str], common: dict,
                  progress: bool, log: Callable[[str], None]) -> Circuit:
    """Node/neuron circuit (or, with ``--group``, a circuit over the best coarse groups)."""
    fams = ["head", "q", "k", "v"] + (["neuron"] if cfg.level == "neuron" else ["mlp"])
    if adapter.shape.attn_only:
        if cfg.level == "neuron":
            raise EdgeatpError("--level neuron needs a model with MLPs")
        fams = fams[:4]
    graph = EdgeGraph.from_shape(adapter.shape, neurons=cfg.level == "neuron")
    if cfg.group:
        groups = parse_groups(cfg.group, adapter.shape, pairs.n_positions)
        method = "atp-qk" if cfg.method == "exact" else cfg.method
        est = attribute_groups(adapter, pairs, groups, method, progress=progress, **common)
        exact = patch_groups(adapter, pairs, groups, progress=progress, **common)
        circuit, curve, pick = _smallest_faithful(adapter, pairs, cfg, rules, len(groups),
                                                  lambda k: group_circuit(est, graph, top_k=k))
        exact_of = dict(zip(exact.labels, exact.mean.tolist()))
        kept = set(circuit.meta["groups_kept"])
        checks = tuple(EdgeCheck(g.name, m, exact_of[g.name], s, g.name in kept) for g, s, m in est.top())
        checked = summarise_checks(checks, len(checks), None, None, exact.n_forwards)
        log(f"kept {len(kept)} of {len(groups)} groups; faithfulness {curve.faithfulness[pick]:.3f}")
    else:
        nodes = node_set(adapter.shape, fams, pairs.n_positions if cfg.positions else None)
        if cfg.method == "exact":
            eff = patch_nodes(adapter, pairs, list(nodes), progress=progress, **common)
            scores = NodeScores(eff.per_pair, eff.per_pair.abs(), "exact", eff.direction, eff.metric,
                                Cost(forwards=eff.n_forwards), {}, nodes)
        else:
            scores = attribute_nodes(adapter, pairs, cfg.method, nodes=nodes, positions=cfg.positions,
                                     progress=progress, **common)
        n_comp = len({n.component.head_node for n in nodes})
        circuit, curve, pick = _smallest_faithful(adapter, pairs, cfg, rules, n_comp,
                                                  lambda k: node_circuit(scores, graph, top_k=k))
        log(f"kept {len(circuit.node_scores)} components; faithfulness {curve.faithfulness[pick]:.3f}")
        checked = verify_nodes(adapter, pairs, circuit, scores, top=cfg.n_verify, sample_below=cfg.sample_below,
                               seed=cfg.seed, batch_size=cfg.batch_size) \
            if cfg.n_verify or cfg.sample_below else None
    return circuit.with_(verification=checked, faithfulness=curve,
                         meta={**circuit.meta, "faithfulness": curve.faithfulness[pick],
                               "necessity": curve.necessity[pick], "clean_metric": curve.clean_metric,
                               "corrupt_metric": curve.corrupt_metric})


def _smallest_faithful(adapter: ModelAdapter, pairs: PromptPairs, cfg: DiscoverConfig, rules: list[str], n_max: int,
                       build: Callable[[int], Circuit]) -> tuple[Circuit, Faithfulness, int]:
    """Node-level circuits of growing size, their faithfulness curve, and the one to keep: the
    ``--top-k`` one, else the smallest reaching ``--target`` (else the most faithful)."""
    sizes = [cfg.top_k] if rules else [k for k in _curve_sizes(n_max) if k <= 64]  # type: ignore[list-item]
    circuits = [build(k) for k in sizes]
    faith = [circuit_faithfulness(adapter, pairs, c, cfg.batch_size) for c in circuits]
    curve = Faithfulness(tuple(sizes), tuple(f.faithfulness[0] for f in faith), tuple(f.necessity[0] for f in faith),
                         faith[0].clean_metric, faith[0].corrupt_metric)
    pick = 0 if rules else next((i for i, f in enumerate(curve.faithfulness) if f >= cfg.target),
                                max(range(len(sizes)), key=lambda i: curve.faithfulness[i]))
    return circuits[pick], curve, pick


def _coarse_edges(adapter: ModelAdapter, pairs: PromptPairs, cfg: DiscoverConfig, scores: EdgeScores,
                  progress: bool) -> list[dict]:
    """Estimated and exact effects of the layer-level coarse edges (``--group layer`` on edges)."""
    coarse = coarse_edges(scores)
    exact = patch_coarse_edges(adapter, pairs, coarse, scores.graph, cfg.batch_size, progress)
    exact_of = dict(zip(exact.labels, exact.mean.tolist()))
    return [{"group": row["edge"], "score": row["score"], "signed": row["signed"], "exact": exact_of[row["edge"]]}
            for row in coarse.to_table()]


def reverify(path: Path, *, model: str | None = None, task: str | None = None, data: str | None = None,
             n_pairs: int | None = None, n_verify: int = 20, sample_below: int = 20, bound: bool = False,
             batch_size: int = 32, seed: int | None = None, allow_download: bool = False,
             progress: bool = False) -> DiscoverResult:
    """Verify a saved circuit again (on its own data unless told otherwise)."""
    circuit = Circuit.from_json(str(path))
    recorded = dict(circuit.meta.get("config") or {})
    if not recorded and model is None:
        raise EdgeatpError(f"{path} does not record its model; pass --model (and --task or --data)")
    cfg = DiscoverConfig(**{**recorded, "batch_size": batch_size, "allow_download": allow_download,
                            "n_verify": n_verify, "sample_below": sample_below, "bound": bound})
    overrides = {k: v for k, v in {"model": model, "n_pairs": n_pairs, "seed": seed}.items() if v is not None}
    if task or data:
        overrides.update(task=task, data=data)
    cfg = DiscoverConfig(**{**asdict(cfg), **overrides})
    _check(cfg)
    with loaded_model(cfg) as adapter:
        return _reverify(path, circuit, cfg, adapter, n_verify, sample_below, bound, batch_size)


def _reverify(path: Path, circuit: Circuit, cfg: DiscoverConfig, adapter: ModelAdapter, n_verify: int,
              sample_below: int, bound: bool, batch_size: int) -> DiscoverResult:
    adapter, pairs, label = load_inputs(cfg, adapter)
    if circuit.graph.shape != adapter.shape:
        raise EdgeatpError(f"{path} was found on a model of another shape than {adapter.name}")
    if circuit.graph.n_positions not in (None, pairs.n_positions):
        raise EdgeatpError(f"{path} is position-resolved over {circuit.graph.n_positions} positions but these "
                           f"prompts have {pairs.n_positions}; verify it on prompts of that length")
    own = circuit_faithfulness(adapter, pairs, circuit, batch_size)
    meta = {**circuit.meta, "faithfulness": own.faithfulness[0], "necessity": own.necessity[0],
            "reverified": {"data": label, "n_pairs": len(pairs)}}
    if circuit.level == "edge":
        scores_like = _stored_scores(circuit, len(pairs))
        checked = verify(adapter, pairs, circuit, scores_like, top=n_verify, sample_below=sample_below,
                         seed=cfg.seed, bound=bound, bound_samples=cfg.bound_samples, bound_p=cfg.bound_p,
                         batch_size=batch_size)
    else:
        checked = circuit.verification
    return DiscoverResult(circuit.with_(verification=checked, meta=meta), cfg, label, len(pairs))


def _stored_scores(circuit: Circuit, n_pairs: int) -> EdgeScores:
    """An :class:`EdgeScores` view of a saved circuit's mean estimates (one pseudo-pair)."""
    return EdgeScores(circuit.signed[None].double(), circuit.score[None].double(), circuit.method, circuit.direction,
                      circuit.metric, meta={"stored": True, "n_pairs": n_pairs}, graph=circuit.graph)


def write_circuit(circuit: Circuit, folder: Path, formats: Sequence[str], stem: str = "circuit",
                  skip_existing_json: bool = False, scores: EdgeScores | None = None) -> dict[str, Path]:
    """Write the requested formats of a circuit into ``folder`` (``skip_existing_json`` leaves the
    circuit's own JSON alone when converting a saved file); returns ``{format: path}``."""
    from .export import export_all

    wanted = [f for f in formats if not (skip_existing_json and f == "json")]
    return export_all(circuit, folder, wanted, name=stem, task=circuit.meta.get("data"), scores=scores)
