"""What ``--group`` names, read without torch: ``layer``, ``head``, ``span:a-b,...`` or a JSON file
of named node lists. The command line refuses a bad spec before loading anything; the groups
themselves are built against the model in :func:`edgeatp.attribution.grouping.parse_groups`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import EdgeatpError, option_error

NAMED = ("layer", "head")


def parse_spans(spec: str) -> list[tuple[int, int]]:
    """The position spans of ``span:0-3,4-9`` (inclusive start-end pairs)."""
    out = []
    for part in spec.removeprefix("span:").split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        if m is None:
            raise option_error(f"{{group}} {spec!r}: write spans as start-end, e.g. span:0-3,4-9")
        if int(m[1]) > int(m[2]):
            raise option_error(f"{{group}} {spec!r}: span {m[1]}-{m[2]} ends before it starts; write start-end with "
                               "start <= end")
        out.append((int(m[1]), int(m[2])))
    return out


def group_file(spec: str) -> dict[str, list]:
    """The named node lists of a group file ``{"group name": ["a0.h1", "a0.h2@3", ...], ...}``."""
    path = Path(spec)
    if not path.is_file():
        raise option_error(f"{{group}} {spec!r} is neither layer, head, span:a-b,... nor a JSON file of named node "
                           "lists (no such file)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EdgeatpError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeatpError(f"{path}: cannot be read as a JSON text file ({exc})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise EdgeatpError(f"{path}: expected an object mapping group names to lists of node names")
    return raw


def check_group_spec(spec: str) -> None:
    """Refuse a ``--group`` spec that cannot name groups (bad spans, a missing or malformed file)."""
    if spec in NAMED:
        return
    if spec.startswith("span:"):
        parse_spans(spec)
    else:
        group_file(spec)
