"""Reproducible training of the zoo models: ``python -m edgeatp.zoo.train NAME [--out DIR]``.

Each run is seeded, single-threaded and takes a few CPU minutes; it writes the weights
(safetensors, float32) and a model card with the recipe, the learning curve and the final
accuracy and clean/corrupt logit differences on held-out prompt pairs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..tasks.builtin import make_task
from ..tasks.pairs import PromptPairs
from ..tokenizer import WordTokenizer
from . import WEIGHTS, ZOO, hooked_config

EVAL_SEED = 10_000_019  # held-out prompt pairs; training batches use seeds 0, 1, 2, ...


def _eval_pairs(model: Any, pairs: PromptPairs) -> dict[str, float]:
    """Accuracy (answer is the argmax) and mean logit difference on clean and corrupt prompts."""
    from ..metrics import METRICS

    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        for which in ("clean", "corrupt"):
            batch = pairs.batch(torch.arange(len(pairs)), "noising" if which == "clean" else "denoising")
            logits = model(batch.base)
            ld = METRICS["logit_diff"](logits, batch)
            at = logits[torch.arange(len(pairs)), batch.answer_pos]
            if which == "clean":
                out["accuracy"] = float((at.argmax(-1) == batch.answer).float().mean())
            out[f"{which}_logit_diff"] = float(ld.mean())
    model.train(was_training)
    return out


def _attention_scores(model: Any, seq_len: int = 20, n: int = 64, seed: int = 1) -> dict[str, list[float]]:
    """Per-head previous-token and induction scores on BOS + random tokens repeated twice."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(1, model.cfg.d_vocab, (n, seq_len), generator=g)
    tokens = torch.cat([torch.zeros(n, 1, dtype=torch.long), half, half], dim=1)
    _, cache = model.run_with_cache(tokens, names_filter=lambda s: s.endswith("hook_pattern"))
    out: dict[str, list[float]] = {"prev": [], "induction": []}
    idx = torch.arange(seq_len + 1, 2 * seq_len + 1)
    for layer in range(model.cfg.n_layers):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"]  # [n, H, T, T]
        out["prev"] += pat[:, :, idx, idx - 1].mean((0, 2)).tolist()
        out["induction"] += pat[:, :, idx, idx - seq_len + 1].mean((0, 2)).tolist()
    return out


def _induction_batch(step: int, batch: int, n_ctx: int, vocab: int) -> torch.Tensor:
    """BOS, a random segment of random length in [4, 23], the segment again, random filler."""
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(1, vocab, (batch, n_ctx), generator=g)
    tokens[:, 0] = 0
    lengths = torch.randint(4, 24, (batch,), generator=g)
    for i, L in enumerate(lengths.tolist()):
        tokens[i, 1 + L: 1 + 2 * L] = tokens[i, 1: 1 + L]
    return tokens


def train(name: str, out_dir: Path = WEIGHTS, max_steps: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Train one zoo model from scratch and write its weights and card into ``out_dir``."""
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer

    entry = ZOO[name]
    torch.set_num_threads(1)
    torch.manual_seed(entry.config["seed"])
    model = HookedTransformer(hooked_config(name))
    tok = WordTokenizer(entry.vocab, bos="BOS", name=f"zoo:{name}")
    recipe = {"optimizer": "AdamW", "lr": 1e-3, "weight_decay": 0.01, "batch": 128 if name != "induction" else 64,
              "max_steps": max_steps or (4000 if name == "induction" else 3000), "eval_every": 100 if name != "induction" else 250,
              "stop": "3 consecutive evals at >= 99% accuracy" if name != "induction" else "fixed number of steps",
              "seed": entry.config["seed"], "threads": 1}
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    held_out = make_task(entry.task, tok, 1000, seed=EVAL_SEED)
    curve, good_evals, step = [], 0, 0
    t0, c0 = time.time(), time.process_time()
    model.train()
    for step in range(1, recipe["max_steps"] + 1):
        if name == "induction":
            tokens = _induction_batch(step, recipe["batch"], model.cfg.n_ctx, model.cfg.d_vocab)
            loss = model(tokens, return_type="loss")
        else:
            pairs = make_task(entry.task, tok, recipe["batch"], seed=step)
            rows = torch.arange(len(pairs))
            tokens, targets, pos = pairs.clean, pairs.answer, pairs.answer_pos
            if name == "dup":  # the corrupt prompt is a valid prompt too, whose answer is the wrong token
                tokens = torch.cat([pairs.clean, pairs.corrupt])
                targets = torch.cat([pairs.answer, pairs.wrong[:, 0]])
                pos, rows = torch.cat([pos, pos]), torch.arange(2 * len(pairs))
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits[rows, pos], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % recipe["eval_every"] == 0:
            stats = {"step": step, "loss": round(float(loss), 4), **_eval_pairs(model, held_out)}
            if name == "induction":
                model.eval()
                scores = _attention_scores(model)
                model.train()
                stats["prev_max_L0"] = round(max(scores["prev"][: model.cfg.n_heads]), 3)
                stats["induction_max_L1"] = round(max(scores["induction"][model.cfg.n_heads:]), 3)
            curve.append(stats)
            log(json.dumps(stats))
            good_evals = good_evals + 1 if stats["accuracy"] >= 0.99 else 0
            if name != "induction" and good_evals >= 3:
                break
    model.eval()
    final = _eval_pairs(model, make_task(entry.task, tok, 2000, seed=EVAL_SEED + 1))
    card = {
        "format_version": 1,
        "name": name,
        "description": entry.description,
        "architecture": {k: v for k, v in entry.config.items() if k != "seed"},
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "vocab": list(entry.vocab),
        "prepend_bos": False,
        "task": entry.task,
        "metric": "logit_diff",
        "known_mechanism": entry.known_mechanism,
        "evaluation": {"n_pairs": 2000, "seed": EVAL_SEED + 1, **{k: round(v, 4) for k, v in final.items()}},
        "training": {**recipe, "steps_run": step, "wall_seconds": round(time.time() - t0, 1),
                     "cpu_seconds": round(time.process_time() - c0, 1), "curve": curve,
                     "regenerate": f"python -m edgeatp.zoo.train {name}"},
    }
    if name == "induction":
        card["attention_scores"] = {k: [round(x, 3) for x in v] for k, v in _attention_scores(model).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / f"{name}.safetensors"))
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=1) + "\n")
    log(f"{name}: accuracy {final['accuracy']:.3f}, clean LD {final['clean_logit_diff']:.2f}, "
        f"corrupt LD {final['corrupt_logit_diff']:.2f}, {card['training']['wall_seconds']} s")
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="+", choices=sorted(ZOO))
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args()
    for name in args.names:
        train(name, args.out, args.max_steps)


if __name__ == "__main__":
    main()
