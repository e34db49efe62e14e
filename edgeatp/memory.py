"""What a prompt pair costs in memory during attribution, and keeping activation caches off the device.

A gradient method holds, per prompt pair: the source run's cached activations, the base run's
(kept on the autograd graph for the backward pass), the gradients of every backward pass (GradDrop
makes one per dropped unit) and the autograd graph of the base forward itself.
:func:`cache_mb_per_pair` and :func:`saved_bytes` estimate that from the model's shape and config
(the cost planner, :mod:`edgeatp.plan`, uses the same figures), so batches shrink until they fit
``memory_budget_mb``. When a single pair does not fit, :class:`HostCache` keeps the cached
activations and gradients in host memory and hands each one to the device when it is read
(``offload``): slower, but a model whose caches do not fit beside it still runs.

Exact patching stacks patch sets along the batch axis (one row = one pair under one set); what one
such forward holds per row is :class:`PatchLoad` plus :func:`forward_row_bytes`, and
:func:`fit_sweep` picks the pairs per batch and sets per forward that keep a sweep within the budget
(patching, verification, faithfulness and the circuit search use it, and so does the planner).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Protocol

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


@dataclass(frozen=True)
class PatchLoad:
    """Numbers a sweep's patch sets make it hold beyond a plain forward: per pair, the source run's
    cached sites (``source``, kept through the pair batch); per stacked row, ``fixed`` whatever the
    sets, plus ``per_set`` for each distinct set stacked in the forward up to ``touched`` (what a site
    reached by any set costs is made for every row); ``mask_bytes`` per row; and ``copies``, the weight
    copies a forward keeps (a differentiable one keeps TransformerLens' copies for its backward)."""

    source: int = 0
    fixed: int = 0
    per_set: int = 0
    touched: int = 0
    mask_bytes: int = 0
    copies: int = 0


def edge_patch_load(shape: ModelShape, n_positions: int, width: int, set_writers: int, touched_writers: int,
                    moved: int, readers: int, mask_entries: int) -> PatchLoad:
    """:class:`PatchLoad` of edge patches (:class:`edgeatp.patching.EdgePatch`): ``width`` numbers per
    token of the writers' sites, cached in the source run, gathered per row and recorded in the patched
    run; every residual a q/k/v reader reads; the writers' source-minus-current writes ``[T, n, d]`` of
    each site a set reaches (``set_writers`` writers at most per set, ``touched_writers`` over all
    sets); at a reader site, the writes of the writers a set moves twice (gathered and joined;
    ``moved`` at most) and the private input of each reader it moves, normalised (``readers`` at most);
    the ``[P, W, R]`` boolean mask (``mask_entries``)."""
    T, d = n_positions, shape.d_model
    fixed = T * (2 * width + shape.n_layers * d + 2 * moved * d + 4 * readers * d)
    return PatchLoad(T * width, fixed, T * set_writers * d, T * touched_writers * d, mask_entries)


def node_patch_load(source: int, per_set: int) -> PatchLoad:
    """:class:`PatchLoad` of node patches (:class:`edgeatp.patching.NodePatch`): the ``source`` numbers
    per pair of the sites any set patches, cached in the source run; per row, each site a set of the
    forward reaches gathered from them, and its patched copy made while the original still lives
    (``per_set`` numbers at most per set)."""
    return PatchLoad(source, 0, 3 * per_set, 3 * source, 0)


def forward_row_bytes(spec: ModelSpec, n_positions: int) -> int:
    """Bytes one row of a forward without gradients holds at its largest: its logits and the largest
    of the unembedding's output, a block's activations and the MLP's hidden values."""
    s, T = spec.shape, n_positions
    layer = T * (6 * s.d_model + 3 * s.n_heads * s.d_head) + 3 * s.n_heads * T * T
    return spec.dtype_bytes * (max(T * spec.d_vocab_out, layer, 3 * T * spec.d_mlp) + T * spec.d_vocab_out)


def forward_copies(spec: ModelSpec) -> int:
    """Bytes of the largest weight copy a forward without gradients makes (each lives for one product):
    TransformerLens 3.9's rearranged attention projections, transposed gated-MLP matrices and
    contiguous unembedding."""
    s = spec.shape
    return spec.dtype_bytes * s.d_model * max(spec.d_vocab_out, s.n_heads * s.d_head, spec.d_mlp if spec.gated_mlp else 0)


def sweep_bytes(spec: ModelSpec, n_positions: int, load: PatchLoad, pairs: int, sets: int, offload: bool) -> int:
    """Device bytes of a sweep's pair batch of ``pairs`` pairs at a forward of ``sets`` stacked patch
    sets: the source run's cache (unless offloaded), what each row of the patched forward holds and
    the forward's weight copies."""
    dt = spec.dtype_bytes
    row = dt * (load.fixed + min(load.touched, sets * load.per_set)) + load.mask_bytes \
        + forward_row_bytes(spec, n_positions)
    copies = max(forward_copies(spec), dt * load.copies)
    return pairs * (0 if offload else dt * load.source) + pairs * sets * row + copies


def fit_sweep(spec: ModelSpec, n_positions: int, load: PatchLoad, n_pairs: int, batch_size: int,
              budget_mb: float, offload: bool) -> tuple[int, int]:
    """Pairs per batch and patch sets per forward of a sweep: as many pairs as ``batch_size`` allows,
    then sets up to ``batch_size`` rows, each cut (to no fewer than one) until :func:`sweep_bytes`
    fits ``budget_mb``."""
    fits = lambda pairs, sets: sweep_bytes(spec, n_positions, load, pairs, sets, offload) <= budget_mb * MB  # noqa: E731
    pairs = _largest(min(n_pairs, batch_size), lambda p: fits(p, 1))
    return pairs, _largest(max(1, batch_size // pairs), lambda k: fits(pairs, k))


def _largest(top: int, ok: Callable[[int], bool]) -> int:
    """The largest ``n`` in ``1 … top`` with ``ok(n)`` (``ok`` falls as ``n`` grows), or 1."""
    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


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
