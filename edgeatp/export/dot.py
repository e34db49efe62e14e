"""Plain-text Graphviz DOT for a circuit, and rendering it with the ``dot`` program.

The drawing reads top to bottom: the embedding, then per layer a row of heads and a row of MLPs
(one row per layer for parallel attention/MLP blocks), the logits at the bottom; a column of row
labels on the left keeps the order. Edge colour is the sign of the signed estimate (blue
positive, red negative, grey zero; the legend spells out what that means for the circuit's
direction), pen width grows linearly with the score relative to the largest drawn score, and
the head input an edge enters is shown by style, arrowhead and a letter: q solid/normal,
k dashed/empty, v dotted/odot. Every node and edge has an ``id`` and a tooltip with its numbers
(visible in SVG output).
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

from ..circuit import Circuit
from ..errors import EdgeatpError
from ..graph import Node, NodeKind
from ._view import EdgeRow, edge_rows, kept_nodes, layer_rank, node_score_map, node_sort_key, sign_legend
from .files import atomic_write

POSITIVE, NEGATIVE, NEUTRAL = "#2166ac", "#b2182b", "#8c8c8c"
READER_STYLE = {"q": ("solid", "normal"), "k": ("dashed", "empty"), "v": ("dotted", "odot"),
                "mlp": ("solid", "normal"), "logits": ("solid", "normal")}
NODE_FILL = {NodeKind.INPUT: "#e0e0e0", NodeKind.HEAD: "#d6e6f5", NodeKind.MLP: "#fde3c8",
             NodeKind.NEURON: "#fde3c8", NodeKind.LOGITS: "#e0e0e0"}
FORMATS = ("svg", "png", "pdf")
INSTALL_HINT = "install Graphviz: apt-get install graphviz (Debian/Ubuntu) or brew install graphviz (macOS)"


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


def edge_colour(signed: float) -> str:
    """Blue for a positive signed estimate, red for a negative one, grey for zero."""
    return POSITIVE if signed > 0 else NEGATIVE if signed < 0 else NEUTRAL


def pen_width(score: float, top: float, lo: float, hi: float) -> float:
    """Pen width growing linearly from ``lo`` (score 0) to ``hi`` (the largest drawn score)."""
    return round(lo + (hi - lo) * (score / top if top > 0 else 0.0), 3)


def _fmt(x: float | None) -> str:
    """A number for labels and tooltips (4 significant digits, ``n/a`` for missing)."""
    return "n/a" if x is None else f"{x:.4g}"


def _title_lines(circuit: Circuit, title: str | None) -> list[str]:
    """Title and legend text: model, method, direction, metric, size, sign convention, encodings."""
    model = str(circuit.meta.get("model", "model"))
    head = title or f"{model}: {circuit.level} circuit, {circuit.n_edges} edges"
    lines = [head, f"method {circuit.method or 'n/a'} | direction {circuit.direction.value} | metric {circuit.metric}"]
    lines += textwrap.wrap("sign convention: " + circuit.sign_convention, 90)
    lines += textwrap.wrap("colour: " + sign_legend(circuit.direction, circuit.metric), 90)
    lines.append("pen width: score relative to the largest drawn score | head inputs: q solid, k dashed, v dotted")
    return lines


def _node_line(node: Node, score: float | None, in_graph: bool, show_scores: bool) -> str:
    """One DOT node statement with label, fill by kind and a tooltip."""
    label = node.component.name + ("" if node.position is None else f"\n@{node.position}")
    if show_scores and score is not None:
        label += f"\n{_fmt(score)}"
    small = node.kind is NodeKind.NEURON
    return f"  {quote(node.name)} " + attrs(
        label=label, id=node.name, tooltip=f"{node.name}: node score {_fmt(score)}",
        shape="box", style="rounded,filled" if in_graph else "rounded,filled,dashed",
        fillcolor=NODE_FILL[node.kind], fontsize=10 if small else 12) + ";"


def _edge_line(row: EdgeRow, top: float, lo: float, hi: float) -> str:
    """One DOT edge statement: colour by sign, width by score, style/arrowhead/letter by reader type."""
    style, arrow = READER_STYLE[row.reader_type]
    qkv = row.reader_type in ("q", "k", "v")
    extra: dict[str, str | float] = {"label": row.reader_type, "fontsize": 9} if qkv else {}
    tip = f"{row.edge.name}: score {_fmt(row.score)}, signed {_fmt(row.signed)}, exact {_fmt(row.exact)}"
    return f"  {quote(row.writer.name)} -> {quote(row.reader.name)} " + attrs(
        color=edge_colour(row.signed), fontcolor=edge_colour(row.signed), penwidth=pen_width(row.score, top, lo, hi),
        style=style, arrowhead=arrow, id=row.edge.name, tooltip=tip, **extra) + ";"


def to_dot(circuit: Circuit, *, title: str | None = None, show_scores: bool | None = None,
           min_penwidth: float = 0.8, max_penwidth: float = 6.0) -> str:
    """The circuit's kept edges as DOT text (no Graphviz needed to write it). ``show_scores`` puts
    node scores in the labels (default: only for node- and neuron-level circuits)."""
    rows = edge_rows(circuit)
    scores = node_score_map(circuit, rows)
    kept = kept_nodes(rows)
    shape = circuit.graph.shape
    show = circuit.level != "edge" if show_scores is None else show_scores
    top = max((r.score for r in rows), default=0.0)
    ranks: dict[int, tuple[str, list[Node]]] = {}
    for node in sorted(scores, key=lambda n: node_sort_key(n, shape)):
        rank, label = layer_rank(node, shape)
        ranks.setdefault(rank, (label, []))[1].append(node)
    out = ["digraph circuit {",
           "  graph " + attrs(rankdir="TB", charset="UTF-8", newrank="true", nodesep=0.25, ranksep=0.45,
                              fontname="Helvetica", fontsize=11, labelloc="t", labeljust="l") + ";",
           f"  graph [label={left_lines(_title_lines(circuit, title))}];",
           "  node " + attrs(fontname="Helvetica") + ";",
           "  edge " + attrs(fontname="Helvetica", arrowsize=0.7) + ";"]
    order = sorted(ranks)
    for rank in order:
        out.append(f"  {quote(f'row:{rank}')} " + attrs(label=ranks[rank][0], shape="plaintext", fontcolor="#666666",
                                                        fontsize=10) + ";")
    for a, b in zip(order, order[1:]):
        out.append(f"  {quote(f'row:{a}')} -> {quote(f'row:{b}')} [style=invis];")
    for rank in order:
        out += [_node_line(n, scores[n], n in kept, show) for n in ranks[rank][1]]
    for rank in order:
        members = " ".join(quote(n.name) + ";" for n in ranks[rank][1])
        out.append(f"  {{ rank=same; {quote(f'row:{rank}')}; {members} }}")
    out += [_edge_line(r, top, min_penwidth, max_penwidth) for r in rows]
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
