"""Prompt pairs from users' JSONL and CSV files, with errors that name the row and the fix.

Columns: ``clean``, ``corrupt``, ``answer``, ``wrong`` (JSONL: a string or a list of strings;
CSV: several wrong answers separated by ``|``). Strings are tokenized with the model's
tokenizer exactly as written (answers usually need their leading space, e.g. ``" Mary"``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..tokenizer import Tokenizer
from .pairs import PromptPairs
from .rows import check_records, read_rows


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


def _encode_prompt(tok: Tokenizer, text: str, what: str, where: str) -> list[int]:
    """Token ids of a prompt, refusing words the tokenizer does not know (they would become its
    unknown token and silently change the prompt)."""
    try:
        ids = tok.encode(text)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from None
    if tok.unk_id is not None and tok.unk_id in ids:
        unknown = [w for w in text.split() if tok.unk_id in tok.encode(w)]
        word = unknown[0] if unknown else tok.token_str(tok.unk_id)
        raise DataError(f"{where}: the {what} prompt has a word the tokenizer does not know ({word!r} becomes "
                        "its unknown token); rephrase it with words the model knows")
    return ids


def load_pairs(path: str | Path, tokenizer: Tokenizer | None, prepend_bos: bool = True,
               n_ctx: int | None = None) -> PromptPairs:
    """Read and tokenize a JSONL/CSV file of prompt pairs; every problem names its row.

    ``prepend_bos`` puts the tokenizer's BOS token first, exactly once: a prompt whose text
    already tokenizes to a leading BOS is not given a second one."""
    path = Path(path)
    if tokenizer is None:
        raise DataError(f"{path}: the model has no tokenizer, so text prompts cannot be tokenized")
    rows = read_rows(path)
    check_records(path, rows)
    clean, corrupt, answer, wrong, texts, labels = [], [], [], [], [], []
    bos = tokenizer.bos_id if prepend_bos else None
    for label, rec in rows:
        where = f"{path}, {label}"
        w = rec["wrong"] if isinstance(rec["wrong"], list) else [rec["wrong"]]
        c_ids = _encode_prompt(tokenizer, rec["clean"], "clean", where)
        x_ids = _encode_prompt(tokenizer, rec["corrupt"], "corrupt", where)
        if bos is not None:
            c_ids = c_ids if c_ids[:1] == [bos] else [bos, *c_ids]
            x_ids = x_ids if x_ids[:1] == [bos] else [bos, *x_ids]
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
