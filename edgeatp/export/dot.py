"""Plain-text Graphviz DOT for a circuit, and rendering it with the ``dot`` program.

The drawing reads top to bottom: the embedding, then per layer a row of heads and a row of MLPs
(one row per layer for parallel attention/MLP blocks), the logits at the bottom; a column of row
labels on the left keeps the order. Colour is a sign (blue positive, red negative, grey zero or
unknown; the legend spells out what that means for the circuit's direction) and always the sign
of the best-known effect: the **exact** effect where verification patched the item (dark
colour; ``exact`` in node labels), else the **estimate** (light colour; ``est.`` in node labels).

* Edge circuits: edge colour is that sign, pen width grows linearly with the score relative to
  the largest drawn score; nodes are filled by kind.
* Node-, neuron- and group-level circuits: node fill is the sign of the component's effect (of
  the kept groups it belongs to, for group circuits, whose names and effects are in its label;
  grey for unscored nodes and for groups of mixed sign); their edges were not scored one by one
  and are drawn alike, a head's q/k/v inputs from one writer as one edge labelled ``qkv``.

The head input an edge enters is shown by style, arrowhead and a letter: q solid/normal, k
dashed/empty, v dotted/odot. Large circuits are reduced (see :func:`~edgeatp.export._view.drawing`:
at most ``max_edges`` edges and ``max_neurons`` neurons per MLP drawn one by one) and the legend
says what was left out. Every node and edge has an ``id`` and a tooltip with its numbers
(visible in SVG output).
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

from ..circuit import Circuit
from ..errors import EdgeatpError
from ..graph import NodeKind
from ._view import (MAX_EDGES, MAX_NEURONS, DrawEdge, DrawNode, best_effect, column_notes, drawing, layer_rank,
                    sign_legend, sign_of, size_summary)
from .files import atomic_write

POSITIVE, NEGATIVE, NEUTRAL = "#2166ac", "#b2182b", "#8c8c8c"  # edges: exact effects (and zero)
LIGHT_POSITIVE, LIGHT_NEGATIVE = "#92c5de", "#f4a582"  # edges: estimates only
FILL_POSITIVE, FILL_NEGATIVE = "#6fa8dc", "#ef8a6f"  # nodes: exact effects
FILL_LIGHT_POSITIVE, FILL_LIGHT_NEGATIVE, FILL_NEUTRAL = "#d4e6f4", "#fbd9cc", "#e8e8e8"  # nodes: estimates, unknown
UNIFORM_PENWIDTH = 1.0  # edges of node- and group-level circuits (not scored one by one)
READER_STYLE = {"q": ("solid", "normal"), "k": ("dashed", "empty"), "v": ("dotted", "odot"),
                "mlp": ("solid", "normal"), "logits": ("solid", "normal"), "shared": ("dotted", "none")}
NODE_FILL = {NodeKind.INPUT: "#e0e0e0", NodeKind.HEAD: "#d6e6f5", NodeKind.MLP: "#fde3c8",
             NodeKind.NEURON: "#fde3c8", NodeKind.LOGITS: "#e0e0e0", NodeKind.K: "#eef3fa", NodeKind.V: "#eef3fa"}
FORMATS = ("svg", "png", "pdf")
INSTALL_HINT = "install Graphviz: apt-get install graphviz (Debian/Ubuntu) or brew install graphviz (macOS)"
MAX_GROUP_LINES = 3  # kept groups named in one node's label


def quote(text: str) -> str:
    """``text`` as a DOT double-quoted string (backslashes, quotes and line breaks escaped)."""
    body = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
    return f'"{body}"'


def left_lines(lines: list[str]) -> str:
    """A left-justified multi-line DOT label (each line escaped, ended by ``\\l``)."""
    body = "".join(quote(line)[1:-1] + "\\l" for line in lines)
    return f'"{body}"'


def attrs(**values: str | float) -> str:
    """A DOT attribute list; string values are quoted, numbers written as they are."""
    parts = [f"{k}={v if isinstance(v, (int, float)) else quote(v)}" for k, v in values.items()]
    return "[" + ", ".join(parts) + "]"


def edge_colour(signed: float | None, exact: float | None = None) -> str:
    """The sign of the best-known effect: dark blue/red when exact, light blue/red when only
    estimated, grey for zero."""
    value, is_exact = best_effect(signed, exact)
    sign = sign_of(value)
    if not sign:
        return NEUTRAL
    if is_exact:
        return POSITIVE if sign > 0 else NEGATIVE
    return LIGHT_POSITIVE if sign > 0 else LIGHT_NEGATIVE


def node_fill(node: DrawNode, signed_nodes: bool) -> str:
    """Fill of a node: the sign of its effect (dark when exact, light when estimated, grey when
    unknown or mixed) in node-level drawings, its kind otherwise."""
    if not signed_nodes:
        return NODE_FILL[node.node.kind]
    sign, exact = node.effect_sign()
    if not sign:
        return FILL_NEUTRAL
    if exact:
        return FILL_POSITIVE if sign > 0 else FILL_NEGATIVE
    return FILL_LIGHT_POSITIVE if sign > 0 else FILL_LIGHT_NEGATIVE


def pen_width(score: float, top: float, lo: float, hi: float) -> float:
    """Pen width growing linearly from ``lo`` (score 0) to ``hi`` (the largest drawn score)."""
    return round(lo + (hi - lo) * (score / top if top > 0 else 0.0), 3)


def _fmt(x: float | None) -> str:
    """A number for labels and tooltips (4 significant digits, ``n/a`` for missing)."""
    return "n/a" if x is None else f"{x:.4g}"


def _effect_text(signed: float, exact: float | None) -> str:
    """``exact -6.03`` when patched, else ``est. -2.77``."""
    value, is_exact = best_effect(signed, exact)
    return f"{'exact' if is_exact else 'est.'} {_fmt(value)}"


def _wrap(text: str) -> list[str]:
    """Legend text in lines of at most 90 characters (words, including hyphenated ones, kept whole)."""
    return textwrap.wrap(text, 90, break_on_hyphens=False)


def _headline(circuit: Circuit) -> str:
    """What the circuit is: model, level and size."""
    return f"{circuit.meta.get('model', 'model')}: {circuit.level} circuit, {size_summary(circuit)}"


def _title_lines(circuit: Circuit, title: str | None, edges: list[DrawEdge], notes: tuple[str, ...]) -> list[str]:
    """Title and legend: the run, the sign convention, what colour, width and style mean, and
    ``notes`` (what the drawing leaves out)."""
    lines = [title or _headline(circuit),
             f"method {circuit.method or 'n/a'} | direction {circuit.direction.value} | metric {circuit.metric}"]
    lines += _wrap("sign convention: " + circuit.sign_convention)
    qkv = "head inputs: q solid, k dashed, v dotted"
    shared = any(e.reader_type == "shared" for e in edges)
    if circuit.level == "edge":
        edges = [e for e in edges if e.reader_type != "shared"]
        exact = sum(e.exact is not None for e in edges)
        lines += _wrap("edge colour: " + sign_legend(circuit.direction, circuit.metric, "edge"))
        lines += _wrap(f"dark blue/red: sign of the exact effect ({exact} drawn edges patched in verification); "
                       f"light blue/red: sign of the estimate only ({len(edges) - exact} not patched)")
        lines += _wrap("pen width: score relative to the largest drawn score; score = "
                       + column_notes(circuit.method).score + f" | {qkv}")
    else:
        what = "group" if circuit.level == "group" else "component"
        lines += _wrap(f"node colour: sign of the {what}'s effect: " + sign_legend(circuit.direction, circuit.metric,
                                                                                   what))
        grey = "unscored nodes (input, logits" + (", MLP inputs of neurons)" if circuit.level == "neuron" else ")")
        if circuit.level == "group":
            grey += " and components whose kept groups differ in sign"
        lines += _wrap(f"dark fill, 'exact' in the label: exact effect (patched in verification); light fill, "
                       f"'est.': estimate only; grey: {grey}")
        if circuit.level == "group":
            lines.append("each component lists the kept groups it belongs to, with their effects")
        among = "the kept groups' components" if circuit.level == "group" else "the kept components"
        lines += _wrap(f"edges: every edge among {among}, not scored one by one, drawn alike; one edge into a head "
                       f"stands for the inputs it is labelled with (q, k, v) | {qkv}")
    if shared:
        lines += _wrap("a<L>.kv<G><k|v>: the key or value input of a key/value head shared by several query heads "
                       "(grouped-query attention); dotted grey lines lead to the query heads that read it")
    for text in notes:
        lines += _wrap(text)
    return lines


def _node_label(node: DrawNode, level: str, show_numbers: bool) -> str:
    """Component name (and position), then its numbers: node score (edge circuits), effect of the
    component (node circuits) or of its kept groups (group circuits), and merged neurons."""
    n = node.node
    label = n.component.name + ("" if n.position is None else f"\n@{n.position}")
    if node.merged:
        label += f"\n+{len(node.merged)} neurons"
    if not show_numbers:
        return label
    if level == "edge" and node.score is not None:
        label += f"\n{_fmt(node.score)}"
    elif node.unit is not None:
        label += "\n" + _effect_text(node.unit.signed, node.unit.exact)
    for g in node.groups[:MAX_GROUP_LINES]:
        label += f"\ngroup {g.name}: {_effect_text(g.signed, g.exact)}"
    if len(node.groups) > MAX_GROUP_LINES:
        label += f"\n+{len(node.groups) - MAX_GROUP_LINES} more groups"
    return label


def _node_tooltip(node: DrawNode) -> str:
    """Every number of a node, for SVG hover text."""
    parts = []
    if node.unit is not None:
        u = node.unit
        parts.append(f"score {_fmt(u.score)}, signed estimate {_fmt(u.signed)}, exact {_fmt(u.exact)}")
    parts += [f"group {g.name}: score {_fmt(g.score)}, signed estimate {_fmt(g.signed)}, exact {_fmt(g.exact)}"
              for g in node.groups]
    if not parts:
        parts.append("not scored" if node.score is None else f"node score {_fmt(node.score)}")
    if node.merged:
        names = ", ".join(m.name for m in node.merged[:10]) + (", ..." if len(node.merged) > 10 else "")
        parts.append(f"merged neurons: {names}")
    return f"{node.node.name}: " + "; ".join(parts)


def _node_line(node: DrawNode, level: str, show_numbers: bool) -> str:
    """One DOT node statement with label, fill (by kind, or by the sign of its effect) and a tooltip."""
    return f"  {quote(node.node.name)} " + attrs(
        label=_node_label(node, level, show_numbers), id=node.node.name, tooltip=_node_tooltip(node),
        shape="box", style="rounded,filled", fillcolor=node_fill(node, level != "edge"),
        fontsize=10 if node.node.kind is NodeKind.NEURON else 12) + ";"


def _edge_line(edge: DrawEdge, scored: bool, top: float, lo: float, hi: float) -> str:
    """One DOT edge statement: colour by the sign of the best-known effect and width by score
    (scored edges; others grey and uniform), style/arrowhead/letter by reader type."""
    style, arrow = READER_STYLE.get(edge.reader_type, ("solid", "normal"))  # several head inputs: solid
    if edge.reader_type == "shared":
        return f"  {quote(edge.writer.name)} -> {quote(edge.reader.name)} " + attrs(
            color=NEUTRAL, penwidth=UNIFORM_PENWIDTH, style=style, arrowhead=arrow, id=edge.id,
            tooltip=f"{edge.writer.name} is a shared key/value input that {edge.reader.name} reads") + ";"
    qkv = edge.reader_type not in ("mlp", "logits")  # q, k, v or several of them
    colour = edge_colour(edge.signed, edge.exact) if scored else NEUTRAL
    extra: dict[str, str | float] = {"label": edge.reader_type, "fontsize": 9, "fontcolor": colour} if qkv else {}
    if scored:
        tip = f"{edge.id}: score {_fmt(edge.score)}, signed estimate {_fmt(edge.signed)}, exact {_fmt(edge.exact)}"
        tip += "" if edge.exact is not None else " (estimate only)"
    else:
        tip = f"{edge.id}: an edge among the kept components (not scored)"
    if edge.members:
        tip += f"; drawn for {len(edge.members)} edges: {', '.join(edge.members[:10])}" + (
            ", ..." if len(edge.members) > 10 else "") + (" (scores and estimates summed)" if scored else "")
    width = pen_width(edge.score, top, lo, hi) if scored else UNIFORM_PENWIDTH
    return f"  {quote(edge.writer.name)} -> {quote(edge.reader.name)} " + attrs(
        color=colour, penwidth=width, style=style, arrowhead=arrow, id=edge.id, tooltip=tip, **extra) + ";"


def to_dot(circuit: Circuit, *, title: str | None = None, show_scores: bool | None = None,
           min_penwidth: float = 0.8, max_penwidth: float = 6.0, max_edges: int | None = MAX_EDGES,
           max_neurons: int | None = MAX_NEURONS) -> str:
    """The circuit's kept edges as DOT text (no Graphviz needed to write it). ``show_scores`` puts
    numbers in node labels — node scores in edge circuits, effects of components or groups in
    node-level ones (default: only for node-level ones). Large circuits are reduced to
    ``max_edges`` edges (an edge circuit's highest-scoring; in node-level ones those whose weaker
    end scores highest) and ``max_neurons`` neurons per MLP drawn one by one (the rest merged into
    the MLP's node), and the legend says so; ``None`` draws everything."""
    view = drawing(circuit, max_edges=max_edges, max_neurons=max_neurons)
    edges = list(view.edges)
    shape = circuit.graph.shape
    show = circuit.level != "edge" if show_scores is None else show_scores
    scored = circuit.level == "edge"
    top = max((e.score for e in edges), default=0.0)
    ranks: dict[int, tuple[str, list[DrawNode]]] = {}
    for node in view.nodes:  # in forward order
        rank, label = layer_rank(node.node, shape)
        ranks.setdefault(rank, (label, []))[1].append(node)
    out = ["digraph circuit {",
           "  graph " + attrs(rankdir="TB", charset="UTF-8", newrank="true", nodesep=0.25, ranksep=0.45,
                              fontname="Helvetica", fontsize=11, labelloc="t", labeljust="l") + ";",
           f"  graph [label={left_lines(_title_lines(circuit, title, edges, view.left_out))}];",
           "  node " + attrs(fontname="Helvetica") + ";",
           "  edge " + attrs(fontname="Helvetica", arrowsize=0.7) + ";"]
    order = sorted(ranks)
    for rank in order:
        out.append(f"  {quote(f'row:{rank}')} " + attrs(label=ranks[rank][0], shape="plaintext", fontcolor="#666666",
                                                        fontsize=10) + ";")
    for a, b in zip(order, order[1:]):
        out.append(f"  {quote(f'row:{a}')} -> {quote(f'row:{b}')} [style=invis];")
    for rank in order:
        out += [_node_line(n, circuit.level, show) for n in ranks[rank][1]]
    for rank in order:
        members = " ".join(quote(n.node.name) + ";" for n in ranks[rank][1])
        out.append(f"  {{ rank=same; {quote(f'row:{rank}')}; {members} }}")
    out += [_edge_line(e, scored, top, min_penwidth, max_penwidth) for e in edges]
    out.append("}")
    return "\n".join(out) + "\n"


def dot_available() -> bool:
    """Whether the Graphviz ``dot`` program is on the PATH."""
    return shutil.which("dot") is not None


def render_bytes(dot_text: str, fmt: str) -> bytes:
    """DOT text rendered as svg, png or pdf by Graphviz ``dot``."""
    kind = fmt.lower()
    if kind not in FORMATS:
        raise EdgeatpError(f"cannot render to {kind or 'an empty format'!r}; choose one of {', '.join(FORMATS)}")
    exe = shutil.which("dot")
    if exe is None:
        raise EdgeatpError(f"the Graphviz 'dot' program is not on the PATH, so {kind} cannot be rendered; "
                           f"{INSTALL_HINT} (the .dot text can be written without it)")
    done = subprocess.run([exe, f"-T{kind}"], input=dot_text.encode(), capture_output=True)
    if done.returncode != 0:
        msg = done.stderr.decode(errors="replace").strip().splitlines()
        raise EdgeatpError(f"Graphviz dot failed to render {kind}: {msg[0] if msg else 'no message'}")
    return done.stdout


def render(dot_text: str, path: str | Path, fmt: str | None = None) -> Path:
    """Render DOT text to ``path`` as svg, png or pdf (default: the file suffix), atomically."""
    out = Path(path)
    return atomic_write(out, render_bytes(dot_text, fmt or out.suffix.lstrip(".")))
