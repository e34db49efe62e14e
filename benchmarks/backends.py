"""Speed of the two model backends on the same checkpoints: HookedTransformer (TransformerLens 3.x)
and TransformerBridge (TransformerLens 4.x, or the preview in 3.9).

Each run writes the same tiny-but-not-trivial GPT-2 and Llama (grouped-query) checkpoints, loads
them on every backend this TransformerLens has and times edgeatp's main operations in process
CPU seconds (one torch thread, median of repeats, backends interleaved). Every time is also given
as a ratio to one plain forward+backward of the Hugging Face model itself on the same batch,
measured in the same run: transformers and torch are the same in both environments, so these
ratios compare runs made in different virtualenvs (TransformerLens 3.x and 4.x cannot share one).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/backends.py                     # hooked + 3.9's bridge
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv-tl4/bin/python benchmarks/backends.py    # TransformerLens 4's bridge
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import edgeatp as ea  # noqa: E402
from edgeatp.metrics import get_metric  # noqa: E402
from edgeatp.model.loading import default_backend  # noqa: E402
from edgeatp.tasks import PromptPairs  # noqa: E402

VOCAB = [f"w{i}" for i in range(512)]
SIZES = dict(d_model=128, n_layers=4, n_heads=8, d_mlp=512, n_ctx=64)


def write_checkpoints(root: Path) -> dict[str, Path]:
    """A GPT-2 and a Llama (8 query heads on 4 key/value heads) checkpoint with a word-level tokenizer."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    s = SIZES
    configs = {
        "gpt2": tf.GPT2Config(vocab_size=len(VOCAB), n_embd=s["d_model"], n_layer=s["n_layers"], n_head=s["n_heads"],
                              n_positions=s["n_ctx"], bos_token_id=0, eos_token_id=0),
        "llama-gqa": tf.LlamaConfig(vocab_size=len(VOCAB), hidden_size=s["d_model"], num_hidden_layers=s["n_layers"],
                                    num_attention_heads=s["n_heads"], num_key_value_heads=s["n_heads"] // 2,
                                    intermediate_size=s["d_mlp"], max_position_embeddings=s["n_ctx"], bos_token_id=0,
                                    eos_token_id=0),
    }
    word = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="w1"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=word, bos_token="w0", eos_token="w0", unk_token="w1")
    folders = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        config.initializer_range = 0.1
        folders[name] = root / name
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(str(folders[name]))
        tokenizer.save_pretrained(str(folders[name]))
    return folders


def random_pairs(n: int, length: int, seed: int = 0) -> PromptPairs:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, len(VOCAB), (n, length), generator=g)
    corrupt = torch.randint(2, len(VOCAB), (n, length), generator=g)
    return PromptPairs.from_lists(clean.tolist(), corrupt.tolist(), [5] * n, [[6, 7]] * n)


def cpu_seconds(fn: Callable[[], Any]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def hf_unit(folder: Path, pairs: PromptPairs) -> Callable[[], Any]:
    """One forward+backward of the Hugging Face model on all pairs' base prompts (the unit)."""
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    batch = pairs.batch(torch.arange(len(pairs)))
    metric = get_metric("logit_diff")

    def run() -> None:
        metric(hf(batch.base).logits, batch).sum().backward()
        hf.zero_grad(set_to_none=True)
    return run


def operations(adapter: ea.ModelAdapter, pairs: PromptPairs, n_patches: int) -> dict[str, Callable[[], Any]]:
    """edgeatp's main operations on one loaded model."""
    setup = ea.Setup(adapter, pairs)
    graph = ea.EdgeGraph.from_shape(adapter.shape)
    edges = list(graph.edges())[:n_patches]
    tokens = pairs.batch(torch.arange(len(pairs))).base

    def forward() -> None:
        with torch.no_grad():
            adapter.forward(tokens)
    return {
        "forward (no hooks)": forward,
        "edges atp": lambda: ea.attribute_edges(setup, "atp"),
        "edges atp-qk": lambda: ea.attribute_edges(setup, "atp-qk"),
        "nodes atp*": lambda: ea.attribute_nodes(setup, "atp*"),
        f"exact patching, {n_patches} edges": lambda: ea.patch_edges(setup, graph, edges),
    }


def run(repeats: int, n_pairs: int, length: int, n_patches: int) -> dict[str, Any]:
    """Median CPU seconds of every operation on every backend, per model, with the unit."""
    from importlib.metadata import version

    torch.set_num_threads(1)
    backends = ["hooked", "bridge"] if default_backend() == "hooked" else ["bridge"]
    pairs = random_pairs(n_pairs, length)
    out: dict[str, Any] = {"transformer_lens": version("transformer-lens"), "transformers": version("transformers"),
                           "torch": torch.__version__, "backends": backends, "sizes": SIZES, "n_pairs": n_pairs,
                           "length": length, "repeats": repeats, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in write_checkpoints(Path(tmp)).items():
            unit = hf_unit(folder, pairs)
            ops = {b: operations(ea.load_model(str(folder), backend=b), pairs, n_patches) for b in backends}
            times: dict[str, list[float]] = {"unit": []}
            for fn in [unit, *(f for o in ops.values() for f in o.values())]:
                fn()  # warm-up
            for _ in range(repeats):  # interleaved, so drift on the shared machine hits every column alike
                times["unit"].append(cpu_seconds(unit))
                for b, o in ops.items():
                    for op, fn in o.items():
                        times.setdefault(f"{b}|{op}", []).append(cpu_seconds(fn))
            med = {k: statistics.median(v) for k, v in times.items()}
            out["models"][name] = {"unit_seconds": med["unit"], "seconds": {k: v for k, v in med.items() if k != "unit"}}
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown table: seconds, ratio to the unit and bridge/hooked ratio where both ran."""
    lines = []
    for name, m in result["models"].items():
        lines.append(f"\n**{name}** (TransformerLens {result['transformer_lens']}; unit = Hugging Face "
                     f"forward+backward = {1000 * m['unit_seconds']:.1f} ms CPU)\n")
        head = "| operation | " + " | ".join(f"{b} s | {b} / unit" for b in result["backends"])
        both = len(result["backends"]) == 2
        lines += [head + (" | bridge / hooked |" if both else " |"),
                  "|---|" + "---:|" * (2 * len(result["backends"]) + both)]
        ops = dict.fromkeys(k.split("|", 1)[1] for k in m["seconds"])
        for op in ops:
            cells = []
            for b in result["backends"]:
                s = m["seconds"][f"{b}|{op}"]
                cells += [f"{s:.3f}", f"{s / m['unit_seconds']:.1f}"]
            if both:
                cells.append(f"{m['seconds'][f'bridge|{op}'] / m['seconds'][f'hooked|{op}']:.2f}")
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--patches", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args()
    result = run(args.repeats, args.pairs, args.length, args.patches)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
