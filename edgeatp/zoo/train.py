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


FIXED = "fixed number of steps"
BASE_RECIPE = {"optimizer": "AdamW", "lr": 1e-3, "weight_decay": 0.01, "batch": 128, "max_steps": 3000,
               "eval_every": 100, "stop": "3 consecutive evals at >= 99% accuracy"}
RECIPES = {  # per-model changes to BASE_RECIPE
    "induction": {"batch": 64, "max_steps": 4000, "eval_every": 250, "stop": FIXED},
    "llama-induction": {"lr": 2e-3, "batch": 64, "max_steps": 1500, "eval_every": 250, "stop": FIXED},
}


def _recipe(name: str, max_steps: int | None) -> dict[str, Any]:
    recipe = {**BASE_RECIPE, **RECIPES.get(name, {}), "seed": ZOO[name].config["seed"], "threads": 1}
    if max_steps:
        recipe["max_steps"] = max_steps
    return recipe


def _trainable(model: Any, biases: bool) -> list[torch.nn.Parameter]:
    """The parameters to train; without ``biases`` every ``b_*`` parameter is zeroed and frozen."""
    for pname, p in model.named_parameters():
        if not biases and pname.rsplit(".", 1)[-1].lstrip("_").startswith("b_"):
            with torch.no_grad():
                p.zero_()
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _loss(name: str, model: Any, tok: WordTokenizer, step: int, batch: int) -> torch.Tensor:
    """The training loss of one batch: next-token loss on repeated segments for the induction task,
    cross-entropy at the answer position otherwise."""
    if ZOO[name].task == "induction":
        return model(_induction_batch(step, batch, model.cfg.n_ctx, model.cfg.d_vocab), return_type="loss")
    pairs = make_task(ZOO[name].task, tok, batch, seed=step)
    rows = torch.arange(len(pairs))
    tokens, targets, pos = pairs.clean, pairs.answer, pairs.answer_pos
    if name == "dup":  # the corrupt prompt is a valid prompt too, whose answer is the wrong token
        tokens = torch.cat([pairs.clean, pairs.corrupt])
        targets = torch.cat([pairs.answer, pairs.wrong[:, 0]])
        pos, rows = torch.cat([pos, pos]), torch.arange(2 * len(pairs))
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits[rows, pos], targets)


def _head_scores(model: Any) -> dict[str, float]:
    """The strongest layer-0 previous-token and layer-1 induction scores (for the learning curve)."""
    model.eval()
    scores = _attention_scores(model)
    model.train()
    return {"prev_max_L0": round(max(scores["prev"][: model.cfg.n_heads]), 3),
            "induction_max_L1": round(max(scores["induction"][model.cfg.n_heads:]), 3)}


def _extra_card(name: str, model: Any, tok: WordTokenizer) -> dict[str, Any]:
    """Card entries beyond the common ones: attention scores and, for grouped-query models, the
    hook-level mechanism checks of :mod:`.checks` (measured without edgeatp's own patching)."""
    entry, extra = ZOO[name], {}
    if not entry.biases:
        extra["biases"] = ("none: every b_* parameter TransformerLens creates (attn b_Q, _b_K, _b_V, b_O; mlp b_in, "
                           "b_out; unembed b_U) is zero and was frozen (excluded from the optimizer)")
    if entry.task == "induction":
        extra["attention_scores"] = {k: [round(x, 3) for x in v] for k, v in _attention_scores(model).items()}
    if entry.grouped_query:
        from .checks import mechanism_checks

        checks = mechanism_checks(model, make_task(entry.task, tok, 500, seed=EVAL_SEED + 2))
        extra["mechanism_checks"] = {"seed": EVAL_SEED + 2, **checks}
    return extra


def train(name: str, out_dir: Path = WEIGHTS, max_steps: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Train one zoo model from scratch and write its weights and card into ``out_dir``."""
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer

    entry = ZOO[name]
    torch.set_num_threads(1)
    torch.manual_seed(entry.config["seed"])
    model = HookedTransformer(hooked_config(name))
    tok = WordTokenizer(entry.vocab, bos="BOS", name=f"zoo:{name}")
    recipe = _recipe(name, max_steps)
    opt = torch.optim.AdamW(_trainable(model, entry.biases), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    held_out = make_task(entry.task, tok, 1000, seed=EVAL_SEED)
    curve, good_evals, step = [], 0, 0
    t0, c0 = time.time(), time.process_time()
    model.train()
    for step in range(1, recipe["max_steps"] + 1):
        loss = _loss(name, model, tok, step, recipe["batch"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % recipe["eval_every"] == 0:
            stats = {"step": step, "loss": round(float(loss), 4), **_eval_pairs(model, held_out)}
            if entry.task == "induction":
                stats.update(_head_scores(model))
            curve.append(stats)
            log(json.dumps(stats))
            good_evals = good_evals + 1 if stats["accuracy"] >= 0.99 else 0
            if recipe["stop"] != FIXED and good_evals >= 3:
                break
    model.eval()
    final = _eval_pairs(model, make_task(entry.task, tok, 2000, seed=EVAL_SEED + 1))
    wall, cpu = round(time.time() - t0, 1), round(time.process_time() - c0, 1)
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
        "training": {**recipe, "steps_run": step, "wall_seconds": wall, "cpu_seconds": cpu, "curve": curve,
                     "regenerate": f"python -m edgeatp.zoo.train {name}"},
    }
    if not entry.biases:
        card["n_trainable_params"] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    card.update(_extra_card(name, model, tok))
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
