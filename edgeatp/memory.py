"""What a prompt pair costs in memory during attribution, and keeping activation caches off the device.

A gradient method holds, per prompt pair: the source run's cached activations, the base run's
(kept on the autograd graph for the backward pass), the gradients of every backward pass (GradDrop
makes one per dropped unit) and the autograd graph of the base forward itself.
:func:`cache_mb_per_pair` estimates that from the model's shape, so batches shrink until they fit
``memory_budget_mb``. When a single pair does not fit, :class:`HostCache` keeps the cached
activations and gradients in host memory and hands each one to the device when it is read
(``offload``): slower, but a model whose caches do not fit beside it still runs.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Iterable

import torch

from .graph import ModelShape
from .model import Site

MB = 2 ** 20


def site_numel(shape: ModelShape, site: Site, n_positions: int) -> int:
    """Elements one prompt pair of ``n_positions`` tokens holds at a site."""
    T, d, H, dh = n_positions, shape.d_model, shape.n_heads, shape.d_head
    kv = shape.n_kv_heads or H
    per_kind = {"resid_pre": T * d, "attn_out": T * d, "mlp_out": T * d, "mlp_in": T * d, "resid_final": T * d,
                "q": T * H * dh, "rot_q": T * H * dh, "z": T * H * dh, "k": T * kv * dh, "v": T * kv * dh,
                "rot_k": T * kv * dh, "scores": H * T * T, "pattern": H * T * T, "mlp_post": T * (shape.d_mlp or 0),
                "attn_post_scale": T, "mlp_post_scale": T}
    return per_kind[site.kind]


def forward_numel(shape: ModelShape, n_positions: int, d_vocab: int) -> int:
    """Elements one forward keeps per prompt pair for the backward pass (what autograd saves: per
    layer the norms' inputs and outputs, q/k/v, scores and probabilities, head outputs and MLP
    activations), with the logits it holds meanwhile. Fitted to the tensors autograd saves in
    TransformerLens models: an upper bound within 2× (GELU and unnormalised models keep less)."""
    T, d, H, dh = n_positions, shape.d_model, shape.n_heads, shape.d_head
    kv = shape.n_kv_heads or H
    attention = T * (8 * d + 2 * (H + kv) * dh) + 3 * H * T * T
    mlp = 0 if shape.attn_only else T * (6 * d + 7 * (shape.d_mlp or 0))  # 7: gated MLPs; plain ones keep 5
    return shape.n_layers * (attention + mlp) + T * (4 * d + d_vocab) + 2 * d_vocab


def cache_mb_per_pair(shape: ModelShape, element_size: int, n_positions: int, act: Iterable[Site],
                      base: Iterable[Site], grad: Iterable[Site], passes: int) -> float:
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
