"""Wall time and memory of all-edge attribution, as a multiple of a plain forward + backward.

Run from the repository root with our venv::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/edges.py                 # zoo models + GPT-2-sized
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/edges.py --models gpt2 --threads 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/edges.py --models gpt2 --profile atp

For each model and one batch of prompt pairs (all pairs in one batch) it times
``attribute_edges`` with ``atp``, ``atp-qk``, ``atp*`` and ``ig`` (and ``atp``/``atp*`` under a
small ``memory_budget_mb`` to show chunking) against a plain pass of the same model on the same
batch: ``model(tokens)`` → summed logit difference → gradient w.r.t. the input embedding, no hooks.
Wall and process-CPU times are medians of interleaved repeats after a warm-up (calls run once are
timed cold); targets are judged on CPU time, which contention from other jobs inflates less.
"RSS +MB" is the peak resident-set growth during one extra call (freed heap trimmed and the kernel's
peak counter reset before it; for calls run once, that call). auto-circuit's fast EAP is timed in its own
venv through ``autocircuit_side.py`` (ratio to a plain pass in that venv) when ``.venv-ac`` exists.
Model weights are frozen (``requires_grad_(False)``), as auto-circuit's loader does.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import edgeatp as ea  # noqa: E402
from edgeatp.metrics import get_metric  # noqa: E402
from autocircuit_compare import AC_RECIPE, Case, ac_available, code_version, random_case, run_side, zoo_case  # noqa: E402
from autocircuit_side import rss_mb, timed_runs  # noqa: E402

GPT2_CONFIG = dict(n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257,
                   act_fn="gelu", normalization_type="LN", seed=0, dtype="float32")
METHODS = ("atp", "atp-qk", "atp*", "ig")


@dataclass
class Row:
    """One timed call: medians of wall and CPU seconds, ratios to the plain pass of the same process."""

    model: str
    label: str
    wall: float
    cpu: float
    wall_ratio: float
    cpu_ratio: float
    rss_mb: float
    meta: dict[str, Any]
    n_runs: int


def rows_from(model: str, runs: dict[str, list[tuple[float, float, float]]], plain: str,
              metas: dict[str, dict[str, Any]]) -> list[Row]:
    """Median wall and CPU times of ``(wall, cpu, rss)`` runs and their ratios to the ``plain`` entry."""
    med = {k: (statistics.median(w for w, _, _ in v), statistics.median(c for _, c, _ in v)) for k, v in runs.items()}
    pw, pc = med[plain]
    return [Row(model, k, w, c, w / pw, c / pc, runs[k][0][2], metas.get(k, {}), len(runs[k]))
            for k, (w, c) in med.items()]


def plain_pass(adapter: ea.ModelAdapter, pairs: ea.PromptPairs) -> Callable[[], None]:
    """Forward of all pairs, summed logit difference, gradient w.r.t. the input embedding; no hooks."""
    model = adapter.model
    batch = pairs.batch(torch.arange(len(pairs)))
    metric = get_metric("logit_diff")
    tokens = batch.base

    def run() -> None:
        x = (model.embed(tokens) + model.pos_embed(tokens)).detach().requires_grad_(True)
        logits = model(x, start_at_layer=0)
        torch.autograd.grad(metric(logits, batch).sum(), x)
    return run


def bench(case: Case, repeats: int, slow_repeats: int, budget_mb: float, threads: int,
          with_ac: bool) -> list[Row]:
    """Time every method on the case; ``slow_repeats`` for atp-qk, atp* and ig."""
    adapter, pairs = case.adapter, case.pairs
    adapter.model.requires_grad_(False)
    n = len(pairs)
    metas: dict[str, dict[str, Any]] = {}

    def method(name: str, budget: float | None = None) -> Callable[[], None]:
        kwargs = {} if budget is None else {"memory_budget_mb": budget}
        label = name if budget is None else f"{name}, budget {budget:g} MB"

        def run() -> None:
            metas[label] = ea.attribute_edges(ea.Setup(adapter, pairs, batch_size=n), name, **kwargs).meta
        return run

    calls: dict[str, tuple[Callable[[], None], int]] = {"plain f+b": (plain_pass(adapter, pairs), repeats)}
    for name in METHODS:
        calls[name] = (method(name), repeats if name == "atp" else slow_repeats)
    for name in ("atp", "atp*"):
        calls[f"{name}, budget {budget_mb:g} MB"] = (method(name, budget_mb), repeats if name == "atp" else slow_repeats)
    runs = timed_runs(calls)
    rows = rows_from(case.name, runs, "plain f+b", metas)
    if with_ac:
        with tempfile.TemporaryDirectory() as tmp:
            res = run_side(case, "time", Path(tmp), threads=threads, repeats=repeats)
        t = res["timing"]
        ac_runs = {"plain f+b (TL 2.18)": [tuple(x) for x in t["plain"]], "auto-circuit EAP": [tuple(x) for x in t["eap"]]}
        rows += rows_from(case.name, ac_runs, "plain f+b (TL 2.18)", {})
    return rows


def print_table(rows: list[Row], shapes: dict[str, str]) -> None:
    print("| model (pairs × tokens) | method | runs | wall s | × plain (wall) | CPU s | × plain (CPU) | pair batch "
          "| writer chunk | peak_buffer_mb | RSS +MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r.meta
        chunk = m.get("writer_chunk", "") if "qk" in r.label or "*" in r.label else ""
        print(f"| {r.model} ({shapes[r.model]}) | {r.label} | {r.n_runs} | {r.wall:.3g} | {r.wall_ratio:.2f} "
              f"| {r.cpu:.3g} | {r.cpu_ratio:.2f} | {m.get('batch_size', '')} | {chunk} "
              f"| {m.get('peak_buffer_mb', '')} | {r.rss_mb:.0f} |")


def check_targets(rows: list[Row]) -> None:
    """All-edge AtP within 3× a plain forward+backward and no slower than auto-circuit (CPU seconds)."""
    for model in dict.fromkeys(r.model for r in rows):
        by = {r.label: r for r in rows if r.model == model}
        atp = by["atp"]
        line = (f"{model}: atp = {atp.cpu_ratio:.2f}× plain f+b in CPU time, {atp.wall_ratio:.2f}× in wall time "
                f"({'OK' if atp.cpu_ratio <= 3 else 'MISSED'}, target ≤ 3)")
        if "auto-circuit EAP" in by:
            ac = by["auto-circuit EAP"]
            rel = atp.cpu / ac.cpu
            line += f"; atp / auto-circuit EAP = {rel:.2f} in CPU time ({'OK' if rel <= 1 else 'MISSED'}, target ≤ 1)"
        print(line)


def profile_method(case: Case, method: str) -> None:
    """Where one call spends its time: edgeatp functions (cProfile) and torch ops by input shape."""
    from torch.profiler import ProfilerActivity, profile

    adapter, pairs = case.adapter, case.pairs
    adapter.model.requires_grad_(False)
    n = len(pairs)
    ea.attribute_edges(ea.Setup(adapter, pairs, batch_size=n), method)
    prof = cProfile.Profile()
    prof.enable()
    ea.attribute_edges(ea.Setup(adapter, pairs, batch_size=n), method)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    stats.print_stats(r"edgeatp|einsum|run_backward|HookedTransformer.py.*\(forward\)", 25)
    print(out.getvalue())
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as tp:
        ea.attribute_edges(ea.Setup(adapter, pairs, batch_size=n), method)
    print(tp.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20,
                                                         max_name_column_width=30, max_shapes_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="ioi,induction,gpt2", help="comma list of ioi, induction, gpt2")
    ap.add_argument("--repeats", type=int, default=15, help="repeats per call on the zoo models")
    ap.add_argument("--gpt2-repeats", type=int, default=3, help="repeats of plain/atp/auto-circuit on gpt2")
    ap.add_argument("--gpt2-slow-repeats", type=int, default=1, help="repeats of atp-qk/atp*/ig on gpt2")
    ap.add_argument("--gpt2-batch", default="8x32", help="pairs x tokens for the GPT-2-sized model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the GPT-2-sized model (zoo: 1)")
    ap.add_argument("--no-autocircuit", action="store_true", help="skip auto-circuit even if .venv-ac exists")
    ap.add_argument("--profile", metavar="METHOD", help="profile one call of METHOD (e.g. atp) instead of timing")
    args = ap.parse_args()
    with_ac = ac_available() and not args.no_autocircuit
    if not with_ac and not args.no_autocircuit:
        print(f"note: auto-circuit timings skipped, .venv-ac is missing; create it with:\n  {AC_RECIPE}\n")
    version = code_version()
    print(f"edgeatp at {version}", flush=True)
    rows: list[Row] = []
    shapes: dict[str, str] = {}
    for name in args.models.split(","):
        torch.set_num_threads(args.threads if name == "gpt2" else 1)
        if name == "gpt2":
            b, t = (int(v) for v in args.gpt2_batch.split("x"))
            case = random_case("gpt2-sized random", GPT2_CONFIG, b, t)
            reps, slow, budget = args.gpt2_repeats, args.gpt2_slow_repeats, 64.0
        else:
            case = zoo_case(name, 32)
            reps, slow, budget = args.repeats, args.repeats, 1.0
        shapes[case.name] = (f"{len(case.pairs)} × {case.pairs.n_positions}, "
                             f"{ea.EdgeGraph.from_shape(case.adapter.shape).n_edges} edges, RSS {rss_mb():.0f} MB")
        if args.profile:
            print(f"== profile of {args.profile} on {case.name} ({shapes[case.name]}), "
                  f"{torch.get_num_threads()} thread(s)")
            profile_method(case, args.profile)
            continue
        rows += bench(case, reps, slow, budget, torch.get_num_threads(), with_ac)
        print(f"done: {case.name}", flush=True)
        del case
    if rows:
        print(f"\nedgeatp at {version}, torch {torch.__version__}, threads: zoo 1, gpt2 {args.threads}\n")
        print_table(rows, shapes)
        print()
        check_targets(rows)


if __name__ == "__main__":
    main()
