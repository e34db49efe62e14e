"""A Markdown or HTML report of a circuit: what was run, the graph, the top edges, the
verification and the faithfulness curve.

The report is built as a list of blocks (headings, paragraphs, key/value lists, tables, figures)
by pure functions and rendered to either format; :func:`write_report` writes it next to the
circuit's ``.dot`` file, its rendered ``.svg`` (when Graphviz is installed) and the faithfulness
chart ``<name>_faithfulness.svg``. HTML embeds both pictures inline, so the ``.html`` file is
self-contained; Markdown links the ``.svg`` files next to it (GitHub renders linked SVGs, not
inline ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Literal, Sequence, Union

from ..circuit import Circuit
from ..verification import same_sign
from ..errors import EdgeatpError
from ..scores import EdgeScores
from ._view import EdgeRow, edge_rows
from .chart import faithfulness_svg
from .dot import INSTALL_HINT, dot_available, render_bytes, to_dot
from .files import atomic_write

ReportFormat = Literal["md", "html"]


@dataclass(frozen=True)
class Code:
    """Text shown verbatim (names like ``a0.h1->a1.h2<q>``): backticks in Markdown, ``<code>`` in HTML."""

    text: str


Cell = Union[str, Code, float, int, bool, None]


@dataclass(frozen=True)
class Heading:
    """A section heading (level 1 or 2)."""

    level: int
    text: str


@dataclass(frozen=True)
class Para:
    """A paragraph of text and code pieces."""

    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class KeyValues:
    """A list of labelled values."""

    items: tuple[tuple[str, Cell], ...]


@dataclass(frozen=True)
class Table:
    """A table with a header row."""

    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]


@dataclass(frozen=True)
class Figure:
    """A picture: inline SVG text for HTML, a link to ``file`` for Markdown."""

    svg: str
    file: str
    caption: str


Block = Union[Heading, Para, KeyValues, Table, Figure]


# ------------------------------------------------------------------------------------ content
def number(x: float | None) -> str:
    """A number for tables: 4 significant digits; ``—`` when unknown."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.4g}"


def stderr_lookup(circuit: Circuit, scores: EdgeScores | None) -> dict[str, float]:
    """Standard errors of the circuit's kept edges by name, when the scores they came from are given."""
    if scores is None:
        return {}
    se = scores.stderr
    if tuple(se.shape) != tuple(circuit.score.shape):
        raise EdgeatpError("the scores passed to the report belong to a different graph than the circuit")
    coords = (circuit.in_graph & circuit.graph.full_mask).nonzero()
    values = se.cpu()[tuple(coords.T)].tolist()
    return {circuit.graph.edge_at(tuple(c)).name: v for c, v in zip(coords.tolist(), values)}


def header_blocks(circuit: Circuit, task: str | None, title: str | None) -> list[Block]:
    """Title and the run summary: model, data, method, direction, metric, sign convention, sizes."""
    g = circuit.graph
    model = str(circuit.meta.get("model", "unknown model"))
    sel = circuit.selection
    n_nodes = len(circuit.nodes())
    items: list[tuple[str, Cell]] = [
        ("model", Code(model)), ("task / data", Code(task or str(circuit.meta.get("task", "not recorded")))),
        ("method", Code(circuit.method or "n/a")), ("direction", circuit.direction.value),
        ("metric", Code(circuit.metric)), ("sign convention", circuit.sign_convention),
        ("level", circuit.level),
        ("graph", f"{g.n_writers} writers × {g.n_readers} readers, {g.n_edges} edges"
                  + ("" if g.n_positions is None else f" over {g.n_positions} positions")),
        ("circuit size", f"{circuit.n_edges} edges, {n_nodes} components"),
        ("selection", "not recorded" if sel is None else f"{sel.rule} = {number(sel.value)}"),
        ("faithfulness", number(circuit.faithfulness)), ("necessity", number(circuit.necessity)),
        ("scores", "score = mean over prompt pairs of per-pair |estimate| (ranking); signed = mean estimate"),
    ]
    return [Heading(1, title or f"Circuit report: {model}"), KeyValues(tuple(items))]


def graph_blocks(graph_svg: str | None, svg_file: str, dot_file: str) -> list[Block]:
    """The rendered circuit graph, or a note that Graphviz is missing with a link to the DOT text."""
    blocks: list[Block] = [Heading(2, "Graph")]
    if graph_svg is None:
        return blocks + [Para(("Graphviz 'dot' was not found, so the graph was not rendered (" + INSTALL_HINT
                               + "). The graph is in ", Code(dot_file), "."))]
    return blocks + [Figure(graph_svg, svg_file, "Circuit graph (blue: positive estimate, red: negative; width: score; "
                                                 "q solid, k dashed, v dotted)"),
                     Para(("DOT source: ", Code(dot_file)))]


def edge_table(rows: Sequence[EdgeRow], stderr: dict[str, float]) -> Table:
    """Top edges: rank, name, reader type, score, signed estimate, stderr and verified exact effect."""
    body = tuple((i + 1, Code(r.edge.name), r.reader_type, number(r.score), number(r.signed),
                  number(stderr.get(r.edge.name)), number(r.exact)) for i, r in enumerate(rows))
    return Table(("#", "edge", "reader", "score", "signed estimate", "stderr", "exact effect"), body)


def top_blocks(circuit: Circuit, stderr: dict[str, float], top: int) -> list[Block]:
    """The top-edges table (and the node-score table for node- and neuron-level circuits)."""
    rows = edge_rows(circuit)
    blocks: list[Block] = []
    if circuit.node_scores:
        ranked = sorted(circuit.node_scores.items(), key=lambda kv: -kv[1])[:top]
        blocks += [Heading(2, f"Top components ({len(ranked)} of {len(circuit.node_scores)} scored)"),
                   Table(("#", "component", "score"),
                         tuple((i + 1, Code(n), number(s)) for i, (n, s) in enumerate(ranked)))]
    if circuit.level == "edge":
        blocks.append(Heading(2, f"Top edges ({min(top, len(rows))} of {len(rows)} kept)"))
    else:
        blocks += [Heading(2, f"Edges among the kept components ({min(top, len(rows))} of {len(rows)})"),
                   Para(("A node-level circuit: its edges were not scored one by one.",))]
    blocks.append(edge_table(rows[:top], stderr) if rows else Para(("The circuit has no edges.",)))
    return blocks


def verification_blocks(circuit: Circuit) -> list[Block]:
    """Verification summary and the table of exactly patched edges (or a note that none were)."""
    v = circuit.verification
    blocks: list[Block] = [Heading(2, "Verification")]
    if v is None:
        return blocks + [Para(("Not verified: no edge was exactly patched.",))]
    bound = "not run" if v.bound is None else f"{number(v.bound)} (alpha = {number(v.bound_alpha)})"
    blocks.append(KeyValues((
        ("rank correlation (Spearman, |estimate| vs |exact|, top edges)", number(v.rank_correlation)),
        ("sign agreement (top edges)", number(v.sign_agreement)),
        ("largest miss", Code(v.largest_miss)), ("largest miss size |estimate − exact|", number(v.largest_miss_size)),
        (f"largest |exact| among the {v.outside_checked} checked edges outside the circuit", number(v.outside_max)),
        ("bound on any unverified edge's |effect|", bound),
        ("forward passes", v.n_forwards),
    )))
    body = tuple((Code(c.name), "yes" if c.in_circuit else "no", number(c.score), number(c.estimate),
                  number(c.exact), number(c.estimate - c.exact), "yes" if same_sign(c.estimate, c.exact) else "no")
                 for c in v.checks)
    header = ("edge", "in circuit", "score", "estimate", "exact", "estimate − exact", "same sign")
    return blocks + [Table(header, body)]


def faithfulness_blocks(circuit: Circuit, chart_file: str) -> list[Block]:
    """The faithfulness/necessity chart and its numbers (or a note that none were computed)."""
    f = circuit.curve
    blocks: list[Block] = [Heading(2, "Faithfulness")]
    if f is None:
        return blocks + [Para(("No faithfulness curve was computed.",))]
    body = tuple((s, number(a), number(b)) for s, a, b in zip(f.sizes, f.faithfulness, f.necessity))
    return blocks + [
        Figure(faithfulness_svg(f), chart_file, "Faithfulness (outside the circuit patched) and necessity (circuit "
                                                "knocked out) by size; 1 = clean metric, 0 = corrupt metric"),
        KeyValues((("clean metric", number(f.clean_metric)), ("corrupt metric", number(f.corrupt_metric)))),
        Table(("edges", "faithfulness", "necessity"), body)]


def report_blocks(circuit: Circuit, *, graph_svg: str | None, name: str, task: str | None = None,
                  title: str | None = None, stderr: dict[str, float] | None = None, top: int = 20) -> list[Block]:
    """Every block of the report, in order."""
    return [*header_blocks(circuit, task, title), *graph_blocks(graph_svg, f"{name}.svg", f"{name}.dot"),
            *top_blocks(circuit, stderr or {}, top), *verification_blocks(circuit),
            *faithfulness_blocks(circuit, f"{name}_faithfulness.svg")]


# ------------------------------------------------------------------------------------ rendering
def md_cell(cell: Cell, table: bool = False) -> str:
    """A cell as Markdown text: angle brackets escaped, code in backticks, pipes escaped in tables."""
    if isinstance(cell, Code):
        text = "`" + cell.text + "`"
    else:
        text = (cell if isinstance(cell, str) else str(cell)).replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|") if table else text


def html_cell(cell: Cell) -> str:
    """A cell as escaped HTML (code in ``<code>``)."""
    if isinstance(cell, Code):
        return f"<code>{escape(cell.text)}</code>"
    return escape(cell if isinstance(cell, str) else str(cell))


def to_markdown(blocks: Sequence[Block]) -> str:
    """Render blocks as GitHub-flavoured Markdown."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + md_cell(b.text))
        elif isinstance(b, Para):
            out.append("".join(md_cell(c) for c in b.cells))
        elif isinstance(b, KeyValues):
            out.append("\n".join(f"- **{md_cell(k)}**: {md_cell(v)}" for k, v in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(md_cell(h, True) for h in b.header) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(md_cell(c, True) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        else:
            out.append(f"![{md_cell(b.caption)}]({b.file})\n\n*{md_cell(b.caption)}*")
    return "\n\n".join(out) + "\n"


def inline_svg(svg: str) -> str:
    """SVG text without its XML prolog and doctype, ready to sit inside HTML."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def to_html(blocks: Sequence[Block], title: str) -> str:
    """Render blocks as a self-contained HTML page (pictures inline)."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html_cell(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append("<p>" + "".join(html_cell(c) for c in b.cells) + "</p>")
        elif isinstance(b, KeyValues):
            items = "".join(f"<tr><th>{html_cell(k)}</th><td>{html_cell(v)}</td></tr>" for k, v in b.items)
            body.append(f'<table class="kv">{items}</table>')
        elif isinstance(b, Table):
            head = "".join(f"<th>{html_cell(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{html_cell(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            body.append(f"<figure>{inline_svg(b.svg)}<figcaption>{html_cell(b.caption)}</figcaption></figure>")
    style = ("body{font-family:Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:0.8em 0}td,th{border:1px solid #ddd;padding:3px 8px;"
             "text-align:left;font-size:0.9em}table.kv th{background:#f6f6f6;font-weight:normal}"
             "figure{margin:1em 0}figcaption{color:#555;font-size:0.9em}svg{max-width:100%;height:auto}")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{style}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


# ------------------------------------------------------------------------------------ files
def report_files(circuit: Circuit, fmt: ReportFormat = "md", *, name: str = "circuit", task: str | None = None,
                 title: str | None = None, scores: EdgeScores | None = None, top: int = 20,
                 graph_svg: str | None = None) -> dict[str, str]:
    """The report ``<name>.md`` or ``<name>.html`` and the files it refers to: ``<name>.dot`` and
    the faithfulness chart ``<name>_faithfulness.svg`` (file name → text). ``graph_svg`` is the
    rendered circuit (``None`` when Graphviz is missing); ``scores`` (the :class:`EdgeScores` the
    circuit was pruned from) adds standard errors."""
    if fmt not in ("md", "html"):
        raise EdgeatpError(f"report format must be 'md' or 'html', got {fmt!r}")
    files = {f"{name}.dot": to_dot(circuit)}
    if circuit.curve is not None:
        files[f"{name}_faithfulness.svg"] = faithfulness_svg(circuit.curve)
    blocks = report_blocks(circuit, graph_svg=graph_svg, name=name, task=task, title=title,
                           stderr=stderr_lookup(circuit, scores), top=top)
    page_title = title or f"Circuit report: {circuit.meta.get('model', name)}"
    files[f"{name}.{fmt}"] = to_markdown(blocks) if fmt == "md" else to_html(blocks, page_title)
    return files


def write_report(circuit: Circuit, out_dir: str | Path, fmt: ReportFormat = "md", *, name: str = "circuit",
                 task: str | None = None, title: str | None = None, scores: EdgeScores | None = None,
                 top: int = 20) -> Path:
    """Write the report with its DOT file, rendered graph (when Graphviz is installed) and chart
    into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    graph_svg = render_bytes(to_dot(circuit), "svg").decode() if dot_available() else None
    files = report_files(circuit, fmt, name=name, task=task, title=title, scores=scores, top=top, graph_svg=graph_svg)
    if graph_svg is not None:
        files[f"{name}.svg"] = graph_svg
    for file, text in files.items():
        atomic_write(out / file, text)
    return out / f"{name}.{fmt}"
