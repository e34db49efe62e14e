"""The AtP* QK fix as pure tensor math (no model): exact softmax recomputation for patched
queries and keys, linearised only after the attention probabilities.

Shapes: scores and probabilities are ``[..., T_query, T_key]``; masked entries of the clean
scores are ``-inf``. ``G`` is ``dL/dA`` on the base run. Every function returns the estimated
change of the metric, never NaN: masked entries and degenerate rows contribute 0, and tiny
probabilities are never clamped (a key at 1e-20 can become dominant after the patch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _masked(S: torch.Tensor) -> torch.Tensor:
    return torch.isneginf(S)


def softmax_change(S: torch.Tensor, S_new: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``softmax(S_new) − A`` with masked entries (``-inf`` in ``S``) and fully masked rows at 0."""
    mask = _masked(S)
    S_new = S_new.masked_fill(mask, float("-inf"))
    A_new = torch.softmax(S_new, dim=-1)
    return torch.where(mask | torch.isnan(A_new), torch.zeros_like(A_new), A_new - A)


def per_query(dA: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``[..., T_query]``: each query row's effect ``Σ_s G[t, s] ΔA[t, s]`` of a softmax change ``dA``."""
    return (dA * G).sum(-1)


def joint(dA: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``[...]``: the whole pattern's effect ``Σ_{t,s} G ΔA`` of a softmax change ``dA``."""
    return (dA * G).sum((-1, -2))


def query_fix(S: torch.Tensor, S_new: torch.Tensor, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Per-query estimates ``[..., T_query]``: each row recomputed with its patched query (E5).

    ``S_new[t, s]`` is the score of the patched query ``t`` against the clean key ``s``; rows
    are independent, so one softmax gives every single-query patch at once.
    """
    return per_query(softmax_change(S, S_new, A), G)


def joint_fix(S: torch.Tensor, S_new: torch.Tensor, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Estimate ``[...]`` for patching all queries and/or all keys of a head at once (exact softmax)."""
    return joint(softmax_change(S, S_new, A), G)


def _exclusive_lse(x: torch.Tensor) -> torch.Tensor:
    """Leave-one-out log-sum-exp along the last axis: ``out[..., s] = LSE_{r != s} x[..., r]``, O(T)."""
    neg = torch.full_like(x[..., :1], float("-inf"))
    prefix = torch.cat([neg, torch.logcumsumexp(x, -1)[..., :-1]], -1)
    suffix = torch.cat([torch.logcumsumexp(x.flip(-1), -1).flip(-1)[..., 1:], neg], -1)
    return torch.logaddexp(prefix, suffix)


@dataclass(frozen=True)
class KeyShift:
    """The part of the key fix that does not depend on the gradient: where it applies, the
    leave-one-out log-normaliser of each entry, and each key's probability change ``a' − a``."""

    finite: torch.Tensor
    lse_wo: torch.Tensor
    da: torch.Tensor


def key_shift(S: torch.Tensor, delta: torch.Tensor) -> KeyShift:
    """Probability changes of single-key patches (sigmoid of leave-one-out logits; see :func:`key_fix_terms`)."""
    mask = _masked(S)
    lse_wo = _exclusive_lse(S)
    finite = ~mask & torch.isfinite(lse_wo)
    logit_a = torch.where(finite, S - lse_wo, torch.zeros_like(S))
    da = torch.sigmoid(logit_a + torch.where(finite, delta, torch.zeros_like(delta))) - torch.sigmoid(logit_a)
    return KeyShift(finite, torch.where(finite, lse_wo, torch.zeros_like(lse_wo)), da)


def key_fix_terms(S: torch.Tensor, delta: torch.Tensor, G: torch.Tensor, shift: KeyShift | None = None) -> torch.Tensor:
    """``E[t, s]``: effect through query row ``t`` of patching key ``s`` alone (closed form of E6/E7).

    ``delta[t, s]`` is the change of score ``(t, s)`` when key ``s`` is patched. Under that patch
    key ``s``'s probability becomes ``sigmoid(logit(a) + delta)`` and every other key of the row
    is rescaled by one factor, so the row's effect is ``(a' − a)(G_s − Ḡ_{¬s})`` where ``Ḡ_{¬s}``
    is the attention-weighted mean of ``G`` over the other keys. Logits and ``Ḡ`` come from
    leave-one-out log-sum-exps (prefix/suffix, positive and negative parts of ``G`` apart),
    so saturated rows and sub-epsilon probabilities keep full precision. Pass ``shift``
    (from :func:`key_shift`) to reuse the gradient-free part across several ``G``.
    """
    ks = shift if shift is not None else key_shift(S, delta)
    ninf = torch.tensor(float("-inf"), dtype=S.dtype, device=S.device)
    pos = torch.where(G > 0, S + torch.log(G.clamp(min=0)), ninf)
    neg = torch.where(G < 0, S + torch.log((-G).clamp(min=0)), ninf)
    g_bar = torch.exp(_exclusive_lse(pos) - ks.lse_wo) - torch.exp(_exclusive_lse(neg) - ks.lse_wo)
    E = ks.da * (G - g_bar)
    return torch.where(ks.finite, E, torch.zeros_like(E))


def key_fix(S: torch.Tensor, delta: torch.Tensor, G: torch.Tensor, shift: KeyShift | None = None) -> torch.Tensor:
    """Per-key estimates ``[..., T_key]``: the key-fix terms summed over the queries that see each key."""
    return key_fix_terms(S, delta, G, shift).sum(-2)
