"""Tokenizers edgeatp can use: a word-level one for zoo models and a wrapper for Hugging Face ones."""

from __future__ import annotations

from typing import Any, Protocol, Sequence


class Tokenizer(Protocol):
    """What edgeatp needs from a tokenizer (``unk_id``: the unknown-token id, if any)."""

    name: str
    bos_id: int | None
    unk_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token added."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence of ids."""

    def token_str(self, token_id: int) -> str:
        """A readable form of one token."""


class WordTokenizer:
    """Whitespace-separated words mapped to ids: the zoo models' vocabularies."""

    def __init__(self, vocab: Sequence[str], bos: str | None = "BOS", name: str = "words") -> None:
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary has duplicate words")
        self.vocab = list(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.bos_id = self.ids.get(bos) if bos is not None else None
        self.unk_id = None  # unknown words raise instead
        self.name = name

    def encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            if word not in self.ids:
                raise ValueError(f"unknown word {word!r} for the {self.name} vocabulary ({len(self.vocab)} words)")
            out.append(self.ids[word])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def token_str(self, token_id: int) -> str:
        return self.vocab[int(token_id)]


class HFTokenizer:
    """Wrapper around a Hugging Face tokenizer; ``encode`` never adds special tokens."""

    def __init__(self, tokenizer: Any, name: str | None = None) -> None:
        self.hf = tokenizer
        self.name = name or getattr(tokenizer, "name_or_path", "hf")
        self.bos_id = tokenizer.bos_token_id
        self.unk_id = tokenizer.unk_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids])

    def token_str(self, token_id: int) -> str:
        return self.hf.decode([int(token_id)])


def single_token(tok: Tokenizer, text: str) -> int | None:
    """The id if ``text`` is exactly one known token, else ``None``."""
    try:
        ids = tok.encode(text)
    except ValueError:
        return None
    if len(ids) != 1 or (tok.unk_id is not None and ids[0] == tok.unk_id):
        return None
    return ids[0]
