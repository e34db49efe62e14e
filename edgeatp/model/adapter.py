"""The model adapter: loading models and the only place that knows TransformerLens hook names.

Every algorithm in edgeatp talks to a model through :class:`ModelAdapter`: named activation
:class:`Site` s instead of hook strings, scoped hooks that are always removed, and a
:meth:`ModelAdapter.session` that puts the model in eval mode and restores the caller's
TransformerLens flags, training mode and tokenizer padding side on every exit path.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import DataError, ModelError
from ..graph import ModelShape
from ..tokenizer import Tokenizer
from .sites import FwdHook, Site

_FLAGS = ("use_split_qkv_input", "use_attn_result", "use_attn_in", "use_hook_mlp_in", "ungroup_grouped_query_attention")


class ModelAdapter:
    """A HookedTransformer plus its tokenizer, seen through edgeatp's sites.

    Build one with :func:`load_model`. The constructor validates the architecture and
    raises :class:`ModelError` for features edgeatp does not handle yet.
    """

    def __init__(self, model: Any, tokenizer: Tokenizer | None = None, name: str = "model",
                 card: dict | None = None) -> None:
        from transformer_lens import HookedTransformer

        if not isinstance(model, HookedTransformer):
            raise ModelError(
                f"expected a transformer_lens.HookedTransformer, got {type(model).__name__}; "
                "TransformerBridge models are not supported yet"
            )
        _validate_config(model.cfg)
        _validate_weights(model)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.card = card or {}
        cfg = model.cfg
        self.shape = ModelShape(
            n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
            d_mlp=None if cfg.attn_only else cfg.d_mlp, attn_only=bool(cfg.attn_only),
            parallel_attn_mlp=bool(cfg.parallel_attn_mlp),
            n_kv_heads=None if cfg.ungroup_grouped_query_attention else cfg.n_key_value_heads,
        )
        self._depth = 0
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ facts
    @property
    def cfg(self) -> Any:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.W_E.dtype

    @property
    def causal(self) -> bool:
        return self.cfg.attention_dir == "causal"

    @property
    def d_vocab(self) -> int:
        return int(self.cfg.d_vocab_out)

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
        """Eval mode, known TransformerLens flags, no foreign hooks; everything restored on exit.

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
            m = self.model
            foreign = [n for n, hp in m.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
            if foreign:
                raise ModelError(
                    f"the model has hooks attached ({len(foreign)} hook points, e.g. {foreign[0]!r}); "
                    "remove them with model.reset_hooks(including_permanent=True) before running edgeatp"
                )
            saved = {f: getattr(m.cfg, f) for f in _FLAGS}
            modes = [(mod, mod.training) for mod in m.modules()]
            tok = getattr(m, "tokenizer", None)
            padding_side = getattr(tok, "padding_side", None)
            self._depth = 1
            try:
                m.eval()
                m.cfg.use_split_qkv_input = False
                m.cfg.use_attn_result = False
                m.cfg.use_attn_in = False
                m.cfg.use_hook_mlp_in = not m.cfg.attn_only
                if padding_side is not None:
                    tok.padding_side = "right"
                yield self
            finally:
                self._depth = 0
                m.reset_hooks(including_permanent=False)
                for f, v in saved.items():
                    setattr(m.cfg, f, v)
                for mod, mode in modes:
                    mod.training = mode
                if padding_side is not None:
                    tok.padding_side = padding_side

    def hook_name(self, site: Site) -> str:
        """The TransformerLens hook point of a site."""
        k, l = site.kind, site.layer
        if k == "resid_final":
            return f"blocks.{self.shape.n_layers - 1}.hook_resid_post"
        if not 0 <= l < self.shape.n_layers:
            raise ValueError(f"site {k} needs a layer in 0..{self.shape.n_layers - 1}, got {l}")
        rotary = self.cfg.positional_embedding_type == "rotary"
        names = {
            "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "q": "attn.hook_q", "k": "attn.hook_k",
            "v": "attn.hook_v", "rot_q": "attn.hook_rot_q" if rotary else "attn.hook_q",
            "rot_k": "attn.hook_rot_k" if rotary else "attn.hook_k",
            "scores": "attn.hook_attn_scores", "pattern": "attn.hook_pattern", "z": "attn.hook_z",
            "attn_out": "hook_attn_out", "mlp_in": "hook_mlp_in", "mlp_post": "mlp.hook_post",
            "mlp_out": "hook_mlp_out", "attn_post_scale": "ln1_post.hook_scale", "mlp_post_scale": "ln2_post.hook_scale",
        }
        if k in ("mlp_in", "mlp_post", "mlp_out", "mlp_post_scale", "resid_mid") and self.shape.attn_only:
            raise ValueError(f"site {k}: the model is attention-only")
        if k == "resid_mid" and self.shape.parallel_attn_mlp:
            raise ValueError("site resid_mid: attention and MLP of this model read the same residual")
        if k in ("attn_post_scale", "mlp_post_scale") and not self.post_norm:
            raise ValueError(f"site {k}: the model does not normalise its sublayer outputs")
        return f"blocks.{l}.{names[k]}"

    @contextmanager
    def hooks(self, fwd: Sequence[tuple[Site, FwdHook]]) -> Iterator[None]:
        """Forward hooks on sites for the duration of the block; a hook may return a replacement."""
        def wrap(fn: FwdHook) -> Callable:
            return lambda tensor, hook: fn(tensor)

        with self.session():
            with self.model.hooks(fwd_hooks=[(self.hook_name(s), wrap(f)) for s, f in fwd]):
                yield

    def forward(self, tokens: torch.Tensor, fwd: Sequence[tuple[Site, FwdHook]] = (), logits: bool = True
                ) -> torch.Tensor | None:
        """Logits ``[batch, pos, vocab]`` of a batch of token ids, with optional site hooks
        (``logits=False`` skips the unembedding when only hooked activations are wanted)."""
        with self.hooks(fwd):
            return self.model(tokens.to(self.device), return_type="logits" if logits else None)

    # ------------------------------------------------------------------ math on weights
    def _block(self, layer: int) -> Any:
        return self.model.blocks[layer]

    @property
    def post_norm(self) -> bool:
        """Whether sublayer outputs are normalised before they join the residual (Gemma-2's norms)."""
        return bool(getattr(self.cfg, "use_normalization_before_and_after", False))

    def head_factors(self, layer: int, z: torch.Tensor, scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head residual writes as coefficients ``[b, p, H, d_head]`` times a basis ``[H, d_head,
        d_model]`` (``W_O``, with a post-norm's centring and weight folded in and its per-position
        scale folded into the coefficients): each head's write has rank ``d_head``."""
        W_O = self._block(layer).attn.W_O
        dt = torch.promote_types(z.dtype, W_O.dtype)  # float32 activations of a bfloat16 model stay float32
        return self._post_factors(layer, "attn", z.to(dt), W_O.to(dt), scale)

    def neuron_factors(self, layer: int, post: torch.Tensor, scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-neuron writes as coefficients ``[b, p, N, 1]`` times a basis ``[N, 1, d_model]`` (rank one)."""
        W_out = self._block(layer).mlp.W_out
        dt = torch.promote_types(post.dtype, W_out.dtype)
        return self._post_factors(layer, "mlp", post.to(dt)[..., None], W_out.to(dt)[:, None, :], scale)

    def _post_factors(self, layer: int, which: str, coef: torch.Tensor, basis: torch.Tensor,
                      scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold a sublayer's output norm (post-normalised models) into write factors: it is linear
        once its scale, taken from the same run, is known."""
        if not self.post_norm:
            return coef, basis
        norm = self._block(layer).ln1_post if which == "attn" else self._block(layer).ln2_post
        if isinstance(norm, torch.nn.Identity):
            return coef, basis
        if scale is None:
            raise ValueError("post-normalised writes need the norm's scale")
        from transformer_lens.components import LayerNorm

        centred = basis - basis.mean(-1, keepdim=True) if isinstance(norm, LayerNorm) else basis
        return coef / scale[:, :, None, :].to(coef.dtype), centred * norm.w.to(basis.dtype)

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
        attn = self._block(layer).attn
        if kind == "q":
            return attn.W_Q, attn.b_Q
        if kind == "k":
            return (attn._W_K, attn._b_K) if self.grouped_now else (attn.W_K, attn.b_K)
        return (attn._W_V, attn._b_V) if self.grouped_now else (attn.W_V, attn.b_V)

    def qkv_from_residual(self, layer: int, kind: str, resid: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """What ``hook_q|k|v`` would hold for ``heads`` if each read its own residual copy.

        ``resid`` is ``[..., n, d_model]`` (one residual per selected head), ``heads`` the
        ``n`` head indices (key/value heads for keys and values of a grouped model); returns
        ``[..., n, d_head]``. Exact: same LayerNorm and weights.
        """
        W, b = self.qkv_weights(layer, kind)
        normed = self.normalise(self._block(layer).ln1, resid)
        return torch.einsum("...nd,nde->...ne", normed, W[heads].to(normed.dtype)) + b[heads].to(normed.dtype)

    def qkv_all_heads(self, layer: int, kind: str, resid: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """``hook_q|k|v`` values ``[..., n, d_head]`` of the given heads (default all) reading residuals ``[..., d_model]``."""
        W, b = self.qkv_weights(layer, kind)
        if heads is not None:
            W, b = W[heads], b[heads]
        normed = self.normalise(self._block(layer).ln1, resid)
        return torch.einsum("...d,hde->...he", normed, W.to(normed.dtype)) + b.to(normed.dtype)

    def normed_projection(self, layer: int, kind: str, heads: torch.Tensor, dtype: torch.dtype | None = None
                          ) -> "NormedProjection | None":
        """The block's input norm and the q/k/v projection of ``heads`` as one closed form (``None``
        for a norm without one), so projections of ``x + Δ`` split into ``x``'s and ``Δ``'s parts;
        folded in ``dtype`` (default: the weights')."""
        parts = _norm_parts(self._block(layer).ln1)
        if parts is None:
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
        return self._block(layer).attn.apply_rotary(x, past_kv_pos_offset=offset)

    def reader_input_grads(self, layer: int, resid: torch.Tensor, grads: dict[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
        """Gradients w.r.t. each head's private q/k/v residual input, ``{kind: [b, p, n, d_model]}``.

        ``grads`` are ``dL/d hook_q, hook_k, hook_v`` (``[b, p, n, d_head]`` each: per query head,
        or per key/value head) and ``resid`` the block input. The projection is transposed by hand
        and the normalisation's exact Jacobian applied to every reader at once — the same numbers
        TransformerLens' ``use_split_qkv_input`` gives, without its cost in every later pass.
        """
        kinds = list(grads)
        ups = []
        for kind in kinds:
            W, _ = self.qkv_weights(layer, kind)
            dt = torch.promote_types(grads[kind].dtype, W.dtype)
            ups.append(torch.einsum("bphe,hde->bphd", grads[kind].to(dt), W.to(dt)))
        u = torch.cat(ups, dim=2).detach()  # [b, p, n_q + n_k + n_v, d]
        g_in = self.norm_vjp(self._block(layer).ln1, resid.detach(), u)
        return dict(zip(kinds, g_in.split([x.shape[2] for x in ups], dim=2)))

    @staticmethod
    def normalise(norm: Any, x: torch.Tensor) -> torch.Tensor:
        """``norm(x)`` in ``x``'s own dtype: TransformerLens rounds its norms' output to the model's
        dtype, which would undo a wider (float32) recomputation on a bfloat16 or float16 model."""
        parts = _norm_parts(norm)
        if parts is None or (parts.scaled and x.dtype == norm.cfg.dtype):
            return norm(x)
        y = x - x.mean(-1, keepdim=True) if parts.centred else x
        if parts.scaled:
            y = y / (y.pow(2).mean(-1, keepdim=True) + parts.eps).sqrt()
        if parts.weight is not None:
            y = y * parts.weight.to(x.dtype)
        return y + parts.bias.to(x.dtype) if parts.bias is not None else y

    @staticmethod
    def norm_vjp(norm: Any, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``J_norm(x)ᵀ u`` for residuals ``x [b, p, d]`` and cotangents ``u [b, p, n, d]``, one per reader.

        Closed form for norms :func:`_norm_parts` knows (``y = w ⊙ x̂ + b`` with ``x̂ = (x − μ)/σ``
        or ``x/σ``, or no norm); autograd for anything else.
        """
        parts = _norm_parts(norm)
        if parts is not None and not parts.scaled:
            return u
        if parts is not None:
            x = x.to(torch.promote_types(x.dtype, u.dtype))
            xc = x - x.mean(-1, keepdim=True) if parts.centred else x
            scale = (xc.pow(2).mean(-1, keepdim=True) + parts.eps).sqrt()[:, :, None, :]  # [b, p, 1, 1]
            xhat = (xc / scale.squeeze(2))[:, :, None, :]
            g = u * parts.weight if parts.weight is not None else u
            out = g - xhat * (g * xhat).mean(-1, keepdim=True)
            if parts.centred:
                out = out - g.mean(-1, keepdim=True)
            return out / scale
        n = u.shape[2]
        with torch.enable_grad():
            xe = x.detach().requires_grad_(True)[:, :, None, :].expand(-1, -1, n, -1)
            (g_in,) = torch.autograd.grad(norm(xe), xe, u)
        return g_in

    @property
    def grouped_now(self) -> bool:
        """Whether keys and values are per shared key/value head in the current view (not :meth:`ungrouped`)."""
        return self.shape.grouped and not self.cfg.ungroup_grouped_query_attention

    def expand_kv(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Per-key/value-head values repeated along ``dim`` to one per query head (unchanged without grouping)."""
        return x.repeat_interleave(self.shape.group_size, dim=dim) if self.grouped_now else x

    def sum_to_kv(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Per-query-head values summed along ``dim`` over the query heads of each key/value head."""
        if not self.grouped_now:
            return x
        d = dim % x.dim()
        return x.unflatten(d, (self.shape.kv_heads, self.shape.group_size)).sum(d + 1)

    def attention_score_fn(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Unmasked, unbiased scores ``[b, n, Tq, Tk]`` of head-paired post-rotary q and k
        ``[b, T, n, d_head]`` (the model's own scale and soft-cap; no key/value repetition)."""
        from transformer_lens.components.abstract_attention import AbstractAttention

        return AbstractAttention.calculate_attention_scores(self._block(layer).attn, q, k)

    @contextmanager
    def ungrouped(self, on: bool = True) -> Iterator[None]:
        """Run a grouped model with each query head's own copy of its key and value (the same
        numbers; keys and values ``[b, p, n_heads, d_head]``), for the per-query-head graph view."""
        if not (on and self.shape.grouped):
            yield
            return
        with self.session():
            saved = self.cfg.ungroup_grouped_query_attention
            self.cfg.ungroup_grouped_query_attention = True
            try:
                yield
            finally:
                self.cfg.ungroup_grouped_query_attention = saved


@dataclass(frozen=True)
class NormParts:
    """A norm as ``y ↦ (C y) / s(y) ⊙ weight + bias``: ``centred`` (C subtracts the mean),
    ``scaled`` (``s = sqrt(mean((C y)²) + eps)``; otherwise ``s = 1``); ``None`` weight/bias = 1/0."""

    centred: bool
    scaled: bool
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass(frozen=True)
class NormedProjection:
    """``proj(y) = (C y) W / s(y) + b`` for a norm folded into a projection ``W [d_model, n·d_head]``."""

    W: torch.Tensor
    b: torch.Tensor
    centred: bool
    scaled: bool
    eps: float


def _norm_parts(norm: Any) -> NormParts | None:
    """TransformerLens' LayerNorm, LayerNormPre, RMSNorm, RMSNormPre or no norm in closed form."""
    from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

    if isinstance(norm, torch.nn.Identity):
        return NormParts(False, False, 0.0, None, None)
    if not isinstance(norm, (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)):
        return None
    return NormParts(isinstance(norm, (LayerNorm, LayerNormPre)), True, float(norm.eps),
                     norm.w if isinstance(norm, (LayerNorm, RMSNorm)) else None,
                     norm.b if isinstance(norm, LayerNorm) else None)


def _validate_config(cfg: Any) -> None:
    """Reject architectures whose internals edgeatp's exact formulas would get wrong."""
    problems = []
    if cfg.positional_embedding_type not in ("standard", "rotary", "alibi"):
        problems.append(f"positional embedding type {cfg.positional_embedding_type!r}")
    if getattr(cfg, "load_in_4bit", False):
        problems.append("4-bit weights")
    if getattr(cfg, "use_attention_sinks", False):
        problems.append("attention sinks")
    if getattr(cfg, "use_logn_attn", False):
        problems.append("log-n attention scaling")
    if getattr(cfg, "num_experts", None):
        problems.append("mixture-of-experts MLPs")
    if getattr(cfg, "use_qk_norm", False) or cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        problems.append("QK normalisation")
    if getattr(cfg, "clip_qkv", None) is not None:
        problems.append("clipped q/k/v")
    if getattr(cfg, "use_dynamic_ntk_rope", False):
        problems.append("dynamic NTK rotary scaling")
    from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES  # type: ignore

    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        problems.append(f"post-norm architecture {cfg.original_architecture}")
    if problems:
        raise ModelError("edgeatp does not support " + "; ".join(problems) + " yet")


def _validate_weights(model: Any) -> None:
    """Post-normalised sublayers must have no output bias: its normalised part changes with the
    norm's scale and belongs to no single writer, so edge patches would not add up."""
    if not getattr(model.cfg, "use_normalization_before_and_after", False):
        return
    for layer, block in enumerate(model.blocks):
        biases = [("attention output", block.attn.b_O)] + ([] if model.cfg.attn_only else [("MLP output", block.mlp.b_out)])
        for what, b in biases:
            if bool((b != 0).any()):
                raise ModelError(f"edgeatp does not support post-normalised sublayers with a bias yet (layer {layer} "
                                 f"{what} bias)")
