"""Prompt pairs from users' JSONL and CSV files, with errors that name the row and the fix.

Columns: ``clean``, ``corrupt``, ``answer``, ``wrong`` (JSONL: a string or a list of strings;
CSV: several wrong answers separated by ``|``). Strings are tokenized with the model's
tokenizer exactly as written (answers usually need their leading space, e.g. ``" Mary"``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..tokenizer import Tokenizer
from .pairs import PromptPairs

REQUIRED = ("clean", "corrupt", "answer", "wrong")


def _read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(label, record) per non-blank row; label is e.g. ``line 3`` / ``row 3``."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
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


def _single_token(tok: Tokenizer, text: str, what: str, where: str) -> int:
    try:
        ids = tok.encode(text)
    except ValueError as exc:
        raise DataError(f"{where}: {what} {text!r}: {exc}") from None
    if len(ids) == 1:
        if tok.unk_id is not None and ids[0] == tok.unk_id:
            raise DataError(f"{where}: {what} {text!r} is the tokenizer's unknown token; use a word it knows")
        return ids[0]
    hint = ""
    if not text.startswith(" "):
        try:
            if len(tok.encode(" " + text)) == 1:
                hint = f"; ' {text}' (with a leading space) is a single token"
        except ValueError:
            pass
    raise DataError(f"{where}: {what} {text!r} is {len(ids)} tokens, it must be exactly one{hint}")


def load_pairs(path: str | Path, tokenizer: Tokenizer | None, prepend_bos: bool = True,
               n_ctx: int | None = None) -> PromptPairs:
    """Read and tokenize a JSONL/CSV file of prompt pairs; every problem names its row."""
    path = Path(path)
    if tokenizer is None:
        raise DataError(f"{path}: the model has no tokenizer, so text prompts cannot be tokenized")
    rows = _read_rows(path)
    clean, corrupt, answer, wrong, texts, labels = [], [], [], [], [], []
    prefix = [tokenizer.bos_id] if prepend_bos and tokenizer.bos_id is not None else []
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
        try:
            c_ids, x_ids = prefix + tokenizer.encode(rec["clean"]), prefix + tokenizer.encode(rec["corrupt"])
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        if len(c_ids) != len(x_ids):
            raise DataError(f"{where}: clean is {len(c_ids)} tokens but corrupt is {len(x_ids)}; "
                            "rewrite the corrupt prompt so both tokenize to the same length")
        if n_ctx is not None and len(c_ids) > n_ctx:
            raise DataError(f"{where}: the prompt is {len(c_ids)} tokens but the model's context is {n_ctx}")
        clean.append(c_ids)
        corrupt.append(x_ids)
        answer.append(_single_token(tokenizer, rec["answer"], "answer", where))
        wrong.append([_single_token(tokenizer, x, "wrong answer", where) for x in w])
        texts.append((rec["clean"], rec["corrupt"]))
        labels.append(label)
    pad = tokenizer.bos_id if tokenizer.bos_id is not None else 0
    return PromptPairs.from_lists(clean, corrupt, answer, wrong, pad_id=pad, name=path.name, texts=texts,
                                  row_labels=labels)
