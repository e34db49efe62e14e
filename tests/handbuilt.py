"""Tiny models with analytically set weights, for tests where the right answer is known exactly."""

import torch

from edgeatp.model import ModelAdapter
from edgeatp.tasks.pairs import PromptPairs


def cancellation_model() -> ModelAdapter:
    """Head a0.h0 copies the token's sign x (dim 0) to dim 1, which the logits read (+1 direct path);
    MLP1 reads dim 1 through a ReLU and writes −relu(x) back (−1 path). At x = +1 the two paths
    cancel exactly (gradient 0) although patching x = −1 changes the logit difference by −1."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=4, n_heads=1, d_head=2, d_mlp=2, n_ctx=4, d_vocab=3,
                                  act_fn="relu", normalization_type=None, dtype=torch.float64)
    m = HookedTransformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.embed.W_E[1, 0] = 1.0  # token 1: x = +1
        m.embed.W_E[2, 0] = -1.0  # token 2: x = -1
        m.blocks[0].attn.W_V[0, 0, 0] = 1.0
        m.blocks[0].attn.W_O[0, 0, 1] = 1.0
        m.blocks[1].mlp.W_in[1, 0] = 1.0
        m.blocks[1].mlp.W_out[0, 1] = -1.0
        m.unembed.W_U[1, 1] = 1.0
    return ModelAdapter(m, name="cancellation")


def cancellation_pairs() -> PromptPairs:
    """One pair: clean token 1 (x = +1), corrupt token 2 (x = −1); metric logit[1] − logit[0]."""
    return PromptPairs.from_lists([[1]], [[2]], [1], [0])


def saturated_model(seed: int = 0, n_layers: int = 1, qk_scale: float = 8.0) -> ModelAdapter:
    """A random attention-only model without LayerNorm whose layer-0 attention is saturated."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=12, n_heads=3, d_head=4, n_ctx=8, d_vocab=10,
                                  attn_only=True, normalization_type=None, dtype=torch.float64)
    m = HookedTransformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.6)
        m.blocks[0].attn.W_Q.mul_(qk_scale)
        m.blocks[0].attn.W_K.mul_(qk_scale)
        for block in m.blocks[1:]:
            block.attn.W_O.mul_(0.05)
    return ModelAdapter(m, name="saturated")


def random_pairs_for(adapter: ModelAdapter, n: int = 6, length: int = 6, seed: int = 0) -> PromptPairs:
    """Pairs that differ in a couple of positions, so effects are sparse-ish."""
    g = torch.Generator().manual_seed(seed)
    V = adapter.d_vocab
    clean = torch.randint(0, V, (n, length), generator=g)
    corrupt = clean.clone()
    for i in range(n):
        pos = torch.randperm(length, generator=g)[:2]
        corrupt[i, pos] = torch.randint(0, V, (2,), generator=g)
    return PromptPairs.from_lists(clean.tolist(), corrupt.tolist(), [1] * n, [2] * n)
