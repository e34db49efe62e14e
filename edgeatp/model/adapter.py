"""The model adapter: the one object algorithms talk to, whatever TransformerLens class runs the model.

Every algorithm in edgeatp talks to a model through :class:`ModelAdapter`: named activation
:class:`Site` s instead of hook strings, scoped hooks that are always removed, and a
:meth:`ModelAdapter.session` that puts the model in eval mode with frozen weights and restores the
caller's TransformerLens flags, training mode, ``requires_grad`` and tokenizer padding side on every exit path. The
TransformerLens class behind it is a :class:`~.backend.Backend` (``HookedTransformer`` or
``TransformerBridge``); the math on weights lives here, on the tensors the backend exposes.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..errors import DataError, ModelError
from ..graph import ModelShape
from ..model_config import spec_of
from ..plan import ModelSpec
from ..tokenizer import Tokenizer
from .backend import Backend, Norm, NormParts, backend_for
from .sites import FwdHook, Site


class ModelAdapter:
    """A TransformerLens model (``HookedTransformer`` or ``TransformerBridge``) plus its tokenizer,
    seen through edgeatp's sites.

    Build one with :func:`load_model`. The constructor validates the architecture and
    raises :class:`ModelError` for features edgeatp does not handle yet.
    """

    def __init__(self, model: Any, tokenizer: Tokenizer | None = None, name: str = "model",
                 card: dict | None = None) -> None:
        self.backend: Backend = backend_for(model)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.card = card or {}
        self.shape: ModelShape = self.backend.shape
        self._depth = 0
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ facts
    @property
    def cfg(self) -> Any:
        return self.model.cfg

    @property
    def spec(self) -> ModelSpec:
        """The planner's description of this model (:mod:`edgeatp.plan`)."""
        return spec_of(self.cfg, self.name, self.shape)

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    @property
    def causal(self) -> bool:
        return self.cfg.attention_dir == "causal"

    @property
    def d_vocab(self) -> int:
        out = int(self.cfg.d_vocab_out)
        return out if out > 0 else int(self.cfg.d_vocab)

    @property
    def n_ctx(self) -> int:
        return int(self.cfg.n_ctx)

    @property
    def prepend_bos(self) -> bool:
        """Whether prompts for this model should start with a BOS token by default."""
        if "prepend_bos" in self.card:
            return bool(self.card["prepend_bos"])
        return bool(self.cfg.default_prepend_bos) and self.bos_id is not None

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id if self.tokenizer is not None else None

    def check_pairs(self, pairs: Any) -> None:
        """Refuse prompt pairs this model cannot run: too long, or token ids outside its vocabulary."""
        if pairs.n_positions > self.n_ctx:
            raise DataError(f"{pairs.name}: prompts of {pairs.n_positions} tokens exceed {self.name}'s context of "
                            f"{self.n_ctx}; shorten them or use a model with a longer context")
        d_vocab = int(self.cfg.d_vocab)
        for what, t, lowest in (("clean", pairs.clean, 0), ("corrupt", pairs.corrupt, 0), ("answer", pairs.answer, 0),
                                ("wrong", pairs.wrong, -1)):
            bad = ((t >= d_vocab) | (t < lowest)).nonzero()
            if len(bad):
                row = int(bad[0][0])
                raise DataError(f"{pairs.name}, {pairs.label(row)}: {what} token id {int(t[tuple(bad[0])])} is outside "
                                f"{self.name}'s vocabulary 0..{d_vocab - 1}; tokenize with this model's tokenizer")

    def describe(self) -> dict:
        """A short JSON-able description for reports."""
        return {
            "name": self.name, "n_layers": self.shape.n_layers, "n_heads": self.shape.n_heads,
            "d_model": self.shape.d_model, "d_head": self.shape.d_head, "d_mlp": self.shape.d_mlp,
            "attn_only": self.shape.attn_only, "parallel_attn_mlp": self.shape.parallel_attn_mlp,
            "d_vocab": self.d_vocab, "n_ctx": self.n_ctx,
            "positional_embedding": self.cfg.positional_embedding_type,
            "normalization": self.cfg.normalization_type,
        }

    # ------------------------------------------------------------------ state
    @contextmanager
    def session(self) -> Iterator["ModelAdapter"]:
        """Eval mode, frozen weights, known TransformerLens flags, no foreign hooks; everything restored
        on exit. Frozen weights keep gradient runs from saving what only weight gradients would need.

        Re-entrant; only the outermost session saves and restores. Sessions of different threads
        take turns (hooks and flags are model-wide state), so an adapter may be shared by threads.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            foreign = self.backend.foreign_hooks()
            if foreign:
                raise ModelError(
                    f"the model has hooks attached ({len(foreign)} hook points, e.g. {foreign[0]!r}); "
                    "remove them with model.reset_hooks(including_permanent=True) before running edgeatp"
                )
            tok = getattr(self.model, "tokenizer", None)
            padding_side = getattr(tok, "padding_side", None)
            trainable = [p for p in self.backend.parameters() if p.requires_grad]
            self._depth = 1
            try:
                with self.backend.prepared():
                    for p in trainable:
                        p.requires_grad_(False)
                    if padding_side is not None:
                        tok.padding_side = "right"
                    yield self
            finally:
                self._depth = 0
                for p in trainable:
                    p.requires_grad_(True)
                if padding_side is not None:
                    tok.padding_side = padding_side

    def hook_name(self, site: Site) -> str:
        """The TransformerLens hook point of a site."""
        return self.backend.hook_name(site)

    @contextmanager
    def hooks(self, fwd: Sequence[tuple[Site, FwdHook]]) -> Iterator[None]:
        """Forward hooks on sites for the duration of the block; a hook may return a replacement."""
        with self.session(), self.backend.hooks(fwd):
            yield

    def forward(self, tokens: torch.Tensor, fwd: Sequence[tuple[Site, FwdHook]] = (), logits: bool = True
                ) -> torch.Tensor | None:
        """Logits ``[batch, pos, vocab]`` of a batch of token ids, with optional site hooks
        (``logits=False`` skips the unembedding when only hooked activations are wanted)."""
        with self.hooks(fwd):
            return self.backend.run(tokens.to(self.device), logits)

    # ------------------------------------------------------------------ math on weights
    @property
    def post_norm(self) -> bool:
        """Whether sublayer outputs are normalised before they join the residual (Gemma-2's norms)."""
        return self.backend.post_norm

    def head_factors(self, layer: int, z: torch.Tensor, scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head residual writes as coefficients ``[b, p, H, d_head]`` times a basis ``[H, d_head,
        d_model]`` (``W_O``, with a post-norm's centring and weight folded in and its per-position
        scale folded into the coefficients): each head's write has rank ``d_head``."""
        W_O = self.backend.W_O(layer)
        dt = torch.promote_types(z.dtype, W_O.dtype)  # float32 activations of a bfloat16 model stay float32
        return self._post_factors(layer, "attn", z.to(dt), W_O.to(dt), scale)

    def neuron_factors(self, layer: int, post: torch.Tensor, scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-neuron writes as coefficients ``[b, p, N, 1]`` times a basis ``[N, 1, d_model]`` (rank one)."""
        W_out = self.backend.W_out(layer)
        dt = torch.promote_types(post.dtype, W_out.dtype)
        return self._post_factors(layer, "mlp", post.to(dt)[..., None], W_out.to(dt)[:, None, :], scale)

    def _post_factors(self, layer: int, which: str, coef: torch.Tensor, basis: torch.Tensor,
                      scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold a sublayer's output norm (post-normalised models) into write factors: it is linear
        once its scale, taken from the same run, is known."""
        if not self.post_norm:
            return coef, basis
        norm = self.backend.norm(layer, "ln1_post" if which == "attn" else "ln2_post")
        if not isinstance(norm, NormParts):
            raise ModelError(f"edgeatp does not support the output normalisation {type(norm.module).__name__} yet")
        if not norm.scaled:
            return coef, basis
        if scale is None:
            raise ValueError("post-normalised writes need the norm's scale")
        basis = norm.centre(basis)
        weighted = basis * norm.weight.to(basis.dtype) if norm.weight is not None else basis
        return coef / scale[:, :, None, :].to(coef.dtype), weighted

    def head_writes(self, layer: int, z: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head residual writes ``[b, p, H, d_model]`` from ``hook_z`` values ``[b, p, H, d_head]``
        (``scale``: the output norm's scale of the same run, for post-normalised models)."""
        coef, basis = self.head_factors(layer, z, scale)
        return torch.einsum("bphe,hed->bphd", coef, basis)

    def neuron_writes(self, layer: int, post: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Per-neuron residual writes ``[b, p, d_mlp, d_model]`` from hidden activations."""
        coef, basis = self.neuron_factors(layer, post, scale)
        return coef * basis[:, 0]

    def qkv_weights(self, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``W [n, d_model, d_head]`` and ``b [n, d_head]`` of the query, key or value projection: per
        query head, or per shared key/value head for keys and values of a grouped model (per
        query head again inside :meth:`ungrouped`)."""
        return self.backend.qkv_weights(layer, kind)

    def qkv_from_residual(self, layer: int, kind: str, resid: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """What ``hook_q|k|v`` would hold for ``heads`` if each read its own residual copy.

        ``resid`` is ``[..., n, d_model]`` (one residual per selected head), ``heads`` the
        ``n`` head indices (key/value heads for keys and values of a grouped model); returns
        ``[..., n, d_head]``. Exact: same LayerNorm and weights.
        """
        W, b = self.qkv_weights(layer, kind)
        normed = self._ln1(layer, resid)
        return torch.einsum("...nd,nde->...ne", normed, W[heads].to(normed.dtype)) + b[heads].to(normed.dtype)

    def qkv_all_heads(self, layer: int, kind: str, resid: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """``hook_q|k|v`` values ``[..., n, d_head]`` of the given heads (default all) reading residuals ``[..., d_model]``."""
        W, b = self.qkv_weights(layer, kind)
        if heads is not None:
            W, b = W[heads], b[heads]
        normed = self._ln1(layer, resid)
        return torch.einsum("...d,hde->...he", normed, W.to(normed.dtype)) + b.to(normed.dtype)

    def _ln1(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """The attention input norm of a block applied to residuals ``[..., d_model]``, computed in at
        least float32 and returned in ``resid``'s dtype, as TransformerLens' own norms do (so float32
        residuals of a bfloat16 model keep their precision)."""
        norm = self.backend.norm(layer, "ln1")
        if not isinstance(norm, NormParts):
            return norm(resid)
        return norm(resid.to(torch.promote_types(resid.dtype, torch.float32))).to(resid.dtype)

    def normed_projection(self, layer: int, kind: str, heads: torch.Tensor, dtype: torch.dtype | None = None
                          ) -> "NormedProjection | None":
        """The block's input norm and the q/k/v projection of ``heads`` as one closed form (``None``
        for a norm without one), so projections of ``x + Δ`` split into ``x``'s and ``Δ``'s parts;
        folded in ``dtype`` (default: the weights')."""
        parts = self.backend.norm(layer, "ln1")
        if not isinstance(parts, NormParts):
            return None
        W, b = self.qkv_weights(layer, kind)
        dt = dtype or W.dtype
        W, b = W[heads].to(dt), b[heads].to(dt)
        n, d, e = W.shape
        Wf, bf = W.permute(1, 0, 2).reshape(d, n * e), b.reshape(n * e)
        if parts.bias is not None:
            bf = bf + parts.bias.to(dt) @ Wf
        if parts.weight is not None:
            Wf = parts.weight.to(dt)[:, None] * Wf
        return NormedProjection(Wf, bf, parts.centred, parts.scaled, parts.eps)

    def rotate(self, layer: int, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Apply the model's rotary embedding to q or k values ``[b, T, n, d_head]`` at positions
        ``offset, offset + 1, …`` (identity without rotary embeddings)."""
        if self.cfg.positional_embedding_type != "rotary":
            return x
        return self.backend.rotate(layer, x, offset)

    def reader_input_grads(self, layer: int, resid: torch.Tensor, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gradients w.r.t. each head's private q/k/v residual input, ``[b, p, R, d_model]`` with the
        readers of ``grads``' kinds concatenated in its order (often a view of an ``[R, b, p, d]`` buffer).

        ``grads`` are ``dL/d hook_q, hook_k, hook_v`` (``[b, p, n, d_head]`` each: per query head,
        or per key/value head) and ``resid`` the block input. The projection is transposed by hand
        and the normalisation's exact Jacobian applied in closed form — the same numbers
        TransformerLens' ``use_split_qkv_input`` gives, without its cost in every later pass: with
        ``x̂`` the normalised input and ``u = w ⊙ Wᵀδ``, the gradient is ``(u − x̂·mean(u x̂) − mean(u))/σ``,
        so the weight and ``1/σ`` go into the small factors and two in-place passes finish it.
        """
        W = torch.cat([self.qkv_weights(layer, kind)[0] for kind in grads])  # [R, d, e]
        delta = torch.cat(list(grads.values()), dim=2).detach()  # [b, p, R, e]
        dt = torch.promote_types(delta.dtype, W.dtype)  # gradients handed over in float32 stay float32
        W, delta = W.to(dt), delta.to(dt)
        b, p, R, e = delta.shape
        parts = self.backend.norm(layer, "ln1")
        if not isinstance(parts, NormParts):
            return self.norm_vjp(parts, resid.detach(), torch.einsum("bphe,hde->bphd", delta, W))
        if parts.weight is not None:
            W = W * parts.weight[:, None].to(dt)
        xc = parts.centre(resid.detach().to(dt).reshape(b * p, -1))
        if parts.scaled:
            sigma = parts.scale_of(xc)  # [bp, 1]
            delta = delta / sigma.view(b, p, 1, 1)
        out = torch.bmm(delta.permute(2, 0, 1, 3).reshape(R, b * p, e), W.transpose(1, 2))  # [R, bp, d]
        if parts.scaled:
            xhat = xc / sigma
            out.addcmul_(torch.einsum("rnd,nd->rn", out, xhat)[..., None] / xc.shape[-1], xhat, value=-1)
        if parts.centred:
            out.sub_(out.mean(-1, keepdim=True))
        return out.view(R, b, p, -1).permute(1, 2, 0, 3)

    @staticmethod
    def norm_vjp(norm: Norm, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``J_norm(x)ᵀ u`` for residuals ``x [b, p, d]`` and cotangents ``u [b, p, n, d]``, one per reader
        (closed form for :class:`~.backend.NormParts`, autograd for a norm without one)."""
        return norm.vjp(x, u)

    @property
    def grouped_now(self) -> bool:
        """Whether keys and values are per shared key/value head in the current view (not :meth:`ungrouped`)."""
        return self.backend.grouped_now

    def expand_kv(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Per-key/value-head values repeated along ``dim`` to one per query head (unchanged without grouping)."""
        return x.repeat_interleave(self.shape.group_size, dim=dim) if self.grouped_now else x

    def sum_to_kv(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Per-query-head values summed along ``dim`` over the query heads of each key/value head."""
        if not self.grouped_now:
            return x
        d = dim % x.dim()
        return x.unflatten(d, (self.shape.kv_heads, self.shape.group_size)).sum(d + 1)

    def attention_score_fn(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale_on: str = "scores") -> torch.Tensor:
        """Unmasked, unbiased scores ``[b, n, Tq, Tk]`` of head-paired post-rotary q and k
        ``[b, T, n, d_head]`` (the model's own scale and soft-cap; no key/value repetition).
        ``scale_on`` ``"q"`` or ``"k"`` divides that operand instead of the scores: one pass fewer
        when it is the smaller, the same numbers up to rounding (compare only scores scaled alike)."""
        scale = self.backend.attn_scale(layer)
        qt, kt = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1)
        if scale_on == "q":
            scores = (qt / scale) @ kt
        elif scale_on == "k":
            scores = qt @ (kt / scale)
        else:
            scores = qt @ kt / scale
        cap = self.backend.attn_softcap(layer)
        return scores if cap is None else cap * torch.tanh(scores / cap)

    @contextmanager
    def ungrouped(self, on: bool = True) -> Iterator[None]:
        """Run a grouped model with each query head's own copy of its key and value (the same
        numbers; keys and values ``[b, p, n_heads, d_head]``), for the per-query-head graph view."""
        if not (on and self.shape.grouped):
            yield
            return
        with self.session(), self.backend.ungrouped():
            yield


@dataclass(frozen=True)
class NormedProjection:
    """``proj(y) = (C y) W / s(y) + b`` for a norm folded into a projection ``W [d_model, n·d_head]``."""

    W: torch.Tensor
    b: torch.Tensor
    centred: bool
    scaled: bool
    eps: float
