"""The zoo: small trained models with known circuits, shipped as package data.

Each model has ``weights/<name>.safetensors`` (a HookedTransformer state dict), a card
``weights/<name>.json`` (architecture, vocabulary, task, accuracy, training recipe) and an
exhaustive exact-patching reference table ``weights/<name>.reference.json``; cards may also
carry hook-level ``mechanism_checks`` (:mod:`edgeatp.zoo.checks`). The training code that made
them is :mod:`edgeatp.zoo.train`; ``python -m edgeatp.zoo.train NAME`` regenerates a model in a
few CPU minutes. This package holds data only; loading a zoo model as an adapter is
:func:`edgeatp.model.load_model` (``"zoo:NAME"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..tasks.vocab import NAME_VOCAB, SYMBOL_VOCAB

WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ZooEntry:
    """What defines a zoo model before training: its architecture, vocabulary and task."""

    name: str
    description: str
    config: dict[str, Any]
    vocab: tuple[str, ...]
    task: str
    known_mechanism: str
    biases: bool = True  # False: every b_* parameter is zero and frozen (Llama-style, no biases anywhere)

    @property
    def grouped_query(self) -> bool:
        """Grouped-query attention: fewer key/value heads than query heads."""
        kv = self.config.get("n_key_value_heads")
        return kv is not None and kv < self.config["n_heads"]


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "induction",
            "2-layer attention-only induction model (previous-token head -> induction heads), no LayerNorm",
            dict(n_layers=2, d_model=64, n_heads=2, d_head=32, n_ctx=48, d_vocab=64, attn_only=True,
                 act_fn=None, normalization_type=None, default_prepend_bos=False, seed=0),
            SYMBOL_VOCAB, "induction",
            "a layer-0 previous-token head feeds the layer-1 induction heads through their keys",
        ),
        ZooEntry(
            "ioi",
            "2-layer transformer with MLPs on a synthetic IOI-style name task",
            dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=20, d_vocab=64,
                 act_fn="gelu", normalization_type="LN", default_prepend_bos=False, seed=0),
            NAME_VOCAB, "ioi",
            "layer-0 heads copy the subject from its second mention; the MLPs turn it into a logit difference",
        ),
        ZooEntry(
            "dup",
            "2-layer attention-only model: answer the name that occurs once",
            dict(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=16, d_vocab=64, attn_only=True,
                 act_fn=None, normalization_type="LN", default_prepend_bos=False, seed=0),
            NAME_VOCAB, "dup",
            "layer-0 heads gather the names at the last position, layer-1 heads count them",
        ),
        ZooEntry(
            "llama-induction",
            "2-layer Llama-shaped induction model: RMSNorm, rotary, gated SiLU MLPs, grouped-query attention "
            "(4 query heads, 2 key/value heads), no biases",
            dict(n_layers=2, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=128, n_ctx=48, d_vocab=64,
                 act_fn="silu", gated_mlp=True, normalization_type="RMS", final_rms=True,
                 positional_embedding_type="rotary", rotary_dim=16, default_prepend_bos=False, seed=0),
            SYMBOL_VOCAB, "induction",
            "previous-token head a0.h0 feeds the layer-1 induction heads a1.h0 (kv head 0) and a1.h2, a1.h3 "
            "(sharing kv head 1) through their keys (K-composition); a1.h1 shares kv head 0 with a1.h0 but is only a "
            "weak induction head",
            biases=False,
        ),
    )
}


def entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``, or a one-line error listing the zoo."""
    if name not in ZOO:
        raise ModelError(f"unknown zoo model {name!r}; the zoo has {', '.join(ZOO)}")
    return ZOO[name]


def hooked_config(name: str) -> Any:
    """The HookedTransformerConfig of a zoo model."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(**entry(name).config)


def read_card(name: str) -> dict[str, Any]:
    """The model card (JSON) of a trained zoo model."""
    path = WEIGHTS / f"{entry(name).name}.json"
    if not path.exists():
        raise ModelError(f"zoo model {name!r} has not been trained: run `python -m edgeatp.zoo.train {name}`")
    return json.loads(path.read_text())


def read_reference(name: str) -> dict[str, Any]:
    """The shipped exhaustive exact-patching table of a zoo model."""
    path = WEIGHTS / f"{entry(name).name}.reference.json"
    if not path.exists():
        raise ModelError(f"zoo model {name!r} has no reference table: run `python -m edgeatp.zoo.reference {name}`")
    return json.loads(path.read_text())


def state_dict(name: str) -> dict[str, Any]:
    """The shipped weights of a zoo model (a HookedTransformer state dict, float32)."""
    from safetensors.torch import load_file

    path = WEIGHTS / f"{entry(name).name}.safetensors"
    if not path.exists():
        raise ModelError(f"zoo model {name!r} has no weights: run `python -m edgeatp.zoo.train {name}`")
    return {k: v.float() for k, v in load_file(str(path)).items()}


__all__ = ["ZOO", "ZooEntry", "WEIGHTS", "entry", "hooked_config", "read_card", "read_reference", "state_dict"]
