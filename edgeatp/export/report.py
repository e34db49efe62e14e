"""A Markdown or HTML report of a circuit: what was run and what came out, the graph, the
circuit's edges, components or groups, the verification, the faithfulness curve and, when they
were computed, the circuit search (before and after, size by size, the refined curve on the
faithfulness chart) and MIB's CPR/CMD.

The header states the circuit's faithfulness and necessity and lists its warnings
(``circuit.warnings``) before anything else, and says what the number columns mean for the
circuit's method: **score** is the ranking magnitude (for GradDrop methods the mean over dropped
layers of ``|estimate|``), **signed estimate** the plain signed estimate, **exact effect** the
patched one; every table that shows them repeats this in a footnote. The middle section follows
the circuit's level: edge circuits list their top edges (and, with layer-to-layer units, a table
of those), node- and neuron-level circuits a table of the scored components, group circuits a
table of the groups. Headings and counts use the circuit's own unit (edges, components, groups).

The report is built as a list of blocks (headings, paragraphs, notices, key/value lists, tables,
figures) by pure functions and rendered to either format; :func:`write_report` writes it next to
the circuit's ``.dot`` file, its rendered ``.svg`` (when Graphviz is installed) and the
faithfulness chart ``<name>_faithfulness.svg``. HTML embeds both pictures inline, so the
``.html`` file is self-contained; Markdown links the ``.svg`` files next to it (GitHub renders
linked SVGs, not inline ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Literal, Sequence, Union

from ..circuit import Circuit, FaithfulnessCurve, Unit
from ..errors import EdgeatpError
from ..scores import EdgeScores
from ..verification import same_sign
from ._view import (EdgeRow, chosen_size, column_notes, drawing, edge_rows, member_components, size_summary, size_word,
                    unit_kind)
from .chart import faithfulness_svg
from .dot import INSTALL_HINT, dot_available, render_bytes, to_dot
from .files import atomic_write

ReportFormat = Literal["md", "html"]


@dataclass(frozen=True)
class Code:
    """Text shown verbatim (names like ``a0.h1->a1.h2<q>``): backticks in Markdown, ``<code>`` in HTML."""

    text: str


@dataclass(frozen=True)
class Strong:
    """Text to stand out: bold in Markdown, ``<strong>`` in HTML."""

    text: str


Cell = Union[str, Code, Strong, float, int, bool, None]


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
class Notice:
    """Items the reader must not miss (warnings), each shown as ``label: item``."""

    label: str
    items: tuple[str, ...]


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


Block = Union[Heading, Para, Notice, KeyValues, Table, Figure]


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


def target_of(circuit: Circuit) -> float | None:
    """The faithfulness target the circuit was discovered with (``None`` when not recorded)."""
    target = (circuit.meta.get("config") or {}).get("target")
    return float(target) if isinstance(target, (int, float)) else None


def column_footnote(circuit: Circuit) -> Para:
    """What the score, signed estimate and exact effect columns mean for the circuit's method."""
    notes = column_notes(circuit.method)
    return Para((f"Score: {notes.score}. Signed estimate: {notes.signed}. Exact effect: {notes.exact}.",))


def header_blocks(circuit: Circuit, task: str | None, title: str | None) -> list[Block]:
    """Title, the circuit's own faithfulness and necessity, its warnings, and the run summary:
    model, data, method, direction, metric, sign convention, sizes and what the numbers mean."""
    g = circuit.graph
    model = str(circuit.meta.get("model", "unknown model"))
    sel = circuit.selection
    target = target_of(circuit)
    notes = column_notes(circuit.method)
    summary = Para((Strong(f"Faithfulness {number(circuit.faithfulness)}, necessity {number(circuit.necessity)}"),
                    " (1 = the clean behaviour, 0 = the corrupt one" + ("" if target is None else
                                                                        f"; target {target:g}") + "); ",
                    f"{circuit.level} circuit: {size_summary(circuit)}."))
    items: list[tuple[str, Cell]] = [
        ("model", Code(model)), ("task / data", Code(task or str(circuit.meta.get("task", "not recorded")))),
        ("method", Code(circuit.method or "n/a")), ("direction", circuit.direction.value),
        ("metric", Code(circuit.metric)), ("sign convention", circuit.sign_convention),
        ("level", circuit.level),
        ("graph", f"{g.n_writers} writers × {g.n_readers} readers, {g.n_edges} edges"
                  + ("" if g.n_positions is None else f" over {g.n_positions} positions")),
        ("circuit size", size_summary(circuit)),
        ("selection", "not recorded" if sel is None else f"{sel.rule} = {number(sel.value)}"),
        ("faithfulness", number(circuit.faithfulness)), ("necessity", number(circuit.necessity)),
        ("score", notes.score), ("signed estimate", notes.signed), ("exact effect", notes.exact),
    ]
    blocks: list[Block] = [Heading(1, title or f"Circuit report: {model}"), summary]
    if circuit.warnings:
        blocks.append(Notice("Warning", tuple(circuit.warnings)))
    return blocks + [KeyValues(tuple(items))]


def graph_blocks(circuit: Circuit, graph_svg: str | None, svg_file: str, dot_file: str) -> list[Block]:
    """The rendered circuit graph and what the drawing leaves out, or a note that Graphviz is
    missing with a link to the DOT text."""
    blocks: list[Block] = [Heading(2, "Graph")]
    left_out = drawing(circuit).left_out
    reduced = [Para(("The drawing is reduced: " + "; ".join(left_out) + ".",))] if left_out else []
    if graph_svg is None:
        return blocks + [Para(("Graphviz 'dot' was not found, so the graph was not rendered (" + INSTALL_HINT
                               + "). The graph is in ", Code(dot_file), ".")), *reduced]
    if circuit.level == "edge":
        caption = ("Circuit graph (edge colour: sign of the exact effect where the edge was patched, dark, else of "
                   "the estimate, light; blue positive, red negative; width: score; q solid, k dashed, v dotted)")
    else:
        what = "its kept groups'" if circuit.level == "group" else "the component's"
        caption = (f"Circuit graph (node colour: sign of {what} exact effect where patched, dark, else of the "
                   "estimate, light; blue positive, red negative; edges among the kept components drawn alike)")
    return blocks + [Figure(graph_svg, svg_file, caption), Para(("DOT source: ", Code(dot_file))), *reduced]


def edge_table(rows: Sequence[EdgeRow], stderr: dict[str, float]) -> Table:
    """Top edges: rank, name, reader type, score, signed estimate, stderr and verified exact effect."""
    body = tuple((i + 1, Code(r.edge.name), r.reader_type, number(r.score), number(r.signed),
                  number(stderr.get(r.edge.name)), number(r.exact)) for i, r in enumerate(rows))
    return Table(("#", "edge", "reader", "score", "signed estimate", "stderr", "exact effect"), body)


def unit_table(units: Sequence[Unit], what: str, *, kept: bool = True, members: bool = False) -> Table:
    """Units (components, groups, coarse edges): rank, name, whether kept, (for groups) the
    components their members belong to, score, signed estimate and exact effect."""
    def row(i: int, u: Unit) -> tuple[Cell, ...]:
        extra = (("yes" if u.in_circuit else "no",) if kept else ()) + (
            (", ".join(member_components(u)) or "not recorded",) if members else ())
        return (i + 1, Code(u.name), *extra, number(u.score), number(u.signed), number(u.exact))
    header = ("#", what, *(("kept",) if kept else ()), *(("components",) if members else ()), "score",
              "signed estimate", "exact effect")
    return Table(header, tuple(row(i, u) for i, u in enumerate(units)))


def main_blocks(circuit: Circuit, stderr: dict[str, float], top: int) -> list[Block]:
    """The circuit itself, by level: top edges (and layer-to-layer edges), components or groups,
    each table with a footnote on its columns."""
    kind = unit_kind(circuit)
    rows = edge_rows(circuit)
    if kind is None:
        blocks: list[Block] = [Heading(2, f"Top edges ({min(top, len(rows))} of {len(rows)} kept)")]
        blocks += [edge_table(rows[:top], stderr), column_footnote(circuit)] if rows else [
            Para(("The circuit has no edges.",))]
        coarse = circuit.units_of("coarse_edge")
        if coarse:
            shown = f"top {top} of {len(coarse)}" if len(coarse) > top else f"{len(coarse)}"
            blocks += [Heading(2, f"Layer-to-layer edges ({shown})"),
                       Para(("Every edge between two layers (the embedding, an attention layer, an MLP, the logits) "
                             "estimated and patched as one.",)),
                       unit_table(coarse[:top], "layer-to-layer edge", kept=False),
                       Para(("Score: the mean over prompt pairs of |the sum of the member edges' signed estimates| "
                             "(first order, no GradDrop). Signed estimate: that sum of plain estimates, mean over "
                             "prompt pairs. Exact effect: every member edge patched together, mean over prompt "
                             "pairs.",))]
        return blocks
    units = circuit.units_of(kind)
    what = size_word(circuit)
    shown = f"; top {top} shown" if len(units) > top else ""
    heading = f"{what.capitalize()} ({chosen_size(circuit)} of {len(units)} kept{shown})"
    among = "the kept groups' components" if kind == "group" else "the kept components"
    footnote = column_footnote(circuit)
    if kind == "component":
        footnote = Para((*footnote.cells, " A head's score and signed estimate are those of its best-scoring node "
                                          "(its output, query, key or value); its exact effect patches its output."))
    return [Heading(2, heading), unit_table(units[:top], what[:-1], members=kind == "group"), footnote,
            Heading(2, f"Edges among {among}"),
            Para((f"The circuit is the {circuit.n_edges} edges among {among} (with the input and the logits); "
                  "they were not scored one by one, so they are not listed here (see the graph and the JSON).",))]


def verification_blocks(circuit: Circuit) -> list[Block]:
    """Verification summary and the table of exactly patched edges, components or groups (or a
    note that none were)."""
    v = circuit.verification
    what = size_word(circuit)
    blocks: list[Block] = [Heading(2, "Verification")]
    if v is None:
        return blocks + [Para((f"Not verified: no {what[:-1]} was exactly patched.",))]
    bound = "not run" if v.bound is None else f"{number(v.bound)} (alpha = {number(v.bound_alpha)})"
    blocks.append(KeyValues((
        (f"rank correlation (Spearman, |estimate| vs |exact|, top {what})", number(v.rank_correlation)),
        (f"sign agreement (top {what})", number(v.sign_agreement)),
        ("largest miss", Code(v.largest_miss)), ("largest miss size |estimate − exact|", number(v.largest_miss_size)),
        (f"largest |exact| among the {v.outside_checked} checked {what} outside the circuit", number(v.outside_max)),
        (f"bound on any unverified {what[:-1]}'s |effect|", bound),
        ("forward passes", v.n_forwards),
    )))
    body = tuple((Code(c.name), "yes" if c.in_circuit else "no", number(c.score), number(c.estimate),
                  number(c.exact), number(c.estimate - c.exact), "yes" if same_sign(c.estimate, c.exact) else "no")
                 for c in v.checks)
    header = (what[:-1], "in circuit", "score", "signed estimate", "exact effect", "estimate − exact", "same sign")
    return blocks + [Table(header, body), column_footnote(circuit)]


def curve_of(circuit: Circuit) -> FaithfulnessCurve | None:
    """The circuit's faithfulness curve, else the ranking's circuits a search started from."""
    if circuit.curve is not None:
        return circuit.curve
    return circuit.refinement.before_curve() if circuit.refinement is not None else None


def chart(circuit: Circuit, curve: FaithfulnessCurve) -> str:
    """The circuit's faithfulness chart: sizes in its own unit, its size and its target marked, and
    the refined circuits' faithfulness when a search refined it."""
    refined = circuit.refinement.after_curve() if circuit.refinement is not None else None
    return faithfulness_svg(curve, unit=size_word(circuit), chosen=chosen_size(circuit), target=target_of(circuit),
                            refined=refined)


def search_blocks(circuit: Circuit) -> list[Block]:
    """The circuit search, size by size: the ranking's circuit before and the searched one after."""
    r = circuit.refinement
    if r is None:
        return []
    body = tuple((x.size, x.before_edges, number(x.before_faithfulness), len(x.edges), Strong(number(x.faithfulness)),
                  number(x.necessity), x.found_by, x.n_forwards) for x in r.sizes)
    return [Heading(2, "Circuit search"),
            Para((f"Exact whole-circuit search from the top {r.n_candidates} edges of {r.ranking} "
                  f"(objective: {r.objective}; seed {r.seed}): {r.n_forwards} forwards of a budget of {r.budget}, "
                  "the final exact check included. Every number is an exact run; the chart above shows the "
                  "refined faithfulness beside the ranking's.",)),
            Table(("size limit", "edges before", "faithfulness before", "edges after", "faithfulness after",
                   "necessity after", "found by", "forwards"), body)]


def mib_blocks(circuit: Circuit) -> list[Block]:
    """MIB's CPR and CMD of the ranking (and of the searched circuits, when they cover MIB's grid)."""
    if not circuit.circuit_metrics:
        return []
    body = tuple((m.label, Strong(number(m.cpr)), Strong(number(m.cmd)), m.n_edges,
                  ", ".join(f"{x:g}: {number(f)}" for x, f in zip(m.grid, m.cpr_faithfulness)), m.n_forwards)
                 for m in circuit.circuit_metrics)
    return [Heading(2, "MIB circuit metrics"),
            Para(("CPR: area under faithfulness over MIB's grid of circuit sizes (fractions of all edges, linear "
                  "axis; higher is better). CMD: area under |1 − faithfulness| (lower is better). CPR's circuits "
                  "take the top edges by the ranking score signed by the estimate's direction, CMD's by the ranking "
                  "score; dangling edges are dropped.",)),
            Table(("circuits", "CPR", "CMD", "all edges", "faithfulness (CPR) at each fraction", "forwards"), body)]


def faithfulness_blocks(circuit: Circuit, chart_file: str) -> list[Block]:
    """The faithfulness/necessity chart (chosen size and target marked) and its numbers (or a
    note that none were computed)."""
    f = curve_of(circuit)
    blocks: list[Block] = [Heading(2, "Faithfulness")]
    if f is None:
        return blocks + [Para(("No faithfulness curve was computed.",))]
    what = size_word(circuit)
    target = target_of(circuit)
    body = tuple((s, number(a), number(b)) for s, a, b in zip(f.sizes, f.faithfulness, f.necessity))
    marks = f"the chosen circuit ({chosen_size(circuit)} {what}) and " + (
        "no target" if target is None else f"the target {target:g}") + " are marked"
    return blocks + [
        Figure(chart(circuit, f), chart_file,
               f"Faithfulness (outside the circuit patched) and necessity (circuit knocked out) by size in {what}; "
               f"1 = clean metric, 0 = corrupt metric; {marks}"),
        KeyValues((("clean metric", number(f.clean_metric)), ("corrupt metric", number(f.corrupt_metric)))),
        Table((what, "faithfulness", "necessity"), body)]


def report_blocks(circuit: Circuit, *, graph_svg: str | None, name: str, task: str | None = None,
                  title: str | None = None, stderr: dict[str, float] | None = None, top: int = 20) -> list[Block]:
    """Every block of the report, in order."""
    return [*header_blocks(circuit, task, title), *graph_blocks(circuit, graph_svg, f"{name}.svg", f"{name}.dot"),
            *main_blocks(circuit, stderr or {}, top), *verification_blocks(circuit),
            *faithfulness_blocks(circuit, f"{name}_faithfulness.svg"), *search_blocks(circuit), *mib_blocks(circuit)]


# ------------------------------------------------------------------------------------ rendering
def md_cell(cell: Cell, table: bool = False) -> str:
    """A cell as Markdown text: angle brackets escaped, code in backticks, pipes escaped in tables."""
    if isinstance(cell, Code):
        text = "`" + cell.text + "`"
    elif isinstance(cell, Strong):
        text = "**" + md_cell(cell.text) + "**"
    else:
        text = (cell if isinstance(cell, str) else str(cell)).replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|") if table else text


def html_cell(cell: Cell) -> str:
    """A cell as escaped HTML (code in ``<code>``)."""
    if isinstance(cell, Code):
        return f"<code>{escape(cell.text)}</code>"
    if isinstance(cell, Strong):
        return f"<strong>{escape(cell.text)}</strong>"
    return escape(cell if isinstance(cell, str) else str(cell))


def to_markdown(blocks: Sequence[Block]) -> str:
    """Render blocks as GitHub-flavoured Markdown."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + md_cell(b.text))
        elif isinstance(b, Para):
            out.append("".join(md_cell(c) for c in b.cells))
        elif isinstance(b, Notice):
            out.append("\n>\n".join(f"> **{md_cell(b.label)}:** {md_cell(item)}" for item in b.items))
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
        elif isinstance(b, Notice):
            body += [f'<p class="notice"><strong>{html_cell(b.label)}:</strong> {html_cell(item)}</p>'
                     for item in b.items]
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
             "figure{margin:1em 0}figcaption{color:#555;font-size:0.9em}svg{max-width:100%;height:auto}"
             "p.notice{background:#fff4e5;border-left:4px solid #e08214;padding:0.5em 0.8em}")
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
    curve = curve_of(circuit)
    if curve is not None:
        files[f"{name}_faithfulness.svg"] = chart(circuit, curve)
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
