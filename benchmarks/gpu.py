"""Edge attribution on a GPU: time of AtP, AtP+QK fix and AtP* as a multiple of a plain
forward + backward, and peak device memory, on a GPT-2-small-shaped random model in bfloat16 and
float32 (no download: the model is initialised from its config).

Run by ``scripts/gpu_check.sh``, or on its own from the repository root::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu.py                    # cuda, GPT-2 small shape
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu.py --device cpu --small   # a smoke run anywhere

Every call runs once to warm up, then ``--repeats`` times; times are medians with the device
synchronised around each call. "peak MB" is the growth of the device's peak allocated memory over
what the model and inputs already hold, during one call (CUDA only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import edgeatp as ea  # noqa: E402
from edgeatp.graph import ModelShape  # noqa: E402
from edgeatp.metrics import get_metric  # noqa: E402

GPT2_SMALL = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257)
SMALL = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=64, d_vocab=500)
METHODS = ("atp", "atp-qk", "atp*")


def model_and_pairs(shape: dict[str, int], dtype: str, device: str, n_pairs: int, n_tokens: int
                    ) -> tuple[ea.ModelAdapter, ea.PromptPairs]:
    """A GPT-2-shaped model with GPT-2's initialisation, its weights frozen, and random prompt pairs
    whose second halves differ."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(**shape, act_fn="gelu_new", normalization_type="LN", seed=0, dtype=torch.float32)
    adapter = ea.load_model(HookedTransformer(cfg), device=device, dtype=dtype)
    adapter.model.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    V = shape["d_vocab"]
    clean = torch.randint(0, V, (n_pairs, n_tokens), generator=g)
    corrupt = clean.clone()
    corrupt[:, n_tokens // 2:] = torch.randint(0, V, (n_pairs, n_tokens - n_tokens // 2), generator=g)
    answer = torch.randint(0, V, (n_pairs,), generator=g)
    pairs = ea.PromptPairs.from_lists(clean.tolist(), corrupt.tolist(), answer.tolist(),
                                      ((answer + 1) % V)[:, None].tolist())
    return adapter, pairs


def plain_pass(adapter: ea.ModelAdapter, pairs: ea.PromptPairs) -> Callable[[], None]:
    """Forward of all pairs, summed logit difference, gradient w.r.t. the input embedding; no hooks."""
    model, metric = adapter.model, get_metric("logit_diff")
    batch = pairs.batch(torch.arange(len(pairs))).to(adapter.device)

    def run() -> None:
        x = (model.embed(batch.base) + model.pos_embed(batch.base)).detach().requires_grad_(True)
        torch.autograd.grad(metric(model(x, start_at_layer=0), batch).sum(), x)
    return run


def measure(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float, Any]:
    """Median seconds of ``repeats`` calls after a warm-up, peak device MB of one call, its result."""
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    result = fn()
    sync()
    peak = float("nan")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        fn()
        sync()
        peak = (torch.cuda.max_memory_allocated(device) - held) / 2 ** 20
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak, result


def bench(shape: dict[str, int], dtype: str, device: str, n_pairs: int, n_tokens: int, repeats: int,
          budget_mb: float) -> list[dict[str, Any]]:
    adapter, pairs = model_and_pairs(shape, dtype, device, n_pairs, n_tokens)
    setup = ea.Setup(adapter, pairs, batch_size=n_pairs, memory_budget_mb=budget_mb)
    base, base_peak, _ = measure(plain_pass(adapter, pairs), adapter.device, repeats)
    rows = [dict(dtype=dtype, method="plain fwd+bwd", seconds=base, ratio=1.0, peak=base_peak, batch=n_pairs, chunk="")]
    for method in METHODS:
        seconds, peak, scores = measure(lambda m=method: ea.attribute_edges(setup, m), adapter.device, repeats)
        finite = bool(torch.isfinite(scores.scores).all())
        rows.append(dict(dtype=dtype, method=method + ("" if finite else " (NOT FINITE)"), seconds=seconds,
                         ratio=seconds / base, peak=peak, batch=scores.meta["batch_size"],
                         chunk=scores.meta["writer_chunk"] if method != "atp" else ""))
    del adapter, setup
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--pairs", type=int, default=8, help="prompt pairs (one batch unless the budget splits it)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-budget", type=float, default=4096.0, help="edgeatp's memory budget, MB")
    ap.add_argument("--small", action="store_true", help="a 2-layer model instead of GPT-2 small's shape")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --small for a smoke run")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the smoke run on a shared host
    shape = SMALL if args.small else GPT2_SMALL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "host"
    dims = ("n_layers", "n_heads", "d_model", "d_head", "d_mlp")
    graph = ea.EdgeGraph.from_shape(ModelShape(*(shape[k] for k in dims)))
    print(f"{'2-layer' if args.small else 'GPT-2-small'}-shaped random model ({shape['n_layers']} layers, "
          f"d_model {shape['d_model']}, {graph.n_edges} edges), "
          f"{args.pairs} pairs × {args.tokens} tokens on {name}, torch {torch.__version__}\n")
    print("| dtype | method | ms | × plain fwd+bwd | peak MB | pairs/batch | writer chunk |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        for r in bench(shape, dtype, args.device, args.pairs, args.tokens, args.repeats, args.memory_budget):
            peak = "—" if r["peak"] != r["peak"] else f"{r['peak']:.0f}"  # no peak counter off CUDA
            print(f"| {r['dtype']} | {r['method']} | {1000 * r['seconds']:.1f} | {r['ratio']:.2f} | {peak} "
                  f"| {r['batch']} | {r['chunk']} |", flush=True)


if __name__ == "__main__":
    main()
