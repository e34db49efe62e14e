"""Models described from their configs alone, without weights: what the planner (:mod:`edgeatp.plan`) reads.

:func:`shape_of` is the one translation of a TransformerLens config into edgeatp's :class:`ModelShape`
(the adapter uses it too) and :func:`spec_of` adds what the planner needs. :func:`describe_model`
resolves what ``--model`` names without reading weights: a zoo model (its shipped config), a
checkpoint folder or a TransformerLens pretrained name. The common checkpoint families (GPT-2,
GPT-NeoX/Pythia, Llama, Mistral, Qwen2) are read from ``config.json`` without importing torch, with
the numbers TransformerLens' translation gives (a test compares the two); any other folder goes
through the loader's own preflight and translation (:func:`~edgeatp.model.checkpoint.config_only`).
Nothing here imports torch until a model needs TransformerLens.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import ModelError
from .graph import ModelShape
from .plan import DTYPE_BYTES, ModelSpec

_DTYPE_ALIASES = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "float": "float32", "double": "float64"}


def shape_of(cfg: Any) -> ModelShape:
    """The graph shape of a HookedTransformer config (key/value heads shared unless TransformerLens ungroups them)."""
    return ModelShape(
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
        d_mlp=None if cfg.attn_only else cfg.d_mlp, attn_only=bool(cfg.attn_only),
        parallel_attn_mlp=bool(cfg.parallel_attn_mlp),
        n_kv_heads=None if cfg.ungroup_grouped_query_attention else cfg.n_key_value_heads,
    )


def spec_of(cfg: Any, name: str, shape: ModelShape | None = None) -> ModelSpec:
    """The planner's description of a model with this TransformerLens config (``shape``: the graph shape
    when the caller knows it, e.g. a backend's; else the HookedTransformer config's own)."""
    dtype = str(cfg.dtype).removeprefix("torch.")
    pos = getattr(cfg, "positional_embedding_type", "standard")
    d_vocab = int(cfg.d_vocab)
    return ModelSpec(name, shape or shape_of(cfg), d_vocab, int(getattr(cfg, "d_vocab_out", -1) or d_vocab),
                     int(cfg.n_ctx), dtype, getattr(cfg, "normalization_type", "LN"),
                     bool(getattr(cfg, "gated_mlp", False)), pos == "standard", pos == "rotary",
                     bool(getattr(cfg, "use_normalization_before_and_after", False)), getattr(cfg, "act_fn", None))


def _dtype_name(dtype: str | None, default: str) -> str:
    """A dtype name edgeatp knows (``--dtype`` spellings included), or ``default`` when none is given."""
    if dtype is None:
        return default
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPE_BYTES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return name


def describe_model(spec: str, dtype: str | None = None) -> ModelSpec:
    """The planner's description of what ``--model`` names, from configs alone (no weights are read).

    ``dtype`` overrides the weights' dtype (default: float32 for zoo and TransformerLens models, the
    checkpoint's declared dtype for folders), as ``load_model`` does.
    """
    if spec.startswith("zoo:"):
        return _zoo_spec(spec, dtype)
    path = Path(spec).expanduser()
    if path.name == "config.json" and path.is_file():
        path = path.parent
    if path.is_dir():
        fast = _folder_spec(path, dtype)
        if fast is not None:
            return fast
        if _translation() is None:
            raise _untranslatable(path, path.name)
        from .model.checkpoint import config_only
        from .model.loading import _parse_dtype

        return _checked(config_only(path, _parse_dtype(dtype)), path.name)
    return _pretrained_spec(spec, dtype)


def _zoo_spec(spec: str, dtype: str | None) -> ModelSpec:
    """A zoo model's description from its shipped config (HookedTransformerConfig's defaults filled in)."""
    from . import zoo

    c = zoo.entry(spec[4:]).config
    d_model, n_heads = c["d_model"], c["n_heads"]
    attn_only = bool(c.get("attn_only", False))
    shape = ModelShape(c["n_layers"], n_heads, d_model, c.get("d_head", d_model // n_heads),
                       None if attn_only else c.get("d_mlp", 4 * d_model), attn_only,
                       bool(c.get("parallel_attn_mlp", False)), c.get("n_key_value_heads"))
    pos = c.get("positional_embedding_type", "standard")
    return ModelSpec(spec, shape, c["d_vocab"], c.get("d_vocab_out", c["d_vocab"]), c["n_ctx"],
                     _dtype_name(dtype, c.get("dtype", "float32")), c.get("normalization_type", "LN"),
                     bool(c.get("gated_mlp", False)), pos == "standard", pos == "rotary", act_fn=c.get("act_fn"))


def read_config(path: Path) -> dict:
    """``config.json`` of a checkpoint folder as a dict, or a one-line error naming the file."""
    file = path / "config.json"
    if not file.is_file():
        raise ModelError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file} is not valid JSON ({str(exc).splitlines()[0]}); restore the file the model "
                         "came with") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{file} is not a JSON object; restore the file the model came with")
    return raw


def _folder_spec(path: Path, dtype: str | None) -> ModelSpec | None:
    """A checkpoint folder of a common family read from ``config.json`` as TransformerLens translates it
    (LayerNorm folded), without importing torch; ``None`` for other families and for settings the loader
    checks further (it refuses some of them with its own one-line error)."""
    raw = read_config(path)
    file = path / "config.json"
    if not _plain(raw):
        return None
    arch = _architecture(raw)
    declared = raw.get("dtype") or raw.get("torch_dtype")
    dt = _dtype_name(dtype, declared if declared in DTYPE_BYTES else "float32")
    try:
        if arch == "GPT2LMHeadModel":
            d, heads = raw.get("n_embd", 768), raw.get("n_head", 12)
            shape = ModelShape(raw.get("n_layer", 12), heads, d, d // heads, 4 * d)
            vocab = raw.get("vocab_size", 50257)
            return ModelSpec(path.name, shape, vocab, vocab, raw.get("n_ctx", raw.get("n_positions", 1024)), dt,
                             "LNPre", learned_positions=True, act_fn=raw.get("activation_function", "gelu_new"))
        d, heads, vocab = raw["hidden_size"], raw["num_attention_heads"], raw["vocab_size"]
        if arch == "GPTNeoXForCausalLM":
            shape = ModelShape(raw["num_hidden_layers"], heads, d, d // heads, raw["intermediate_size"],
                               parallel_attn_mlp=raw.get("use_parallel_residual", True))
            return ModelSpec(path.name, shape, vocab, vocab, raw.get("max_position_embeddings", 2048), dt, "LNPre",
                             rotary=True, act_fn=raw.get("hidden_act", "gelu"))
        d_head = (raw.get("head_dim") or d // heads) if arch == "MistralForCausalLM" else d // heads
        shape = ModelShape(raw["num_hidden_layers"], heads, d, d_head, raw["intermediate_size"],
                           n_kv_heads=raw.get("num_key_value_heads", heads))
        n_ctx = 2048 if arch == "MistralForCausalLM" else raw.get("max_position_embeddings", 2048)
        return ModelSpec(path.name, shape, vocab, vocab, n_ctx, dt, "RMSPre", gated_mlp=True, rotary=True,
                         act_fn=raw.get("hidden_act", "silu"))
    except KeyError as exc:
        raise ModelError(f"{file} has no {exc.args[0]!r}; it is not a complete {arch} config") from None
    except ValueError as exc:
        raise ModelError(f"{file}: {exc}") from None


def _architecture(raw: dict) -> str | None:
    """The architecture a config declares (the loader's translation needs it declared)."""
    declared = raw.get("architectures")
    return declared[0] if isinstance(declared, list) and declared else None


def _plain(raw: dict) -> bool:
    """Whether a config is of a family :func:`_folder_spec` reads, with none of the settings the loader
    refuses or translates specially (rotary scaling, extra biases, unusual widths, sliding windows)."""
    arch = _architecture(raw)
    if raw.get("quantization_config") or raw.get("auto_map") or raw.get("is_encoder_decoder"):
        return False
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "unknown"
    theta = rope.get("rope_theta", raw.get("rope_theta", raw.get("rotary_emb_base", 10000))) \
        if isinstance(rope, dict) else None
    if arch == "GPT2LMHeadModel":
        return raw.get("n_inner") in (None, 4 * raw.get("n_embd", 768))
    if arch == "GPTNeoXForCausalLM":
        return rope_type == "default" and theta == 10000 and raw.get("attention_bias", True) is True
    if arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        width = raw.get("hidden_size", 0) // max(raw.get("num_attention_heads", 1), 1)
        return (rope_type in (("default", "llama3") if arch == "LlamaForCausalLM" else ("default",))
                and not raw.get("attention_bias") and not raw.get("mlp_bias") and not raw.get("use_sliding_window")
                and (arch == "MistralForCausalLM" or raw.get("head_dim") in (None, width)))
    return False


def _checked(cfg: Any, name: str) -> ModelSpec:
    """The description of a translated config the adapter accepts (its one-line refusal otherwise)."""
    from .model.hooked import validate_config

    validate_config(cfg)
    return spec_of(cfg, name)


def _translation() -> Any | None:
    """TransformerLens 3.x's config translation (``None`` where only TransformerLens 4 is installed)."""
    try:
        import transformer_lens.loading_from_pretrained as loading
    except ImportError:
        return None
    return loading


def _untranslatable(folder: Path, label: str) -> ModelError:
    """The one-line error for a config only TransformerLens 3.x's translation reads, where only 4 is installed."""
    from .model.bridge import TL3_HINT

    arch = _architecture(read_config(folder)) or "this"
    return ModelError(f"{label}: edgeatp plan reads plain GPT-2, GPT-NeoX, Llama, Mistral and Qwen2 configs itself "
                      f"and needs TransformerLens 3.x's translation for a {arch} config, which TransformerLens 4 does "
                      f"not have; {TL3_HINT}")


def _pretrained_spec(name: str, dtype: str | None) -> ModelSpec:
    """A TransformerLens pretrained name whose config TransformerLens knows offline (built in, or in the
    local Hugging Face cache; with TransformerLens 4, its cached folder); a one-line error otherwise."""
    loading = _translation()
    if loading is None:
        return _cached_spec(name, dtype)
    from .model.loading import _hf_offline, _parse_dtype

    try:
        official = loading.get_official_model_name(name)
    except ValueError:
        raise ModelError(f"unknown model {name!r}: not 'zoo:NAME', not a folder with a config.json and not a "
                         "TransformerLens pretrained name") from None
    try:
        with _hf_offline(True):
            cfg = loading.get_pretrained_model_config(official, fold_ln=True, device=None,
                                                      dtype=_parse_dtype(dtype or "float32"))
    except Exception:  # noqa: BLE001 - any failure to find the config offline means the same to the user
        raise ModelError(f"the config of {name!r} ({official}) is not known offline (not built into TransformerLens, "
                         "not in the local Hugging Face cache); pass a folder with its config.json") from None
    return _checked(cfg, name)


def _cached_spec(name: str, dtype: str | None) -> ModelSpec:
    """A pretrained name as its folder in the local Hugging Face cache (TransformerLens 4 has no built-in configs)."""
    from .model.bridge_loading import cached_snapshot

    folder = cached_snapshot(name)
    if folder is None:
        raise ModelError(f"the config of {name!r} is not in the local Hugging Face cache (and edgeatp runs offline); "
                         "pass a folder with its config.json")
    fast = _folder_spec(folder, dtype)
    if fast is None:
        raise _untranslatable(folder, name)
    return replace(fast, name=name)
