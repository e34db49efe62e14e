"""The cost planner (``edgeatp plan``) against measured runs: passes, peak memory and time.

For each case the planner gets what ``edgeatp plan`` gets — the model's config and the workload
(pairs, tokens, the prompts' shared prefix, level, batch size, memory budget) — and every method of
the level is then run and measured (:mod:`edgeatp.research.measure`): forwards (rows over pairs),
backward calls, the peak of live tensor bytes during the call, and process CPU time as a ratio to one
plain forward+backward of the same batches, timed before and after the method.

Cases: the zoo models on their own tasks; local checkpoint folders (tiny GPT-2, Pythia and grouped-query
Llama checkpoints written here with transformers, their specs read from ``config.json`` by the planner's
torch-free reader, the models loaded by edgeatp's loader); GPT-2-shaped random models (a small one,
and with ``--gpt2`` the full GPT-2-small shape, 8 pairs x 32 tokens, several minutes); with
``--cases families``, tiny Gemma-2, Qwen2 and parallel GPT-NeoX checkpoints (d_model 32) at 24 and 12
tokens, and GPT-2- and Llama-like HookedTransformers of the same shape as controls.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/plan_check.py [--cases zoo,checkpoints,gpt2-small,families]
        [--gpt2] [--repeats 3] [--no-time]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

import edgeatp as ea  # noqa: E402
from edgeatp.model_config import describe_model, spec_of  # noqa: E402
from edgeatp.plan import ModelSpec  # noqa: E402
from edgeatp.research.measure import Check, check_plan, workload_of  # noqa: E402
from edgeatp.setup import Setup  # noqa: E402

GPT2_SMALL = dict(n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257,
                  act_fn="gelu_new", normalization_type="LN")
EDGE_METHODS = ["atp", "atp-qk", "atp-gd", "atp*", "ig"]


@dataclass
class Case:
    """A model, its spec as the planner reads it, pairs and the level to attribute at."""

    group: str
    name: str
    setup: Setup
    spec: ModelSpec
    level: str = "edge"
    methods: tuple[str, ...] = tuple(EDGE_METHODS)


def random_pairs(n: int, T: int, vocab: int, prefix: int, seed: int = 0) -> ea.PromptPairs:
    """Random prompts whose corrupt copies differ from position ``prefix`` on."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, T), generator=g)
    corrupt = clean.clone()
    corrupt[:, prefix:] = torch.randint(0, vocab, (n, T - prefix), generator=g)
    answer = torch.randint(0, vocab, (n,), generator=g)
    return ea.PromptPairs.from_lists(clean.tolist(), corrupt.tolist(), answer.tolist(), ((answer + 1) % vocab).tolist())


def zoo_cases() -> list[Case]:
    from edgeatp.zoo import ZOO

    out = []
    for name in ZOO:
        model = ea.load_model(f"zoo:{name}")
        pairs = ea.make_task(ZOO[name].task, model.tokenizer, n=32, prepend_bos=model.prepend_bos)
        out.append(Case("zoo", f"zoo:{name}", Setup(model, pairs, batch_size=32), describe_model(f"zoo:{name}")))
    zoo_ioi = out[[c.name for c in out].index("zoo:ioi")]
    out.append(Case("zoo", "zoo:ioi", zoo_ioi.setup, zoo_ioi.spec, "node", ("atp", "atp-qk", "atp*", "ig", "exact")))
    out.append(Case("zoo", "zoo:ioi", zoo_ioi.setup, zoo_ioi.spec, "neuron", ("atp", "atp*")))
    return out


def checkpoint_cases(folder: Path) -> list[Case]:
    """Tiny random Hugging Face checkpoints of three families, saved as folders and loaded from them."""
    import transformers as tf

    configs = {
        "gpt2-tiny": tf.GPT2Config(vocab_size=512, n_embd=128, n_head=4, n_layer=3, n_positions=64),
        "pythia-tiny": tf.GPTNeoXConfig(vocab_size=512, hidden_size=128, num_attention_heads=4, num_hidden_layers=3,
                                        intermediate_size=512, max_position_embeddings=64, rotary_pct=0.25),
        "llama-gqa-tiny": tf.LlamaConfig(vocab_size=512, hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                                         num_hidden_layers=3, intermediate_size=384, max_position_embeddings=64),
    }
    out = []
    for name, config in configs.items():
        torch.manual_seed(0)
        path = folder / name
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        model = ea.load_model(str(path))
        pairs = random_pairs(16, 24, config.vocab_size, 8)
        out.append(Case("checkpoint", name, Setup(model, pairs, batch_size=8), describe_model(str(path))))
    return out


def family_cases(folder: Path) -> list[Case]:
    """Gemma-2 (post-norms, soft-capping, a scaled embedding), Qwen2 (q/k/v biases) and parallel GPT-NeoX
    (partial rotary) checkpoints of one tiny shape at 8 pairs x 24 and x 12 tokens, edges and nodes; and
    GPT-2- and Llama-like HookedTransformers of that shape at 24 tokens: what the families add beyond it."""
    import transformers as tf
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    shape = dict(vocab_size=32, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                 max_position_embeddings=64)
    configs = {
        "gemma2-tiny": tf.Gemma2Config(**shape, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                       query_pre_attn_scalar=12, attn_logit_softcapping=1.0,
                                       final_logit_softcapping=0.5),
        "qwen2-tiny": tf.Qwen2Config(**shape, num_key_value_heads=2),
        "neox-parallel-tiny": tf.GPTNeoXConfig(**shape, rotary_pct=0.5, use_parallel_residual=True),
    }
    models: list[tuple[str, ea.ModelAdapter, ModelSpec]] = []
    for name, config in configs.items():
        torch.manual_seed(0)
        path = folder / name
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        models.append((name, ea.load_model(str(path)), describe_model(str(path))))
    out = []
    for T in (24, 12):
        pairs = random_pairs(8, T, 32, 4)
        for name, model, spec in models:
            setup = Setup(model, pairs, batch_size=4)
            out += [Case("families", f"{name} x{T}", setup, spec),
                    Case("families", f"{name} x{T}", setup, spec, "node", ("atp", "atp*"))]
    controls = {"gpt2-like": dict(act_fn="gelu_new", normalization_type="LN"),
                "llama-like": dict(act_fn="silu", normalization_type="RMS", gated_mlp=True, n_key_value_heads=2,
                                   positional_embedding_type="rotary", rotary_dim=8)}
    pairs = random_pairs(8, 24, 32, 4)
    for name, extra in controls.items():
        torch.manual_seed(0)
        cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64, d_vocab=32,
                                      **extra)
        model = ea.load_model(HookedTransformer(cfg))
        setup = Setup(model, pairs, batch_size=4)
        out += [Case("same-shape controls", f"{name} x24", setup, spec_of(model.cfg, name)),
                Case("same-shape controls", f"{name} x24", setup, spec_of(model.cfg, name), "node", ("atp", "atp*"))]
    return out


def random_case(name: str, config: dict[str, Any], n: int, T: int, batch: int) -> Case:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    model = ea.load_model(HookedTransformer(HookedTransformerConfig(**config)))
    pairs = random_pairs(n, T, config["d_vocab"], T // 2)
    return Case("gpt2-shaped", name, Setup(model, pairs, batch_size=batch), spec_of(model.cfg, name))


def gpt2_cases(full: bool) -> list[Case]:
    small = {**GPT2_SMALL, "n_layers": 4, "n_heads": 8, "d_model": 256, "d_head": 32, "d_mlp": 1024}
    out = [random_case("gpt2-shaped 4x256", small, 16, 32, 8)]
    if full:
        out.append(random_case("gpt2-small shape", GPT2_SMALL, 8, 32, 8))
    return out


def run(case: Case, repeats: int) -> list[Check]:
    work = workload_of(case.setup, case.level)
    return check_plan(case.setup, case.spec, work, list(case.methods), repeats)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:+.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="zoo,checkpoints,gpt2-small")
    parser.add_argument("--gpt2", action="store_true", help="also the full GPT-2-small shape (several minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-time", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wanted = args.cases.split(",")
    repeats = 0 if args.no_time else args.repeats
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"commit {commit}, torch {torch.__version__}, 1 thread, {repeats} timed repeats\n")
    print("| case | level | method | forwards (meas/plan) | backward calls (meas/plan) | batch | peak MB measured "
          "| planned | error | time x fwd+bwd measured | planned | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    errors: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        if "zoo" in wanted:
            cases += zoo_cases()
        if "checkpoints" in wanted:
            cases += checkpoint_cases(Path(tmp))
        if "gpt2-small" in wanted or args.gpt2:
            cases += gpt2_cases(args.gpt2)
        if "families" in wanted:
            cases += family_cases(Path(tmp))
        for case in cases:
            for c in run(case, repeats):
                p, m = c.planned, c.measured
                batches = -(-case.setup.n_pairs // p.memory.batch_size)
                planned_bwd = round(p.passes.backwards * batches) if p.passes.backwards else 0
                if m.forwards != p.passes.forwards or m.backward_calls != planned_bwd:
                    raise SystemExit(f"{case.name} {p.method}: passes differ from the plan")
                print(f"| {case.name} | {case.level} | {p.method} | {m.forwards:g} / {p.passes.forwards:g} "
                      f"| {m.backward_calls} / {planned_bwd} | {p.memory.batch_size} | {m.peak_mb:.1f} "
                      f"| {c.planned_peak_mb:.1f} | {_pct(c.memory_error)} "
                      f"| {'' if c.time_ratio is None else f'{c.time_ratio:.2f}'} | {p.time:.2f} "
                      f"| {_pct(c.time_error)} |")
                group = errors.setdefault(case.group, {"memory": [], "time": []})
                group["memory"].append(c.memory_error)
                if c.time_error is not None:
                    group["time"].append(c.time_error)
    print("\npasses: equal to the plan in every run (checked above)")
    for group, errs in errors.items():
        for what, xs in errs.items():
            if xs:
                print(f"{group}: {what} error median {statistics.median(xs):+.0%}, "
                      f"range {min(xs):+.0%} .. {max(xs):+.0%}, median |error| "
                      f"{statistics.median(abs(x) for x in xs):.0%} ({len(xs)} runs)")


if __name__ == "__main__":
    main()
