"""Library use end to end on a shipped zoo model: scores, a pruned and verified circuit, exports.

    python examples/zoo_end_to_end.py [--model zoo:induction] [--out examples-out]
"""

import argparse

import torch

import edgeatp as ea


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="zoo:induction")
    parser.add_argument("--out", default="examples-out")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = ea.load_model(args.model)
    setup = ea.Setup(model, ea.make_task(model.card["task"], model.tokenizer, n=64, seed=0))

    # Node level: which heads and MLPs matter (AtP with the QK fix), checked against exact patching.
    nodes = ea.attribute_nodes(setup, "atp-qk")
    exact = ea.patch_nodes(setup, [n for n, *_ in nodes.top(5)])
    for (node, score, signed), truth in zip(nodes.top(5), exact.mean.tolist()):
        print(f"{node.name:>10}  estimate {signed:+.3f}  exact {truth:+.3f}")

    # Edge level: every writer -> reader edge from one backward pass, then a faithful circuit.
    edges = ea.attribute_edges(setup, "atp-qk")
    curve = ea.faithfulness_curve(setup, edges, [2, 4, 8, 16, 32])
    size = next((k for k, f in zip(curve.sizes, curve.faithfulness) if f >= 0.8), curve.sizes[-1])
    circuit = ea.measure(setup, ea.prune(edges, top_k=size))
    circuit = circuit.with_(verification=ea.verify(setup, circuit, edges, top=10, sample_below=10), curve=curve)
    print(f"\n{circuit.n_edges} edges, faithfulness {circuit.faithfulness:.2f}:")
    for edge in circuit.edges():
        print("  ", edge.name)
    v = circuit.verification
    print(f"verification: rank correlation {v.rank_correlation:.2f}, sign agreement {v.sign_agreement:.2f}, "
          f"largest |exact| of the {v.outside_checked} checked edges outside the circuit {v.outside_max:.3f}")

    written = ea.write_outputs(circuit, args.out, ["json", "dot", "svg", "md"], scores=edges)
    for fmt, path in written.paths.items():
        print(f"wrote {fmt}: {path}")
    for fmt, why in written.skipped.items():
        print(f"skipped {fmt}: {why}")


if __name__ == "__main__":
    main()
