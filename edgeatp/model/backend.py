"""What the adapter needs from a TransformerLens model class, and the pure math it builds on.

A :class:`Backend` wraps one TransformerLens model class — ``HookedTransformer`` (TransformerLens
3.x, :mod:`.hooked`) or ``TransformerBridge`` (TransformerLens 4.x, and 3.9's preview,
:mod:`.bridge`) — behind the same small surface: sites to hooks, a forward, the model-wide
state a run changes (restored on exit), and the weights as plain tensors (per-head projections,
output matrices) plus :class:`NormParts` descriptions of the normalisations. Everything the adapter
computes from weights is written once, here and in :mod:`.adapter`, on those tensors, so both
backends give the same numbers by construction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Sequence, Union

import torch

from ..errors import ModelError
from ..graph import ModelShape
from .sites import FwdHook, Site

#: Site kind -> TransformerLens hook name inside ``blocks.{layer}`` (both model classes use these names).
HOOK_NAMES = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v",
    "rot_q": "attn.hook_rot_q", "rot_k": "attn.hook_rot_k", "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern", "z": "attn.hook_z", "attn_out": "hook_attn_out", "mlp_in": "hook_mlp_in",
    "mlp_post": "mlp.hook_post", "mlp_out": "hook_mlp_out", "attn_post_scale": "ln1_post.hook_scale",
    "mlp_post_scale": "ln2_post.hook_scale",
}
#: Where each norm a backend describes sits: before attention, and the output norms of post-normalised blocks.
NORMS = ("ln1", "ln1_post", "ln2_post")


@dataclass(frozen=True, eq=False)
class NormParts:
    """A norm in closed form, ``y ↦ (C y) / s(y) ⊙ weight + bias``: ``centred`` (C subtracts the
    mean), ``scaled`` (``s = sqrt(mean((C y)²) + eps)``; otherwise ``s = 1``); ``None`` weight/bias
    = 1/0. LayerNorm, RMSNorm, their parameter-free variants and no norm at all, computed the way
    TransformerLens' own norms compute them."""

    centred: bool
    scaled: bool
    eps: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """``C x``: ``x − mean(x)`` for a LayerNorm, ``x`` otherwise."""
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def scale_of(self, xc: torch.Tensor) -> torch.Tensor:
        """``[..., 1]``: the normalising scale of centred residuals ``xc [..., d]``."""
        if not self.scaled:
            return torch.ones_like(xc[..., :1])
        return (xc.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xc = self.centre(x)
        out = xc / self.scale_of(xc) if self.scaled else xc
        if self.weight is not None:
            out = out * self.weight
        return out + self.bias if self.bias is not None else out

    def vjp(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``J(x)ᵀ u`` for residuals ``x [b, p, d]`` and cotangents ``u [b, p, n, d]``, one per reader."""
        g = u * self.weight if self.weight is not None else u
        if not self.scaled:
            return self.centre(g)
        xc = self.centre(x.to(torch.promote_types(x.dtype, u.dtype)))  # float32 cotangents: float32 throughout
        scale = self.scale_of(xc)[:, :, None, :]  # [b, p, 1, 1]
        xhat = (xc / scale.squeeze(2))[:, :, None, :]
        out = g - xhat * (g * xhat).mean(-1, keepdim=True)
        if self.centred:
            out = out - g.mean(-1, keepdim=True)
        return out / scale


#: A block without a norm in front of a sublayer.
NO_NORM = NormParts(centred=False, scaled=False, eps=0.0)


@dataclass(frozen=True, eq=False)
class OpaqueNorm:
    """A norm module without a closed form here: applied as it is, its Jacobian taken by autograd."""

    module: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def vjp(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``J(x)ᵀ u`` for residuals ``x [b, p, d]`` and cotangents ``u [b, p, n, d]`` (autograd)."""
        n = u.shape[2]
        with torch.enable_grad():
            xe = x.detach().requires_grad_(True)[:, :, None, :].expand(-1, -1, n, -1)
            (g_in,) = torch.autograd.grad(self.module(xe), xe, u)
        return g_in


#: What a backend says about a norm: its closed form, or the module itself.
Norm = Union[NormParts, OpaqueNorm]


class Backend(ABC):
    """One TransformerLens model class seen through edgeatp's sites.

    ``prepared`` sets the model-wide state runs need (eval mode, flags) and restores the caller's on
    exit; ``hooks`` attaches site hooks for a block; the weight accessors return plain tensors in the
    current key/value view (per shared key/value head, or per query head inside ``ungrouped``).
    """

    kind: ClassVar[str]
    model: Any

    @property
    @abstractmethod
    def shape(self) -> ModelShape:
        """The model's shape with its key/value grouping as it is stored."""

    @property
    def cfg(self) -> Any:
        """The TransformerLens config (``HookedTransformerConfig`` or ``TransformerBridgeConfig``)."""
        return self.model.cfg

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    def post_norm(self) -> bool:
        """Whether sublayer outputs are normalised before they join the residual (Gemma-2's norms)."""
        return False

    def hook_name(self, site: Site) -> str:
        """The TransformerLens hook point of a site."""
        k, n_layers = site.kind, self.shape.n_layers
        if k == "resid_final":
            return f"blocks.{n_layers - 1}.hook_resid_post"
        if not 0 <= site.layer < n_layers:
            raise ValueError(f"site {k} needs a layer in 0..{n_layers - 1}, got {site.layer}")
        if k in ("mlp_in", "mlp_post", "mlp_out", "mlp_post_scale", "resid_mid") and self.shape.attn_only:
            raise ValueError(f"site {k}: the model is attention-only")
        if k == "resid_mid" and self.shape.parallel_attn_mlp:
            raise ValueError("site resid_mid: attention and MLP of this model read the same residual")
        if k in ("attn_post_scale", "mlp_post_scale") and not self.post_norm:
            raise ValueError(f"site {k}: the model does not normalise its sublayer outputs")
        name = HOOK_NAMES[k]
        if k in ("rot_q", "rot_k") and self.cfg.positional_embedding_type != "rotary":
            name = HOOK_NAMES[k[-1]]
        return f"blocks.{site.layer}.{name}"

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter of the model, each once."""
        return list({id(p): p for p in self.model.parameters()}.values())

    @abstractmethod
    def foreign_hooks(self) -> list[str]:
        """Names of hook points that carry hooks edgeatp did not add."""

    @contextmanager
    @abstractmethod
    def prepared(self) -> Iterator[None]:
        """Eval mode and edgeatp's flags for a run; the caller's state restored on every exit."""

    @contextmanager
    @abstractmethod
    def hooks(self, fwd: Sequence[tuple[Site, FwdHook]]) -> Iterator[None]:
        """Forward hooks on sites for the block; a hook may return a replacement (inside ``prepared``)."""

    @abstractmethod
    def run(self, tokens: torch.Tensor, logits: bool) -> torch.Tensor | None:
        """One forward of token ids (logits, or ``None`` when only hooked values are wanted)."""

    @property
    @abstractmethod
    def grouped_now(self) -> bool:
        """Whether keys and values are per shared key/value head in the current view."""

    @contextmanager
    @abstractmethod
    def ungrouped(self) -> Iterator[None]:
        """Keys and values per query head (each a copy of its shared head) for the block."""

    @abstractmethod
    def qkv_weights(self, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``W [n, d_model, d_head]`` and ``b [n, d_head]`` (zeros without a bias) of a projection."""

    @abstractmethod
    def W_O(self, layer: int) -> torch.Tensor:
        """``[n_heads, d_head, d_model]``: each head's output matrix."""

    @abstractmethod
    def W_out(self, layer: int) -> torch.Tensor:
        """``[d_mlp, d_model]``: each hidden unit's write."""

    @abstractmethod
    def norm(self, layer: int, which: str) -> Norm:
        """The norm ``which`` (one of :data:`NORMS`) of a block (:data:`NO_NORM` where there is none)."""

    @abstractmethod
    def rotate(self, layer: int, x: torch.Tensor, offset: int) -> torch.Tensor:
        """The model's rotary embedding applied to q or k values ``[b, T, n, d_head]`` at positions
        ``offset, …, offset + T − 1`` (only called for rotary models)."""

    @abstractmethod
    def attn_scale(self, layer: int) -> float:
        """What the layer divides ``q·k`` by."""

    def attn_softcap(self, layer: int) -> float | None:
        """The layer's attention-score soft-cap, if any."""
        cap = getattr(self.cfg, "attn_scores_soft_cap", None)
        return float(cap) if cap is not None and cap > 0 else None

    @abstractmethod
    def convert(self, dtype: torch.dtype | None, device: torch.device | None) -> None:
        """Move or cast the model's weights in place."""


def backend_for(model: Any) -> Backend:
    """The backend of a TransformerLens model object, or a one-line error for anything else."""
    for loader in (_hooked, _bridge):
        backend = loader(model)
        if backend is not None:
            return backend
    raise ModelError(f"expected a transformer_lens.HookedTransformer or TransformerBridge, got {type(model).__name__}")


def _hooked(model: Any) -> Backend | None:
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # TransformerLens 4.x
        return None
    if not isinstance(model, HookedTransformer):
        return None
    from .hooked import HookedBackend

    return HookedBackend(model)


def _bridge(model: Any) -> Backend | None:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # TransformerLens before 3.9
        return None
    if not isinstance(model, TransformerBridge):
        return None
    from .bridge import BridgeBackend

    return BridgeBackend(model)
