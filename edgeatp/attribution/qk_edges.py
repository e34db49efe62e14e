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

from dataclasses import dataclass
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


def first_difference(delta: torch.Tensor) -> int:
    """The first position where any writer's difference is non-zero in any pair (``T`` if none)."""
    moved = delta.abs().amax(dim=(0, 2, 3)) > 0
    return int(moved.nonzero()[0, 0]) if bool(moved.any()) else delta.shape[1]


def writer_chunks(layout: WriterLayout, source: dict[Site, torch.Tensor], base: dict[Site, torch.Tensor],
                  delta: torch.Tensor, writers: torch.Tensor, start: int, size: int) -> Iterator[WriterChunk]:
    """The given graph writers, site by site, in chunks of at most ``size``."""
    wanted = set(writers.tolist())
    for site, (idx, _) in layout.groups.items():
        pos = [k for k, w in enumerate(idx) if w in wanted]
        if not pos:
            continue
        coef, basis = layout.factors(site, source, base)
        for lo in range(0, len(pos), size):
            sel = torch.tensor(pos[lo: lo + size])
            ws = torch.tensor(idx)[sel]
            d = delta[:, start:, ws.to(delta.device)]
            c = coef[:, start:, sel.to(coef.device)].to(d.dtype) if basis is not None else d
            yield WriterChunk(ws, d, c, basis[sel.to(basis.device)].to(d.dtype) if basis is not None else None)


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def patched_inputs(model: ModelAdapter, layer: int, kind: str, heads: torch.Tensor, resid: torch.Tensor,
                   chunk: WriterChunk, start: int) -> torch.Tensor:
    """``[b, c, T', n, d_head]`` pre-rotary queries or keys of ``heads`` when each chunk writer's
    difference is added to their residual input ``resid`` ``[b, T, d]`` (positions from ``start``)."""
    dt = chunk.delta.dtype
    x = resid[:, start:].to(dt)
    b, T, c = x.shape[0], x.shape[1], chunk.delta.shape[2]
    proj = model.normed_projection(layer, kind, heads)
    if proj is None:  # a norm without a closed form: project every patched residual exactly
        new = model.qkv_all_heads(layer, kind, x[:, :, None, :] + chunk.delta, heads)
        return new.to(dt).permute(0, 2, 1, 3, 4)
    W, bias = proj.W.to(dt), proj.b.to(dt)
    xc = _centre(x) if proj.centred else x
    dc = _centre(chunk.delta) if proj.centred else chunk.delta
    new = (xc @ W)[:, :, None, :]
    if chunk.basis is not None and _factored_is_cheaper(chunk.basis.shape[1], x.shape[-1], b * T):
        basis = _centre(chunk.basis) if proj.centred else chunk.basis
        composed = (basis.reshape(-1, basis.shape[-1]) @ W).view(c, basis.shape[1], -1)  # [c, r, X]
        new = new + torch.einsum("btcr,crx->btcx", chunk.coef, composed)
    else:
        new = new + dc @ W
    if proj.scaled:
        new = new / ((xc[:, :, None, :] + dc).pow(2).mean(-1, keepdim=True) + proj.eps).sqrt()
    new = new + bias
    return new.view(b, T, c, len(heads), -1).permute(0, 2, 1, 3, 4)


def _factored_is_cheaper(rank: int, d_model: int, rows: int) -> bool:
    """Whether ``coef · (basis W)`` costs fewer multiplications than ``(coef · basis) W`` for ``rows`` rows."""
    return rank * (d_model + rows) < rows * d_model


def score_shifts(model: ModelAdapter, layer: int, kind: str, heads: torch.Tensor, qheads: torch.Tensor,
                 Q: torch.Tensor, K: torch.Tensor, F0: torch.Tensor, resid: torch.Tensor, chunk: WriterChunk,
                 start: int) -> torch.Tensor:
    """``[b, c, n_q, T', T]`` changes of the scores of query heads ``qheads`` (query rows from
    ``start``) when each chunk writer's difference enters the query (or key) input of ``heads``.

    ``Q``, ``K`` are the base run's post-rotary queries and keys of ``qheads`` ``[b, T, n_q, e]``
    (keys repeated per query head), ``F0`` their unmasked scores ``[b, n_q, T, T]``. A shared key
    head feeds every query head of its group, so its patched key is repeated to each of them.
    """
    new = patched_inputs(model, layer, kind, heads, resid, chunk, start)
    b, c, Tp, n, e = new.shape
    new = model.rotate(layer, new.reshape(b * c, Tp, n, e), offset=start).view(b, c, Tp, n, e)
    new = new.repeat_interleave(len(qheads) // n, dim=3).reshape(b, c * Tp, len(qheads), e)
    if kind == "q":
        F = model.attention_score_fn(layer, new, K).unflatten(2, (c, Tp)).transpose(1, 2)
        return F - F0[:, None, :, start:, :]
    F = model.attention_score_fn(layer, Q[:, start:], new).unflatten(3, (c, Tp)).permute(0, 3, 1, 2, 4)
    shift = F.new_zeros(b, c, len(qheads), Tp, K.shape[1])
    shift[..., start:] = F - F0[:, None, :, start:, start:]
    return shift
