"""Local Hugging Face checkpoint folders as HookedTransformers, offline.

One path for every decoder family TransformerLens 3.9 converts, built from TransformerLens' own
config translation (``get_pretrained_model_config``) and weight converters
(``get_pretrained_state_dict``); edgeatp adds only what a local folder needs:

* **Preflight** on ``config.json`` (no weights read): families TransformerLens cannot convert,
  encoder-only and encoder-decoder models, models that need their own Python code, quantized
  checkpoints, missing weights and config features TransformerLens would silently get wrong
  are refused with one line naming the folder.
* **Name guard.** TransformerLens picks hard-coded configs by *name* (``"llama" in name``,
  ``"gemma-2-"``, ``"Meta-Llama-3-8B"``...), so a folder called ``Llama-3-8B-Instruct/`` holding
  a small fine-tune would get the official geometry. It translates a copy of ``config.json`` in a
  temporary folder whose path has none of those names, while its ``AutoConfig`` is patched
  (scoped, always restored) to return the config transformers read from the user's folder.
* **Templates.** Gemma, Gemma-2, Gemma-3 (text) and OLMo-1 exist in TransformerLens 3.9 only as
  name-keyed dicts: the dict of one official model is taken and overlaid with the geometry of
  ``config.json``. OLMo-2 is translated by TransformerLens' OLMo-3 branch (same modules).
* **Weights** are read by transformers (sharded safetensors too) with missing, unexpected and
  mismatched tensors refused, in the checkpoint's dtype unless ``dtype`` says otherwise, then
  converted and processed (``fold_ln``, centring, value-bias folding) with TransformerLens' own
  guards: no folding for post-norm blocks, no unembedding centring under a logit soft-cap, no
  value-bias folding with attention sinks.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..errors import ModelError
from ..model_config import read_config

if TYPE_CHECKING:
    from .adapter import ModelAdapter

#: Decoder architectures TransformerLens 3.9 converts into a HookedTransformer, with their model type.
FAMILIES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt2", "GPTNeoForCausalLM": "gpt_neo", "GPTJForCausalLM": "gptj",
    "GPTNeoXForCausalLM": "gpt_neox", "OPTForCausalLM": "opt", "BloomForCausalLM": "bloom",
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "PhiForCausalLM": "phi", "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
    "OlmoForCausalLM": "olmo", "Olmo2ForCausalLM": "olmo2", "Olmo3ForCausalLM": "olmo3", "OlmoeForCausalLM": "olmoe",
    "ApertusForCausalLM": "apertus", "GptOssForCausalLM": "gpt_oss",
}
#: Families TransformerLens 3.9 knows only by official name: the name whose dict is the template.
TEMPLATES: dict[str, str] = {
    "GemmaForCausalLM": "google/gemma-2b", "Gemma2ForCausalLM": "google/gemma-2-2b",
    "Gemma3ForCausalLM": "google/gemma-3-1b-pt", "OlmoForCausalLM": "allenai/OLMo-1B-hf",
}
#: Families translated and converted by a sibling branch of TransformerLens (same module layout).
BOS_BY_CONVENTION = frozenset({"GPT2LMHeadModel"})  # BOS prepended though the tokenizer does not add it
ALIASES: dict[str, str] = {"Olmo2ForCausalLM": "Olmo3ForCausalLM"}
#: Converted by TransformerLens only through the checkpoint's own modelling code.
REMOTE_CODE = frozenset({"QWenLMHeadModel", "GPT2LMHeadCustomModel"})
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Substrings of a path that make TransformerLens 3.9's translation take a name-keyed branch.
_NAME_TRIGGERS = ("llama", "gemma", "wav2vec2")
_TRANSLATING = threading.Lock()  # the AutoConfig patch is module-wide state

_LLAMA_LIKE = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "ApertusForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "OlmoForCausalLM",
    "Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoeForCausalLM",
})
#: Branches that take d_head = hidden_size / num_attention_heads whatever head_dim says.
_HEAD_DIM_FROM_WIDTH = frozenset({
    "LlamaForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
    "ApertusForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoeForCausalLM",
})
_NOT_ROTARY = frozenset({"GPT2LMHeadModel", "GPTNeoForCausalLM", "OPTForCausalLM", "BloomForCausalLM"})
_ROPE_TYPES = {"LlamaForCausalLM": ("default", "llama3"), "ApertusForCausalLM": ("default", "llama3"),
               "GptOssForCausalLM": ("default", "yarn"), "Olmo3ForCausalLM": ("default", "yarn")}


@dataclass
class Checkpoint:
    """A preflighted checkpoint folder whose config TransformerLens has translated; no weights read yet."""

    path: Path
    architecture: str
    hf_config: Any
    cfg: Any  # HookedTransformerConfig
    dtype: torch.dtype
    tokenizer: Any | None  # the folder's Hugging Face tokenizer

    @property
    def model_type(self) -> str:
        """The Hugging Face model type (``llama``, ``gpt2``...)."""
        return FAMILIES[self.architecture]


def supported_families() -> str:
    """The model types TransformerLens 3.9 converts, for error messages."""
    return ", ".join(FAMILIES.values())


def _first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------- preflight
def architecture_of(path: Path, raw: dict) -> str:
    """The checkpoint's architecture (``architectures[0]``, else the one its ``model_type`` names)."""
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    by_type = {t: a for a, t in FAMILIES.items()}
    if raw.get("model_type") in by_type:
        return by_type[raw["model_type"]]
    raise ModelError(f"{path / 'config.json'} names no architecture (model_type {raw.get('model_type')!r}); "
                     f"edgeatp loads these model types: {supported_families()}")


def preflight(path: Path, raw: dict) -> str:
    """Refuse, from ``config.json`` alone, architectures that cannot be converted; the architecture."""
    from transformer_lens.utilities.architectures import MASKED_LM_ARCHITECTURES, SEQ2SEQ_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    arch = architecture_of(path, raw)
    what = f"{path}: model type {raw.get('model_type')!r} ({arch})"
    if raw.get("is_encoder_decoder") or arch in SEQ2SEQ_ARCHITECTURES:
        raise ModelError(f"{what} is an encoder-decoder model; edgeatp loads decoder-only language models "
                         f"({supported_families()})")
    if arch not in FAMILIES:
        if arch in REMOTE_CODE or raw.get("auto_map"):
            raise ModelError(f"{what} needs the checkpoint's own Python code (trust_remote_code), which edgeatp "
                             f"never runs; it loads these model types: {supported_families()}")
        if arch in MASKED_LM_ARCHITECTURES or raw.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise ModelError(f"{what} is an encoder-only (masked) language model; edgeatp loads decoder-only "
                             f"language models ({supported_families()})")
        raise ModelError(f"{what} is not a family TransformerLens 3.9 converts; supported model types: "
                         f"{supported_families()}")
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise ModelError(f"{what} is {method}-quantized, which TransformerLens cannot convert; "
                         "point edgeatp at a dequantized (float) copy")
    return arch


def _rope(c: Any) -> dict:
    """The rotary parameters of a config (those of full-attention layers when they differ per layer type)."""
    rope = getattr(c, "rope_parameters", None) or {}
    return (rope.get("full_attention") or {}) if "full_attention" in rope else rope


def ignored_features(arch: str, c: Any) -> list[str]:
    """Settings of a transformers config that TransformerLens 3.9's translation or converter drops."""
    out = []
    width, heads = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None)
    if arch in _HEAD_DIM_FROM_WIDTH and head_dim and head_dim != width // heads:
        out.append(f"head_dim={head_dim} (not hidden_size/num_attention_heads)")
    if arch in _LLAMA_LIKE:
        out += [f"{k}=true" for k in ("attention_bias", "mlp_bias") if getattr(c, k, False)]
    rope = _rope(c)
    rope_type = rope.get("rope_type", "default")
    if arch not in _NOT_ROTARY and rope_type not in _ROPE_TYPES.get(arch, ("default",)):
        out.append(f"rope_type={rope_type!r}")
    if arch == "Phi3ForCausalLM" and rope.get("partial_rotary_factor", 1.0) != 1.0:
        out.append(f"partial_rotary_factor={rope['partial_rotary_factor']}")
    if arch == "GPT2LMHeadModel" and c.n_inner not in (None, 4 * c.n_embd):
        out.append(f"n_inner={c.n_inner} (not 4*n_embd)")
    if arch == "GPTNeoXForCausalLM":
        if rope.get("rope_theta", 10000) != 10000:
            out.append(f"rope_theta={rope['rope_theta']}")
        if not c.attention_bias:
            out.append("attention_bias=false")
    if arch == "OPTForCausalLM":
        if not c.do_layer_norm_before:
            out.append("do_layer_norm_before=false")
        if c.word_embed_proj_dim != width:
            out.append(f"word_embed_proj_dim={c.word_embed_proj_dim} (not hidden_size)")
        if not c.enable_bias:
            out.append("enable_bias=false")
    if arch == "BloomForCausalLM" and c.apply_residual_connection_post_layernorm:
        out.append("apply_residual_connection_post_layernorm=true")
    if arch == "OlmoForCausalLM" and c.num_key_value_heads != heads:
        out.append(f"num_key_value_heads={c.num_key_value_heads}")
    if arch == "PhiForCausalLM" and c.qk_layernorm:
        out.append("qk_layernorm=true")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and c.use_sliding_window:
        out.append("use_sliding_window=true")
    if arch == "Gemma3ForCausalLM":
        caps = ("attn_logit_softcapping", "final_logit_softcapping")
        out += [f"{k}={getattr(c, k)}" for k in caps if getattr(c, k, None)]
    return out


def read_hf_config(path: Path, arch: str) -> Any:
    """The transformers config of the folder, refusing settings TransformerLens would silently get wrong."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure inside transformers becomes one line
        raise ModelError(f"{path / 'config.json'}: transformers cannot read it ({_first_line(exc)})") from exc
    ignored = ignored_features(arch, c)
    if ignored:
        raise ModelError(f"{path}: this {FAMILIES[arch]} checkpoint sets {', '.join(ignored)}, which TransformerLens "
                         "3.9 ignores when converting it (its outputs would be wrong)")
    return c


def checkpoint_dtype(raw: dict, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` if given, else the dtype ``config.json`` declares, else float32."""
    if dtype is not None:
        return dtype
    declared = raw.get("dtype") or raw.get("torch_dtype")
    return DTYPES.get(declared, torch.float32) if isinstance(declared, str) else torch.float32


# ---------------------------------------------------------------------------------------- translation
def _neutral_folder() -> tuple[str, str]:
    """A new temporary folder (root, folder inside it) whose path none of TransformerLens' name triggers match."""
    for base in dict.fromkeys([tempfile.gettempdir(), "/tmp", str(Path.cwd())]):
        for _ in range(20):
            try:
                root = tempfile.mkdtemp(prefix="edgeatp-", dir=base)
            except OSError:
                break
            folder = os.path.join(root, "checkpoint")
            if not any(t in folder.lower() for t in _NAME_TRIGGERS):
                return root, folder
            shutil.rmtree(root, ignore_errors=True)
    raise ModelError(f"cannot make a temporary folder whose path avoids the names {', '.join(_NAME_TRIGGERS)} "
                     "(TransformerLens reads them as model names); set TMPDIR to another folder")


@contextmanager
def _neutral_copy(raw: dict) -> Iterator[str]:
    """A copy of ``config.json`` in a neutral temporary folder, removed afterwards."""
    root, folder = _neutral_folder()
    try:
        os.mkdir(folder)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(raw, f)
        yield folder
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _template_overlay(arch: str, c: Any) -> dict:
    """The geometry of a Gemma/OLMo-1 config, laid over TransformerLens' dict of an official model."""
    from transformer_lens.config.hooked_transformer_config import SOFTCAP_DISABLED

    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    over = dict(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size, rotary_dim=d_head,
        rotary_base=_rope(c).get("rope_theta", 10000.0),
        act_fn=getattr(c, "hidden_activation", None) or c.hidden_act,
    )
    if arch == "OlmoForCausalLM":  # multi-head converter, non-parametric LayerNorm, optional q/k/v clipping
        over.update(attn_types=["global"] * c.num_hidden_layers, clip_qkv=c.clip_qkv)
        return over
    over.update(n_key_value_heads=c.num_key_value_heads, eps=c.rms_norm_eps)
    if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        layer_types = list(c.layer_types or [])
        over.update(attn_types=["local" if t == "sliding_attention" else "global" for t in layer_types] or None,
                    use_local_attn=bool(c.sliding_window) and "sliding_attention" in layer_types,
                    window_size=c.sliding_window, attn_scale=math.sqrt(c.query_pre_attn_scalar))
    if arch == "Gemma2ForCausalLM":
        over.update(attn_scores_soft_cap=c.attn_logit_softcapping or SOFTCAP_DISABLED,
                    output_logits_soft_cap=c.final_logit_softcapping or SOFTCAP_DISABLED)
    if arch == "Gemma3ForCausalLM":
        over["rotary_base_local"] = (rope.get("sliding_attention") or {}).get("rope_theta", over["rotary_base"])
    return over


@contextmanager
def _translation_scope(arch: str, c: Any) -> Iterator[None]:
    """Patch TransformerLens' loading module while it translates (restored on every exit path).

    ``AutoConfig`` returns a copy of the config transformers read from the user's folder, with the
    attributes transformers 5 no longer exposes but TransformerLens reads (GPT-2 ``n_ctx``, Phi
    ``partial_rotary_factor``); for template families ``convert_hf_model_config`` returns the
    template's dict overlaid with this checkpoint's geometry.
    """
    import transformer_lens.loading_from_pretrained as loading

    shown = copy.deepcopy(c)
    if arch == "GPT2LMHeadModel":
        shown.n_ctx = c.n_positions
    if arch == "PhiForCausalLM":
        shown.partial_rotary_factor = _rope(c).get("partial_rotary_factor", 1.0)
    if arch in ALIASES:
        shown.architectures = [ALIASES[arch]]

    class _Config:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            return copy.deepcopy(shown)

    saved = loading.AutoConfig, loading.convert_hf_model_config
    convert = saved[1]
    if arch in TEMPLATES:
        template, overlay = TEMPLATES[arch], _template_overlay(arch, c)

        def convert(name: str, **kwargs: Any) -> dict:
            return {**saved[1](template, **kwargs), **overlay}

    with _TRANSLATING:
        loading.AutoConfig, loading.convert_hf_model_config = _Config, convert
        try:
            yield
        finally:
            loading.AutoConfig, loading.convert_hf_model_config = saved


def translate(path: Path, raw: dict, arch: str, c: Any, dtype: torch.dtype, prepend_bos: bool | None) -> Any:
    """TransformerLens' HookedTransformerConfig for the checkpoint, LayerNorm folded where TransformerLens allows."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    try:
        with _neutral_copy(raw) as neutral, _translation_scope(arch, c):
            cfg = loading.get_pretrained_model_config(
                neutral, hf_cfg=c.to_dict(), fold_ln=ALIASES.get(arch, arch) not in POST_NORM_ARCHITECTURES,
                device=str(torch.get_default_device()), dtype=dtype, default_prepend_bos=prepend_bos)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside TransformerLens becomes one line
        raise ModelError(f"{path}: TransformerLens 3.9 cannot translate this {FAMILIES[arch]} config "
                         f"({_first_line(exc)})") from exc
    cfg.model_name = path.name
    cfg.tokenizer_name = None  # the tokenizer comes from the folder, never by name
    return cfg


def config_only(path: str | Path, dtype: torch.dtype | None = None) -> Any:
    """TransformerLens' config of a checkpoint folder from its ``config.json`` alone: the same preflight
    and translation as :func:`open_checkpoint`, reading no weights and no tokenizer (for planning)."""
    path = Path(path).expanduser().resolve()
    raw = read_config(path)
    arch = preflight(path, raw)
    c = read_hf_config(path, arch)
    return translate(path, raw, arch, c, checkpoint_dtype(raw, dtype), None)


def open_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """Preflight a checkpoint folder, load its tokenizer and translate its config; reads no weights
    (safetensors headers only).

    The config's ``default_prepend_bos`` follows the checkpoint: true when the tokenizer puts BOS
    first by itself (Llama, Gemma) and for GPT-2 checkpoints (``<|endoftext|>`` first, as
    TransformerLens does for ``gpt2`` and edgeatp always did), false otherwise (Pythia, Qwen, OPT).
    """
    path = Path(path).expanduser().resolve()
    raw = read_config(path)
    arch = preflight(path, raw)
    c = read_hf_config(path, arch)
    check_weight_files(path)
    dt = checkpoint_dtype(raw, dtype)
    tokenizer = load_tokenizer(path)
    prepend_bos = None if tokenizer is None else adds_bos(tokenizer) or (
        arch in BOS_BY_CONVENTION and tokenizer.bos_token_id is not None)
    return Checkpoint(path, arch, c, translate(path, raw, arch, c, dt, prepend_bos), dt, tokenizer)


# ---------------------------------------------------------------------------------------- weights
def check_weight_files(path: Path) -> None:
    """Refuse a folder without weights, missing shards and truncated or corrupt safetensors files,
    naming the file (reads headers only)."""
    from safetensors import safe_open

    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelError(f"{path} has config.json but no weights (expected {' or '.join(WEIGHT_FILES)})")
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    index = path / "model.safetensors.index.json"
    if not files and index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ModelError(f"{index} is not a valid shard index (a JSON object with a weight_map)") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{index} lists {len(missing)} shard(s) that are not in the folder "
                             f"(e.g. {missing[0]}); copy the complete checkpoint")
    for file in files:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelError(f"{file} is truncated or not a safetensors file ({_first_line(exc)}); "
                             "copy or save the checkpoint again") from None


@contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' loading report off (edgeatp checks the loading info itself); its progress bars off
    when ``HF_HUB_DISABLE_PROGRESS_BARS`` is set. Restored afterwards."""
    import transformers.utils.logging as tlog

    bars = tlog.is_progress_bar_enabled()
    verbosity = tlog.get_verbosity()
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in ("1", "ON", "YES", "TRUE"):
        tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


@contextmanager
def _advice_dropped() -> Iterator[None]:
    """TransformerLens' advice to use ``from_pretrained_no_processing`` in reduced precision left out:
    it names a TransformerLens call edgeatp's user does not make (folding in the checkpoint's dtype
    is what ``--dtype``'s precision tests measure)."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        return "from_pretrained_no_processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def read_weights(ckpt: Checkpoint, **options: Any) -> Any:
    """The transformers model of the folder in ``ckpt.dtype``; refuses weights that do not match config.json
    (``options`` go to ``from_pretrained``, e.g. ``attn_implementation``)."""
    from transformers import AutoModelForCausalLM

    path = ckpt.path
    try:
        with _transformers_quiet():
            hf_model, info = AutoModelForCausalLM.from_pretrained(
                str(path), config=copy.deepcopy(ckpt.hf_config), dtype=ckpt.dtype, local_files_only=True,
                trust_remote_code=False, output_loading_info=True, ignore_mismatched_sizes=True, **options)
    except Exception as exc:  # noqa: BLE001 - any failure inside transformers becomes one line
        raise ModelError(f"{path}: transformers cannot read the weights ({_first_line(exc)})") from exc
    problem = None
    if info["mismatched_keys"]:
        key, found, wanted = sorted(info["mismatched_keys"])[0]
        problem = (f"{len(info['mismatched_keys'])} tensors have other shapes (e.g. {key}: {tuple(found)} in the "
                   f"weights, {tuple(wanted)} from config.json)")
    elif info["missing_keys"]:
        problem = f"{len(info['missing_keys'])} tensors are missing (e.g. {sorted(info['missing_keys'])[0]})"
    elif info["unexpected_keys"]:
        problem = (f"{len(info['unexpected_keys'])} tensors are not used by config.json "
                   f"(e.g. {sorted(info['unexpected_keys'])[0]})")
    if problem:
        raise ModelError(f"{path}: the weights do not match config.json: {problem}; use the config.json saved "
                         "with these weights")
    hf_model.eval().requires_grad_(False)
    return hf_model


def hooked_transformer(ckpt: Checkpoint) -> Any:
    """The HookedTransformer of a checkpoint, weights converted and processed by TransformerLens."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    hf_model = read_weights(ckpt)
    cfg = ckpt.cfg
    norms_foldable = cfg.original_architecture not in POST_NORM_ARCHITECTURES
    try:
        # the user's own (absolute) path: TransformerLens only reads names here when it has no hf_model
        state = loading.get_pretrained_state_dict(str(ckpt.path), cfg, hf_model, dtype=ckpt.dtype)
        del hf_model
        model = HookedTransformer(cfg, None, move_to_device=False)
        with _advice_dropped():
            model.load_and_process_state_dict(
                state, fold_ln=norms_foldable, center_writing_weights=norms_foldable,
                center_unembed=not softcap_enabled(cfg.output_logits_soft_cap),
                # sinks take attention mass off the real keys, so value biases are no constant shift
                fold_value_biases=not cfg.use_attention_sinks)
    except Exception as exc:  # noqa: BLE001 - any failure inside TransformerLens becomes one line
        raise ModelError(f"{ckpt.path}: TransformerLens 3.9 cannot convert this {ckpt.model_type} checkpoint "
                         f"({_first_line(exc)})") from exc
    return model.eval()


# ---------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(path: Path) -> Any | None:
    """The folder's Hugging Face tokenizer (tokenizer.json, SentencePiece tokenizer.model or vocab.json),
    or None when it has no tokenizer files."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in VOCABULARY_FILES):
        if (path / "tokenizer_config.json").is_file():  # transformers would make an empty tokenizer of it
            raise ModelError(f"{path} has tokenizer_config.json but no vocabulary ({', '.join(VOCABULARY_FILES)}); "
                             "copy the tokenizer files the model came with")
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure inside transformers becomes one line
        raise ModelError(f"{path}: the tokenizer files cannot be loaded ({_first_line(exc)})") from exc


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token first by itself (measured: ``add_bos_token`` is unreliable)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_specials = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    return with_specials[:1] == [bos] and plain[:1] != [bos]


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> "ModelAdapter":
    """A local Hugging Face checkpoint folder as a :class:`ModelAdapter`, offline.

    Architectures the adapter does not handle yet are refused before any weight is read.
    """
    from ..tokenizer import HFTokenizer
    from .adapter import ModelAdapter
    from .hooked import validate_config

    ckpt = open_checkpoint(path, dtype)
    validate_config(ckpt.cfg)
    model = hooked_transformer(ckpt)
    tokenizer = None
    if ckpt.tokenizer is not None:
        model.set_tokenizer(load_tokenizer(ckpt.path))  # its own instance: TransformerLens changes the one it gets
        tokenizer = HFTokenizer(ckpt.tokenizer, ckpt.path.name)
    return ModelAdapter(model, tokenizer, name=str(ckpt.path))
