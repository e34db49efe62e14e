"""Data-parallel speed-up: the same attribution and exact patching with 1 and 2 processes
(``torchrun``, gloo, one torch thread each), next to each rank's share of the work.

Run from the repository root::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distributed.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distributed.py --ranks 1,2,4 --pairs 128

For each process count it starts ``torchrun --standalone --nproc-per-node N`` on this file; every
rank loads the model, warms up once, then runs each task ``--repeats`` times between barriers.
Wall time is rank 0's time between the barriers (median); "CPU s / rank" the largest per-rank
process CPU time of one run (it shows whether ranks waited for a core); speed-up = wall(1) / wall(N).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("edges atp-qk", "edges atp*", "exact patching of 24 edges")


def worker(out: Path, model_spec: str, n_pairs: int, repeats: int) -> None:
    """One rank: time every task between barriers; rank 0 writes the figures."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import edgeatp as ea
    from edgeatp.attribution import attribute_edges
    from edgeatp.distributed import Ranks
    from edgeatp.patching import patch_edges
    from edgeatp.setup import Setup

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = ea.load_model(model_spec)
    pairs = ea.make_task(model_spec.removeprefix("zoo:"), model.tokenizer, n_pairs, seed=0)
    setup = Setup(model, pairs, batch_size=16)
    graph_scores = attribute_edges(setup, "atp")
    top = [e for e, *_ in graph_scores.top(24)]
    tasks = {TASKS[0]: lambda: attribute_edges(setup, "atp-qk"), TASKS[1]: lambda: attribute_edges(setup, "atp*"),
             TASKS[2]: lambda: patch_edges(setup, graph_scores.graph, top)}
    figures = {}
    for name, task in tasks.items():
        task()  # warm-up
        walls, cpus = [], []
        for _ in range(repeats):
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            task()
            dist.barrier()
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (statistics.median(walls), statistics.median(cpus)))
        figures[name] = {"wall": gathered[0][0], "cpu_per_rank": max(c for _, c in gathered),
                         "pairs_per_rank": [len(Ranks(r, world).shard(n_pairs)) for r in range(world)]}
    if rank == 0:
        out.write_text(json.dumps(figures))
    dist.destroy_process_group()


def launch(n: int, model: str, n_pairs: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               __file__, "--worker", str(out), "--model", model, "--pairs", str(n_pairs), "--repeats", str(repeats)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--model", default="zoo:ioi")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.pairs, args.repeats)
        return
    print(f"{args.model}, {args.pairs} prompt pairs in batches of 16, gloo, 1 thread per rank, "
          f"{os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.1f}\n")
    results = {n: launch(n, args.model, args.pairs, args.repeats) for n in map(int, args.ranks.split(","))}
    print("| task | ranks | pairs per rank | wall s | speed-up | CPU s / rank |")
    print("|---|---:|---|---:|---:|---:|")
    one = results[min(results)]
    for task in TASKS:
        for n, figures in results.items():
            f = figures[task]
            print(f"| {task} | {n} | {', '.join(map(str, f['pairs_per_rank']))} | {f['wall']:.2f} "
                  f"| {one[task]['wall'] / f['wall']:.2f} | {f['cpu_per_rank']:.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
