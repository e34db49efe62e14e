"""Score shifts of the edge QK fix: how each writer's difference, entering one reader's query or
key input alone, moves the attention scores of the query heads that read that input — exactly.

The norm in front of a projection is linear up to one scale per position, so the patched
projection of ``x + Δ`` is ``(P(x) + P(Δ)) / s(x + Δ) + b`` with ``P(y) = (C y) W``: ``P(x)`` is
computed once per reader group, the scales are norms of ``x + Δ``, and ``P(Δ)`` — the one large
product — comes from the writers' low-rank factors when that is cheaper (a head writes with rank
``d_head``, a neuron with rank one: ``P(Δ) = coef · (C basis) W``). Positions before the first one
where any pair's two prompts differ are skipped: every writer's difference is zero there, so
their queries and keys do not move.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import torch

from ..model import ModelAdapter, Site, WriterLayout


@dataclass(frozen=True)
class WriterChunk:
    """Some writers of one site: graph indices, dense differences ``[b, T', c, d]`` from the first
    differing position, and their factors (coefficients ``[b, T', c, r]``, basis ``[c, r, d]`` or
    ``None`` for dense writers)."""

    writers: torch.Tensor
    delta: torch.Tensor
    coef: torch.Tensor
    basis: torch.Tensor | None

    def to(self, device: torch.device) -> "WriterChunk":
        """The chunk on ``device`` (a split model's readers may live on a later device than the writers)."""
        if self.delta.device == device:
            return self
        return replace(self, delta=self.delta.to(device), coef=self.coef.to(device),
                       basis=None if self.basis is None else self.basis.to(device))


def first_difference(delta: torch.Tensor) -> int:
    """The first position where any writer's difference is non-zero in any pair (``T`` if none)."""
    moved = delta.abs().amax(dim=(0, 2, 3)) > 0
    return int(moved.nonzero()[0, 0]) if bool(moved.any()) else delta.shape[1]


def writer_chunks(layout: WriterLayout, factors: dict[Site, tuple[torch.Tensor, torch.Tensor | None]],
                  delta: torch.Tensor, writers: torch.Tensor, start: int, size: int) -> Iterator[WriterChunk]:
    """The given graph writers, site by site, in chunks of at most ``size`` (``factors``: each
    writer site's :meth:`WriterLayout.factors` of this batch)."""
    wanted = set(writers.tolist())
    for site, (idx, _) in layout.groups.items():
        pos = [k for k, w in enumerate(idx) if w in wanted]
        if not pos:
            continue
        coef, basis = factors[site]
        for lo in range(0, len(pos), size):
            sel = torch.tensor(pos[lo: lo + size])
            ws = torch.tensor(idx)[sel]
            d = delta[:, start:, ws.to(delta.device)]
            c = coef[:, start:, sel.to(coef.device)].to(d.dtype) if basis is not None else d
            yield WriterChunk(ws, d, c, basis[sel.to(basis.device)].to(d.dtype) if basis is not None else None)


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def _factored_is_cheaper(rank: int, d_model: int, rows: int) -> bool:
    """Whether ``coef · (basis W)`` costs fewer multiplications than ``(coef · basis) W`` for ``rows`` rows."""
    return rank * (d_model + rows) < rows * d_model


class ReaderInputs:
    """The query (or key) inputs of some heads of one layer, ready to take writer differences:
    the base residual from the first differing position and its projection, computed once."""

    def __init__(self, model: ModelAdapter, layer: int, kind: str, heads: torch.Tensor, resid: torch.Tensor,
                 start: int, dtype: torch.dtype) -> None:
        self.model, self.layer, self.kind, self.heads, self.start = model, layer, kind, heads, start
        self.x = resid[:, start:].to(dtype)
        self.proj = model.normed_projection(layer, kind, heads, dtype)
        if self.proj is not None:
            self.W, self.bias = self.proj.W.to(dtype), self.proj.b.to(dtype)
            self.xc = _centre(self.x) if self.proj.centred else self.x
            self.P0 = (self.xc @ self.W)[:, :, None, :]

    def patched(self, chunk: WriterChunk) -> torch.Tensor:
        """``[b, c, T', n, d_head]`` pre-rotary inputs when each chunk writer's difference is added."""
        chunk = chunk.to(self.x.device)
        b, T, c = self.x.shape[0], self.x.shape[1], chunk.delta.shape[2]
        proj = self.proj
        if proj is None:  # a norm without a closed form: project every patched residual exactly
            new = self.model.qkv_all_heads(self.layer, self.kind, self.x[:, :, None, :] + chunk.delta, self.heads)
            return new.to(self.x.dtype).permute(0, 2, 1, 3, 4)
        dc = _centre(chunk.delta) if proj.centred else chunk.delta
        if chunk.basis is not None and _factored_is_cheaper(chunk.basis.shape[1], self.x.shape[-1], b * T):
            basis = _centre(chunk.basis) if proj.centred else chunk.basis
            composed = (basis.reshape(-1, basis.shape[-1]) @ self.W).view(c, basis.shape[1], -1)  # [c, r, X]
            new = self.P0 + torch.einsum("btcr,crx->btcx", chunk.coef, composed)
        else:
            new = self.P0 + dc @ self.W
        if proj.scaled:
            new = new / ((self.xc[:, :, None, :] + dc).pow(2).mean(-1, keepdim=True) + proj.eps).sqrt()
        new = new + self.bias
        return new.view(b, T, c, len(self.heads), -1).permute(0, 2, 1, 3, 4)

    def unpatched(self, qheads: torch.Tensor, Q: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The base run's post-rotary queries and keys of ``qheads`` ``[b, T, n_q, e]`` with these
        readers' inputs from the first differing position recomputed the way :meth:`patched` computes
        them, so that the score shifts of a low-precision model do not count its rounding as a change."""
        zero = self.x.new_zeros(*self.x.shape[:2], 1, self.x.shape[-1])
        new = self.patched(WriterChunk(torch.zeros(1, dtype=torch.long), zero, zero, None))[:, 0]  # [b, T', n, e]
        new = self.model.rotate(self.layer, new, offset=self.start)
        new = new.repeat_interleave(len(qheads) // len(self.heads), dim=2)
        out = (Q if self.kind == "q" else K).clone()
        out[:, self.start:] = new
        return (out, K) if self.kind == "q" else (Q, out)


def score_shifts(inputs: ReaderInputs, qheads: torch.Tensor, Q: torch.Tensor, K: torch.Tensor, F0: torch.Tensor,
                 chunk: WriterChunk) -> torch.Tensor:
    """``[b, c, n_q, T', T]`` changes of the scores of query heads ``qheads`` (query rows from the
    first differing position) when each chunk writer's difference enters the readers' inputs.

    ``Q``, ``K`` are the base run's post-rotary queries and keys of ``qheads`` ``[b, T, n_q, e]``
    (keys repeated per query head), ``F0`` their unmasked scores ``[b, n_q, T, T]``. A shared key
    head feeds every query head of its group, so its patched key is repeated to each of them.
    """
    model, layer, start = inputs.model, inputs.layer, inputs.start
    new = inputs.patched(chunk)
    b, c, Tp, n, e = new.shape
    new = model.rotate(layer, new.reshape(b * c, Tp, n, e), offset=start).view(b, c, Tp, n, e)
    new = new.repeat_interleave(len(qheads) // n, dim=3).reshape(b, c * Tp, len(qheads), e)
    if inputs.kind == "q":
        F = model.attention_score_fn(layer, new, K).unflatten(2, (c, Tp)).transpose(1, 2)
        return F - F0[:, None, :, start:, :]
    F = model.attention_score_fn(layer, Q[:, start:], new).unflatten(3, (c, Tp)).permute(0, 3, 1, 2, 4)
    shift = F.new_zeros(b, c, len(qheads), Tp, K.shape[1])
    shift[..., start:] = F - F0[:, None, :, start:, start:]
    return shift
