"""Shared fixtures: offline mode, one torch thread, tiny float64 models and the zoo models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=DeprecationWarning)

from edgeatp.model import ModelAdapter, load_model  # noqa: E402
from edgeatp.tasks.pairs import PromptPairs  # noqa: E402


def tiny_model(seed: int = 0, *, parallel: bool = False, rotary: bool = False, attn_only: bool = False,
               normalization: str | None = "LN", n_layers: int = 3, n_heads: int = 2, d_model: int = 16,
               d_vocab: int = 20, scale: float = 0.5, dtype: torch.dtype = torch.float64, **extra) -> ModelAdapter:
    """A random HookedTransformer (weights ~ N(0, scale²)) wrapped in an adapter."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=None if attn_only else 2 * d_model, n_ctx=12, d_vocab=d_vocab, attn_only=attn_only,
        act_fn=None if attn_only else extra.pop("act_fn", "gelu"), normalization_type=normalization,
        parallel_attn_mlp=parallel,
        positional_embedding_type="rotary" if rotary else "standard", rotary_dim=4 if rotary else None,
        dtype=dtype, **extra,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return ModelAdapter(model, name="tiny")


def random_pairs(n: int = 5, length: int = 7, d_vocab: int = 20, seed: int = 0) -> PromptPairs:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (n, length), generator=g)
    corrupt = torch.randint(0, d_vocab, (n, length), generator=g)
    return PromptPairs.from_lists(clean.tolist(), corrupt.tolist(), [1] * n, [[2, 3]] * n)


MODEL_VARIANTS = {
    "sequential": {},
    "parallel-rotary": {"parallel": True, "rotary": True},
    "attn-only-nonorm": {"attn_only": True, "normalization": None},
    "rms": {"normalization": "RMS"},
    "llama-gqa": {"normalization": "RMS", "rotary": True, "n_heads": 4, "n_key_value_heads": 2, "gated_mlp": True,
                  "act_fn": "silu"},
}


@pytest.fixture(params=list(MODEL_VARIANTS), scope="module")
def variant(request) -> ModelAdapter:
    return tiny_model(**MODEL_VARIANTS[request.param])


@pytest.fixture(scope="session")
def zoo_ioi() -> ModelAdapter:
    return load_model("zoo:ioi")


@pytest.fixture(scope="session")
def zoo_dup() -> ModelAdapter:
    return load_model("zoo:dup")


@pytest.fixture(scope="session")
def zoo_induction() -> ModelAdapter:
    return load_model("zoo:induction")
