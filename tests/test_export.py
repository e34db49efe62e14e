"""Exports: networkx, DOT (checked by Graphviz), JSON round trips (edgeatp and MIB), schema, report."""

import html
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from edgeatp.attribution.grouping import GroupScores, layer_groups, span_groups
from edgeatp.circuit import (Check, Circuit, CircuitMetrics, FaithfulnessCurve, RefinedSize, Refinement, Unit,
                             Verification, group_circuit, node_circuit, prune)
from edgeatp.errors import EdgeatpError
from edgeatp.export import (circuit_from_json, circuit_to_json, dot_available, render, to_dot, to_networkx, write_json,
                            write_outputs, write_report)
from edgeatp.export._view import drawing
from edgeatp.export.chart import faithfulness_svg, nice_ticks
from edgeatp.export.dot import (FILL_LIGHT_NEGATIVE, FILL_LIGHT_POSITIVE, FILL_NEGATIVE, FILL_NEUTRAL, FILL_POSITIVE,
                                LIGHT_NEGATIVE, LIGHT_POSITIVE, NEGATIVE, NEUTRAL, POSITIVE, quote)
from edgeatp.export.schema import SCHEMA_PATH, violations
from edgeatp.graph import EdgeGraph, ModelShape, Node, NodeKind, node_set
from edgeatp.model import ModelAdapter
from edgeatp.scores import EdgeScores, NodeScores, PairStats
from edgeatp.tasks.pairs import Direction
from edgeatp.setup import Setup
from edgeatp.verification import component_curve, with_exact_units

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = ModelShape(n_layers=2, n_heads=2, d_model=8, d_head=4, d_mlp=16)
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed")


# ------------------------------------------------------------------------------------ builders
def edge_scores(graph: EdgeGraph, seed: int = 0, dtype: torch.dtype = torch.float64,
                direction: Direction = Direction.NOISING) -> EdgeScores:
    """Random per-pair estimates on ``graph`` (zero where edges do not exist)."""
    gen = torch.Generator().manual_seed(seed)
    per = torch.randn((3, graph.P, graph.n_writers, graph.n_readers), generator=gen, dtype=torch.float64)
    per = (per * graph.mask).to(dtype)
    return EdgeScores.from_per_pair(per, None, "atp-qk", direction, "logit_diff", graph, meta={"model": "toy"})


def verified(c: Circuit) -> Circuit:
    """The circuit with a hand-made verification (NaN rank correlation, no bound) and faithfulness curve."""
    top = c.edges()[:3]
    checks = tuple(Check(e.name, -0.5 - i, -0.75 - i, 0.5 + i, True) for i, e in enumerate(top))
    v = Verification(checks, 3, math.nan, 1.0, top[0].name, 0.25, 0.0, 0, None, None, 7)
    f = FaithfulnessCurve((2, 4, 8), (0.1, math.nan, 0.9), (0.8, 0.3, 0.05), 2.0, -1.0, "top-k of atp-qk")
    return c.with_(verification=v, curve=f, faithfulness=0.9, necessity=0.05)


def edge_circuit(dtype: torch.dtype = torch.float64) -> Circuit:
    """The top 12 edges of random scores on the toy model, verified by hand."""
    return verified(prune(edge_scores(EdgeGraph.from_shape(SHAPE), dtype=dtype), top_k=12, cleanup=False))


def refined_circuit() -> Circuit:
    """The edge circuit with a hand-made circuit search and MIB metrics."""
    c = edge_circuit()
    names = tuple(e.name for e in c.edges()[:4])
    sizes = (RefinedSize(4, names, 0.91, 0.02, 3, 0.5, 0.1, "greedy", 40),
             RefinedSize(12, tuple(e.name for e in c.edges()), math.nan, 0.0, 12, 0.9, 0.05, "ranking", 0))
    search = Refinement("atp-qk", "faithfulness", 500, 3, 20, 321, 2.0, -1.0, sizes)
    metrics = CircuitMetrics("top-k of atp-qk", 60, (0.1, 0.5, 1.0), (6, 30, 60), (0.2, 0.8, 1.0), (5, 30, 60),
                             (0.25, 0.7, 1.0), 0.7, 0.3, 12)
    return c.with_(refinement=search, circuit_metrics=(metrics,))


def positional_circuit() -> Circuit:
    """The top 10 of random position-resolved scores over 3 positions, verified by hand."""
    return verified(prune(edge_scores(EdgeGraph.from_shape(SHAPE, n_positions=3), seed=1), top_k=10, cleanup=False))


def the_node_circuit() -> Circuit:
    """A node-level circuit of the 3 best components of random node scores (denoising)."""
    nodes = node_set(SHAPE)
    per = torch.randn((4, len(nodes)), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ns = NodeScores.from_per_pair(per, None, "atp*", Direction.DENOISING, "logit_diff", nodes)
    return node_circuit(ns, EdgeGraph.from_shape(SHAPE), top_k=3)


def verified_node_circuit() -> Circuit:
    """:func:`the_node_circuit` with its best component patched against the sign of its estimate,
    its second best along it (the third is left as an estimate) and the best one outside it."""
    c = the_node_circuit()
    first, second, _, fourth = c.units_of("component")[:4]
    return with_exact_units(c, {first.name: -3 * first.signed, second.name: 2 * second.signed, fourth.name: 0.5}, 3)


def neuron_circuit(top_k: int = 26) -> Circuit:
    """A neuron-level circuit of the ``top_k`` best heads and neurons (most of both MLPs' 16 neurons)."""
    nodes = node_set(SHAPE, ["head", "neuron"])
    per = torch.randn((3, len(nodes)), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ns = NodeScores.from_per_pair(per, None, "atp", Direction.NOISING, "logit_diff", nodes)
    return node_circuit(ns, EdgeGraph.from_shape(SHAPE, neurons=True), top_k=top_k)


def the_group_circuit(spans: tuple[tuple[int, int], ...] = ((0, 1), (2, 3)), top_k: int = 3) -> Circuit:
    """A group circuit of the ``top_k`` best span groups (heads and MLPs over ``spans``) of random
    estimates, the best two of them patched exactly (the second with the sign against its estimate)."""
    groups = span_groups(node_set(SHAPE, ["head", "mlp"]), list(spans))
    per = torch.randn((4, len(groups)), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gs = GroupScores(PairStats.of(per), "atp*", Direction.NOISING, "logit_diff", groups=tuple(groups))
    c = group_circuit(gs, EdgeGraph.from_shape(SHAPE), top_k=top_k)
    first, second = c.units_of("group")[:2]
    return with_exact_units(c, {first.name: 2 * first.signed, second.name: -second.signed}, 4)


def qk_circuit() -> Circuit:
    """Kept: input→a1.h0<q>, input→a1.h0<k> (parallel edges into one head) and a1.h0→logits."""
    c = prune(edge_scores(EdgeGraph.from_shape(SHAPE)), top_k=1)
    g = c.graph
    mask = torch.zeros_like(g.full_mask)
    for name in ("input->a1.h0<q>", "input->a1.h0<k>", "a1.h0->logits"):
        mask[(0, *g.index_of(name))] = True
    return c.with_(in_graph=mask)


def nan_equal(a: object, b: object) -> bool:
    """Deep equality of dataclasses, tuples and floats with NaN equal to NaN."""
    if is_dataclass(a):
        return type(a) is type(b) and all(nan_equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))
    if isinstance(a, (tuple, list)):
        return isinstance(b, type(a)) and len(a) == len(b) and all(nan_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def assert_same(a: Circuit, b: Circuit) -> None:
    """Everything a circuit holds is reproduced exactly."""
    assert a.graph.shape == b.graph.shape
    assert a.graph.writers == b.graph.writers and a.graph.readers == b.graph.readers
    assert a.graph.n_positions == b.graph.n_positions
    for name in ("in_graph", "score", "signed"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.level, a.method, a.direction, a.metric) == (b.level, b.method, b.direction, b.metric)
    assert a.units == b.units and a.meta == b.meta and a.selection == b.selection
    assert nan_equal(a.verification, b.verification) and nan_equal(a.curve, b.curve)
    assert (a.faithfulness, a.necessity) == (b.faithfulness, b.necessity)
    assert nan_equal(a.refinement, b.refinement) and nan_equal(a.circuit_metrics, b.circuit_metrics)


# ------------------------------------------------------------------------------------ networkx
def test_networkx_edges_carry_the_circuit_numbers() -> None:
    c = edge_circuit()
    G = to_networkx(c)
    assert G.number_of_edges() == c.n_edges == 12
    assert {d["name"] for *_, d in G.edges(data=True)} == {e.name for e in c.edges()}
    exact = {ch.name: ch.exact for ch in c.verification.checks}
    for u, v, key, d in G.edges(keys=True, data=True):
        e = c.graph.edge(*c.graph.index_of(d["name"]))
        w, r = c.graph.index_of(e)
        assert (u, v) == (e.writer.name, e.reader.head_node.name)
        assert key == d["reader"] == e.reader.kind.value
        assert d["score"] == float(c.score[0, w, r]) and d["signed"] == float(c.signed[0, w, r])
        assert d["exact"] == exact.get(d["name"]) and d["in_graph"] is True and d["position"] is None
    assert sum(d["exact"] is not None for *_, d in G.edges(data=True)) == 3


def test_networkx_node_scores_and_attributes() -> None:
    c = edge_circuit()
    G = to_networkx(c)
    rows = [(e, float(c.score[(0, *c.graph.index_of(e))])) for e in c.edges()]
    for node in G.nodes:
        touching = sum(s for e, s in rows if node in (e.writer.name, e.reader.head_node.name))
        assert G.nodes[node]["score"] == pytest.approx(touching, rel=1e-12)
        assert G.nodes[node]["in_graph"] is True
    assert set(G.nodes) == {n.name for n in c.nodes()}
    some_head = next(n for n in G.nodes if n.startswith("a"))
    parsed = Node.parse(some_head)
    assert G.nodes[some_head]["kind"] == "head"
    assert (G.nodes[some_head]["layer"], G.nodes[some_head]["head"]) == (parsed.layer, parsed.head)
    assert G.graph["direction"] == "noising" and G.graph["model"] == "toy" and G.graph["method"] == "atp-qk"


def test_networkx_keeps_parallel_qkv_edges() -> None:
    G = to_networkx(qk_circuit())
    assert G.number_of_edges("input", "a1.h0") == 2
    assert set(G["input"]["a1.h0"]) == {"q", "k"}
    assert G.edges["input", "a1.h0", "k"]["name"] == "input->a1.h0<k>"


def test_networkx_include_all_marks_kept_edges() -> None:
    c = qk_circuit()
    G = to_networkx(c, include_all=True)
    assert G.number_of_edges() == c.graph.n_edges == 46
    assert sum(d["in_graph"] for *_, d in G.edges(data=True)) == c.n_edges == 3
    for n in G.nodes:
        kept = sum(d["score"] for u, v, d in G.edges(data=True) if d["in_graph"] and n in (u, v))
        assert G.nodes[n]["score"] == pytest.approx(kept, rel=1e-12, abs=0)
        assert G.nodes[n]["in_graph"] == (n in {"input", "a1.h0", "logits"})
    assert G.nodes["m0"]["score"] == 0.0 and G.degree("m0") > 0


def test_networkx_positional_nodes_are_per_position() -> None:
    c = positional_circuit()
    G = to_networkx(c)
    assert G.number_of_edges() == c.n_edges
    for u, v, d in G.edges(data=True):
        p = d["position"]
        assert u.endswith(f"@{p}") and v.endswith(f"@{p}") and d["name"].endswith(f"@{p}")
        assert G.nodes[u]["position"] == p and G.nodes[u]["component"] == u.split("@")[0]
    assert G.graph["n_positions"] == 3


def test_networkx_node_circuit_uses_node_scores() -> None:
    c = the_node_circuit()
    G = to_networkx(c)
    for n, d in G.nodes(data=True):
        assert d["score"] == c.node_scores.get(n)
    assert G.nodes["input"]["score"] is None and G.nodes["logits"]["score"] is None
    assert any(d["score"] is not None for _, d in G.nodes(data=True))


# ------------------------------------------------------------------------------------ DOT
def edge_attrs(dot: str) -> dict[str, dict[str, str]]:
    """Attributes of every DOT edge statement, by edge id."""
    out = {}
    for line in dot.splitlines():
        if " -> " in line and "id=" in line:
            a = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|[\d.]+)', line))
            out[a["id"].strip('"')] = {k: v.strip('"') for k, v in a.items()}
    return out


def node_attrs(dot: str) -> dict[str, dict[str, str]]:
    """Attributes of every DOT node statement (components, not row labels), by node id."""
    out = {}
    for line in dot.splitlines():
        if " -> " not in line and "id=" in line and "row:" not in line:
            a = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|[\d.]+)', line))
            out[a["id"].strip('"')] = {k: v.strip('"').replace("\\n", "\n") for k, v in a.items()}
    return out


def legend(dot: str) -> str:
    """The title and legend of a DOT drawing as one line of text."""
    return " ".join(dot.split("graph [label=")[1].split("];")[0].replace("\\l", " ").split())


def run_dot(text: str, fmt: str = "svg") -> str:
    """Graphviz output for DOT text; fails the test on any error or warning."""
    done = subprocess.run(["dot", f"-T{fmt}"], input=text.encode(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert not done.stderr.strip(), done.stderr.decode()
    return done.stdout.decode()


@needs_dot
@pytest.mark.parametrize("make", [edge_circuit, positional_circuit, the_node_circuit, qk_circuit, the_group_circuit,
                                  neuron_circuit])
def test_graphviz_accepts_the_dot(make: Callable[[], Circuit]) -> None:
    c = make()
    svg = run_dot(to_dot(c))
    ids = {html.unescape(i) for i in re.findall(r'<g id="([^"]+)" class="edge">', svg)}
    view = drawing(c)
    assert ids == {e.id for e in view.edges} and len(ids) == len(view.edges)
    drawn = [name for e in view.edges for name in (e.members or (e.id,))]
    assert sorted(drawn) == sorted(e.name for e in c.edges())  # every kept edge, once, merged or not
    if c.level == "edge":  # no neuron writers here: one drawn edge per kept edge
        assert ids == {e.name for e in c.edges()}


@needs_dot
def test_dot_draws_layers_top_to_bottom() -> None:
    plain = run_dot(to_dot(edge_circuit()), "plain")
    y = {parts[1].strip('"'): float(parts[3]) for parts in (line.split() for line in plain.splitlines())
         if parts[0] == "node"}
    heads = {n: v for n, v in y.items() if n.startswith("a")}
    assert y["input"] > max(heads.values()) and min(heads.values()) > y["logits"]
    assert all(y[f"a0.h{h}"] > y[f"a1.h{k}"] for h in (0, 1) for k in (0, 1) if f"a0.h{h}" in y and f"a1.h{k}" in y)
    if "m0" in y and "m1" in y:
        assert y["m0"] > y["m1"]


def test_dot_colour_is_the_best_known_sign_and_width_the_score() -> None:
    c = edge_circuit()
    text = to_dot(c, min_penwidth=1.0, max_penwidth=5.0)
    attrs = edge_attrs(text)
    assert set(attrs) == {e.name for e in c.edges()}
    exact = {ch.name: ch.exact for ch in c.verification.checks}
    widths, flipped = [], 0
    for e in c.edges():
        a, idx = attrs[e.name], (0, *c.graph.index_of(e))
        if e.name in exact:  # patched: the exact effect's sign, dark, even against the estimate
            assert a["color"] == (POSITIVE if exact[e.name] > 0 else NEGATIVE) and "estimate only" not in a["tooltip"]
            flipped += bool(c.signed[idx] > 0) != (exact[e.name] > 0)
        else:  # estimate only: light
            assert a["color"] == (LIGHT_POSITIVE if c.signed[idx] > 0 else LIGHT_NEGATIVE)
            assert "estimate only" in a["tooltip"]
        widths.append((float(c.score[idx]), float(a["penwidth"])))
    assert flipped >= 1
    assert max(w for _, w in widths) == 5.0
    by_score = [w for _, w in sorted(widths)]
    assert by_score == sorted(by_score) and by_score[0] < by_score[-1]
    assert {a["color"] for a in attrs.values()} == {NEGATIVE, LIGHT_POSITIVE, LIGHT_NEGATIVE}
    assert "dark blue/red: sign of the exact effect (3 drawn edges patched" in legend(text)
    assert "light blue/red: sign of the estimate only (9 not patched)" in legend(text)


def test_dot_node_circuit_colours_components_by_their_effect() -> None:
    c = verified_node_circuit()
    text = to_dot(c)
    nodes = node_attrs(text)
    first, second, third = [u for u in c.units_of("component") if u.in_circuit]
    assert (first.signed > 0) != (first.exact > 0)  # patched against its estimate: the exact sign wins
    for u in (first, second):
        assert nodes[u.name]["fillcolor"] == (FILL_POSITIVE if u.exact > 0 else FILL_NEGATIVE)
        assert f"exact {u.exact:.4g}" in nodes[u.name]["label"]
    assert nodes[third.name]["fillcolor"] == (FILL_LIGHT_POSITIVE if third.signed > 0 else FILL_LIGHT_NEGATIVE)
    assert f"est. {third.signed:.4g}" in nodes[third.name]["label"]
    assert nodes["input"]["fillcolor"] == nodes["logits"]["fillcolor"] == FILL_NEUTRAL
    edges = edge_attrs(text)
    assert {(a["color"], a["penwidth"]) for a in edges.values()} == {(NEUTRAL, "1.0")}  # unscored: drawn alike
    text_legend = legend(text)
    assert "node circuit, 3 of 6 components kept" in text_legend
    assert "edges: every edge among the kept components, not scored one by one, drawn alike" in text_legend
    assert "pen width" not in text_legend and "edge colour" not in text_legend
    assert "so the component restores it" in text_legend  # denoising


def test_dot_reduces_large_neuron_circuits() -> None:
    c = neuron_circuit()
    kept = [u for u in c.units_of("component") if u.in_circuit and ".n" in u.name]
    per_layer = {layer: [u.name for u in kept if u.name.startswith(f"m{layer}.")] for layer in (0, 1)}
    assert all(len(names) > 3 for names in per_layer.values())
    text = to_dot(c, max_neurons=3)
    nodes = node_attrs(text)
    for layer, names in per_layer.items():  # the three best of each MLP one by one, the rest merged
        assert sorted(n for n in nodes if n.startswith(f"m{layer}.n")) == sorted(names[:3])
        assert f"+{len(names) - 3} neurons" in nodes[f"m{layer}"]["label"]
    assert (f"only the 3 best-scoring neurons of each MLP are drawn one by one; the other {len(per_layer[0]) - 3} "
            f"of m0, {len(per_layer[1]) - 3} of m1 are merged into their MLP's node") in legend(text)
    assert len(edge_attrs(text)) < c.n_edges // 3 and run_dot(text)
    assert "merged" not in legend(to_dot(c, max_neurons=None))
    assert to_networkx(c).number_of_edges() == c.n_edges  # the data keeps every edge


def test_dot_caps_edge_circuits_at_the_best_scores() -> None:
    c = prune(edge_scores(EdgeGraph.from_shape(SHAPE), seed=6), top_k=40, cleanup=False)
    text = to_dot(c, max_edges=10)
    assert set(edge_attrs(text)) == {e.name for e in c.edges()[:10]}
    assert "only the 10 highest-scoring of the 40 kept edges are drawn" in legend(text)
    assert "highest-scoring" not in legend(to_dot(c))  # 40 edges fit the default cap
    assert to_networkx(c).number_of_edges() == 40


def test_dot_caps_node_level_drawings_by_their_weaker_end() -> None:
    c = the_node_circuit()
    full, capped = drawing(c, max_edges=None), drawing(c, max_edges=4)
    assert len(full.edges) > 4 and len(capped.edges) == 4 and capped.nodes == full.nodes  # every component stays
    score = c.node_scores

    def weaker(e: Any) -> float:
        return min(score.get(e.writer.name, math.inf), score.get(e.reader.name, math.inf))
    assert min(map(weaker, capped.edges)) >= max(weaker(e) for e in full.edges if e not in capped.edges)
    assert [e for e in full.edges if e in capped.edges] == list(capped.edges)  # drawn in the same order
    text = legend(to_dot(c, max_edges=4))
    assert f"only 4 of the {len(full.edges)} edges among the kept components are drawn" in text


def test_dot_group_circuit_shows_the_kept_groups() -> None:
    c = the_group_circuit()
    text = to_dot(c)
    nodes = node_attrs(text)
    kept = [u for u in c.units_of("group") if u.in_circuit]
    assert len(kept) == 3 and len({g.name.split("@")[0] for g in kept}) == 3
    for g in kept:  # each kept group on its component, with its span and best-known effect
        label, fill = nodes[g.name.split("@")[0]]["label"], nodes[g.name.split("@")[0]]["fillcolor"]
        value = g.exact if g.exact is not None else g.signed
        assert f"group {g.name}: {'exact' if g.exact is not None else 'est.'} {value:.4g}" in label
        dark, light = (FILL_POSITIVE, FILL_LIGHT_POSITIVE) if value > 0 else (FILL_NEGATIVE, FILL_LIGHT_NEGATIVE)
        assert fill == (dark if g.exact is not None else light)
    assert any((g.exact > 0) != (g.signed > 0) for g in kept if g.exact is not None)
    assert "group circuit, 3 of 12 groups kept (3 components" in legend(text)
    assert "each component lists the kept groups it belongs to" in legend(text)
    old = c.with_(units=tuple(replace(u, members=()) for u in c.units))  # files written before members existed
    assert "kept groups whose members are not recorded are not placed: " + ", ".join(g.name for g in kept) in legend(
        to_dot(old))


def test_dot_marks_qkv_edges() -> None:
    attrs = edge_attrs(to_dot(qk_circuit()))
    q, k, out = attrs["input->a1.h0<q>"], attrs["input->a1.h0<k>"], attrs["a1.h0->logits"]
    assert (q["style"], q["label"]) == ("solid", "q")
    assert (k["style"], k["arrowhead"], k["label"]) == ("dashed", "empty", "k")
    assert "label" not in out


def test_dot_title_has_the_run_and_is_escaped() -> None:
    c = edge_circuit().with_(meta={"model": 'my "odd" \\ model'})
    text = to_dot(c)
    assert 'my \\"odd\\" \\\\ model' in text
    for needle in ("atp-qk", "noising", "logit_diff", "sign convention", "red"):
        assert needle in text
    assert quote('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    if shutil.which("dot"):
        assert "my &quot;odd&quot; \\ model" in run_dot(text)


# ------------------------------------------------------------------------------------ render
@needs_dot
@pytest.mark.parametrize("fmt, magic", [("svg", b"<?xml"), ("png", b"\x89PNG"), ("pdf", b"%PDF")])
def test_render_writes_pictures(tmp_path: Path, fmt: str, magic: bytes) -> None:
    path = render(to_dot(edge_circuit()), tmp_path / f"c.{fmt}")
    assert path.read_bytes().startswith(magic)


def test_render_rejects_unknown_formats(tmp_path: Path) -> None:
    with pytest.raises(EdgeatpError, match="svg, png, pdf"):
        render("digraph {}", tmp_path / "c.gif")


def test_missing_dot_gives_an_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert not dot_available()
    with pytest.raises(EdgeatpError, match=r"apt-get install graphviz.*brew install graphviz"):
        render(to_dot(edge_circuit()), tmp_path / "c.svg")
    written = write_outputs(edge_circuit(), tmp_path / "out", ("json", "svg"))
    assert set(written.paths) == {"json"} and "apt-get install graphviz" in written.skipped["svg"]
    assert (tmp_path / "out" / "circuit.json").is_file() and not (tmp_path / "out" / "circuit.svg").exists()
    report = write_report(edge_circuit(), tmp_path / "rep", "md").read_text()
    assert "was not found" in report and "`circuit.dot`" in report
    assert (tmp_path / "rep" / "circuit.dot").is_file() and not (tmp_path / "rep" / "circuit.svg").exists()


# ------------------------------------------------------------------------------------ JSON
@pytest.mark.parametrize("make", [edge_circuit, positional_circuit, the_node_circuit, the_group_circuit,
                                  refined_circuit])
def test_json_round_trip_is_exact(make: Callable[[], Circuit], tmp_path: Path) -> None:
    c = make()
    data = circuit_to_json(c)
    text = json.dumps(data, allow_nan=False)
    assert_same(c, circuit_from_json(text))
    assert_same(c, circuit_from_json(json.loads(text)))
    assert_same(c, circuit_from_json(write_json(c, tmp_path / "c.json")))


def test_json_keeps_group_members() -> None:
    c = the_group_circuit()
    data = circuit_to_json(c)
    members = {u["name"]: u["members"] for u in data["units"]}
    assert len(members) == 12 and members["a0.h1@2-3"] == ["a0.h1@2", "a0.h1@3"]
    assert members["m1@0-1"] == ["m1@0", "m1@1"]
    assert all("members" not in u for u in circuit_to_json(the_node_circuit())["units"])
    assert circuit_from_json(data).units == c.units


def test_json_lists_every_edge_with_names_and_positions() -> None:
    c = positional_circuit()
    e = circuit_to_json(c)["edges"]
    assert len(e["name"]) == c.graph.n_edges == 46 * 3
    assert sum(e["in_graph"]) == c.n_edges
    assert e["name"][46] == "input->a0.h0<q>@1" and e["position"][46] == 1
    first = circuit_from_json(circuit_to_json(c, all_edges=False))
    assert torch.equal(first.in_graph, c.in_graph) and torch.equal(first.score, c.score * c.in_graph)


def test_json_non_finite_numbers_are_strings() -> None:
    data = circuit_to_json(edge_circuit())
    assert data["verification"]["rank_correlation"] == "NaN"
    assert data["curve"]["faithfulness"][1] == "NaN" and data["verification"]["bound"] is None


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="other"), "not an edgeatp circuit"),
    (lambda d: d.update(version=3), "version 3 is not supported"),
    (lambda d: d["edges"]["name"].__setitem__(0, "m1->a0.h0<q>"), "not an edge of the graph"),
    (lambda d: d.update(n_edges=99), "n_edges=99"),
    (lambda d: d.pop("shape"), "missing shape"),
    (lambda d: d["shape"].update(n_layers=200), "n_layers is 200 but the graph's nodes reach layer 1"),
    (lambda d: d["edges"]["score"].__setitem__(0, -1.0), "edges.score"),
    (lambda d: d["edges"]["score"].__setitem__(0, "big"), "edges.score"),
])
def test_json_errors_are_clear(edit: Callable[[dict], Any], message: str) -> None:
    data = circuit_to_json(edge_circuit())
    edit(data)
    with pytest.raises(EdgeatpError, match=message):
        circuit_from_json(data)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["edges"].__setitem__(0, "m1->a0.h0<q>"), "edge 'm1->a0.h0<q>' of the size-4 circuit is not an edge"),
    (lambda r: r["edges"].__setitem__(0, r["edges"][0] + "@3"), "is not an edge of the graph"),
    (lambda r: r["edges"].append(r["edges"][-1]), "the size-4 circuit lists 5 edges"),
])
def test_a_refinement_naming_edges_the_graph_lacks_is_refused(edit: Callable[[dict], Any], message: str) -> None:
    data = circuit_to_json(refined_circuit())
    edit(data["refinement"]["sizes"][0])
    with pytest.raises(EdgeatpError, match=re.escape(message)):
        circuit_from_json(data)


def test_json_reading_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(EdgeatpError, match="does not exist"):
        circuit_from_json(str(tmp_path / "nope.json"))
    with pytest.raises(EdgeatpError, match="not valid JSON"):
        circuit_from_json("{not json")
    with pytest.raises(EdgeatpError, match="not a circuit"):
        circuit_from_json({"hello": 1})
    with pytest.raises(EdgeatpError, match="unknown JSON mode"):
        circuit_to_json(edge_circuit(), "graphml")


# ------------------------------------------------------------------------------------ MIB
def mib_edge_names(n_layers: int, n_heads: int) -> set[str]:
    """EAP-IG's edge names for a sequential model, from its topology rules."""
    names, upstream = set(), ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        names |= {f"{u}->{h}<{x}>" for u in upstream for h in heads for x in "qkv"}
        upstream += heads
        names |= {f"{u}->m{layer}" for u in upstream}
        upstream.append(f"m{layer}")
    return names | {f"{u}->logits" for u in upstream}


def test_mib_mode_matches_the_eap_ig_format() -> None:
    c = edge_circuit()
    m = circuit_to_json(c, "mib")
    assert {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8}.items() <= m["cfg"].items()
    assert set(m["edges"]) == mib_edge_names(2, 2)
    assert set(m["nodes"]) == {"input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", "logits"}
    assert m["nodes"]["logits"] == {"in_graph": True}
    assert all(set(v) == {"score", "in_graph", "signed"} for v in m["edges"].values())
    kept = {k for k, v in m["edges"].items() if v["in_graph"]}
    assert kept == {e.name for e in c.edges()}
    assert {k for k, v in m["nodes"].items() if v["in_graph"]} == {n.name for n in c.nodes()} | {"logits"}
    back = circuit_from_json(json.dumps(m))
    assert torch.equal(back.in_graph, c.in_graph) and torch.equal(back.score, c.score)
    assert torch.equal(back.signed, c.signed) and back.direction is c.direction and back.method == c.method


def test_mib_reads_files_written_by_eap_ig() -> None:
    data = {"cfg": {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8},
            "nodes": {"input": {"in_graph": True}, "logits": {"in_graph": True}},
            "edges": {"input->a1.h0<k>": {"score": -0.25, "in_graph": True},
                      "a1.h0->logits": {"score": 0.5, "in_graph": True}}}
    c = circuit_from_json(data)
    assert c.graph.shape == ModelShape(2, 2, 8, 4, 32)
    g = c.graph
    assert float(c.signed[(0, *g.index_of("input->a1.h0<k>"))]) == -0.25
    assert float(c.score[(0, *g.index_of("input->a1.h0<k>"))]) == 0.25
    assert c.n_edges == 2 and c.method == "mib" and c.direction is Direction.NOISING
    data["edges"]["m1->a0.h0<q>"] = {"score": 1.0, "in_graph": False}
    with pytest.raises(EdgeatpError, match="does not exist"):
        circuit_from_json(data)


def test_mib_reduces_positions_by_sum_or_max() -> None:
    c = positional_circuit()
    name = c.edges()[0].name.split("@")[0]
    w, r = c.graph.index_of(name)
    total = circuit_to_json(c, "mib")["edges"][name]
    assert total["score"] == pytest.approx(float(c.score[:, w, r].sum()), rel=1e-12)
    assert total["signed"] == pytest.approx(float(c.signed[:, w, r].sum()), rel=1e-12) and total["in_graph"]
    best = circuit_to_json(c, "mib", position_reduce="max")["edges"][name]
    p = int(c.score[:, w, r].argmax())
    assert (best["score"], best["signed"]) == (float(c.score[p, w, r]), float(c.signed[p, w, r]))
    back = circuit_from_json(circuit_to_json(c, "mib"))
    assert back.graph.n_positions is None and torch.equal(back.in_graph, c.in_graph.any(0, keepdim=True))


def test_mib_merges_neurons_into_their_mlp() -> None:
    c = prune(edge_scores(EdgeGraph.from_shape(SHAPE, neurons=True), seed=3), top_k=200, cleanup=False)
    m = circuit_to_json(c, "mib")
    assert set(m["edges"]) == mib_edge_names(2, 2)
    g = c.graph
    neurons = [i for i, w in enumerate(g.writers) if w.kind is NodeKind.NEURON and w.layer == 0]
    r = g.reader_index[Node(NodeKind.LOGITS)]
    assert m["edges"]["m0->logits"]["score"] == pytest.approx(float(c.score[0, neurons, r].sum()), rel=1e-12)
    assert m["edges"]["m0->logits"]["in_graph"] == bool(c.in_graph[0, neurons, r].any())


def test_mib_node_scores_for_node_circuits() -> None:
    c = the_node_circuit()
    m = circuit_to_json(c, "mib")
    for name, score in c.node_scores.items():
        assert m["nodes"][name]["score"] == score
    assert sum(v.get("score", 0.0) != 0.0 for v in m["nodes"].values()) == len(c.node_scores)
    back = circuit_from_json(m)
    assert back.node_scores == c.node_scores and back.level == "node" and back.direction is Direction.DENOISING
    assert torch.equal(back.in_graph, c.in_graph)


# ------------------------------------------------------------------------------------ schema
@pytest.fixture(scope="module")
def schema() -> dict:
    """The shipped JSON Schema."""
    return json.loads(SCHEMA_PATH.read_text())


@pytest.mark.parametrize("make", [edge_circuit, positional_circuit, the_node_circuit, the_group_circuit,
                                  refined_circuit])
def test_written_json_follows_the_schema(schema: dict, make: Callable[[], Circuit]) -> None:
    data = json.loads(json.dumps(circuit_to_json(make()), allow_nan=False))
    assert violations(data, schema, schema) == []
    assert set(schema["required"]) == set(data) - {"sign_convention", "refinement", "circuit_metrics"}


def test_version_2_files_without_search_fields_are_read() -> None:
    data = json.loads(json.dumps(circuit_to_json(refined_circuit()), allow_nan=False))
    del data["refinement"], data["circuit_metrics"]
    back = circuit_from_json(data)
    assert back.refinement is None and back.circuit_metrics == ()
    assert_same(edge_circuit(), back)


@pytest.mark.parametrize("edit", [
    lambda d: d.pop("edges"),
    lambda d: d.update(version=1),
    lambda d: d["edges"]["in_graph"].__setitem__(0, "yes"),
    lambda d: d["edges"]["score"].__setitem__(0, -0.5),
    lambda d: d["edges"]["score"].__setitem__(0, "nan"),
    lambda d: d["verification"].pop("checks"),
    lambda d: d["shape"].update(n_layers=0),
    lambda d: d.update(extra=1),
    lambda d: d["refinement"].pop("sizes"),
    lambda d: d["refinement"]["sizes"][0].update(size=0),
    lambda d: d["refinement"].update(objective="best"),
    lambda d: d["circuit_metrics"][0].pop("cpr"),
    lambda d: d.update(circuit_metrics={}),
])
def test_the_schema_rejects_broken_files(schema: dict, edit: Callable[[dict], Any]) -> None:
    data = json.loads(json.dumps(circuit_to_json(refined_circuit()), allow_nan=False))
    edit(data)
    assert violations(data, schema, schema) != []


# ------------------------------------------------------------------------------------ chart and report
def polyline_points(svg: str, cls: str) -> list[list[tuple[float, float]]]:
    """The points of every polyline segment of one chart series."""
    return [[tuple(map(float, p.split(","))) for p in pts.split()]
            for pts in re.findall(rf'<polyline class="{cls}" points="([^"]+)"', svg)]


def test_chart_plots_the_curves() -> None:
    f = FaithfulnessCurve((2, 5, 10, 20), (0.2, 0.6, math.nan, 1.1), (0.9, 0.5, 0.3, -0.1), 1.0, 0.0)
    svg = faithfulness_svg(f)
    faith = polyline_points(svg, "faithfulness")
    assert [len(s) for s in faith] == [2, 1]
    assert faith[0][0][1] > faith[0][1][1] > faith[1][0][1]
    xs = [x for s in faith for x, _ in s]
    assert xs == sorted(xs) and len(polyline_points(svg, "necessity")[0]) == 4
    for text in ("faithfulness", "necessity", "circuit size (edges)", "normalised metric", ">20<", ">0.5<"):
        assert text in svg
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert "log scale" in faithfulness_svg(FaithfulnessCurve((1, 100), (0.1, 0.9), (0.9, 0.1), 1.0, 0.0))


def test_chart_adds_the_refined_curve() -> None:
    before = FaithfulnessCurve((2, 4, 8), (0.1, 0.5, 0.9), (0.8, 0.3, 0.05), 1.0, 0.0)
    after = FaithfulnessCurve((2, 3, 8), (0.3, 0.7, 1.3), (0.5, 0.2, 0.0), 1.0, 0.0)
    svg = faithfulness_svg(before, refined=after)
    refined = polyline_points(svg, "refined faithfulness")[0]
    plain = polyline_points(svg, "faithfulness")[0]
    assert len(refined) == 3 and refined[0][0] == plain[0][0] and refined[0][1] < plain[0][1]  # higher on the page
    assert refined[2][1] < min(y for _, y in plain) and ">3<" in svg and "refined faithfulness" in svg


def test_report_shows_the_search_and_mib_metrics(tmp_path: Path) -> None:
    c = refined_circuit()
    text = write_report(c, tmp_path, "md").read_text()
    for needle in ("## Circuit search", "top 20 edges of atp-qk", "321 forwards of a budget of 500", "| 4 | 3 | 0.5 | 4 |",
                   "**0.91**", "greedy", "## MIB circuit metrics", "| top-k of atp-qk | **0.7** | **0.3** | 60 |"):
        assert needle in text, needle
    chart = (tmp_path / "circuit_faithfulness.svg").read_text()
    assert len(polyline_points(chart, "refined faithfulness")[0]) == 1  # the NaN at 12 edges leaves a gap
    bare = write_report(c.with_(curve=None), tmp_path / "bare", "md").read_text()
    assert "No faithfulness curve" not in bare and (tmp_path / "bare" / "circuit_faithfulness.svg").is_file()


def test_chart_marks_the_chosen_size_and_the_target() -> None:
    f = FaithfulnessCurve((1, 2, 4, 6), (0.1, 0.5, 0.8, 0.95), (0.9, 0.4, 0.1, 0.0), 1.0, 0.0)
    svg = faithfulness_svg(f, unit="components", chosen=4, target=0.8)
    point = polyline_points(svg, "faithfulness")[0][2]  # size 4, faithfulness 0.8
    chosen = re.search(r'<line class="chosen" x1="([\d.]+)" x2="([\d.]+)"', svg)
    target = re.search(r'<line class="target" x1="[\d.]+" x2="[\d.]+" y1="([\d.]+)" y2="([\d.]+)"', svg)
    assert float(chosen[1]) == float(chosen[2]) == point[0] and float(target[1]) == float(target[2]) == point[1]
    for text in ("chosen: 4 components", "target 0.8", "circuit size (components)", "necessity at 6 components"):
        assert text in svg, text
    plain = faithfulness_svg(f)
    assert 'class="chosen"' not in plain and 'class="target"' not in plain and "circuit size (edges)" in plain
    wide = faithfulness_svg(FaithfulnessCurve((10, 20), (0.5, 0.9), (0.2, 0.1), 1.0, 0.0), chosen=5, target=1.5)
    first = polyline_points(wide, "faithfulness")[0][0]  # axes stretch to show both marks inside the plot
    assert 64 < float(re.search(r'<line class="chosen" x1="([\d.]+)"', wide)[1]) < first[0]
    assert 62 < float(re.search(r'<line class="target" x1="[\d.]+" x2="[\d.]+" y1="([\d.]+)"', wide)[1]) < first[1]
    assert "chosen: 5 edges" in wide


@pytest.fixture(scope="module")
def ioi(zoo_ioi: ModelAdapter) -> tuple[Circuit, EdgeScores]:
    """A real verified circuit with a faithfulness curve, from the IOI zoo model."""
    import edgeatp as ea
    from edgeatp.verification import faithfulness_curve, verify

    pairs = ea.make_task("ioi", zoo_ioi.tokenizer, 8)
    sc = ea.attribute_edges(Setup(zoo_ioi, pairs), "atp-qk")
    c = prune(sc, top_k=12, cleanup=False)
    c = c.with_(verification=verify(Setup(zoo_ioi, pairs), c, sc, top=6, sample_below=3),
                curve=faithfulness_curve(Setup(zoo_ioi, pairs), sc, [4, 8, 16]))
    return c, sc


def test_group_curves_count_groups(zoo_ioi: ModelAdapter) -> None:
    import edgeatp as ea

    setup = Setup(zoo_ioi, ea.make_task("ioi", zoo_ioi.tokenizer, 4))
    end = setup.pairs.n_positions - 1
    groups = span_groups(node_set(zoo_ioi.shape, ["head", "mlp"]), [(0, 3), (4, end)])
    per = torch.zeros((2, len(groups)), dtype=torch.float64)
    per[:, [g.name for g in groups].index("a0.h1@0-3")] = 2.0
    per[:, [g.name for g in groups].index(f"a0.h1@4-{end}")] = 1.0
    gs = GroupScores(PairStats.of(per), "atp", Direction.NOISING, "logit_diff", groups=tuple(groups))
    circuits = [group_circuit(gs, EdgeGraph.from_shape(zoo_ioi.shape), top_k=k) for k in (1, 2, 3)]
    assert [len(c.nodes()) - 2 for c in circuits] == [1, 1, 2]  # two spans of one head, then another component
    assert component_curve(setup, circuits).sizes == (1, 2, 3)


def test_markdown_report_has_the_tables(ioi: tuple[Circuit, EdgeScores], tmp_path: Path) -> None:
    c, sc = ioi
    path = write_report(c, tmp_path, "md", task="ioi (8 pairs)", scores=sc, top=5)
    text = path.read_text()
    assert path.name == "circuit.md"
    for needle in ("`zoo:ioi`", "`ioi (8 pairs)`", "`atp-qk`", "noising", "`logit_diff`", c.sign_convention,
                   "## Top edges (5 of 12 kept)",
                   "| # | edge | reader | score | signed estimate | stderr | exact effect |",
                   "## Verification", "rank correlation", f"{c.verification.rank_correlation:.4g}",
                   "checked edges outside the circuit", "not run", "## Faithfulness", "(circuit_faithfulness.svg)"):
        assert needle in text, needle
    top = c.edges()[0]
    idx = (0, *c.graph.index_of(top))
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert f"`{top.name}`" in row and f"{float(sc.stderr[idx]):.4g}" in row
    assert sum(line.startswith("| ") for line in text.split("## Verification")[1].split("## Faithfulness")[0]
               .splitlines()) == 1 + len(c.verification.checks)
    chart = (tmp_path / "circuit_faithfulness.svg").read_text()
    assert chart.startswith("<svg") and len(polyline_points(chart, "faithfulness")[0]) == 3
    assert "chosen: 12 edges" in chart and 'class="target"' not in chart  # no target recorded: none drawn
    if dot_available():
        assert "(circuit.svg)" in text and (tmp_path / "circuit.svg").is_file()


def test_html_report_embeds_the_pictures(ioi: tuple[Circuit, EdgeScores], tmp_path: Path) -> None:
    c, _ = ioi
    text = write_report(c, tmp_path, "html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert f"<td><code>{html.escape(c.edges()[0].name)}</code></td>" in text
    assert text.count("<svg") == (2 if dot_available() else 1)
    assert '<polyline class="faithfulness"' in text and "<th>rank correlation" in text
    assert "<?xml" not in text


def test_export_all_writes_each_format(tmp_path: Path) -> None:
    formats = ("json", "mib", "dot", "md") + (("svg",) if dot_available() else ())
    paths = write_outputs(edge_circuit(), tmp_path, formats).paths
    assert set(formats) <= set(paths)
    assert paths["mib"].name == "circuit.mib.json" and all(p.is_file() for p in paths.values())
    assert_same(edge_circuit(), circuit_from_json(paths["json"]))
    with pytest.raises(EdgeatpError, match="unknown export format"):
        write_outputs(edge_circuit(), tmp_path, ("gif",))


def test_node_circuit_report_lists_components(tmp_path: Path) -> None:
    c = verified_node_circuit()
    text = write_report(c, tmp_path, "md").read_text()
    u = c.units_of("component")
    assert ("## Components (3 of 6 kept)\n\n| # | component | kept | score | signed estimate | exact effect |\n"
            f"|---|---|---|---|---|---|\n| 1 | `{u[0].name}` | yes | {u[0].score:.4g} | {u[0].signed:.4g} | "
            f"{u[0].exact:.4g} |") in text
    assert f"| 3 | `{u[2].name}` | yes | {u[2].score:.4g} | {u[2].signed:.4g} | — |" in text
    assert f"| 4 | `{u[3].name}` | no | {u[3].score:.4g} | {u[3].signed:.4g} | 0.5 |" in text
    assert text.index("## Components") < text.index("## Edges among the kept components")
    assert "Top edges" not in text and "| edge |" not in text and "0 | 0 |" not in text
    assert c.verification.outside_checked == 1
    assert "**largest |exact| among the 1 checked components outside the circuit**: 0.5" in text
    assert "| component | in circuit | score | signed estimate | exact effect |" in text
    assert "its exact effect patches its output" in text and "No faithfulness curve" in text


def test_group_circuit_report_lists_groups(tmp_path: Path) -> None:
    c = the_group_circuit()
    text = write_report(c, tmp_path, "md").read_text()
    g = c.units_of("group")
    assert ("## Groups (3 of 12 kept)\n\n| # | group | kept | components | score | signed estimate | exact effect |\n"
            f"|---|---|---|---|---|---|---|\n| 1 | `{g[0].name}` | yes | {g[0].name.split('@')[0]} | {g[0].score:.4g} "
            f"| {g[0].signed:.4g} | {g[0].exact:.4g} |") in text
    comp = g[3].name.split("@")[0]
    assert f"| 4 | `{g[3].name}` | no | {comp} | {g[3].score:.4g} | {g[3].signed:.4g} | — |" in text
    assert "## Edges among the kept groups' components" in text and "group circuit: 3 of 12 groups kept" in text
    assert "Top edges" not in text and "| edge |" not in text and "checked edges" not in text
    assert "checked groups outside the circuit" in text and "| group | in circuit |" in text
    assert "mean over dropped layers of |estimate|" in text  # atp*: GradDrop scores explained


def test_layer_to_layer_edges_table(tmp_path: Path) -> None:
    coarse = (Unit("a0->m0", "coarse_edge", 4.6, -4.49, -7.49), Unit("m1->logits", "coarse_edge", 4.0, -4.03, None))
    text = write_report(edge_circuit().with_(units=coarse), tmp_path, "md").read_text()
    assert ("## Layer-to-layer edges (2)" in text and "| # | layer-to-layer edge | score | signed estimate | exact "
            "effect |\n|---|---|---|---|---|\n| 1 | `a0->m0` | 4.6 | -4.49 | -7.49 |\n| 2 | `m1->logits` | 4 | -4.03 | — |"
            in text)
    assert "sum of the member edges' signed estimates" in text
    assert text.index("## Top edges") < text.index("## Layer-to-layer edges") < text.index("## Verification")
    short = write_report(edge_circuit().with_(units=coarse), tmp_path, "md", top=1).read_text()
    assert "## Layer-to-layer edges (top 1 of 2)" in short and "| 2 | `m1->logits` |" not in short


def test_report_header_states_faithfulness_warnings_and_columns(tmp_path: Path) -> None:
    c = the_group_circuit()
    note = "faithfulness 0.3 is below the target 0.8: the circuit does not carry the behaviour"
    curve = FaithfulnessCurve((1, 3, 6), (0.1, 0.3, 0.9), (0.7, 0.2, 0.0), 2.0, -1.0)
    c = c.with_(selection=c.selection.with_note(note), faithfulness=0.3, necessity=0.2, curve=curve,
                meta={"model": "toy", "config": {"target": 0.8}})
    md = write_report(c, tmp_path, "md").read_text()
    head = md.split("## Graph")[0]
    assert "**Faithfulness 0.3, necessity 0.2** (1 = the clean behaviour, 0 = the corrupt one; target 0.8)" in head
    assert f"> **Warning:** {note}" in head and head.index("Warning") < head.index("- **model**")
    assert "- **score**: the ranking magnitude (for GradDrop, as in atp*: the mean over prompt pairs of the mean" in head
    assert "- **signed estimate**: the plain (un-dropped) estimate" in head
    assert md.count("Score: the ranking magnitude (for GradDrop") == 2  # under the groups and verification tables
    chart = (tmp_path / "circuit_faithfulness.svg").read_text()
    assert all(needle in chart for needle in ("chosen: 3 groups", "target 0.8", "circuit size (groups)"))
    assert "the chosen circuit (3 groups) and the target 0.8 are marked" in md
    assert "| groups | faithfulness | necessity |" in md
    html_text = write_report(c, tmp_path, "html").read_text()
    assert f'<p class="notice"><strong>Warning:</strong> {html.escape(note)}</p>' in html_text
    assert "<strong>Faithfulness 0.3, necessity 0.2</strong>" in html_text and "chosen: 3 groups" in html_text
    plain = write_report(edge_circuit(), tmp_path, "md").read_text()  # atp-qk, no warnings
    assert "Warning" not in plain and "dropped" not in plain and "mean over prompt pairs of |estimate|" in plain


def test_report_says_what_the_drawing_leaves_out(tmp_path: Path) -> None:
    text = write_report(neuron_circuit(), tmp_path, "md").read_text()
    assert ("The drawing is reduced: only the 8 best-scoring neurons of each MLP are drawn one by one; the other 3 "
            "of m0") in text
    assert "reduced" not in write_report(edge_circuit(), tmp_path, "md").read_text()
