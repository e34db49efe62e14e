"""Edge AtP scores of edgeatp vs auto-circuit's fast EAP on the same weights and prompt pairs.

Run from the repository root with our venv::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/autocircuit_compare.py

auto-circuit needs TransformerLens 2.18, so it runs in its own venv (``.venv-ac``) through
``benchmarks/autocircuit_side.py``: this script saves each model's parameters, config and prompt
pairs to a temporary directory, runs the side script there and compares the returned scores with
``attribute_edges(method="atp")``.

Conventions. auto-circuit differentiates ``-mean_batch(logit diff)`` w.r.t. masks that move each
edge from clean (0) to corrupt (1): its score is ``(clean - corrupt)·∇mean(metric)``. Ours is the
noising estimate ``(corrupt - clean)·∇metric`` per pair; ``signed`` is its mean over pairs. So
auto-circuit's score equals ``-signed`` when all pairs form one batch (checked on the models below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import edgeatp as ea  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
AC_PYTHON = ROOT / ".venv-ac" / "bin" / "python"
SIDE = Path(__file__).resolve().parent / "autocircuit_side.py"
AC_RECIPE = (
    "python3 -m venv .venv-ac && .venv-ac/bin/pip install torch==2.13.0 auto-circuit==1.0.1 "
    'transformer-lens==2.18.0 "pyarrow<22" jax==0.4.38 jaxlib==0.4.38 "chex<0.1.90"'
)


@dataclass
class Case:
    """A model (its config kwargs, JSON-able, dtype as a string) with prompt pairs."""

    name: str
    config: dict[str, Any]
    adapter: ea.ModelAdapter
    pairs: ea.PromptPairs


def ac_available() -> bool:
    return AC_PYTHON.exists()


def code_version() -> str:
    """The checkout's commit, flagged when edgeatp/ has uncommitted changes (others edit it concurrently)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "edgeatp")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted edgeatp/ changes" if dirty else "")


def tl_config(config: dict[str, Any]) -> Any:
    """A TL HookedTransformerConfig from JSON-able kwargs."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(**{**config, "dtype": getattr(torch, config.get("dtype", "float32"))})


def random_case(name: str, config: dict[str, Any], n_pairs: int, n_tokens: int, seed: int = 0) -> Case:
    """A randomly initialised model and random token pairs (the second half of each prompt corrupted)."""
    from transformer_lens import HookedTransformer

    model = HookedTransformer(tl_config(config))
    g = torch.Generator().manual_seed(seed)
    V = config["d_vocab"]
    clean = torch.randint(0, V, (n_pairs, n_tokens), generator=g)
    corrupt = clean.clone()
    corrupt[:, n_tokens // 2:] = torch.randint(0, V, (n_pairs, n_tokens - n_tokens // 2), generator=g)
    answer = torch.randint(0, V, (n_pairs,), generator=g)
    wrong = (answer + 1 + torch.randint(0, V - 1, (n_pairs,), generator=g)) % V
    pairs = ea.PromptPairs.from_lists(clean.tolist(), corrupt.tolist(), answer.tolist(), wrong.tolist(), name=name)
    return Case(name, config, ea.load_model(model), pairs)


def zoo_case(name: str, n_pairs: int) -> Case:
    """A zoo model with its own task."""
    from edgeatp.zoo import ZOO

    adapter = ea.load_model(f"zoo:{name}")
    pairs = ea.make_task(ZOO[name].task, adapter.tokenizer, n=n_pairs, prepend_bos=adapter.prepend_bos)
    return Case(f"zoo:{name}", dict(ZOO[name].config), adapter, pairs)


def run_side(case: Case, mode: str, workdir: Path, threads: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Run ``autocircuit_side.py`` on the case under ``.venv-ac`` and return its JSON result."""
    p = case.pairs
    if not (p.equal_lengths and bool((p.answer_pos == p.lengths - 1).all()) and p.wrong.shape[1] == 1):
        raise ValueError(f"{case.name}: auto-circuit needs equal-length prompts answered at the last "
                         "position and one wrong answer per pair")
    params = {k: v for k, v in case.adapter.model.state_dict().items()
              if k in dict(case.adapter.model.named_parameters())}
    torch.save(params, workdir / "params.pt")
    torch.save({"clean": p.clean, "corrupt": p.corrupt, "answer": p.answer, "wrong": p.wrong[:, 0]},
               workdir / "pairs.pt")
    job = {"config": case.config, "params": str(workdir / "params.pt"), "pairs": str(workdir / "pairs.pt"),
           "mode": mode, "threads": threads, "repeats": repeats, "out": str(workdir / "out.json")}
    (workdir / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(AC_PYTHON), str(SIDE), str(workdir / "job.json")], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{case.name}: autocircuit_side.py failed:\n{proc.stderr[-3000:]}")
    return json.loads((workdir / "out.json").read_text())


def compare(case: Case) -> dict[str, Any]:
    """Max absolute / relative differences between our ``-signed`` and auto-circuit's scores."""
    with tempfile.TemporaryDirectory() as tmp:
        theirs = run_side(case, "scores", Path(tmp))
    n = len(case.pairs)
    ours = ea.attribute_edges(ea.Setup(case.adapter, case.pairs, batch_size=n), "atp")
    graph = ours.graph
    signed = ours.signed
    names = {e.name for e in graph.edges()}
    if names != set(theirs["scores"]):
        raise RuntimeError(f"{case.name}: edge sets differ: only ours {sorted(names - set(theirs['scores']))[:5]}, "
                           f"only auto-circuit {sorted(set(theirs['scores']) - names)[:5]}")
    a = torch.tensor([-float(signed[graph.index_of(k)]) for k in theirs["scores"]], dtype=torch.float64)
    b = torch.tensor(list(theirs["scores"].values()), dtype=torch.float64)
    diff = (a - b).abs()
    scale = b.abs().max()
    big = b.abs() >= 1e-3 * scale
    with torch.no_grad():
        logits = case.adapter.model(case.pairs.clean)[:, -1].double()
    return {
        "model": case.name, "dtype": case.config.get("dtype", "float32"), "pairs": n, "edges": len(b),
        "max_abs_score": float(scale), "max_abs_diff": float(diff.max()),
        "max_diff_over_max_score": float(diff.max() / scale),
        "max_rel_diff": float((diff[big] / b[big].abs()).max()),
        "logit_max_abs_diff": float((logits - torch.tensor(theirs["clean_logits"], dtype=torch.float64)).abs().max()),
    }


def cases() -> list[Case]:
    small = dict(n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=32, d_vocab=100, act_fn="gelu",
                 normalization_type="LN", seed=1)
    return [
        zoo_case("ioi", 64),
        zoo_case("induction", 64),
        random_case("random 3L+MLP", {**small, "dtype": "float32"}, 32, 16),
        random_case("random 3L+MLP", {**small, "dtype": "float64"}, 32, 16),
    ]


def main() -> None:
    if not ac_available():
        sys.exit(f"auto-circuit's venv is missing ({AC_PYTHON}). Create it from the repository root with:\n"
                 f"  {AC_RECIPE}\n(it needs TransformerLens 2.18, separate from edgeatp's TL 3.9 venv)")
    torch.set_num_threads(1)
    print(f"edgeatp at {code_version()}")
    rows = [compare(c) for c in cases()]
    cols = ["model", "dtype", "pairs", "edges", "max_abs_score", "max_abs_diff", "max_diff_over_max_score",
            "max_rel_diff", "logit_max_abs_diff"]
    print("auto-circuit fast EAP vs edgeatp atp (auto-circuit score = -signed; rel diff over edges with "
          "|score| >= 1e-3 max|score|)")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
