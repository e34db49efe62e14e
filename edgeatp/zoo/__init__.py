"""The zoo: small trained models with known circuits, shipped as package data.

Each model has ``weights/<name>.safetensors`` (a HookedTransformer state dict), a card
``weights/<name>.json`` (architecture, vocabulary, task, accuracy, training recipe) and an
exhaustive exact-patching reference table ``weights/<name>.reference.json`` (not yet for the
grouped-query ``llama-induction``: its card carries hook-level ``mechanism_checks`` instead,
see :mod:`edgeatp.zoo.checks`). The training code that made them is :mod:`edgeatp.zoo.train`;
``python -m edgeatp.zoo.train NAME`` regenerates a model in a few CPU minutes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..tasks.builtin import NAME_VOCAB, SYMBOL_VOCAB

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
        """Grouped-query attention (fewer key/value heads than query heads): not supported by the
        ModelAdapter yet, so :func:`load_zoo_model` refuses it; build the HookedTransformer directly."""
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


def zoo_config(name: str) -> Any:
    """The HookedTransformerConfig of a zoo model."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(**ZOO[name].config)


def read_card(name: str) -> dict[str, Any]:
    """The model card (JSON) of a trained zoo model."""
    path = WEIGHTS / f"{name}.json"
    if not path.exists():
        raise ModelError(f"zoo model {name!r} has not been trained: run `python -m edgeatp.zoo.train {name}`")
    return json.loads(path.read_text())


def read_reference(name: str) -> dict[str, Any]:
    """The shipped exhaustive exact-patching table of a zoo model."""
    path = WEIGHTS / f"{name}.reference.json"
    if not path.exists():
        raise ModelError(f"zoo model {name!r} has no reference table: run `python -m edgeatp.zoo.reference {name}`")
    return json.loads(path.read_text())


def load_zoo_model(name: str) -> Any:
    """A shipped zoo model as a :class:`~edgeatp.model.ModelAdapter` (float32, CPU)."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer

    from ..model import ModelAdapter
    from ..tokenizer import WordTokenizer

    if name not in ZOO:
        raise ModelError(f"unknown zoo model {name!r}; the zoo has {', '.join(ZOO)}")
    card = read_card(name)
    model = HookedTransformer(zoo_config(name))
    state = load_file(str(WEIGHTS / f"{name}.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    tok = WordTokenizer(ZOO[name].vocab, bos="BOS", name=f"zoo:{name}")
    return ModelAdapter(model, tok, name=f"zoo:{name}", card=card)


__all__ = ["ZOO", "ZooEntry", "load_zoo_model", "read_card", "read_reference", "zoo_config", "WEIGHTS"]
