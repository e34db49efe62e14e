"""Writing a circuit's files in the formats asked for, as one set, and reading a circuit back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import networkx as nx

from ..circuit import Circuit
from ..errors import EdgeatpError
from ..scores import EdgeScores
from .dot import FORMATS as PICTURE_FORMATS
from .dot import INSTALL_HINT, dot_available, render_bytes, to_dot
from .files import OutputSet
from .json_io import circuit_from_json, circuit_to_json, jsonable
from .networkx_io import to_networkx
from .report import ReportFormat, report_files

EXPORT_FORMATS = ("json", "mib", "dot", *PICTURE_FORMATS, "md", "html", "networkx")


@dataclass(frozen=True)
class Written:
    """What :func:`write_outputs` wrote (format → path) and what it skipped, with the reason."""

    paths: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def read_circuit(path: str | Path) -> Circuit:
    """A circuit from an edgeatp (any version) or EAP-IG/MIB JSON file, checked against the schema."""
    return circuit_from_json(Path(path))


def check_formats(formats: Sequence[str]) -> list[str]:
    """The requested formats, deduplicated, or a clear error for unknown or no formats."""
    wanted = list(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    unknown = [f for f in wanted if f not in EXPORT_FORMATS]
    if unknown:
        raise EdgeatpError(f"unknown export format(s) {', '.join(map(repr, unknown))}; "
                           f"choose from {', '.join(EXPORT_FORMATS)}")
    if not wanted:
        raise EdgeatpError(f"no export format given; choose from {', '.join(EXPORT_FORMATS)}")
    return wanted


def _networkx_json(circuit: Circuit) -> str:
    """networkx node-link data of :func:`to_networkx`, as strict JSON (non-finite numbers as strings)."""
    return json.dumps(jsonable(nx.node_link_data(to_networkx(circuit), edges="edges")), indent=1, allow_nan=False)


def write_outputs(circuit: Circuit, out_dir: str | Path, formats: Sequence[str] = ("json", "dot", "svg"), *,
                  name: str = "circuit", task: str | None = None, scores: EdgeScores | None = None,
                  replace_set: bool = True, overwrite: bool = True) -> Written:
    """Write the circuit in each of ``formats`` (json, mib, dot, svg, png, pdf, md, html, networkx)
    into ``out_dir`` as ``<name>.<ext>`` (MIB: ``<name>.mib.json``, networkx node-link data:
    ``<name>.networkx.json``; reports bring ``<name>.dot`` and ``<name>_faithfulness.svg``).

    The files are made in a private staging folder and moved in together at the end, so the
    folder never mixes two runs; ``replace_set`` removes files of the previous set of ``name``
    that this set does not write, and ``overwrite=False`` refuses to replace existing files.
    Pictures need Graphviz's ``dot``: without it they are skipped (see :attr:`Written.skipped`).
    """
    wanted = check_formats(formats)
    have_dot = dot_available()
    skipped = {f: f"Graphviz's dot is not installed ({INSTALL_HINT})"
               for f in wanted if f in PICTURE_FORMATS and not have_dot}
    drawn = [f for f in wanted if f in ("dot", "md", "html") or (f in PICTURE_FORMATS and have_dot)]
    dot_text = to_dot(circuit) if drawn else ""
    graph_svg = render_bytes(dot_text, "svg").decode() if have_dot and any(
        f in ("svg", "md", "html") for f in wanted) else None
    contents: dict[str, tuple[str, str | bytes]] = {}  # file -> (format, content)
    for fmt in wanted:
        if fmt in skipped:
            continue
        if fmt == "json":
            contents[f"{name}.json"] = (fmt, json.dumps(circuit_to_json(circuit), allow_nan=False, ensure_ascii=False))
        elif fmt == "mib":
            contents[f"{name}.mib.json"] = (fmt, json.dumps(circuit_to_json(circuit, "mib"), allow_nan=False,
                                                            ensure_ascii=False))
        elif fmt == "networkx":
            contents[f"{name}.networkx.json"] = (fmt, _networkx_json(circuit))
        elif fmt == "dot":
            contents[f"{name}.dot"] = (fmt, dot_text)
        elif fmt == "svg":
            contents[f"{name}.svg"] = (fmt, graph_svg or "")
        elif fmt in PICTURE_FORMATS:
            contents[f"{name}.{fmt}"] = (fmt, render_bytes(dot_text, fmt))
        else:
            report_fmt: ReportFormat = "md" if fmt == "md" else "html"
            for file, text in report_files(circuit, report_fmt, name=name, task=task, scores=scores,
                                           graph_svg=graph_svg).items():
                contents.setdefault(file, (fmt if file.endswith(f".{fmt}") else "report", text))
            if graph_svg is not None:
                contents.setdefault(f"{name}.svg", ("report", graph_svg))
    with OutputSet(Path(out_dir), name, replace_set=replace_set, overwrite=overwrite) as out:
        for file, (_, content) in contents.items():
            data = content.encode("utf-8") if isinstance(content, str) else content
            out.path(file).write_bytes(data)
        final = out.publish()
    paths = {fmt: final[file] for file, (fmt, _) in contents.items() if fmt != "report"}
    paths.update({f"{fmt} ({file})": final[file] for file, (fmt, _) in contents.items() if fmt == "report"})
    return Written(paths, skipped)
