"""Loading models as TransformerBridges, offline: zoo models (HookedTransformer state dicts converted
to TransformerLens' native model), local Hugging Face checkpoint folders and cached pretrained names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..tokenizer import HFTokenizer, WordTokenizer
from .adapter import ModelAdapter
from .bridge import ARCHITECTURES, FAMILY_NAMES, TL3_HINT
from .checkpoint import (BOS_BY_CONVENTION, Checkpoint, _first_line, adds_bos, architecture_of, check_weight_files,
                         checkpoint_dtype, load_tokenizer, read_config, read_weights)


# ---------------------------------------------------------------------------------------- zoo
def zoo_bridge(name: str) -> ModelAdapter:
    """A shipped zoo model as a bridge around TransformerLens' native model (float32, on torch's default device)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    from .. import zoo

    entry = zoo.entry(name)
    cfg = TransformerBridgeConfig.from_dict({**entry.config, "architecture": "TransformerLensNative"})
    bridge = TransformerBridge.boot_native(cfg, device=torch.get_default_device(), dtype=torch.float32,
                                           model_name=f"zoo:{name}")
    bridge.load_state_dict(native_state_dict(zoo.state_dict(name), entry.config), strict=True)
    bridge.eval()
    tok = WordTokenizer(entry.vocab, bos="BOS", name=f"zoo:{name}")
    return ModelAdapter(bridge, tok, name=f"zoo:{name}", card=zoo.read_card(name))


def _heads_out(t: torch.Tensor) -> torch.Tensor:
    """``[n, d_model, d_head]`` -> ``nn.Linear`` weight ``[n * d_head, d_model]``."""
    return t.permute(0, 2, 1).reshape(-1, t.shape[1])


#: HookedTransformer parameter name -> (native bridge parameter name, tensor conversion).
_NATIVE_KEYS: dict[str, tuple[str, Any]] = {
    "W_E": ("weight", None), "W_pos": ("weight", None), "w": ("weight", None), "b": ("bias", None),
    "W_Q": ("q.weight", _heads_out), "W_K": ("k.weight", _heads_out), "_W_K": ("k.weight", _heads_out),
    "W_V": ("v.weight", _heads_out), "_W_V": ("v.weight", _heads_out),
    "b_Q": ("q.bias", torch.flatten), "b_K": ("k.bias", torch.flatten), "_b_K": ("k.bias", torch.flatten),
    "b_V": ("v.bias", torch.flatten), "_b_V": ("v.bias", torch.flatten),
    "W_O": ("o.weight", lambda t: t.reshape(-1, t.shape[-1]).T), "b_O": ("o.bias", None),
    "W_in": ("in.weight", torch.t), "b_in": ("in.bias", None), "W_gate": ("gate.weight", torch.t),
    "W_out": ("out.weight", torch.t), "b_out": ("out.bias", None), "W_U": ("weight", torch.t), "b_U": ("bias", None),
}


def native_state_dict(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A HookedTransformer state dict in the native bridge's names and layouts.

    Rotary query/key dimensions are reordered from HookedTransformer's halves (``i`` pairs with
    ``i + r/2``) to the native model's adjacent pairs (``2i``, ``2i + 1``), the same permutation for
    queries and keys, so every score is unchanged; the native gated MLP has no biases, so they must be zero.
    """
    rotary = config.get("positional_embedding_type") == "rotary" and not config.get("rotary_adjacent_pairs")
    perm = _adjacent_order(config["d_head"], config.get("rotary_dim") or config["d_head"]) if rotary else None
    out = {}
    for key, tensor in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in ("mask", "IGNORE", "rotary_sin", "rotary_cos"):
            continue  # buffers the native model rebuilds from its config
        if config.get("gated_mlp") and leaf in ("b_in", "b_out"):
            if bool((tensor != 0).any()):
                raise ModelError(f"{key} is not zero, but TransformerLens' native gated MLP has no biases; {TL3_HINT}")
            continue
        if leaf not in _NATIVE_KEYS:
            raise ModelError(f"cannot convert {key} to TransformerLens' native model; {TL3_HINT}")
        if perm is not None and leaf in ("W_Q", "W_K", "_W_K", "b_Q", "b_K", "_b_K"):
            tensor = tensor[..., perm]
        name, convert = _NATIVE_KEYS[leaf]
        out[f"{prefix}.{name}"] = (convert(tensor) if convert is not None else tensor).contiguous()
    return out


def _adjacent_order(d_head: int, rotary_dim: int) -> torch.Tensor:
    """Indices taking rotate-half order to adjacent-pair order on the first ``rotary_dim`` dimensions."""
    perm = torch.arange(d_head)
    half = rotary_dim // 2
    perm[0:rotary_dim:2] = torch.arange(half)
    perm[1:rotary_dim:2] = torch.arange(half, rotary_dim)
    return perm


# ---------------------------------------------------------------------------------------- checkpoints
def checkpoint_bridge(path: str | Path, dtype: torch.dtype | None = None, name: str | None = None) -> ModelAdapter:
    """A local Hugging Face checkpoint folder as a bridge around the transformers model, offline.

    The folder's config, weights and tokenizer are read by transformers here (missing, unexpected or
    mismatched weights refused, in the checkpoint's dtype unless ``dtype`` says otherwise) and handed
    to the bridge, which then reads nothing itself.
    """
    from transformers import AutoConfig

    path = Path(path).expanduser().resolve()
    raw = read_config(path)
    arch = architecture_of(path, raw)
    what = f"{path}: model type {raw.get('model_type')!r} ({arch})"
    if raw.get("quantization_config"):
        raise ModelError(f"{what} is quantized; point edgeatp at a dequantized (float) copy")
    if raw.get("auto_map"):
        raise ModelError(f"{what} needs the checkpoint's own Python code (trust_remote_code), which edgeatp never runs")
    if arch not in ARCHITECTURES or arch == "TransformerLensNative":
        raise ModelError(f"{what}: edgeatp's TransformerBridge backend loads {FAMILY_NAMES} checkpoints, "
                         f"not {arch} yet; {TL3_HINT}")
    try:
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure inside transformers becomes one line
        raise ModelError(f"{path / 'config.json'}: transformers cannot read it ({_first_line(exc)})") from exc
    check_weight_files(path)
    dt = checkpoint_dtype(raw, dtype)
    tokenizer = load_tokenizer(path)
    hf_model = read_weights(Checkpoint(path, arch, hf_config, None, dt, tokenizer), attn_implementation="eager")
    bridge = boot_transformers(str(path), hf_model, load_tokenizer(path) if tokenizer is not None else None, dt)
    # BOS as the HookedTransformer loader decides it: when the tokenizer adds it, and for GPT-2 by convention
    bridge.cfg.default_prepend_bos = tokenizer is not None and (
        adds_bos(tokenizer) or (arch in BOS_BY_CONVENTION and tokenizer.bos_token_id is not None))
    return ModelAdapter(bridge, HFTokenizer(tokenizer, path.name) if tokenizer is not None else None,
                        name=name or str(path))


def boot_transformers(name: str, hf_model: Any, tokenizer: Any, dtype: torch.dtype) -> Any:
    """``TransformerBridge.boot_transformers`` on a loaded model and tokenizer (no download), in eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer,
                                                     device=hf_model.device, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - any failure inside TransformerLens becomes one line
        raise ModelError(f"{name}: TransformerLens cannot bridge this model ({_first_line(exc)})") from exc
    return bridge.eval()


# ---------------------------------------------------------------------------------------- pretrained names
def cached_snapshot(name: str) -> Path | None:
    """The folder of ``name`` (a Hugging Face repo id or a TransformerLens alias) in the local cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for repo in dict.fromkeys([official_name(name), name]):
        if repo is None:
            continue
        try:
            folder = snapshot_download(repo, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached (or not a valid repo id)
            continue
        if os.path.isfile(os.path.join(folder, "config.json")):
            return Path(folder)
    return None


def official_name(name: str) -> str | None:
    """TransformerLens' official name for an alias (``gpt2-small`` -> ``gpt2``), ``None`` if it knows none."""
    try:
        from transformer_lens.supported_models import get_official_model_name
    except ImportError:  # TransformerLens 3.x keeps it with its loaders
        from transformer_lens.loading_from_pretrained import get_official_model_name
    try:
        return get_official_model_name(name)
    except ValueError:
        return None
