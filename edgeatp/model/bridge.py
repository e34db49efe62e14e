"""The TransformerBridge backend (TransformerLens 4.x, and the preview in 3.9): a bridge around a
Hugging Face model or TransformerLens' native model, with HookedTransformer's site semantics.

The bridge keeps HookedTransformer's hook names but not all of their meaning, so this backend
closes the gaps while a run is prepared and undoes every change afterwards:

* hooks always return their tensor: q/k/v/z and rotary hooks see reshaped views that leave the
  autograd graph unless the view is handed back;
* ``hook_mlp_in`` is the residual itself, so its hook works on a private copy (the MLP's input,
  as in HookedTransformer), and ``resid_mid`` is read there, before the copy (the bridge's
  ``hook_resid_mid`` sees only what the MLP's norm reads);
* masked pre-softmax scores are ``finfo.min`` outside compatibility mode, shown as ``-inf`` (the
  causal mask, and Mistral's and Qwen2's sliding windows layer by layer, as Hugging Face builds them);
* GPT-NeoX attention never fires ``hook_rot_q``/``hook_rot_k``, and TransformerLens' native
  attention fires ``hook_attn_scores`` after the softmax: their instances get a rotary wrapper
  and a forward with HookedTransformer's hook order for the duration of the run;
* grouped-query keys and values are expanded per query head inside :meth:`BridgeBackend.ungrouped`.

Architectures whose attention runs inside Hugging Face code (no pre-softmax scores, no rotary
hooks) or that need maths edgeatp lacks are refused with one line naming what is missing.
"""

from __future__ import annotations

import math
import types
import weakref
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import ModelError
from ..graph import ModelShape
from .backend import HOOK_NAMES, NO_NORM, Backend, NormParts
from .sites import FwdHook, Site

_FLAGS = ("use_split_qkv_input", "use_attn_in", "use_attn_result", "use_hook_mlp_in")
#: Hugging Face architectures (and TransformerLens' native model) whose bridge attention is checked here.
ARCHITECTURES = {
    "GPT2LMHeadModel": "JointQKVAttentionBridge",
    "GPTNeoXForCausalLM": "JointQKVPositionEmbeddingsAttentionBridge",
    "LlamaForCausalLM": "PositionEmbeddingsAttentionBridge",
    "MistralForCausalLM": "PositionEmbeddingsAttentionBridge",
    "Qwen2ForCausalLM": "PositionEmbeddingsAttentionBridge",
    "TransformerLensNative": "AttentionBridge",
}
#: The families of :data:`ARCHITECTURES`, as error messages name them.
FAMILY_NAMES = "GPT-2, GPT-NeoX, Llama, Mistral and Qwen2"
#: Where HookedTransformer is: a separate environment, since installing TransformerLens 3.x beside 4 downgrades it.
TL3_ENV = "an environment with TransformerLens 3.x (pip install 'edgeatp[tl3]' in a fresh virtualenv)"
TL3_HINT = f"use {TL3_ENV} for it"


class BridgeBackend(Backend):
    """A ``TransformerBridge`` without compatibility mode, on an architecture listed in :data:`ARCHITECTURES`."""

    kind = "bridge"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.architecture = _architecture(model)
        cfg = model.cfg
        self._shape = ModelShape(
            n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
            d_mlp=None if cfg.attn_only else cfg.d_mlp, attn_only=bool(cfg.attn_only),
            parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)), n_kv_heads=cfg.n_key_value_heads,
        )
        self._ungrouped = False

    @property
    def shape(self) -> ModelShape:
        return self._shape

    @property
    def device(self) -> torch.device:
        return self.model.blocks[0].attn.o.original_component.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.blocks[0].attn.o.original_component.weight.dtype

    # ------------------------------------------------------------------ state and hooks
    def foreign_hooks(self) -> list[str]:
        seen: set[int] = set()
        names = []
        for name, hp in self.model.hook_dict.items():
            if id(hp) not in seen and (hp.fwd_hooks or hp.bwd_hooks):
                seen.add(id(hp))
                names.append(name)
        return names

    def parameters(self) -> list[torch.nn.Parameter]:
        # the wrapped model is not a registered child of the bridge: both trees, each parameter once
        m = self.model
        return list({id(p): p for p in (*m.parameters(), *m.original_model.parameters())}.values())

    @contextmanager
    def prepared(self) -> Iterator[None]:
        m = self.model
        saved = {f: bool(getattr(m.cfg, f)) for f in _FLAGS}
        # the wrapped model is not a registered child of the bridge: both trees, each module once
        modules = list({id(x): x for x in (*m.modules(), *m.original_model.modules())}.values())
        modes = [(mod, mod.training) for mod in modules]
        with ExitStack() as undo:
            undo.callback(self._set_flags, saved)
            undo.callback(_restore_modes, modes)
            for mod in modules:
                mod.training = False
            self._set_flags({"use_split_qkv_input": False, "use_attn_in": False, "use_attn_result": False,
                             "use_hook_mlp_in": not self.shape.attn_only})
            for block in m.blocks:
                undo.enter_context(_hook_order(block.attn))
            yield

    def _set_flags(self, values: dict[str, bool]) -> None:
        """Set the bridge's hook flags through its setters (split-input and attn-in exclude each other:
        everything off first, then on)."""
        m = self.model
        for flag in _FLAGS:
            if not values[flag] and getattr(m.cfg, flag):
                getattr(m, f"set_{flag}")(False)
        for flag in _FLAGS:
            if values[flag] and not getattr(m.cfg, flag):
                getattr(m, f"set_{flag}")(True)

    def hook_name(self, site: Site) -> str:
        """As HookedTransformer's, except ``resid_mid``: the bridge's ``hook_resid_mid`` is the MLP
        norm's input, which only the MLP reads; the residual itself passes ``hook_mlp_in`` first."""
        name = super().hook_name(site)
        return name.replace(HOOK_NAMES["resid_mid"], HOOK_NAMES["mlp_in"]) if site.kind == "resid_mid" else name

    def _wrap(self, site: Site, fn: FwdHook) -> Callable:
        """The bridge hook for a site: HookedTransformer's value in, the (possibly replaced) tensor out."""
        kind = site.kind
        expand = self._ungrouped and self.shape.grouped and kind in ("k", "v")
        group = self.shape.group_size

        def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            if kind == "resid_mid":  # the residual the block adds the MLP's write to: read, never replaced
                out = fn(tensor)
                if out is not None and out is not tensor:
                    raise ModelError("edgeatp's TransformerBridge backend can read resid_mid but not replace it (the "
                                     "block adds it to the MLP's write inside Hugging Face code)")
                return tensor
            if kind == "mlp_in":
                tensor = tensor.clone()  # the MLP's own copy, not the residual stream itself
            elif kind == "scores":
                tensor = tensor.masked_fill(tensor < torch.finfo(tensor.dtype).min / 2, float("-inf"))
            elif expand:
                tensor = tensor.repeat_interleave(group, dim=2)
            out = fn(tensor)
            out = tensor if out is None else out
            return out.flatten(2) if expand else out
        return hook

    @contextmanager
    def hooks(self, fwd: Sequence[tuple[Site, FwdHook]]) -> Iterator[None]:
        hooks = list(fwd)
        if self._ungrouped and self.shape.grouped:  # every key and value arrives per query head, hooked or not
            hooked = {s for s, _ in hooks}
            hooks += [(site, _keep) for layer in range(self.shape.n_layers)
                      for site in (Site("k", layer), Site("v", layer)) if site not in hooked]
        hooks.sort(key=lambda h: h[0].kind != "resid_mid")  # on hook_mlp_in, before the MLP's private copy
        with self.model.hooks(fwd_hooks=[(self.hook_name(s), self._wrap(s, f)) for s, f in hooks]):
            yield

    def run(self, tokens: torch.Tensor, logits: bool) -> torch.Tensor | None:
        return self.model(tokens, return_type="logits" if logits else None)

    @property
    def grouped_now(self) -> bool:
        return self.shape.grouped and not self._ungrouped

    @contextmanager
    def ungrouped(self) -> Iterator[None]:
        saved = self._ungrouped
        hf = [b.attn.original_component for b in self.model.blocks if self._hf_attention]
        groups = [a.num_key_value_groups for a in hf]
        self._ungrouped = True
        try:
            for a in hf:
                a.num_key_value_groups = 1  # keys and values arrive per query head
            yield
        finally:
            self._ungrouped = saved
            for a, g in zip(hf, groups):
                a.num_key_value_groups = g

    @property
    def _hf_attention(self) -> bool:
        """Whether the bridge recomputes attention from the Hugging Face module's own projections,
        scaling, rotary embedding and (sliding-window) mask: Llama, Mistral and Qwen2."""
        return ARCHITECTURES[self.architecture] == "PositionEmbeddingsAttentionBridge"

    # ------------------------------------------------------------------ weights
    def qkv_weights(self, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.model.blocks[layer].attn
        W = {"q": attn.W_Q, "k": attn.W_K, "v": attn.W_V}[kind]
        b = {"q": attn.b_Q, "k": attn.b_K, "v": attn.b_V}[kind]
        if b is None:
            b = torch.zeros(W.shape[0], W.shape[2], dtype=W.dtype, device=W.device)
        if kind != "q" and self.shape.grouped and not self.grouped_now:
            W, b = (x.repeat_interleave(self.shape.group_size, dim=0) for x in (W, b))
        return W, b

    def W_O(self, layer: int) -> torch.Tensor:
        return self.model.blocks[layer].attn.W_O

    def W_out(self, layer: int) -> torch.Tensor:
        return self.model.blocks[layer].mlp.W_out

    def norm(self, layer: int, which: str) -> NormParts:
        return _norm_of(self.architecture, self.model.blocks[layer].ln1) if which == "ln1" else NO_NORM

    def rotate(self, layer: int, x: torch.Tensor, offset: int) -> torch.Tensor:
        heads_first = x.transpose(1, 2)  # [b, n, T, d_head], the layout attention rotates in
        own = self.model.blocks[layer].attn.original_component
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)[None]
        if self.architecture == "TransformerLensNative":
            rotated, _ = own.rotary.apply_rope(heads_first, heads_first, position_ids=positions)
            return rotated.transpose(1, 2)
        cos, sin = self.model.rotary_emb.original_component(heads_first, positions)  # [1, T, rotary_dim]
        cos, sin = cos[:, None], sin[:, None]
        r = cos.shape[-1]
        x_rot, x_pass = heads_first[..., :r], heads_first[..., r:]
        half = r // 2
        rotated = x_rot * cos + torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1) * sin
        return torch.cat([rotated, x_pass], dim=-1).transpose(1, 2)

    def attn_scale(self, layer: int) -> float:
        attn = self.model.blocks[layer].attn
        own = attn.original_component
        if self.architecture == "TransformerLensNative":
            return float(own.scale)
        if self._hf_attention:
            return 1.0 / float(own.scaling)
        scale = math.sqrt(self.shape.d_head)  # what the bridge's own attention uses for GPT-2 and GPT-NeoX
        if getattr(self.cfg, "scale_attn_by_inverse_layer_idx", False):
            scale *= layer + 1
        return scale

    def attn_softcap(self, layer: int) -> float | None:
        own = self.model.blocks[layer].attn.original_component
        cap = own.attn_scores_soft_cap if self.architecture == "TransformerLensNative" else \
            getattr(own, "attn_logit_softcapping", None)
        return float(cap) if cap is not None and cap > 0 else None

    def convert(self, dtype: torch.dtype | None, device: torch.device | None) -> None:
        if dtype is not None and self.dtype != dtype:
            self.model.to(dtype, print_details=False)
        if device is not None:
            self.model.to(device, print_details=False)


def _keep(tensor: torch.Tensor) -> None:
    """A hook that changes nothing."""


def _restore_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    for mod, mode in modes:
        mod.training = mode


def _architecture(model: Any) -> str:
    """The checked architecture of a bridge, or a one-line error naming what edgeatp cannot use."""
    arch = getattr(model.cfg, "architecture", None) or type(model.original_model).__name__
    if getattr(model, "compatibility_mode", False):
        raise ModelError(f"edgeatp needs the TransformerBridge without compatibility mode (it changes the weights "
                         f"and cannot be undone); boot the {arch} model again without enable_compatibility_mode()")
    if arch not in ARCHITECTURES:
        raise ModelError(f"edgeatp's TransformerBridge backend does not support {arch} yet (checked: {FAMILY_NAMES} "
                         f"and TransformerLens-native models); {TL3_HINT}")
    for block in model.blocks:
        if type(block.attn).__name__ != ARCHITECTURES[arch]:
            raise ModelError(f"edgeatp's TransformerBridge backend cannot see inside {arch}'s attention "
                             f"({type(block.attn).__name__}: no pre-softmax scores or rotary hooks); {TL3_HINT}")
        _norm_of(arch, block.ln1)
    hf_config = getattr(model.original_model, "config", None)
    if arch == "GPT2LMHeadModel" and not getattr(hf_config, "scale_attn_weights", True):
        raise ModelError("edgeatp's TransformerBridge backend does not support GPT-2 with unscaled attention scores "
                         f"(scale_attn_weights=false; the bridge scales them anyway); {TL3_HINT}")
    return arch


#: Norm modules whose maths :class:`NormParts` reproduces: LayerNorm (centred) or RMSNorm, with or without parameters.
_NORM_CLASSES = {"LayerNorm": True, "NativeLayerNormPre": True, "LlamaRMSNorm": False, "MistralRMSNorm": False,
                 "Qwen2RMSNorm": False, "NativeRMSNorm": False, "NativeRMSNormPre": False}


def _norm_of(arch: str, bridge_norm: Any) -> NormParts:
    """The :class:`NormParts` a block's attention input norm computes."""
    module = getattr(bridge_norm, "original_component", None)
    if module is None or isinstance(module, torch.nn.Identity):
        return NO_NORM
    name = type(module).__name__
    if name not in _NORM_CLASSES:
        raise ModelError(f"edgeatp's TransformerBridge backend does not support {arch}'s normalisation {name} yet")
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    centred = _NORM_CLASSES[name]
    return NormParts(centred, True, float(eps), getattr(module, "weight", None),
                     getattr(module, "bias", None) if centred else None)


# ---------------------------------------------------------------------------------------- hook order
@contextmanager
def _hook_order(attn: Any) -> Iterator[None]:
    """HookedTransformer's rotary and score hooks on attention that lacks them, for the block only:
    GPT-NeoX's fused attention gets a rotary wrapper that fires ``hook_rot_q``/``hook_rot_k``; native
    attention a forward that fires them and the pre-softmax scores."""
    from transformer_lens.model_bridge.generalized_components.joint_qkv_position_embeddings_attention import (
        JointQKVPositionEmbeddingsAttentionBridge)

    own = attn.original_component
    if type(own).__name__ == "NativeAttention":
        own.__dict__["_edgeatp_attn"] = weakref.ref(attn)
        own.forward = types.MethodType(_native_forward, own)
        try:
            yield
        finally:
            del own.__dict__["forward"], own.__dict__["_edgeatp_attn"]
        return
    if isinstance(attn, JointQKVPositionEmbeddingsAttentionBridge) and hasattr(attn, "hook_rot_q"):
        rotate = type(attn)._apply_rotary_pos_emb

        def fire(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 _attn: Any = weakref.ref(attn)) -> tuple[torch.Tensor, torch.Tensor]:
            a = _attn()
            q, k = rotate(a, q, k, cos, sin)
            return a.hook_rot_q(q), a.hook_rot_k(k)

        attn.__dict__["_apply_rotary_pos_emb"] = fire
        try:
            yield
        finally:
            del attn.__dict__["_apply_rotary_pos_emb"]
        return
    yield


def _native_forward(self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, pattern_fn: Callable | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """TransformerLens' native attention with HookedTransformer's hooks: rotary hooks, pre-softmax
    scores (masked with ``-inf``), the pattern before it weights the values; keys and values may
    arrive per query head (inside ``ungrouped``)."""
    import torch.nn.functional as F

    attn = self._edgeatp_attn()
    batch, seq, _ = hidden_states.shape
    q = self.q(hidden_states).view(batch, seq, -1, self.d_head).transpose(1, 2)
    k = self.k(hidden_states).view(batch, seq, -1, self.d_head).transpose(1, 2)
    v = self.v(hidden_states).view(batch, seq, -1, self.d_head).transpose(1, 2)
    if self.rotary is not None:
        q, k = self.rotary.apply_rope(q, k, position_ids=position_ids)
        q, k = attn.hook_rot_q(q), attn.hook_rot_k(k)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    if v.shape[1] != q.shape[1]:
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) / self.scale
    if self.attn_scores_soft_cap > 0:
        scores = self.attn_scores_soft_cap * torch.tanh(scores / self.attn_scores_soft_cap)
    mask = self.causal_mask[:seq, :seq] if self.causal else torch.zeros(seq, seq, dtype=torch.bool,
                                                                          device=scores.device)
    if attention_mask is not None:
        mask = self._combine_attention_mask(mask, attention_mask, batch=batch)
    scores = attn.hook_attn_scores(scores.masked_fill(mask, float("-inf")))
    pattern = F.softmax(scores, dim=-1).masked_fill(mask, 0.0)
    pattern = (pattern_fn or attn.hook_pattern)(pattern)
    out = torch.matmul(pattern, v).transpose(1, 2).reshape(batch, seq, -1)
    return self.o(out), None
