"""The backend-agreement cases: the models, the prompt pairs and every number both backends must give.

The cases are the zoo models and tiny GPT-2, GPT-NeoX (parallel, partial rotary), Llama
(grouped-query), Mistral (grouped-query, a sliding window of :data:`WINDOW` positions, shorter than
the prompts) and Qwen2 (grouped-query, query/key/value biases) checkpoints written here.
:func:`results` computes, on one backend, node and edge scores of every method (the edge QK fix
with rotary at the prompts' first differing position, GradDrop per block and, where blocks have
MLPs, per sublayer), the per-query-head (ungrouped) view of grouped models, and the circuit
``edgeatp discover`` finds with its faithfulness and verification patches.

The reference is always the HookedTransformer backend. Where TransformerLens 4 has none,
``python -m tests.backend_cases FOLDER`` is run with a TransformerLens 3.x Python: it writes the
checkpoints into ``FOLDER`` and the reference results to ``FOLDER/reference.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

METHODS = ("atp", "atp-qk", "atp-gd", "atp*", "ig", "exact")
ZOO = ("induction", "ioi", "dup", "llama-induction")
CHECKPOINTS = ("gpt2", "pythia", "llama-gqa", "mistral-swa", "qwen2-gqa")
WINDOW = 4
CASES = tuple(f"zoo:{n}" for n in ZOO) + CHECKPOINTS
N_PAIRS = 8


def checkpoint_configs() -> dict[str, Any]:
    """The transformers configs of the checkpoint cases (tiny, random, written at test time)."""
    import transformers as tf

    from .test_families import LLAMA, NEOX, H, L, NH, P, V

    return {
        "gpt2": tf.GPT2Config(vocab_size=V, n_embd=H, n_head=NH, n_layer=L, n_positions=P),
        "pythia": tf.GPTNeoXConfig(**NEOX, use_parallel_residual=True),
        "llama-gqa": tf.LlamaConfig(**LLAMA, num_key_value_heads=2),
        "mistral-swa": tf.MistralConfig(**LLAMA, num_key_value_heads=2, sliding_window=WINDOW),
        "qwen2-gqa": tf.Qwen2Config(**LLAMA, num_key_value_heads=2),
    }


def write_checkpoints(root: Path) -> None:
    """Each checkpoint case as a folder under ``root`` with its tokenizer and a prompt-pair file."""
    from .test_families import _bpe, _pairs_file, _write

    tokenizer = _bpe()
    for name, config in checkpoint_configs().items():
        folder = root / name
        _write(folder, config, tokenizer)
        _pairs_file(root / f"{name}.jsonl", tokenizer)


def discover_config(case: str, root: Path, backend: str) -> Any:
    """What ``edgeatp discover`` is asked for on a case (few pairs, few verification patches)."""
    from edgeatp.config import DiscoverConfig

    common = dict(n_pairs=N_PAIRS, n_verify=6, sample_below=6, threads=1, backend=backend)
    if case.startswith("zoo:"):
        return DiscoverConfig(model=case, **common)
    return DiscoverConfig(model=str(root / case), data=str(root / f"{case}.jsonl"), **common)


def results(case: str, root: Path, backend: str) -> dict[str, Any]:
    """Every number of a case on one backend: ``{name: tensor}``, plus the circuit's edge names."""
    import edgeatp as ea
    from edgeatp.pipeline import load_inputs, run_discover

    cfg = discover_config(case, root, backend)
    model = ea.load_model(cfg.model, backend=backend)
    assert model.backend.kind == backend
    pairs, _ = load_inputs(cfg, model)
    setup = ea.Setup(model, pairs)
    out: dict[str, Any] = {}

    def record(name: str, scores: Any) -> None:
        """A method's per-pair signed estimates and the magnitudes they rank by (GradDrop's own)."""
        out[name], out[f"{name} magnitude"] = scores.per_pair, scores.per_pair_abs

    for method in METHODS:
        record(f"nodes {method}", ea.attribute_nodes(setup, method))
        record(f"edges {method}", ea.attribute_edges(setup, method))
    if not model.shape.attn_only:  # GradDrop per sublayer: truncated backwards from resid_mid (or per write, in parallel)
        record("nodes atp-gd sublayer", ea.attribute_nodes(setup, "atp-gd", graddrop="sublayer"))
        record("edges atp* sublayer", ea.attribute_edges(setup, "atp*", graddrop="sublayer"))
    if model.shape.grouped:
        view = ea.EdgeGraph.from_shape(model.shape, ungrouped=True)
        for method in ("atp", "atp-qk", "exact"):
            record(f"ungrouped edges {method}", ea.attribute_edges(setup, method, view))
    circuit = run_discover(cfg).circuit
    out["circuit"] = [e.name for e in circuit.edges()]
    out["faithfulness, necessity"] = torch.tensor([circuit.faithfulness, circuit.necessity], dtype=torch.float64)
    out["verified exact effects"] = torch.tensor([c.exact for c in circuit.verification.checks], dtype=torch.float64)
    return out


def reference(root: Path) -> dict[str, dict[str, Any]]:
    """The HookedTransformer backend's results of every case, with the checkpoints written under ``root``."""
    torch.set_num_threads(1)
    write_checkpoints(root)
    return {case: results(case, root, "hooked") for case in CASES}


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    torch.save(reference(folder), folder / "reference.pt")
