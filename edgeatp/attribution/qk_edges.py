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
            W = self.proj.W.to(dtype)
            self.W = _centre(W.T).T if self.proj.centred else W  # C W: centring folded into the projection
            self.bias = self.proj.b.to(dtype)
            self.xc = _centre(self.x) if self.proj.centred else self.x
            self.P0 = (self.x @ self.W)[:, :, None, :]
            self.xx = self.xc.pow(2).sum(-1)[:, :, None]  # [b, T', 1]

    def patched(self, chunk: WriterChunk) -> torch.Tensor:
        """``[b, c, T', n, d_head]`` pre-rotary inputs when each chunk writer's difference is added."""
        chunk = chunk.to(self.x.device)
        b, T, c = self.x.shape[0], self.x.shape[1], chunk.delta.shape[2]
        proj = self.proj
        if proj is None:  # a norm without a closed form: project every patched residual exactly
            new = self.model.qkv_all_heads(self.layer, self.kind, self.x[:, :, None, :] + chunk.delta, self.heads)
            return new.to(self.x.dtype).permute(0, 2, 1, 3, 4)
        delta = chunk.delta
        if chunk.basis is not None and _factored_is_cheaper(chunk.basis.shape[1], self.x.shape[-1], b * T):
            composed = (chunk.basis.reshape(-1, delta.shape[-1]) @ self.W).view(c, chunk.basis.shape[1], -1)
            new = torch.einsum("btcr,crx->btcx", chunk.coef, composed).add_(self.P0)
        else:
            new = (delta @ self.W).add_(self.P0)
        if proj.scaled:  # |C(x + Δ)|² = |Cx|² + 2 Cx·Δ + |Δ|² - d mean(Δ)², without forming C(x + Δ)
            sq = torch.einsum("btd,btcd->btc", self.xc, delta).mul_(2).add_(self.xx)
            sq.add_(torch.einsum("btcd,btcd->btc", delta, delta))
            if proj.centred:
                sq.sub_(delta.mean(-1).pow(2).mul_(delta.shape[-1]))
            new.div_(sq.div_(delta.shape[-1]).clamp_(min=0).add_(proj.eps).sqrt_()[..., None])
        new.add_(self.bias)
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


def _patched_heads(inputs: ReaderInputs, qheads: torch.Tensor, chunk: WriterChunk) -> tuple[torch.Tensor, int]:
    """The readers' post-rotary queries or keys with each chunk writer's difference added, one per
    query head of ``qheads`` (a shared key head repeated to each of its group), ``[b, c·T', n_q, e]``,
    and the chunk's writer count ``c``."""
    new = inputs.patched(chunk)
    b, c, Tp, n, e = new.shape
    new = inputs.model.rotate(inputs.layer, new.reshape(b * c, Tp, n, e), offset=inputs.start).view(b, c, Tp, n, e)
    return new.repeat_interleave(len(qheads) // n, dim=3).reshape(b, c * Tp, len(qheads), e), c


def score_shifts(inputs: ReaderInputs, qheads: torch.Tensor, Q: torch.Tensor, K: torch.Tensor, F0: torch.Tensor,
                 chunk: WriterChunk) -> torch.Tensor:
    """``[b, c, n_q, T', T]`` changes of the scores of query heads ``qheads`` (query rows from the
    first differing position) when each chunk writer's difference enters the readers' inputs.

    ``Q``, ``K`` are the base run's post-rotary queries and keys of ``qheads`` ``[b, T, n_q, e]``
    (keys repeated per query head), ``F0`` their unmasked scores ``[b, n_q, T, T]``. A shared key
    head feeds every query head of its group, so its patched key is repeated to each of them.
    """
    model, layer, start = inputs.model, inputs.layer, inputs.start
    new, c = _patched_heads(inputs, qheads, chunk)
    b, Tp = new.shape[0], new.shape[1] // c
    if inputs.kind == "q":
        F = model.attention_score_fn(layer, new, K).unflatten(2, (c, Tp)).transpose(1, 2)
        return F - F0[:, None, :, start:, :]
    F = model.attention_score_fn(layer, Q[:, start:], new).unflatten(3, (c, Tp)).permute(0, 3, 1, 2, 4)
    shift = F.new_zeros(b, c, len(qheads), Tp, K.shape[1])
    shift[..., start:] = F - F0[:, None, :, start:, start:]
    return shift


@dataclass(frozen=True)
class BaseScores:
    """The base run's scores of some query heads, query rows from the first differing position
    ``[b, n_q, T', T]`` (masked entries ``-inf``; rows with every key masked set to 0, with their
    gradients, so they add nothing and no NaN), and ``D = F0 - S`` on these rows: ``F - D`` are
    the patched scores ``F`` moved by the model's own rounding of the base ones."""

    S: torch.Tensor
    D: torch.Tensor
    dead: torch.Tensor
    scale_on: str

    @classmethod
    def of(cls, inputs: ReaderInputs, S: torch.Tensor, Q: torch.Tensor, K: torch.Tensor) -> "BaseScores":
        """From the model's scores ``S`` ``[b, n_q, T', T]`` and the inputs' base queries and keys
        (see :meth:`ReaderInputs.unpatched`), recomputed with the scale on the side the writers
        do not move (the smaller operand of every chunk's scores)."""
        scale_on = "k" if inputs.kind == "q" else "q"
        F0 = inputs.model.attention_score_fn(inputs.layer, Q[:, inputs.start:], K, scale_on)
        dead = torch.isneginf(S).all(-1, keepdim=True)
        S = S.masked_fill(dead, 0.0)
        return cls(S, F0 - S, dead, scale_on)


def patched_scores(inputs: ReaderInputs, qheads: torch.Tensor, Q: torch.Tensor, K: torch.Tensor, base: BaseScores,
                   chunk: WriterChunk) -> torch.Tensor:
    """The scores of query heads ``qheads`` when each chunk writer's difference enters the readers'
    inputs: ``[b, n_q, c, T', T]`` for query readers, ``[b, n_q, T', c, T]`` for key readers (the
    layouts in which :func:`contract` is one batched product). Masked entries stay ``-inf``.

    ``Q``, ``K`` as in :func:`score_shifts`; queries before the first differing position see only
    unmoved keys, so only rows from it are returned.
    """
    model, layer, start = inputs.model, inputs.layer, inputs.start
    new, c = _patched_heads(inputs, qheads, chunk)
    b, Tp, nq, T = new.shape[0], new.shape[1] // c, len(qheads), K.shape[1]
    if inputs.kind == "q":
        return model.attention_score_fn(layer, new, K, base.scale_on).view(b, nq, c, Tp, T).sub_(base.D[:, :, None])
    F = model.attention_score_fn(layer, Q[:, start:], new, base.scale_on).view(b, nq, Tp, c, Tp)
    X = F.new_empty(b, nq, Tp, c, T)
    X[..., :start] = base.S[:, :, :, None, :start]
    torch.sub(F, base.D[:, :, :, None, start:], out=X[..., start:])
    return X


def contract(P: torch.Tensor, G: torch.Tensor, kind: str) -> torch.Tensor:
    """``[b, n_q, c, p]``: ``Σ_{t,s} P[t, s] G[t, s, p]`` for every chunk writer and gradient pass,
    one batched matrix product; ``P`` in :func:`patched_scores`' layout, ``G`` ``[b, n_q, T', T, p]``."""
    if kind == "q":
        b, n, c, Tp, T = P.shape
        return torch.bmm(P.view(b * n, c, Tp * T), G.view(b * n, Tp * T, -1)).view(b, n, c, -1)
    b, n, Tp, c, T = P.shape
    return torch.bmm(P.view(b * n * Tp, c, T), G.view(b * n * Tp, T, -1)).view(b, n, Tp, c, -1).sum(2)
