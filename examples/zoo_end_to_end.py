"""Library use end to end on a shipped zoo model: scores, a pruned and verified circuit, exports.

    python examples/zoo_end_to_end.py [--model zoo:induction] [--out examples-out]
"""

import argparse
from pathlib import Path

import torch

import edgeatp as ea
from edgeatp.circuit import circuit_faithfulness
from edgeatp.export import export_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="zoo:induction")
    parser.add_argument("--out", default="examples-out")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = ea.load_model(args.model)
    pairs = ea.make_task(model.card["task"], model.tokenizer, n=64, seed=0)

    # Node level: which heads and MLPs matter (AtP with the QK fix), checked against exact patching.
    nodes = ea.attribute_nodes(model, pairs, method="atp-qk")
    exact = ea.patch_nodes(model, pairs, [n for n, *_ in nodes.top(5)])
    for (node, score, signed), truth in zip(nodes.top(5), exact.mean.tolist()):
        print(f"{node.name:>10}  estimate {signed:+.3f}  exact {truth:+.3f}")

    # Edge level: every writer -> reader edge from one backward pass, then a faithful circuit.
    edges = ea.attribute_edges(model, pairs, method="atp-qk")
    curve = ea.faithfulness_curve(model, pairs, edges, [2, 4, 8, 16, 32])
    size = next((k for k, f in zip(curve.sizes, curve.faithfulness) if f >= 0.8), curve.sizes[-1])
    circuit = ea.prune(edges, top_k=size)
    own = circuit_faithfulness(model, pairs, circuit)
    circuit = circuit.with_(verification=ea.verify(model, pairs, circuit, edges, top=10, sample_below=10),
                            faithfulness=curve,
                            meta={**circuit.meta, "faithfulness": own.faithfulness[0], "necessity": own.necessity[0]})
    print(f"\n{circuit.n_edges} edges, faithfulness {own.faithfulness[0]:.2f}:")
    for edge in circuit.edges():
        print("  ", edge.name)
    v = circuit.verification
    print(f"verification: rank correlation {v.rank_correlation:.2f}, sign agreement {v.sign_agreement:.2f}, "
          f"largest effect below the cut {v.below_cut_max:.3f}")

    formats = ["json", "dot", "md"] + (["svg"] if ea.export.dot_available() else [])
    for fmt, path in export_all(circuit, Path(args.out), formats, scores=edges).items():
        print(f"wrote {fmt}: {path}")


if __name__ == "__main__":
    main()
