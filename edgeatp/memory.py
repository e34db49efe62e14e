"""What a prompt pair costs in memory during attribution, and keeping activation caches off the device.

A gradient method holds, per prompt pair: the source run's cached activations, the base run's
(kept on the autograd graph for the backward pass), the gradients of every backward pass (GradDrop
makes one per dropped unit) and the autograd graph of the base forward itself.
:func:`cache_mb_per_pair` and :func:`saved_bytes` estimate that from the model's shape and config
(the cost planner, :mod:`edgeatp.plan`, uses the same figures), so batches shrink until they fit
``memory_budget_mb``. When a single pair does not fit, :class:`HostCache` keeps the cached
activations and gradients in host memory and hands each one to the device when it is read
(``offload``): slower, but a model whose caches do not fit beside it still runs.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Iterable, Protocol

from .graph import ModelShape

if TYPE_CHECKING:  # the cost planner reads this module without torch
    import torch

    from .plan import ModelSpec

MB = 2 ** 20


class SiteLike(Protocol):
    """A named activation (:class:`edgeatp.model.Site`, or the planner's torch-free stand-in)."""

    @property
    def kind(self) -> str: ...


def site_numel(shape: ModelShape, site: SiteLike, n_positions: int) -> int:
    """Elements one prompt pair of ``n_positions`` tokens holds at a site."""
    T, d, H, dh = n_positions, shape.d_model, shape.n_heads, shape.d_head
    kv = shape.n_kv_heads or H
    per_kind = {"resid_pre": T * d, "attn_out": T * d, "mlp_out": T * d, "mlp_in": T * d, "resid_final": T * d,
                "q": T * H * dh, "rot_q": T * H * dh, "z": T * H * dh, "k": T * kv * dh, "v": T * kv * dh,
                "rot_k": T * kv * dh, "scores": H * T * T, "pattern": H * T * T, "mlp_post": T * (shape.d_mlp or 0),
                "attn_post_scale": T, "mlp_post_scale": T}
    return per_kind[site.kind]


def saved_bytes(spec: ModelSpec, rows: int, T: int, edge: bool, qk: bool) -> int:
    """Bytes a backward-able forward keeps for the backward besides its cached sites (weights frozen):
    the norms' centred inputs, q/k/v as the products read them, scores and pattern, the MLP's hidden
    values (the inputs of each op of a composite nonlinearity) and the logits; for edges also the hooked residuals and q/k/v edgeatp differentiates at.
    Fitted to what TransformerLens models save with frozen weights (``tests/test_memory.py``,
    ``tests/test_plan.py``)."""
    s = spec.shape
    d, dh, H, kv, dt = s.d_model, s.d_head, s.n_heads, s.kv_heads, spec.dtype_bytes
    ln = spec.norm in ("LN", "LNPre")  # LayerNorm keeps x - mean per call; RMSNorm keeps x itself
    residuals = 1 if s.attn_only else 2  # a block's output and its MLP's input
    token = ((3 if s.attn_only else 4) * d if ln else 0) + 3 * H * dh
    token += (3 if spec.gated_mlp else 5 if spec.composite_activation else 1) * spec.d_mlp
    if edge:
        token += residuals * d + (H + 2 * kv) * dh
    elif not ln:
        token += residuals * d
    row = s.n_layers * (T * token * dt + H * T * T * ((3 if qk else 2) * dt + 1))  # scores, pattern, mask
    row += T * ((d if ln else 0) + spec.d_vocab_out) * dt
    return rows * row


def gradient_run_flags(base: Iterable[SiteLike], grad: Iterable[SiteLike]) -> tuple[bool, bool]:
    """Whether a gradient run reading ``base`` and differentiating at ``grad`` takes reader-input
    gradients (edges: block inputs cached, MLP inputs or the final residual differentiated) and pattern
    gradients (the QK fix) — what :func:`saved_bytes` calls ``edge`` and ``qk``."""
    base_kinds, grad_kinds = {s.kind for s in base}, {s.kind for s in grad}
    return "resid_pre" in base_kinds or bool(grad_kinds & {"mlp_in", "resid_final"}), "pattern" in grad_kinds


def cache_mb_per_pair(shape: ModelShape, element_size: int, n_positions: int, act: Iterable[SiteLike],
                      base: Iterable[SiteLike], grad: Iterable[SiteLike], passes: int) -> float:
    """Megabytes of cached activations and gradients one prompt pair holds in a gradient run:
    ``act`` sites in both runs, ``base`` sites in the base run, gradients at ``grad`` sites for
    each of ``passes`` backward passes."""
    T = n_positions
    cached = 2 * sum(site_numel(shape, s, T) for s in set(act)) + sum(site_numel(shape, s, T) for s in set(base))
    return element_size * (cached + passes * sum(site_numel(shape, s, T) for s in set(grad))) / MB


class HostCache(MutableMapping):
    """Cached tensors kept in host memory; reading one gives a copy on the device it came from."""

    def __init__(self) -> None:
        self._kept: dict = {}

    def __setitem__(self, key: object, value: torch.Tensor) -> None:
        self._kept[key] = (value.detach().cpu(), value.device)

    def __getitem__(self, key: object) -> torch.Tensor:
        value, device = self._kept[key]
        return value.to(device, non_blocking=True)

    def __delitem__(self, key: object) -> None:
        del self._kept[key]

    def __iter__(self) -> Iterator:
        return iter(self._kept)

    def __len__(self) -> int:
        return len(self._kept)
