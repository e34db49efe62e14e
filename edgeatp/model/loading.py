"""Loading models: zoo names, TransformerLens pretrained names from the local cache, local Hugging
Face checkpoint directories and model objects, each wrapped in a :class:`ModelAdapter`."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ModelError
from ..tokenizer import HFTokenizer, WordTokenizer
from .adapter import ModelAdapter


def load_model(spec: Any, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               allow_download: bool = False) -> ModelAdapter:
    """Load a model from any supported spec and wrap it in a :class:`ModelAdapter`.

    ``spec`` may be ``"zoo:NAME"`` (shipped models), a local Hugging Face checkpoint directory
    (GPT-2 and GPT-NeoX/Pythia families), a TransformerLens pretrained name (``"gpt2"``,
    ``"pythia-70m"``; must be in the local Hugging Face cache unless ``allow_download``), a
    ``HookedTransformer`` or a ``ModelAdapter``. ``dtype`` and ``device`` convert the weights —
    in place when you pass your own model.
    """
    from transformer_lens import HookedTransformer

    torch_dtype = _parse_dtype(dtype)
    torch_device = _parse_device(device)
    if isinstance(spec, ModelAdapter):
        adapter = spec
    elif isinstance(spec, HookedTransformer):
        tok = spec.tokenizer
        adapter = ModelAdapter(spec, HFTokenizer(tok) if tok is not None else None,
                               name=getattr(spec.cfg, "model_name", "model"))
    elif isinstance(spec, (str, Path)):
        text = str(spec)
        if text.startswith("zoo:"):
            adapter = load_zoo_model(text[4:])
        elif Path(text).expanduser().is_dir():
            adapter = _load_local_checkpoint(Path(text).expanduser())
        else:
            adapter = _load_pretrained(text, allow_download)
    else:
        raise ModelError(f"cannot load a model from {type(spec).__name__}; pass a name, a directory or a HookedTransformer")
    if torch_dtype is not None:
        adapter.model.to(torch_dtype, print_details=False)
        adapter.model.cfg.dtype = torch_dtype
    if torch_device is not None:
        adapter.model.to(torch_device, print_details=False)
    return adapter


def _parse_device(device: str | torch.device | None) -> torch.device | None:
    """A usable torch device, or a one-line error naming what this machine has."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown device {device!r}; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"{{device}} {device!r}: this torch build has no CUDA device; use {{device}} cpu",
                          device="device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"{{device}} {device!r}: MPS is not available here; use {{device}} cpu", device="device")
    return dev


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _load_pretrained(name: str, allow_download: bool) -> ModelAdapter:
    """A TransformerLens pretrained model, from the local Hugging Face cache unless told otherwise."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise ModelError(
            f"unknown model {name!r}: not 'zoo:NAME', not a local checkpoint directory and not a "
            "TransformerLens pretrained name (run `edgeatp models` for the shipped ones)"
        ) from None
    offline = not allow_download
    if offline and not _in_hf_cache(official):
        raise ModelError(
            f"model {name!r} ({official}) is not in the local Hugging Face cache and edgeatp runs offline; "
            "download it once (with {allow_download} on a networked machine) or pass a local checkpoint directory",
            allow_download="allow_download")
    with _hf_offline(offline):
        try:
            model = HookedTransformer.from_pretrained(name, device="cpu")
        except OSError as exc:
            raise ModelError(f"could not load {name!r} from the local cache: {str(exc).splitlines()[0]}") from None
    tok = HFTokenizer(model.tokenizer, name) if model.tokenizer is not None else None
    return ModelAdapter(model, tok, name=name)


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    hit = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(hit, str) and os.path.exists(hit)


@contextmanager
def _hf_offline(offline: bool) -> Iterator[None]:
    """Make huggingface_hub/transformers refuse the network (they read these flags at import time)."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as hc

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved_const = hc.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = saved_const
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load_local_checkpoint(path: Path) -> ModelAdapter:
    """A local Hugging Face checkpoint (GPT-2 or GPT-NeoX family) converted to a HookedTransformer."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type")
    if model_type not in ("gpt2", "gpt_neox"):
        raise ModelError(f"{path}: model_type {model_type!r} is not supported for local checkpoints (gpt2, gpt_neox are)")
    with _hf_offline(True):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        tokenizer = None
        if any((path / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if model_type == "gpt2":
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights as convert

        c = hf_config
        cfg_dict = dict(
            d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
            d_mlp=getattr(c, "n_inner", None) or 4 * c.n_embd, n_layers=c.n_layer,
            n_ctx=getattr(c, "n_ctx", None) or c.n_positions, eps=c.layer_norm_epsilon,
            d_vocab=c.vocab_size, act_fn=c.activation_function,
            use_attn_scale=getattr(c, "scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=getattr(c, "scale_attn_by_inverse_layer_idx", False),
            normalization_type="LN", original_architecture="GPT2LMHeadModel", default_prepend_bos=True,
        )
    else:
        from transformer_lens.pretrained.weight_conversions import convert_neox_weights as convert

        c = hf_config
        d_head = c.hidden_size // c.num_attention_heads
        rotary_pct = getattr(c, "rotary_pct", None)
        if rotary_pct is None:
            rotary_pct = (getattr(c, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        rope = getattr(c, "rope_parameters", None) or {}
        cfg_dict = dict(
            d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
            n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps,
            d_vocab=c.vocab_size, act_fn=c.hidden_act, use_attn_scale=True,
            parallel_attn_mlp=getattr(c, "use_parallel_residual", True), positional_embedding_type="rotary",
            rotary_adjacent_pairs=False, rotary_dim=round(rotary_pct * d_head),
            rotary_base=rope.get("rope_theta", getattr(c, "rotary_emb_base", 10000)),
            normalization_type="LN", original_architecture="GPTNeoXForCausalLM", default_prepend_bos=False,
        )
    cfg = HookedTransformerConfig(**cfg_dict)
    model = HookedTransformer(cfg)
    state = convert(hf_model, cfg)
    model.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=True,
                                      center_unembed=True, fold_value_biases=True)
    tok = HFTokenizer(tokenizer, path.name) if tokenizer is not None else None
    if tok is not None and tok.bos_id is None:
        model.cfg.default_prepend_bos = False
    return ModelAdapter(model, tok, name=str(path))


def load_zoo_model(name: str) -> ModelAdapter:
    """A shipped zoo model (float32, CPU) with its word-level tokenizer and card."""
    from transformer_lens import HookedTransformer

    from .. import zoo

    entry = zoo.entry(name)
    model = HookedTransformer(zoo.hooked_config(name))
    model.load_state_dict(zoo.state_dict(name))
    model.eval()
    tok = WordTokenizer(entry.vocab, bos="BOS", name=f"zoo:{name}")
    return ModelAdapter(model, tok, name=f"zoo:{name}", card=zoo.read_card(name))
