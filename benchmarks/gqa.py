"""Edge attribution on a grouped-query model against the same model ungrouped.

Run from the repository root with our venv::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gqa.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gqa.py --kv-heads 2 --shape 8x64

A random Llama-shaped model (RMSNorm, rotary, gated SiLU MLP, 12 query heads sharing ``--kv-heads``
key/value heads) is timed three ways per method: natively grouped (readers per key/value head), on
its per-query-head view (``graph.ungrouped_view()``, what EAP-IG and MIB name), and as the same
function written as a multi-head model whose key/value weights are repeated per query head (what
ungrouping a checkpoint gives). Ratios are process-CPU medians, measured side by side in one run;
the scores of the two ungrouped runs are checked to agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import edgeatp as ea  # noqa: E402
from autocircuit_compare import code_version  # noqa: E402
from autocircuit_side import timed_runs  # noqa: E402

LLAMA = dict(n_layers=6, d_model=768, n_heads=12, d_head=64, d_mlp=2048, n_ctx=512, d_vocab=32000, act_fn="silu",
             normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=64, gated_mlp=True,
             final_rms=True, seed=0)


def models(kv_heads: int) -> tuple[Any, Any]:
    """The grouped model and the same function with key/value weights repeated per query head."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    grouped = HookedTransformer(HookedTransformerConfig(**LLAMA, n_key_value_heads=kv_heads))
    flat = HookedTransformer(HookedTransformerConfig(**LLAMA))
    group = LLAMA["n_heads"] // kv_heads
    state = {}
    for name, value in grouped.state_dict().items():
        if ".attn._" in name:
            name, value = name.replace(".attn._", ".attn."), value.repeat_interleave(group, dim=0)
        state[name] = value
    flat.load_state_dict(state, strict=False)
    for m in (grouped, flat):
        m.eval().requires_grad_(False)
    return grouped, flat


def random_pairs(n: int, t: int, vocab: int) -> ea.PromptPairs:
    """Random prompt pairs whose second half is corrupted."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (n, t), generator=g)
    corrupt = clean.clone()
    corrupt[:, t // 2:] = torch.randint(0, vocab, (n, t - t // 2), generator=g)
    answer = torch.randint(0, vocab, (n,), generator=g)
    return ea.PromptPairs.from_tokens(clean, corrupt, answer, (answer + 1) % vocab)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--shape", default="8x32", help="pairs x tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, t = (int(v) for v in args.shape.split("x"))
    grouped, flat = models(args.kv_heads)
    pairs = random_pairs(n, t, LLAMA["d_vocab"])
    g_setup, f_setup = ea.Setup(ea.load_model(grouped), pairs, batch_size=n), ea.Setup(ea.load_model(flat), pairs,
                                                                                        batch_size=n)
    g_graph = ea.EdgeGraph.from_shape(g_setup.model.shape)
    view, f_graph = g_graph.ungrouped_view(), ea.EdgeGraph.from_shape(f_setup.model.shape)
    results: dict[str, ea.EdgeScores] = {}

    def call(label: str, setup: ea.Setup, method: str, graph: ea.EdgeGraph) -> Callable[[], None]:
        def run() -> None:
            results[label] = ea.attribute_edges(setup, method, graph)
        return run

    rows = []
    for method in ("atp", "atp-qk"):
        calls = {f"{method} grouped": (call(f"{method} grouped", g_setup, method, g_graph), args.repeats),
                 f"{method} ungrouped view": (call(f"{method} view", g_setup, method, view), args.repeats),
                 f"{method} ungrouped model": (call(f"{method} flat", f_setup, method, f_graph), args.repeats)}
        med = {k: statistics.median(c for _, c, _ in v) for k, v in timed_runs(calls).items()}
        a, b = results[f"{method} view"].signed, results[f"{method} flat"].signed
        agree = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        base = med[f"{method} grouped"]
        for label, cpu in med.items():
            edges = {"grouped": g_graph, "view": view, "model": f_graph}[label.split()[-1]].n_edges
            rows.append((label, edges, cpu, cpu / base, agree))
    print(f"\nedgeatp at {code_version()}, torch {torch.__version__}, {args.threads} thread(s); Llama-shaped "
          f"{LLAMA['n_layers']} layers, 12 query heads on {args.kv_heads} key/value heads, {n} pairs × {t} tokens")
    print("| run | edges | CPU s | × grouped | view vs ungrouped model, max rel. diff |\n|---|---|---|---|---|")
    for label, edges, cpu, ratio, agree in rows:
        print(f"| {label} | {edges} | {cpu:.3g} | {ratio:.2f} | {agree:.1e} |")


if __name__ == "__main__":
    main()
