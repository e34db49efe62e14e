"""Accuracy and cost of the edge methods against exact edge patching.

For each model: exact effects of every edge (one patched forward per edge), then for AtP,
AtP+QKfix, AtP* and integrated gradients (IG, K steps): Spearman correlation of the method's
scores with the exact |effects|, recall of the exact top-10 in the method's top-10, the median
ratio estimate/exact on the exact top-10 (1 = right size), and wall time as a ratio to one
plain forward+backward of the same batch. Models: the zoo, plus a hand-built case where a
*saturated* attention head sits downstream of the edge — the QK fix does not reach it (the
edge enters a value, not a query or key), a gradient at the clean point underestimates it, and
IG's path average recovers it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/edge_accuracy.py [--pairs 32] [--ig-steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scipy.stats import spearmanr

import edgeatp as ea
from edgeatp.metrics import get_metric
from edgeatp.model import ModelAdapter


def saturated_downstream(seed: int = 0) -> ModelAdapter:
    """2-layer attention-only model without LayerNorm; layer 1's queries/keys are scaled up so its
    attention saturates, and layer-0 writes reach it through its keys."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=10, d_vocab=12,
                                  attn_only=True, normalization_type=None, dtype=torch.float64)
    m = HookedTransformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
        m.blocks[1].attn.W_Q.mul_(6.0)
        m.blocks[1].attn.W_K.mul_(6.0)
    return ModelAdapter(m, name="saturated-downstream")


def sparse_pairs(adapter: ModelAdapter, n: int, length: int = 8, seed: int = 0) -> ea.PromptPairs:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, adapter.d_vocab, (n, length), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(0, adapter.d_vocab, (n,), generator=g)
    return ea.PromptPairs.from_lists(clean.tolist(), corrupt.tolist(), [1] * n, [2] * n)


def plain_fb_seconds(adapter: ModelAdapter, pairs: ea.PromptPairs, repeats: int = 5) -> float:
    """Median wall time of one forward + backward of the clean batch (no hooks)."""
    batch = pairs.batch(torch.arange(len(pairs)))
    metric = get_metric("logit_diff")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        metric(adapter.model(batch.base), batch).sum().backward()
        adapter.model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(name: str, res: ea.EdgeScores, exact: ea.EdgeScores, seconds: float, fb: float) -> str:
    est, _ = res.flat()
    truth, _ = exact.flat()
    rho = spearmanr(est.numpy(), truth.abs().numpy()).correlation
    top_true = set(torch.topk(truth.abs(), 10).indices.tolist())
    top_est = set(torch.topk(est, 10).indices.tolist())
    idx = torch.tensor(sorted(top_true))
    ratio = statistics.median((est[idx] / truth.abs()[idx].clamp(min=1e-12)).tolist())
    return f"| {name} | {rho:.3f} | {len(top_true & top_est) / 10:.1f} | {ratio:.2f} | {seconds / fb:.1f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--ig-steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = []
    for name in ("zoo:induction", "zoo:ioi", "zoo:dup"):
        model = ea.load_model(name)
        cases.append((name, model, ea.make_task(model.card["task"], model.tokenizer, args.pairs, seed=7)))
    sat = saturated_downstream()
    cases.append(("saturated-downstream", sat, sparse_pairs(sat, args.pairs)))
    for name, model, pairs in cases:
        exact = ea.attribute_edges(ea.Setup(model, pairs, batch_size=256), "exact")
        fb = plain_fb_seconds(model, pairs)
        print(f"\n### {name} ({exact.graph.n_edges} edges, {len(pairs)} pairs)\n")
        print("| method | Spearman vs exact abs | recall@10 | median est/exact on top-10 | time / (fwd+bwd) |")
        print("|---|---|---|---|---|")
        for method in ("atp", "atp-qk", "atp*", "ig"):
            ea.attribute_edges(ea.Setup(model, pairs, batch_size=len(pairs)), method, ig_steps=args.ig_steps)  # warm-up
            t = time.perf_counter()
            res = ea.attribute_edges(ea.Setup(model, pairs, batch_size=len(pairs)), method, ig_steps=args.ig_steps)
            label = f"ig ({args.ig_steps} steps)" if method == "ig" else method
            print(row(label, res, exact, time.perf_counter() - t, fb))


if __name__ == "__main__":
    main()
