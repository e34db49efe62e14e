"""Command-line latency, measured as a new user meets it: every command in a fresh process.

* Instant commands: ``--help``, ``--version``, each subcommand's ``--help``, ``models``, ``tasks``,
  through ``python -m edgeatp`` and the ``edgeatp`` console script.
* User errors (option, file and circuit-file mistakes), which are all reported before torch is
  imported, and for contrast the two that need torch or TransformerLens to be decided (a CUDA device
  on a machine without one, a pretrained name missing from the Hugging Face cache).
* Floors: the interpreter alone, ``import click``, ``import torch``, ``import transformer_lens``.
* The demo (``edgeatp discover``: zoo:ioi, its task, offline) split by ``--timings`` into start-up,
  import, load, attribute, select, metrics (MIB CPR/CMD), verify and write.

Each row is the median of ``--repeats`` runs (``--demo-repeats`` for the demo): wall seconds and
the child's CPU seconds (user + system, from ``getrusage``; for the demo this includes Graphviz).
The machine's load average is printed with the tables: wall times on a shared machine grow with
it, CPU times much less. The checkout measured is the one holding this script (``PYTHONPATH``
points at it); ``--baseline DIR`` measures another checkout side by side, run for run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cli_latency.py [--repeats 5] [--demo-repeats 3] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELP = [["--help"], ["--version"], ["discover", "--help"], ["verify", "--help"], ["refine", "--help"],
        ["render", "--help"], ["export", "--help"], ["models"], ["tasks"]]
ERRORS = [  # (what is wrong, arguments)
    ("missing --data file", ["discover", "--data", "missing.jsonl"]),
    ("malformed JSONL", ["discover", "--data", "bad.jsonl"]),
    ("CSV without columns", ["discover", "--data", "bad.csv"]),
    ("contradictory flags", ["discover", "--top-k", "3", "--threshold", "0.1"]),
    ("unknown task", ["discover", "--task", "nope"]),
    ("unknown zoo model", ["discover", "--model", "zoo:nope"]),
    ("missing model folder", ["discover", "--model", "./no/such/folder"]),
    ("bad --device string", ["discover", "--device", "cudaa"]),
    ("bad --dtype string", ["discover", "--dtype", "f16"]),
    ("malformed --group file", ["discover", "--level", "node", "--group", "groups.json"]),
    ("output folder under a file", ["discover", "--out", "afile/sub"]),
    ("circuit file not JSON", ["verify", "bad.json"]),
    ("JSON that is not a circuit", ["render", "other.json"]),
]
LATE_ERRORS = [  # decided by torch / TransformerLens themselves
    ("--device cuda without CUDA (needs torch)", ["discover", "--device", "cuda"]),
    ("pretrained name not cached (needs TransformerLens)", ["discover", "--model", "gpt2"]),
]
ROOT = Path(__file__).resolve().parent.parent
FLOORS = [("python -c pass", ["-c", "pass"]), ("import click", ["-c", "import click"]),
          ("import torch", ["-c", "import torch"]), ("import transformer_lens", ["-c", "import transformer_lens"])]


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds, child CPU seconds and the result of one run of ``command``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done


def median_runs(command: list[str], repeats: int, cwd: Path, envs: list[dict[str, str]],
                expect: int) -> tuple[list[str], str]:
    """"wall / CPU" median seconds of ``repeats`` runs in each environment (alternating), and the
    last line the command printed in the first. A baseline without the command (another exit
    status) gets "not there"; the checkout measured must answer as expected."""
    walls: list[list[float]] = [[] for _ in envs]
    cpus: list[list[float]] = [[] for _ in envs]
    missing = [False for _ in envs]
    last = ""
    for _ in range(repeats):
        for i, env in enumerate(envs):
            if missing[i]:
                continue
            wall, cpu, done = timed(command, cwd, env)
            if done.returncode != expect:
                if i == 0:
                    raise SystemExit(f"{command} exited with {done.returncode}, expected {expect}: "
                                     f"{done.stderr[-500:]}")
                missing[i] = True
                continue
            walls[i].append(wall)
            cpus[i].append(cpu)
            if i == 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                last = lines[-1] if lines else ""
    return [f"{statistics.median(w):.2f} / {statistics.median(c):.2f}" if not gone else "not there"
            for w, c, gone in zip(walls, cpus, missing)], last


def fixtures(folder: Path) -> None:
    """The broken files the error rows point at."""
    (folder / "bad.jsonl").write_text('{"clean": "a b", "corrupt": "a c"\n')
    (folder / "bad.csv").write_text("clean,corrupt\nx,y\n")
    (folder / "bad.json").write_text("{not json")
    (folder / "other.json").write_text('{"a": 1}')
    (folder / "groups.json").write_text('{"g": ["a0.h0"')
    (folder / "afile").write_text("")


def demo(repeats: int, cli: list[str], cwd: Path, env: dict[str, str],
         baseline: dict[str, str] | None) -> list[tuple[str, float, float]]:
    """The demo's phases (median wall, median CPU): the rest of the process (start-up, checks, exit,
    Graphviz's CPU) first, the process total last, then the baseline's total when given."""
    runs, base = [], []
    for i in range(repeats):
        out = cwd / f"demo-{i}"
        wall, cpu, done = timed([*cli, "discover", "--out", str(out), "--quiet", "--json", "--timings"], cwd, env)
        if done.returncode != 0:
            raise SystemExit(f"the demo failed: {done.stderr[-2000:]}")
        phases = json.loads(done.stdout)["timings"]
        runs.append({"rest (start-up, checks, exit)": (wall - sum(p["wall"] for p in phases.values()),
                                                       cpu - sum(p["cpu"] for p in phases.values())),
                     **{k: (p["wall"], p["cpu"]) for k, p in phases.items()}, "total": (wall, cpu)})
        if baseline is not None:
            wall, cpu, done = timed([*cli, "discover", "--out", str(out), "--quiet", "--json"], cwd, baseline)
            if done.returncode != 0:
                raise SystemExit(f"the baseline demo failed: {done.stderr[-2000:]}")
            base.append({"baseline total": (wall, cpu)})
    return [(name, statistics.median(r[name][0] for r in rs), statistics.median(r[name][1] for r in rs))
            for rs in (runs, base) if rs for name in rs[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (median)")
    parser.add_argument("--demo-repeats", type=int, default=3, help="runs of the demo (median)")
    parser.add_argument("--baseline", type=Path, default=None, help="another edgeatp checkout to measure alongside")
    args = parser.parse_args()
    envs = [{**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
            for root in [ROOT, *([args.baseline.resolve()] if args.baseline else [])]]
    script = Path(sys.executable).with_name("edgeatp")
    entry_points = [("python -m edgeatp", [sys.executable, "-m", "edgeatp"])]
    if script.is_file():
        entry_points.append(("edgeatp", [str(script)]))
    cols = " | wall / CPU s" + (" | baseline wall / CPU s" if args.baseline else "")
    rule = "|---" * (2 + bool(args.baseline))
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores\n")
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        fixtures(cwd)
        print(f"| command{cols} |\n{rule}|")
        for label, argv in FLOORS:
            times, _ = median_runs([sys.executable, *argv], args.repeats, cwd, envs[:1], 0)
            print(f"| floor: `{label}` | {times[0]} |" + (" |" if args.baseline else ""))
        for name, cli in entry_points:
            for argv in HELP:
                times, _ = median_runs([*cli, *argv], args.repeats, cwd, envs, 0)
                print(f"| `{name} {' '.join(argv)}` | {' | '.join(times)} |")
        cli = entry_points[-1][1]
        print(f"\n| error (`edgeatp ...`){cols} | message |\n{rule}|---|")
        for what, argv in ERRORS + LATE_ERRORS:
            repeats = args.repeats if (what, argv) in ERRORS else max(1, args.repeats // 2)
            times, last = median_runs([*cli, *argv], repeats, cwd, envs, 2)
            print(f"| {what}: `{' '.join(argv)}` | {' | '.join(times)} | {last[:110].replace('|', '/')} |")
        print(f"\nDemo: `edgeatp discover --out DIR --quiet --json --timings`, median of {args.demo_repeats} runs\n")
        print("| phase | wall s | CPU s |\n|---|---|---|")
        for name, wall, cpu in demo(args.demo_repeats, cli, cwd, envs[0], envs[1] if args.baseline else None):
            print(f"| {name} | {wall:.2f} | {cpu:.2f} |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
