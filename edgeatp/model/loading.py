"""Loading models: zoo names, pretrained names from the local cache, local Hugging Face checkpoint
directories and model objects, each wrapped in a :class:`ModelAdapter` on one of two backends:
``hooked`` (TransformerLens 3.x ``HookedTransformer``) or ``bridge`` (``TransformerBridge``,
TransformerLens 4.x; 3.9 ships a preview)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ModelError
from ..timings import mark
from ..tokenizer import HFTokenizer, WordTokenizer
from .adapter import ModelAdapter
from .bridge import TL3_ENV
from .checkpoint import load_checkpoint
from .devices import place

BACKENDS = ("auto", "hooked", "bridge")


def load_model(spec: Any, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               allow_download: bool = False, backend: str = "auto", n_devices: int = 1) -> ModelAdapter:
    """Load a model from any supported spec and wrap it in a :class:`ModelAdapter`.

    ``spec`` may be ``"zoo:NAME"`` (shipped models), a local Hugging Face checkpoint directory
    (any decoder family TransformerLens converts, see :mod:`edgeatp.model.checkpoint`; loaded in
    its own dtype unless ``dtype`` is given), a TransformerLens pretrained name (``"gpt2"``,
    ``"pythia-70m"``; must be in the local Hugging Face cache unless ``allow_download``), a
    ``HookedTransformer``, a ``TransformerBridge`` or a ``ModelAdapter``. ``dtype`` and ``device``
    convert the weights — in place when you pass your own model. ``backend`` picks the
    TransformerLens class names and folders are loaded as: ``hooked`` (``HookedTransformer``),
    ``bridge`` (``TransformerBridge``) or ``auto``, the one :func:`default_backend` names.
    ``n_devices`` splits the layers of a ``HookedTransformer`` over that many devices from
    ``device`` on (``cuda:0``, ``cuda:1``, ...; see :mod:`edgeatp.model.devices`).
    """
    torch_dtype = _parse_dtype(dtype)
    torch_device = _parse_device(device)
    kind = resolve_backend(backend)
    mark("import")  # TransformerLens loads on first use: its import is not part of loading the model
    if isinstance(spec, ModelAdapter):
        adapter = spec
    elif isinstance(spec, (str, Path)):
        text = str(spec)
        if text.startswith("zoo:"):
            adapter = load_zoo_model(text[4:], backend=kind)
        elif Path(text).expanduser().is_dir():
            with _hf_offline(True):
                adapter = load_checkpoint(text, dtype=torch_dtype) if kind == "hooked" else \
                    _bridge_loading().checkpoint_bridge(text, dtype=torch_dtype)
        else:
            adapter = _load_pretrained(text, allow_download, kind, torch_dtype)
    elif _is_model_object(spec):
        tok = spec.tokenizer
        adapter = ModelAdapter(spec, HFTokenizer(tok) if tok is not None else None,
                               name=getattr(spec.cfg, "model_name", None) or "model")
    else:
        raise ModelError(f"cannot load a model from {type(spec).__name__}; pass a name, a directory, a "
                         "HookedTransformer or a TransformerBridge")
    if backend != "auto" and adapter.backend.kind != kind:
        raise ModelError(f"{{backend}} {backend} was asked for, but the model given runs on the "
                         f"{adapter.backend.kind} backend", backend="backend")
    if n_devices == 1:
        adapter.backend.convert(torch_dtype, torch_device)
    elif adapter.backend.kind != "hooked":
        if default_backend() == "hooked":
            raise ModelError("{n_devices} splits HookedTransformer models only; load the model with {backend} hooked",
                             n_devices="n_devices", backend="backend")
        raise ModelError(f"{{n_devices}} splits HookedTransformer models (TransformerLens 3.x), which this environment "
                         f"lacks; use {TL3_ENV}", n_devices="n_devices")
    else:
        adapter.backend.convert(torch_dtype, None)
        place(adapter.model, torch_device or adapter.device, n_devices)
    return adapter


def default_backend() -> str:
    """``hooked`` where TransformerLens has ``HookedTransformer`` (3.x), else ``bridge`` (4.x)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return "bridge"
    return "hooked"


def resolve_backend(backend: str) -> str:
    """The backend ``backend`` names here (``auto`` resolved), or a one-line error when this
    TransformerLens lacks it."""
    if backend not in BACKENDS:
        raise ModelError(f"unknown {{backend}} {backend!r}; use one of {', '.join(BACKENDS)}", backend="backend")
    kind = default_backend() if backend == "auto" else backend
    if kind == "hooked" and default_backend() != "hooked":
        raise ModelError("{backend} hooked needs TransformerLens 3.x (HookedTransformer), which this environment "
                         f"lacks; use {{backend}} bridge, or {TL3_ENV}", backend="backend")
    if kind == "bridge":
        try:
            import transformer_lens.model_bridge  # noqa: F401
        except ImportError:
            raise ModelError("{backend} bridge needs TransformerLens 3.9 or newer (TransformerBridge)",
                             backend="backend") from None
    return kind


def _is_model_object(spec: Any) -> bool:
    """Whether ``spec`` is a HookedTransformer or TransformerBridge (without importing what is absent)."""
    return hasattr(spec, "cfg") and hasattr(spec, "hook_dict") and isinstance(spec, torch.nn.Module)


def _bridge_loading() -> Any:
    from . import bridge_loading

    return bridge_loading


def _parse_device(device: str | torch.device | None) -> torch.device | None:
    """A usable torch device, or a one-line error naming what this machine has."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown device {device!r}; use cpu, cuda, cuda:1, mps or xpu") from None
    if dev.type == "cpu":
        return dev
    if dev.type not in ("cuda", "mps", "xpu"):
        raise ModelError(f"{{device}} {device!r}: edgeatp runs on cpu, cuda, mps or xpu devices; use one of those",
                         device="device")
    name, count = dev.type.upper(), _device_count(dev.type)
    if count == 0:
        raise ModelError(f"{{device}} {device!r}: this torch build has no {name} device; use {{device}} cpu",
                         device="device")
    if dev.index is not None and dev.index >= count:
        raise ModelError(f"{{device}} {device!r}: this machine has {count} {name} device(s), numbered from 0",
                         device="device")
    return dev


def _device_count(kind: str) -> int:
    """How many devices of an accelerator type (cuda, mps, xpu) this torch build reaches."""
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    module = getattr(torch, kind, None)  # torch.cuda; torch.xpu from torch 2.4 on
    return module.device_count() if module is not None and module.is_available() else 0


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _load_pretrained(name: str, allow_download: bool, backend: str, dtype: torch.dtype | None) -> ModelAdapter:
    """A TransformerLens pretrained model, from the local Hugging Face cache unless told otherwise."""
    if backend == "bridge":
        return _load_pretrained_bridge(name, allow_download)
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
            model = HookedTransformer.from_pretrained(name, device=torch.get_default_device(),
                                                      dtype=dtype or torch.float32)
        except OSError as exc:
            raise ModelError(f"could not load {name!r} from the local cache: {str(exc).splitlines()[0]}") from None
    tok = HFTokenizer(model.tokenizer, name) if model.tokenizer is not None else None
    return ModelAdapter(model, tok, name=name)


def _load_pretrained_bridge(name: str, allow_download: bool) -> ModelAdapter:
    """A pretrained model as a bridge: its cached snapshot folder, loaded like a checkpoint directory
    (downloaded first only when allowed)."""
    loading = _bridge_loading()
    folder = loading.cached_snapshot(name)
    if folder is None and allow_download:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(loading.official_name(name) or name))
        except Exception as exc:  # noqa: BLE001 - any download failure becomes one line
            raise ModelError(f"could not download {name!r}: {str(exc).splitlines()[0]}") from None
    if folder is None:
        raise ModelError(
            f"model {name!r} is not in the local Hugging Face cache and edgeatp runs offline; download it once "
            "(with {allow_download} on a networked machine) or pass a local checkpoint directory",
            allow_download="allow_download")
    with _hf_offline(True):
        return loading.checkpoint_bridge(folder, name=name)


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


def load_zoo_model(name: str, backend: str = "auto") -> ModelAdapter:
    """A shipped zoo model (float32, CPU) with its word-level tokenizer and card."""
    if resolve_backend(backend) == "bridge":
        return _bridge_loading().zoo_bridge(name)
    from transformer_lens import HookedTransformer

    from .. import zoo

    entry = zoo.entry(name)
    model = HookedTransformer(zoo.hooked_config(name))
    model.load_state_dict(zoo.state_dict(name))
    model.eval()
    tok = WordTokenizer(entry.vocab, bos="BOS", name=f"zoo:{name}")
    return ModelAdapter(model, tok, name=f"zoo:{name}", card=zoo.read_card(name))
