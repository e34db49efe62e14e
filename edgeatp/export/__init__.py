"""Exports of a circuit: networkx, DOT text and rendered pictures, JSON (edgeatp and EAP-IG/MIB
formats) and a Markdown/HTML report. Writing DOT, JSON and reports needs no Graphviz; only
rendering pictures calls the ``dot`` program.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import networkx as nx

from ..circuit import Circuit
from ..errors import EdgeatpError
from ..scores import EdgeScores
from .dot import FORMATS as PICTURE_FORMATS
from .dot import INSTALL_HINT, dot_available, render, to_dot
from .json_io import SCHEMA_PATH, circuit_from_json, circuit_to_json, write_json
from .networkx_io import to_networkx
from .report import ReportFormat, write_report

EXPORT_FORMATS = ("json", "mib", "dot", *PICTURE_FORMATS, "md", "html", "networkx")


def export_all(circuit: Circuit, out_dir: str | Path, formats: Sequence[str] = ("json", "dot", "svg"), *,
               name: str = "circuit", task: str | None = None, scores: EdgeScores | None = None) -> dict[str, Path]:
    """Write the circuit in each of ``formats`` (json, mib, dot, svg, png, pdf, md, html, networkx)
    into ``out_dir`` as ``<name>.<ext>`` (MIB: ``<name>.mib.json``, networkx node-link data:
    ``<name>.networkx.json``); returns format → path. Checks the formats and Graphviz before
    writing anything."""
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise EdgeatpError(f"unknown export format(s) {', '.join(map(repr, unknown))}; "
                           f"choose from {', '.join(EXPORT_FORMATS)}")
    pictures = [f for f in formats if f in PICTURE_FORMATS]
    if pictures and not dot_available():
        raise EdgeatpError(f"rendering {', '.join(pictures)} needs the Graphviz 'dot' program; {INSTALL_HINT}, "
                           "or export only json, mib, dot, md and html")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dot_text = to_dot(circuit)
    written: dict[str, Path] = {}
    for fmt in dict.fromkeys(formats):
        if fmt == "json":
            written[fmt] = write_json(circuit, out / f"{name}.json")
        elif fmt == "mib":
            written[fmt] = write_json(circuit, out / f"{name}.mib.json", "mib")
        elif fmt == "networkx":
            data = nx.node_link_data(to_networkx(circuit), edges="edges")
            written[fmt] = out / f"{name}.networkx.json"
            written[fmt].write_text(json.dumps(data, indent=1), encoding="utf-8")
        elif fmt == "dot":
            written[fmt] = out / f"{name}.dot"
            written[fmt].write_text(dot_text, encoding="utf-8")
        elif fmt in PICTURE_FORMATS:
            written[fmt] = render(dot_text, out / f"{name}.{fmt}", fmt)
        else:
            report_fmt: ReportFormat = "md" if fmt == "md" else "html"
            written[fmt] = write_report(circuit, out, report_fmt, name=name, task=task, scores=scores)
    return written


__all__ = ["EXPORT_FORMATS", "SCHEMA_PATH", "circuit_from_json", "circuit_to_json", "dot_available", "export_all",
           "render", "to_dot", "to_networkx", "write_json", "write_report"]
