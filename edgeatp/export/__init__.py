"""Exports of a circuit: networkx, DOT text and rendered pictures, JSON (edgeatp and EAP-IG/MIB
formats) and a Markdown/HTML report. Writing DOT, JSON and reports needs no Graphviz; only
rendering pictures calls the ``dot`` program, and without it the pictures are skipped with a note.

All writers read the circuit through :mod:`._view` and share its conventions: a sign shown is the
exact effect's where verification measured one, else the estimate's (marked as such); "score" is
the ranking magnitude and "signed estimate" the plain signed estimate. Pictures of large circuits
are reduced (the best edges and neurons, see :func:`to_dot`) and say what they leave out; the
JSON, MIB and networkx exports always keep every edge.

Names load on first use, so ``edgeatp.export.files`` (the command line's checks of output
folders) and the circuit-file checks of ``edgeatp.export.schema`` do not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "EXPORT_FORMATS": ".outputs", "Written": ".outputs", "check_formats": ".outputs", "read_circuit": ".outputs",
    "write_outputs": ".outputs",
    "OutputSet": ".files", "atomic_write": ".files", "check_writable": ".files", "set_files": ".files",
    "circuit_from_json": ".json_io", "circuit_to_json": ".json_io", "write_json": ".json_io",
    "dot_available": ".dot", "render": ".dot", "to_dot": ".dot",
    "to_networkx": ".networkx_io", "write_report": ".report", "SCHEMA_PATH": ".schema",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
