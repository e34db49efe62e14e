"""The work of the data-parallel tests: run in one process by tests/test_distributed.py, and under
``torchrun --nproc-per-node 2`` (gloo) as ``python tests/dist_work.py OUT CHECKPOINT``, which writes
rank 0's results and what every rank caught in the failure scenarios (library calls and the
``discover`` command) into OUT; ``python tests/dist_work.py --hang OUT SECONDS`` lets rank 1 stop
answering past the collective timeout; ``python tests/dist_work.py --commands OUT`` runs the
circuit commands of :data:`COMMANDS` into OUT/two."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import edgeatp as ea  # noqa: E402
from edgeatp.attribution import attribute_edges, attribute_nodes  # noqa: E402
from edgeatp.circuit import prune  # noqa: E402
from edgeatp.distributed import guard, process_group  # noqa: E402
from edgeatp.model import Site  # noqa: E402
from edgeatp.patching import patch_edges  # noqa: E402
from edgeatp.setup import Setup  # noqa: E402
from edgeatp.tasks import make_task  # noqa: E402
from edgeatp.tasks.pairs import PromptPairs  # noqa: E402
from edgeatp.verification import faithfulness_curve, verify  # noqa: E402


def workload(checkpoint: str) -> dict[str, object]:
    """Attribution (edges, nodes; plain, QK-fixed, GradDrop, integrated gradients, per position),
    exact patching, faithfulness and verification on zoo:ioi, and edge AtP* on a local checkpoint.
    24 pairs in batches of 8: two processes batch them differently from one."""
    out: dict[str, object] = {}
    model = ea.load_model("zoo:ioi")
    setup = Setup(model, make_task("ioi", model.tokenizer, 24, seed=3), batch_size=8)
    for method in ("atp-qk", "atp*", "ig"):
        scores = attribute_edges(setup, method, ig_steps=2)
        out[f"ioi {method}"] = (scores.scores, scores.signed, scores.stderr, scores.per_pair)
    positional = attribute_edges(setup, "atp", positions=True)
    out["ioi atp per position"] = (positional.scores, positional.signed)
    nodes = attribute_nodes(setup, "atp*")
    out["ioi nodes atp*"] = (nodes.scores, nodes.signed, nodes.per_pair)
    scores = attribute_edges(setup, "atp-qk")
    circuit = prune(scores, top_k=16)
    out["circuit"] = circuit.in_graph
    curve = faithfulness_curve(setup, scores, [4, 16])
    out["faithfulness"] = (curve.faithfulness, curve.necessity, curve.clean_metric, curve.corrupt_metric)
    exact = patch_edges(setup, scores.graph, [e for e, *_ in scores.top(6)])
    out["exact"] = (exact.per_pair, exact.base_metric)
    v = verify(setup, circuit, scores, top=6, sample_below=6)
    out["verification"] = [(c.name, c.estimate, c.exact) for c in v.checks]
    local = ea.load_model(checkpoint)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 30, (10, 7), generator=g)
    pairs = PromptPairs.from_lists(tokens.tolist(), torch.randint(2, 30, (10, 7), generator=g).tolist(),
                                   [5] * 10, [[6]] * 10)
    ckpt_scores = attribute_edges(Setup(local, pairs, batch_size=4), "atp*")
    out["checkpoint atp*"] = (ckpt_scores.scores, ckpt_scores.signed)
    return out


def failures(rank: int) -> dict[str, list]:
    """Runs in which rank 1 fails (bad data; an exception inside a forward hook) or has fewer pairs
    than rank 0 (uneven pairs): what each rank caught and how long it took."""
    caught: dict[str, list] = {}
    model = ea.load_model("zoo:ioi")
    pairs = make_task("ioi", model.tokenizer, 8, seed=0)

    def boom(t: torch.Tensor) -> None:
        raise RuntimeError("boom in a hook")

    forward = model.forward
    for scenario in ("bad data", "hook", "uneven pairs"):
        start = time.time()
        try:
            with guard():
                data = pairs
                if rank == 1 and scenario == "bad data":
                    data = PromptPairs.from_lists([[0, 4, 999]], [[0, 5, 999]], [4], [[5]])
                if rank == 1 and scenario == "uneven pairs":
                    data = pairs.subset(range(7))
                if rank == 1 and scenario == "hook":
                    model.forward = lambda tokens, fwd=(), logits=True: forward(  # type: ignore[method-assign]
                        tokens, [*fwd, (Site("pattern", 1), boom)], logits)
                attribute_edges(Setup(model, data, batch_size=2), "atp-qk")
            caught[scenario] = ["nothing", "", time.time() - start]
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            caught[scenario] = [type(exc).__name__, str(exc), time.time() - start]
        finally:
            model.forward = forward  # type: ignore[method-assign]
    return caught


def failing_command(rank: int, out: Path) -> dict[str, object]:
    """``edgeatp discover`` (in this process, the process group already joined) while rank 1 fails
    inside a forward hook: exit status and output of each rank."""
    from click.testing import CliRunner

    from edgeatp.cli import main as cli
    from edgeatp.model.adapter import ModelAdapter

    forward = ModelAdapter.forward

    def failing(self: ModelAdapter, tokens: torch.Tensor, fwd=(), logits: bool = True):  # type: ignore[no-untyped-def]
        def boom(t: torch.Tensor) -> None:
            raise RuntimeError("boom in a hook")
        return forward(self, tokens, [*fwd, (Site("pattern", 1), boom)], logits)

    if rank == 1:
        ModelAdapter.forward = failing  # type: ignore[method-assign]
    try:
        res = CliRunner().invoke(cli, ["discover", "--model", "zoo:induction", "--n-pairs", "8", "--format", "json",
                                       "--out", str(out / "cli-failure")])
    finally:
        ModelAdapter.forward = forward  # type: ignore[method-assign]
    return {"exit_code": res.exit_code, "output": res.output}


def commands(folder: Path) -> list[list[str]]:
    """``discover --refine`` and, on its circuit, ``refine``, ``verify`` and ``export``, writing into ``folder``."""
    circuit = str(folder / "circuit.json")
    return [["discover", "--model", "zoo:ioi", "--n-pairs", "10", "--batch-size", "4", "--top-k", "12", "--refine",
             "--refine-budget", "200", "--refine-sizes", "6,12", "--verify", "6", "--sample-below", "4",
             "--format", "json", "--out", str(folder), "--json"],
            ["refine", circuit, "--sizes", "4,8", "--refine-budget", "150", "--batch-size", "4",
             "--collective-timeout", "600", "--out", str(folder / "refined.json"), "--json"],
            ["verify", circuit, "--verify", "6", "--sample-below", "4", "--batch-size", "4",
             "--out", str(folder / "verified.json"), "--json"],
            ["export", circuit, "--format", "mib"]]


def run_commands(rank: int, out: Path) -> None:
    """The :func:`commands` on every rank of the joined process group, as the command line runs them:
    each one's exit status, standard output and standard error in OUT/commands{rank}.json."""
    from click.testing import CliRunner

    from edgeatp.cli import main as cli

    ran = []
    for args in commands(out / "two"):
        res = CliRunner().invoke(cli, args)
        ran.append({"exit_code": res.exit_code, "stdout": res.stdout, "stderr": res.stderr})
    (out / f"commands{rank}.json").write_text(json.dumps(ran))


def hang(out: Path, timeout_s: float) -> None:
    """Rank 1 stops answering (it sleeps past the collective timeout) while rank 0 attributes: what
    each caught and how long it took, in OUT/hang{rank}.json."""
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    model = ea.load_model("zoo:induction")
    pairs = make_task("induction", model.tokenizer, 8, seed=0)
    dist.barrier()
    start = time.time()
    try:
        with guard():
            if rank == 1:
                time.sleep(3 * timeout_s)
            attribute_edges(Setup(model, pairs, batch_size=4), "atp")
        caught = ["nothing", ""]
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        caught = [type(exc).__name__, str(exc)]
    (out / f"hang{rank}.json").write_text(json.dumps([*caught, time.time() - start]))


def main() -> None:
    if sys.argv[1] == "--hang":
        hang(Path(sys.argv[2]), float(sys.argv[3]))
        return
    if sys.argv[1] == "--commands":
        with process_group(None, timeout_s=60) as ranks:
            run_commands(ranks.rank, Path(sys.argv[2]))
        return
    out, checkpoint = Path(sys.argv[1]), sys.argv[2]
    with process_group(None, timeout_s=60) as ranks:
        results = workload(checkpoint)
        if ranks.is_main:
            torch.save(results, out / "results.pt")
        caught: dict[str, object] = {**failures(ranks.rank), "command": failing_command(ranks.rank, out)}
    caught["threads after"] = _threads()
    (out / f"caught{ranks.rank}.json").write_text(json.dumps(caught))


def _threads() -> list[str]:
    """The names of this process's threads (Linux; empty elsewhere)."""
    tasks = Path("/proc/self/task")
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir()) if tasks.is_dir() else []


if __name__ == "__main__":
    main()
