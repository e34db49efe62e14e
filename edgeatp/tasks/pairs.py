"""Prompt pairs: clean and corrupt token sequences with the answer they are judged on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterator, Sequence

import torch

from ..errors import DataError


class Direction(str, Enum):
    """Which run is patched. Noising patches corrupt activations into the clean run (tests
    necessity, the AtP* paper's default); denoising patches clean activations into the
    corrupt run (tests sufficiency). One code path serves both: only base and source swap."""

    NOISING = "noising"
    DENOISING = "denoising"


@dataclass(frozen=True)
class PairBatch:
    """A batch ready to run: ``base`` is the run being patched, ``source`` supplies patch values."""

    base: torch.Tensor  # [B, T] token ids (right-padded)
    source: torch.Tensor  # [B, T]
    clean: torch.Tensor  # [B, T]
    answer: torch.Tensor  # [B]
    wrong: torch.Tensor  # [B, K], -1 = unused slot
    answer_pos: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B]
    index: torch.Tensor  # [B] rows of the dataset
    direction: Direction

    def __len__(self) -> int:
        return int(self.base.shape[0])

    @property
    def corrupt(self) -> torch.Tensor:
        """The corrupt prompts (the source when noising, the base when denoising)."""
        return self.source if self.direction is Direction.NOISING else self.base

    def repeat_rows(self, rows: torch.Tensor) -> "PairBatch":
        """A batch whose row ``i`` is this batch's row ``rows[i]`` (for stacked patch sweeps)."""
        return PairBatch(
            self.base[rows], self.source[rows], self.clean[rows], self.answer[rows], self.wrong[rows],
            self.answer_pos[rows], self.lengths[rows], self.index[rows], self.direction,
        )

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in (self.base, self.source, self.clean, self.answer, self.wrong,
                                                   self.answer_pos, self.lengths, self.index)), self.direction)


@dataclass(frozen=True)
class PromptPairs:
    """A dataset of clean/corrupt prompt pairs of equal token length per pair.

    Sequences of different pairs may differ in length; they are right-padded with ``pad_id``
    (identical in clean and corrupt, after the answer position, so padding can change no
    effect of a causal model). ``wrong`` holds one or more wrong-answer tokens per pair
    (``-1`` pads unused slots); metrics such as the logit difference use their mean.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor
    answer_pos: torch.Tensor
    lengths: torch.Tensor
    pad_id: int = 0
    name: str = "pairs"
    texts: tuple[tuple[str, str], ...] | None = field(default=None, repr=False)
    row_labels: tuple[str, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = self.clean.shape[0]
        if n == 0:
            raise DataError(f"{self.name}: no prompt pairs")
        if self.clean.dim() != 2 or self.clean.shape != self.corrupt.shape:
            raise DataError(f"{self.name}: clean and corrupt must be [pairs, positions] tensors of one shape")
        wrong = self.wrong if self.wrong.dim() == 2 else self.wrong[:, None]
        object.__setattr__(self, "wrong", wrong.long())
        for fld in ("answer", "answer_pos", "lengths"):
            t = getattr(self, fld)
            if t.shape != (n,):
                raise DataError(f"{self.name}: {fld} must have one entry per pair ({n}), got shape {tuple(t.shape)}")
        if self.wrong.shape[0] != n or not bool((self.wrong[:, 0] >= 0).all()):
            raise DataError(f"{self.name}: every pair needs at least one wrong-answer token")
        bad = ((self.answer_pos < 0) | (self.answer_pos >= self.lengths)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{self.name}: pair {i} has answer position {int(self.answer_pos[i])} "
                            f"outside its {int(self.lengths[i])} tokens")
        if bool((self.lengths > self.clean.shape[1]).any()) or bool((self.lengths < 1).any()):
            raise DataError(f"{self.name}: lengths must lie in 1..{self.clean.shape[1]}")
        if self.texts is not None and len(self.texts) != n:
            raise DataError(f"{self.name}: texts must have one entry per pair")
        if self.row_labels is not None and len(self.row_labels) != n:
            raise DataError(f"{self.name}: row labels must have one entry per pair")

    def label(self, i: int) -> str:
        """Where pair ``i`` came from: its file line/row, else ``pair i``."""
        return self.row_labels[i] if self.row_labels is not None else f"pair {i}"

    def fingerprint(self) -> dict[str, Any]:
        """Count and content hash of the pairs (tokens, answers, positions), to recognise the same data."""
        h = hashlib.sha256()
        for t in (self.clean, self.corrupt, self.answer, self.wrong, self.answer_pos, self.lengths):
            h.update(t.contiguous().numpy().tobytes())
        return {"n_pairs": len(self), "sha256": h.hexdigest()}

    @classmethod
    def from_lists(
        cls,
        clean: Sequence[Sequence[int]],
        corrupt: Sequence[Sequence[int]],
        answer: Sequence[int],
        wrong: Sequence[int | Sequence[int]],
        answer_pos: Sequence[int] | None = None,
        *,
        pad_id: int = 0,
        name: str = "pairs",
        texts: Sequence[tuple[str, str]] | None = None,
        row_labels: Sequence[str] | None = None,
    ) -> "PromptPairs":
        """Build from token lists; checks each pair's lengths and names the offending row."""
        n = len(clean)
        if not (len(corrupt) == len(answer) == len(wrong) == n):
            raise DataError(f"{name}: clean, corrupt, answer and wrong need the same number of rows")
        if n == 0:
            raise DataError(f"{name}: no prompt pairs")
        labels = row_labels or [f"pair {i}" for i in range(n)]
        for i in range(n):
            if len(clean[i]) != len(corrupt[i]):
                raise DataError(
                    f"{name}, {labels[i]}: clean is {len(clean[i])} tokens but corrupt is {len(corrupt[i])}; "
                    "rewrite the corrupt prompt so both tokenize to the same length"
                )
            if len(clean[i]) == 0:
                raise DataError(f"{name}, {labels[i]}: empty prompt")
        lengths = [len(c) for c in clean]
        T = max(lengths)
        def pad(rows: Sequence[Sequence[int]]) -> torch.Tensor:
            out = torch.full((n, T), pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            return out
        wrong_lists = [[w] if isinstance(w, int) else list(w) for w in wrong]
        K = max(len(w) for w in wrong_lists)
        wrong_t = torch.full((n, K), -1, dtype=torch.long)
        for i, w in enumerate(wrong_lists):
            if not w:
                raise DataError(f"{name}, {labels[i]}: no wrong-answer token")
            wrong_t[i, : len(w)] = torch.tensor(w)
        pos = torch.tensor(list(answer_pos)) if answer_pos is not None else torch.tensor(lengths) - 1
        return cls(pad(clean), pad(corrupt), torch.tensor(list(answer), dtype=torch.long), wrong_t,
                   pos.long(), torch.tensor(lengths), pad_id, name, tuple(texts) if texts is not None else None,
                   tuple(row_labels) if row_labels is not None else None)

    @classmethod
    def from_tokens(cls, clean: torch.Tensor, corrupt: torch.Tensor, answer: torch.Tensor | Sequence[int],
                    wrong: torch.Tensor | Sequence[int] | Sequence[Sequence[int]], *,
                    answer_pos: torch.Tensor | Sequence[int] | None = None,
                    lengths: torch.Tensor | Sequence[int] | None = None, pad_id: int = 0,
                    name: str = "pairs") -> "PromptPairs":
        """Pairs from token tensors ``clean``/``corrupt`` ``[pairs, positions]``, one answer id per
        pair and one or more wrong ids per pair (``[pairs]`` or ``[pairs, k]``, ``-1`` = unused slot).

        ``lengths`` default to the full width (no padding) and ``answer_pos`` to the last real
        token of each pair; pass them for right-padded batches.
        """
        c, x = torch.as_tensor(clean), torch.as_tensor(corrupt)
        if c.dim() != 2 or c.shape != x.shape:
            raise DataError(f"{name}: clean and corrupt must be [pairs, positions] tensors of one shape, "
                            f"got {tuple(c.shape)} and {tuple(x.shape)}")
        n, T = c.shape
        lens = torch.full((n,), T) if lengths is None else torch.as_tensor(lengths).long()
        pos = lens - 1 if answer_pos is None else torch.as_tensor(answer_pos).long()
        return cls(c.long(), x.long(), torch.as_tensor(answer).long().reshape(-1), torch.as_tensor(wrong).long(),
                   pos, lens, pad_id, name)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def n_positions(self) -> int:
        return int(self.clean.shape[1])

    @property
    def equal_lengths(self) -> bool:
        return bool((self.lengths == self.lengths[0]).all())

    def subset(self, rows: Sequence[int] | torch.Tensor) -> "PromptPairs":
        """The pairs at ``rows`` (padding trimmed to the longest kept pair)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        T = int(self.lengths[idx].max())
        texts = tuple(self.texts[i] for i in idx.tolist()) if self.texts is not None else None
        labels = tuple(self.label(i) for i in idx.tolist())
        return PromptPairs(self.clean[idx, :T], self.corrupt[idx, :T], self.answer[idx], self.wrong[idx],
                           self.answer_pos[idx], self.lengths[idx], self.pad_id, self.name, texts, labels)

    def batch(self, rows: torch.Tensor, direction: Direction | str = Direction.NOISING) -> PairBatch:
        """Rows as a :class:`PairBatch` (trimmed to their longest sequence)."""
        d = Direction(direction)
        T = int(self.lengths[rows].max())
        clean, corrupt = self.clean[rows, :T], self.corrupt[rows, :T]
        base, source = (clean, corrupt) if d is Direction.NOISING else (corrupt, clean)
        return PairBatch(base, source, clean, self.answer[rows], self.wrong[rows], self.answer_pos[rows],
                         self.lengths[rows], rows, d)

    def batches(self, batch_size: int, direction: Direction | str = Direction.NOISING,
                same_length: bool = False, rows: torch.Tensor | None = None) -> Iterator[PairBatch]:
        """Consecutive batches of ``rows`` (default: every pair); ``same_length`` groups pairs of
        equal length (needed by position-resolved results and by bidirectional models, where
        padding is visible)."""
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        order = torch.arange(len(self)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if same_length:
            order = order[torch.sort(self.lengths[order], stable=True).indices]
        chunk: list[int] = []
        for i in order.tolist():
            if chunk and (len(chunk) == batch_size or (same_length and self.lengths[i] != self.lengths[chunk[0]])):
                yield self.batch(torch.tensor(chunk), direction)
                chunk = []
            chunk.append(i)
        if chunk:
            yield self.batch(torch.tensor(chunk), direction)
