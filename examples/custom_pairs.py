"""Your own prompt pairs: a JSONL file (columns clean, corrupt, answer, wrong) on zoo:ioi.

    python examples/custom_pairs.py [examples/custom_pairs.jsonl]

The same from the shell: edgeatp discover --data examples/custom_pairs.jsonl --top-k 12
"""

import sys
from pathlib import Path

import edgeatp as ea


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("custom_pairs.jsonl")
    model = ea.load_model("zoo:ioi")
    try:
        pairs = ea.load_pairs(path, model.tokenizer, prepend_bos=model.prepend_bos, n_ctx=model.n_ctx)
    except ea.EdgeatpError as exc:  # names the row and the fix, e.g. unequal token lengths
        raise SystemExit(f"error: {exc}")
    print(f"{len(pairs)} pairs, lengths {sorted(set(pairs.lengths.tolist()))}")
    setup = ea.Setup(model, pairs)
    edges = ea.attribute_edges(setup, "atp-qk")
    circuit = ea.prune(edges, top_k=12)
    exact = ea.patch_edges(setup, edges.graph, circuit.edges())
    for edge, truth in zip(circuit.edges(), exact.mean.tolist()):
        print(f"{edge.name:>18}  estimate {edges.signed_of(edge):+.3f}  exact {truth:+.3f}")


if __name__ == "__main__":
    main()
