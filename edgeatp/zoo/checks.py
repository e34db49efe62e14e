"""Exact checks of the induction mechanism of a zoo model, written with TransformerLens hooks only.

They do not use edgeatp's attribution or patching code, so they check it independently (the
tests compare edgeatp's exact edge patches of ``llama-induction`` with these numbers). On the
``induction`` task (``BOS s1..s8 s1..s5 -> s6``) the answer ``s6`` first occurs at the
*key position*; a previous-token head in layer 0 writes ``s5`` there, and a layer-1
induction head at the last position attends to it because its key now matches the query.

All patches are noising patches (corrupt -> clean): the effect is measured as the clean
logit difference (answer minus wrong token) after the patch and as the fraction of the
clean-minus-corrupt gap that remains (1 = no effect, 0 = the corrupt run's value).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..metrics import METRICS
from ..tasks.pairs import PromptPairs

Hooks = list[tuple[str, Callable[..., Any]]]


def key_positions(pairs: PromptPairs) -> torch.Tensor:
    """Where the answer token first occurs in each clean prompt (the induction target)."""
    return (pairs.clean == pairs.answer[:, None]).int().argmax(1)


def _run(model: Any, pairs: PromptPairs, hooks: Hooks = ()) -> dict[str, float]:
    """Mean logit difference, answer and wrong-token logits, and accuracy of the clean prompts under ``hooks``."""
    batch = pairs.batch(torch.arange(len(pairs)), "noising")
    with torch.no_grad():
        logits = model.run_with_hooks(batch.base, fwd_hooks=list(hooks))
    rows = torch.arange(len(pairs))
    at = logits[rows, batch.answer_pos]
    return {"logit_diff": float(METRICS["logit_diff"](logits, batch).mean()),
            "answer_logit": float(at[rows, batch.answer].mean()),
            "wrong_logit": float(at[rows, batch.wrong[:, 0]].mean()),
            "accuracy": float((at.argmax(-1) == batch.answer).float().mean())}


def _corrupt_logit_diff(model: Any, pairs: PromptPairs) -> float:
    batch = pairs.batch(torch.arange(len(pairs)), "denoising")
    with torch.no_grad():
        return float(METRICS["logit_diff"](model(batch.base), batch).mean())


def _z(model: Any, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's ``hook_z`` ([b, T, H, d_head]) on ``tokens``."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda s: s.endswith("hook_z"))
    return {layer: cache[f"blocks.{layer}.attn.hook_z"] for layer in range(model.cfg.n_layers)}


def task_attention(model: Any, pairs: PromptPairs) -> dict[str, list[float]]:
    """Per query head: layer-0 attention from the key position to its previous token, and
    layer-1 attention from the last position to the key position (clean prompts)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(pairs.clean, names_filter=lambda s: s.endswith("hook_pattern"))
    rows, kp = torch.arange(len(pairs)), key_positions(pairs)
    p0, p1 = cache["blocks.0.attn.hook_pattern"], cache["blocks.1.attn.hook_pattern"]
    return {"layer0_key_pos_to_previous": [round(float(p0[rows, h, kp, kp - 1].mean()), 3) for h in range(p0.shape[1])],
            "layer1_last_to_key_pos": [round(float(p1[rows, h, pairs.answer_pos, kp].mean()), 3)
                                       for h in range(p1.shape[1])]}


def _patch_z(layer: int, head: int, source: dict[int, torch.Tensor]) -> Hooks:
    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[:, :, head] = source[layer][:, :, head]
        return z

    return [(f"blocks.{layer}.attn.hook_z", hook)]


def _add(slots: list[int], delta: torch.Tensor) -> Callable[..., torch.Tensor]:
    def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:  # x: [b, T, heads or kv heads, d_model]
        x = x.clone()
        x[:, :, slots] += delta[:, :, None]
        return x

    return hook


def _layer1_delta(model: Any, pairs: PromptPairs, heads: list[int], via_mlp: bool) -> torch.Tensor:
    """How layer 1's input changes when layer-0 ``heads`` output their corrupt values: their own
    outputs only (direct path), or with MLP 0 recomputed on the patched residual (``via_mlp``)."""
    zc, zx = _z(model, pairs.clean), _z(model, pairs.corrupt)
    if not via_mlp:  # b_O cancels: it is the same in both runs
        W_O = model.blocks[0].attn.W_O
        return sum((zx[0][:, :, h] - zc[0][:, :, h]) @ W_O[h] for h in heads)
    name = "blocks.1.hook_resid_pre"
    hooks = [hook for h in heads for hook in _patch_z(0, h, zx)]
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean, names_filter=name)
        with model.hooks(fwd_hooks=hooks):
            _, patched = model.run_with_cache(pairs.clean, names_filter=name)
    return patched[name] - clean[name]


def path_patch(model: Any, pairs: PromptPairs, heads: list[int], site: str, slots: list[int],
               via_mlp: bool = False) -> dict[str, float]:
    """Patch the corrupt outputs of layer-0 ``heads`` into layer 1's ``site`` input only (``q``:
    query heads ``slots``; ``k``/``v``: key/value heads ``slots``); every other reader of the
    residual stream sees the clean outputs. ``via_mlp`` also carries the patch through MLP 0."""
    delta = _layer1_delta(model, pairs, heads, via_mlp)
    was = model.cfg.use_split_qkv_input
    model.set_use_split_qkv_input(True)
    try:
        return _run(model, pairs, [(f"blocks.1.hook_{site}_input", _add(slots, delta))])
    finally:
        model.set_use_split_qkv_input(was)


def _path_patches(model: Any, pairs: PromptPairs, head: int) -> dict[str, dict[str, float]]:
    """Layer-0 ``head`` patched into layer 1's queries (all query heads), keys and values (all
    key/value heads, then each one), along the direct path and through MLP 0 as well."""
    H, G = model.cfg.n_heads, model.cfg.n_key_value_heads or model.cfg.n_heads
    sites = [("q", list(range(H))), ("k", list(range(G))), ("v", list(range(G)))]
    sites += [(site, [g]) for site in ("k", "v") for g in range(G)]
    return {f"a0.h{head} -> a1 {site} of {'query' if site == 'q' else 'kv'} heads {slots} "
            f"({'direct + through MLP 0' if via else 'direct'})": path_patch(model, pairs, [head], site, slots, via)
            for via in (False, True) for site, slots in sites}


def _split_input_error(model: Any, pairs: PromptPairs) -> float:
    """Largest logit change from running with split q/k/v inputs and a zero patch (should be ~1e-6)."""
    was = model.cfg.use_split_qkv_input
    with torch.no_grad():
        ref = model(pairs.clean)
        model.set_use_split_qkv_input(True)
        try:
            got = model.run_with_hooks(pairs.clean, fwd_hooks=[("blocks.1.hook_k_input", lambda x, hook: x + 0.0)])
        finally:
            model.set_use_split_qkv_input(was)
    return float((got - ref).abs().max())


def mechanism_checks(model: Any, pairs: PromptPairs) -> dict[str, Any]:
    """Attention on the task, per-head noising, and path patching of the previous-token head (the
    layer-0 head attending most to the previous token) into layer 1's queries, keys and values."""
    H, G = model.cfg.n_heads, model.cfg.n_key_value_heads or model.cfg.n_heads
    clean, corrupt_ld = _run(model, pairs), _corrupt_logit_diff(model, pairs)

    def summary(got: dict[str, float]) -> dict[str, float]:
        return {"logit_diff": round(got["logit_diff"], 3),
                "fraction_remaining": round((got["logit_diff"] - corrupt_ld) / (clean["logit_diff"] - corrupt_ld), 3),
                "answer_logit_change": round(got["answer_logit"] - clean["answer_logit"], 3),
                "wrong_logit_change": round(got["wrong_logit"] - clean["wrong_logit"], 3),
                "accuracy": round(got["accuracy"], 3)}

    attn = task_attention(model, pairs)
    zx = _z(model, pairs.corrupt)
    prev = max(range(H), key=lambda h: attn["layer0_key_pos_to_previous"][h])
    return {
        "n_pairs": len(pairs),
        "direction": "noising (corrupt -> clean); fraction_remaining = (LD - LD_corrupt) / (LD_clean - LD_corrupt); "
                     "logit changes are relative to the clean run (wrong = the token the corrupt prompt puts at sk)",
        "clean": summary(clean), "corrupt_logit_diff": round(corrupt_ld, 3),
        "kv_head_of_query_head": [h * G // H for h in range(H)],
        "task_attention": attn,
        "previous_token_head": f"a0.h{prev}",
        "induction_heads": [f"a1.h{h}" for h in range(H) if attn["layer1_last_to_key_pos"][h] >= 0.5],
        "head_noising": {f"a{layer}.h{h}": summary(_run(model, pairs, _patch_z(layer, h, zx)))
                         for layer in range(model.cfg.n_layers) for h in range(H)},
        "path_patching": {k: summary(v) for k, v in _path_patches(model, pairs, prev).items()},
        "split_input_max_logit_error": _split_input_error(model, pairs),
    }
