"""Reading users' prompt-pair files (JSONL and CSV) into records, with errors that name the row.

Only the file is read here (no model, no tokenizer, no torch), so a wrong file is reported at
once; :mod:`edgeatp.tasks.files` tokenizes the records.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import DataError

REQUIRED = ("clean", "corrupt", "answer", "wrong")


def read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(label, record) per non-blank row; label is e.g. ``line 3`` / ``row 3``."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass a .jsonl or .csv file of prompt pairs")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded); save the file as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs one prompt pair per line/row")
    suffix = path.suffix.lower()
    rows: list[tuple[str, dict[str, Any]]] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {i}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                "each line must be one object like {\"clean\": ..., \"corrupt\": ..., ...}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}, line {i}: expected a JSON object, got {type(rec).__name__}")
            rows.append((f"line {i}", rec))
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} in the header {header}; "
                            f"the header must name {', '.join(REQUIRED)}")
        for i, rec in enumerate(reader, start=2):
            if None in rec:
                raise DataError(f"{path}, row {i}: more fields than header columns (quote fields that contain commas)")
            if all(not (v or "").strip() for v in rec.values()):
                continue
            wrong = rec.get("wrong")
            rows.append((f"row {i}", {**rec, "wrong": wrong.split("|") if isinstance(wrong, str) else wrong}))
    else:
        raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl or .csv")
    if not rows:
        raise DataError(f"{path}: the file has no prompt pairs")
    return rows


def check_records(path: Path, rows: list[tuple[str, dict[str, Any]]]) -> None:
    """Every record has the four fields with the right types (before any tokenizing)."""
    for label, rec in rows:
        where = f"{path}, {label}"
        missing = [c for c in REQUIRED if rec.get(c) in (None, "", [])]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}; every pair needs {', '.join(REQUIRED)}")
        for c in ("clean", "corrupt", "answer"):
            if not isinstance(rec[c], str):
                raise DataError(f"{where}: {c} must be a string, got {type(rec[c]).__name__}")
        w = rec["wrong"] if isinstance(rec["wrong"], list) else [rec["wrong"]]
        if not all(isinstance(x, str) and x != "" for x in w):
            raise DataError(f"{where}: wrong must be a non-empty string or a list of strings")
