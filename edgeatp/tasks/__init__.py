"""Tasks: prompt pairs, built-in generators and user files.

Names are imported on first use, so reading a data file or listing tasks does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "TASKS": ".builtin", "TaskSpec": ".builtin", "make_task": ".builtin", "load_pairs": ".files",
    "Direction": ".pairs", "PairBatch": ".pairs", "PromptPairs": ".pairs",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
