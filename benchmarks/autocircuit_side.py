"""auto-circuit's side of the comparison: runs under ``.venv-ac`` (TransformerLens 2.18, auto-circuit 1.0.1).

Usage: ``.venv-ac/bin/python benchmarks/autocircuit_side.py JOB.json`` where the job file (written by
``autocircuit_compare.py`` or ``edges.py``) names a parameter file, a prompt-pair file, the model
config and a mode:

* ``scores``: one fast-EAP pass (mask gradient, ``mask_val=0``, logit difference, separate Q/K/V,
  factorized graph) over all pairs (one batch); writes every edge score keyed by edgeatp's
  node names (``a0.h1->a1.h2<q>``) plus the clean answer-position logits as a loading check.
* ``time``: wall and CPU times (``repeats`` interleaved runs after a warm-up and a run that measures
  the peak RSS growth) of that fast-EAP call on all pairs as one batch and of a plain forward +
  input-gradient backward of an unwrapped copy of the model on the same batch.

Weights are loaded from parameters only; the causal-mask and IGNORE buffers are rebuilt from the
config (TransformerLens 3.9 stores the mask as an empty placeholder). The timing helpers
(``measure``, ``timed_runs``) are shared with ``edges.py``: this module imports only torch at load
time, so it works under both venvs.
"""

from __future__ import annotations

import ctypes
import json
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch


def rss_mb() -> float:
    """Current resident set size in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak() -> bool:
    """Return freed heap to the OS, then reset the kernel's peak-RSS counter (Linux ``clear_refs``);
    False if the reset is not allowed."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], Any], memory: bool = False) -> tuple[float, float, float]:
    """``(wall seconds, process CPU seconds, peak RSS growth in MB)`` of one call.

    The growth is measured only with ``memory`` (heap trimmed and the peak counter reset first,
    which makes the call re-fault its pages, so such calls are not used for timing); else NaN.
    """
    reset = memory and _reset_peak()
    start_rss = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start_rss
    return wall, cpu, max(0.0, growth) if reset else float("nan")


def timed_runs(calls: dict[str, tuple[Callable[[], Any], int]]) -> dict[str, list[tuple[float, float, float]]]:
    """Per call ``(fn, k)``: a warm-up, a run measuring memory, then ``k`` interleaved timed runs.

    Calls with ``k == 1`` run once, cold, timed and measured together. Returns ``(wall, cpu, rss)``
    per timed run, with the memory run's RSS growth on every entry.
    """
    for fn, k in calls.values():
        if k > 1:
            fn()
    first = {label: measure(fn, memory=True) for label, (fn, _) in calls.items()}
    runs = {label: [first[label]] if k == 1 else [] for label, (_, k) in calls.items()}
    for _ in range(max(k for _, k in calls.values())):
        for label, (fn, k) in calls.items():
            if len(runs[label]) < k:
                wall, cpu, _ = measure(fn)
                runs[label].append((wall, cpu, first[label][2]))
    return runs


def build_model(job: dict, flags: bool) -> Any:
    """A TL 2.18 HookedTransformer with the job's config and parameters, weights frozen."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = dict(job["config"])
    cfg["dtype"] = getattr(torch, cfg.get("dtype", "float32"))
    if flags:
        cfg.update(use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=not cfg.get("attn_only", False))
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    params = torch.load(job["params"])
    expected = {k for k, _ in model.named_parameters()}
    if set(params) != expected:
        raise SystemExit(f"parameter mismatch: missing {sorted(expected - set(params))}, "
                         f"unexpected {sorted(set(params) - expected)}")
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert not unexpected and all(k.endswith(("attn.mask", "attn.IGNORE")) for k in missing), (missing, unexpected)
    model.eval()
    model.requires_grad_(False)
    return model


def edge_name(src: str, dest: str) -> str:
    """auto-circuit node names → edgeatp's ``writer->reader`` name."""
    def node(name: str) -> str:
        if name == "Resid Start":
            return "input"
        if name == "Resid End":
            return "logits"
        if m := re.fullmatch(r"A(\d+)\.(\d+)(?:\.([QKV]))?", name):
            return f"a{m[1]}.h{m[2]}" + (f"<{m[3].lower()}>" if m[3] else "")
        if m := re.fullmatch(r"MLP (\d+)", name):
            return f"m{m[1]}"
        raise ValueError(f"unexpected auto-circuit node {name!r}")
    return f"{node(src)}->{node(dest)}"


def main(job_path: str) -> None:
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job.get("threads", 1))
    pairs = torch.load(job["pairs"])
    clean, corrupt = pairs["clean"], pairs["corrupt"]
    answer, wrong = pairs["answer"][:, None], pairs["wrong"][:, None]
    n = len(clean)
    ds = PromptDataset(clean, corrupt, list(answer), list(wrong))
    loader = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=n, shuffle=False)  # one batch
    model = build_model(job, flags=True)
    t0 = time.perf_counter()
    pm = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True)
    wrap_s = time.perf_counter() - t0

    def eap() -> dict[str, torch.Tensor]:
        return mask_gradient_prune_scores(pm, loader, None, grad_function="logit", answer_function="avg_diff",
                                          mask_val=0.0)

    result: dict[str, Any] = {"n_edges": len(pm.edges), "wrap_seconds": wrap_s, "n_pairs": n}
    if job["mode"] == "scores":
        scores = eap()
        result["scores"] = {edge_name(e.src.name, e.dest.name): float(e.prune_score(scores)) for e in pm.edges}
        plain = build_model(job, flags=False)
        with torch.no_grad():
            result["clean_logits"] = plain(clean)[:, -1].double().tolist()
    else:
        plain = build_model(job, flags=False)
        rows = torch.arange(n)

        def plain_fb() -> None:
            x = (plain.embed(clean) + plain.pos_embed(clean)).detach().requires_grad_(True)
            logits = plain(x, start_at_layer=0)[:, -1]
            metric = logits[rows, answer[:, 0]] - logits[rows, wrong[:, 0]]
            torch.autograd.grad(metric.sum(), x)

        runs = timed_runs({"plain": (plain_fb, job.get("repeats", 3)), "eap": (eap, job.get("repeats", 3))})
        result["timing"] = runs  # name -> [(wall s, CPU s, peak RSS growth MB)] per run
    Path(job["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: autocircuit_side.py JOB.json")
    main(sys.argv[1])
