"""The HookedTransformer backend (TransformerLens 3.x): hook names, flags and weights of a
``HookedTransformer``, and the architecture checks for it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import ModelError
from ..graph import ModelShape
from .backend import NO_NORM, Backend, Norm, NormParts, OpaqueNorm
from .sites import FwdHook, Site

_FLAGS = ("use_split_qkv_input", "use_attn_result", "use_attn_in", "use_hook_mlp_in", "ungroup_grouped_query_attention")


class HookedBackend(Backend):
    """A ``HookedTransformer``; refuses architectures edgeatp's exact formulas would get wrong."""

    kind = "hooked"

    def __init__(self, model: Any) -> None:
        validate_config(model.cfg)
        _validate_weights(model)
        self.model = model
        cfg = model.cfg
        self._shape = ModelShape(
            n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
            d_mlp=None if cfg.attn_only else cfg.d_mlp, attn_only=bool(cfg.attn_only),
            parallel_attn_mlp=bool(cfg.parallel_attn_mlp),
            n_kv_heads=None if cfg.ungroup_grouped_query_attention else cfg.n_key_value_heads,
        )

    @property
    def shape(self) -> ModelShape:
        return self._shape

    @property
    def device(self) -> torch.device:
        return self.model.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.W_E.dtype

    @property
    def post_norm(self) -> bool:
        return bool(getattr(self.cfg, "use_normalization_before_and_after", False))

    # ------------------------------------------------------------------ state and hooks
    def foreign_hooks(self) -> list[str]:
        return [n for n, hp in self.model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]

    @contextmanager
    def prepared(self) -> Iterator[None]:
        m = self.model
        saved = {f: getattr(m.cfg, f) for f in _FLAGS}
        modes = [(mod, mod.training) for mod in m.modules()]
        try:
            m.eval()
            m.cfg.use_split_qkv_input = False
            m.cfg.use_attn_result = False
            m.cfg.use_attn_in = False
            m.cfg.use_hook_mlp_in = not m.cfg.attn_only
            yield
        finally:
            m.reset_hooks(including_permanent=False)
            for f, v in saved.items():
                setattr(m.cfg, f, v)
            for mod, mode in modes:
                mod.training = mode

    @contextmanager
    def hooks(self, fwd: Sequence[tuple[Site, FwdHook]]) -> Iterator[None]:
        def wrap(fn: FwdHook) -> Callable:
            return lambda tensor, hook: fn(tensor)

        with self.model.hooks(fwd_hooks=[(self.hook_name(s), wrap(f)) for s, f in fwd]):
            yield

    def run(self, tokens: torch.Tensor, logits: bool) -> torch.Tensor | None:
        return self.model(tokens, return_type="logits" if logits else None)

    @property
    def grouped_now(self) -> bool:
        return self.shape.grouped and not self.cfg.ungroup_grouped_query_attention

    @contextmanager
    def ungrouped(self) -> Iterator[None]:
        saved = self.cfg.ungroup_grouped_query_attention
        self.cfg.ungroup_grouped_query_attention = True
        try:
            yield
        finally:
            self.cfg.ungroup_grouped_query_attention = saved

    # ------------------------------------------------------------------ weights
    def qkv_weights(self, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.model.blocks[layer].attn
        if kind == "q":
            return attn.W_Q, attn.b_Q
        if kind == "k":
            return (attn._W_K, attn._b_K) if self.grouped_now else (attn.W_K, attn.b_K)
        return (attn._W_V, attn._b_V) if self.grouped_now else (attn.W_V, attn.b_V)

    def W_O(self, layer: int) -> torch.Tensor:
        return self.model.blocks[layer].attn.W_O

    def W_out(self, layer: int) -> torch.Tensor:
        return self.model.blocks[layer].mlp.W_out

    def norm(self, layer: int, which: str) -> Norm:
        from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

        module = getattr(self.model.blocks[layer], which, None)
        if module is None or isinstance(module, torch.nn.Identity):
            return NO_NORM
        if isinstance(module, (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)):
            return NormParts(isinstance(module, (LayerNorm, LayerNormPre)), True, float(module.eps),
                             module.w if isinstance(module, (LayerNorm, RMSNorm)) else None,
                             module.b if isinstance(module, LayerNorm) else None)
        return OpaqueNorm(module)

    def rotate(self, layer: int, x: torch.Tensor, offset: int) -> torch.Tensor:
        return self.model.blocks[layer].attn.apply_rotary(x, past_kv_pos_offset=offset)

    def attn_scale(self, layer: int) -> float:
        return float(self.model.blocks[layer].attn.attn_scale)

    def convert(self, dtype: torch.dtype | None, device: torch.device | None) -> None:
        if dtype is not None and self.dtype != dtype:
            self.model.to(dtype, print_details=False)
            self.model.cfg.dtype = dtype
        if device is not None:
            self.model.to(device, print_details=False)


def validate_config(cfg: Any) -> None:
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
