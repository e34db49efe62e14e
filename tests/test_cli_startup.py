"""The command line answers at once: help, listings and user errors never import torch or TransformerLens.

Each check runs in a fresh interpreter and looks at what was imported (no timing: the machine is
shared, but an import of torch is what makes a command slow, and it is either there or not).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import edgeatp

HEAVY = ("torch", "transformer_lens", "transformers", "numpy", "scipy", "networkx", "safetensors")
ROOT = str(Path(edgeatp.__file__).resolve().parent.parent)
RUN_CASES = """
import json, sys
from click.testing import CliRunner
from edgeatp.cli import main
heavy = set(json.loads(sys.argv[2]))
out = []
for args in json.loads(sys.argv[1]):
    res = CliRunner().invoke(main, args)
    out.append({"args": args, "exit": res.exit_code, "output": res.output,
                "heavy": sorted(heavy & {m.split(".")[0] for m in sys.modules})})
print(json.dumps(out))
"""


def run_cases(cases: list[list[str]], cwd: Path) -> list[dict]:
    """Invoke the CLI on each argument list in one fresh interpreter; what each printed and had imported."""
    done = subprocess.run([sys.executable, "-c", RUN_CASES, json.dumps(cases), json.dumps(HEAVY)], cwd=cwd,
                          capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}


def imported_modules(command: list[str]) -> set[str]:
    """Top-level packages a command imports, from ``python -X importtime`` (works for scripts and -m)."""
    done = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True,
                          env=_env())
    assert done.returncode == 0, done.stderr
    names = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert len(names) > 20, done.stderr  # the report is there
    return {n.split(".")[0] for n in names}


def test_help_version_and_listings_import_nothing_heavy(tmp_path):
    cases = [["--help"], ["--version"], ["models"], ["models", "--json"], ["tasks"], ["tasks", "--json"]]
    cases += [[name, "--help"] for name in ("discover", "verify", "refine", "render", "export", "models", "tasks")]
    for case in run_cases(cases, tmp_path):
        assert case["exit"] == 0, case
        assert case["heavy"] == [], f"`edgeatp {' '.join(case['args'])}` imported {case['heavy']}"
    assert "zoo:ioi" in run_cases([["models"]], tmp_path)[0]["output"]


@pytest.mark.parametrize("command", [["-m", "edgeatp", "--help"], ["-m", "edgeatp", "--version"], ["SCRIPT", "models"]])
def test_the_real_entry_points_import_nothing_heavy(command):
    if command[0] == "SCRIPT":
        script = Path(sys.executable).with_name("edgeatp")
        if not script.is_file():
            pytest.skip("no edgeatp console script next to this interpreter")
        command = [str(script), *command[1:]]
    found = imported_modules(command)
    assert "edgeatp" in found and "click" in found
    assert not found & set(HEAVY), f"{command} imported {sorted(found & set(HEAVY))}"


def test_option_and_file_errors_are_reported_before_any_heavy_import(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"clean": "a b", "corrupt": "a c"\n')
    (tmp_path / "bad.csv").write_text("clean,corrupt\nx,y\n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "groups.json").write_text('{"g": ["a0.h0"')
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "future.json").write_text('{"format": "edgeatp.circuit", "version": 99}')
    (tmp_path / "mib.json").write_text('{"cfg": {}, "nodes": {}, "edges": {}}')
    (tmp_path / "afile").write_text("")
    cases = [
        (["discover", "--data", "missing.jsonl"], "no such file"),
        (["discover", "--data", "bad.jsonl"], "bad.jsonl, line 1: not valid JSON"),
        (["discover", "--data", "bad.csv"], "missing column(s) answer, wrong"),
        (["discover", "--task", "ioi", "--data", "bad.csv"], "either --task or --data"),
        (["discover", "--top-k", "3", "--threshold", "0.1"], "choose one of --top-k"),
        (["discover", "--task", "nope"], "unknown task 'nope'"),
        (["discover", "--model", "zoo:nope"], "the zoo has zoo:"),
        (["discover", "--model", "./no/such/folder"], "--model ./no/such/folder: no such folder"),
        (["discover", "--model", "afile"], "--model afile: this is a file"),
        (["discover", "--model", "my model"], "names have no spaces"),
        (["discover", "--device", "cudaa"], "--device 'cudaa' is unknown"),
        (["discover", "--dtype", "f16"], "Invalid value for '--dtype'"),
        (["discover", "--n-pairs", "0"], "Invalid value for '--n-pairs'"),
        (["discover", "--metric", "kl"], "zero gradient at the clean run"),
        (["discover", "--format", "json,gif"], "unknown format"),
        (["discover", "--level", "node", "--group", "span:0..3"], "write spans as start-end"),
        (["discover", "--level", "node", "--group", "span:0-3,5-4"], "span 5-4 ends before it starts"),
        (["discover", "--level", "node", "--group", "missing.json"], "neither layer, head, span"),
        (["discover", "--level", "node", "--group", "groups.json"], "groups.json: not valid JSON"),
        (["discover", "--out", "afile/sub"], "afile is a file, not a folder"),
        (["verify", "bad.json"], "bad.json is not valid JSON"),
        (["verify", "other.json"], "not a circuit"),
        (["verify", "future.json"], "version 99 is not supported"),
        (["verify", "mib.json", "--task", "nope"], "unknown task 'nope'"),
        (["verify", "mib.json", "--model", "zoo:nope"], "the zoo has zoo:"),
        (["verify", "mib.json", "--out", "afile/x.json"], "afile is a file, not a folder"),
        (["discover", "--refine", "--level", "node"], "--refine searches edge circuits"),
        (["discover", "--refine-sizes", "5,x", "--refine"], "give positive edge counts"),
        (["refine", "bad.json"], "bad.json is not valid JSON"),
        (["refine", "other.json"], "not a circuit"),
        (["refine", "mib.json", "--sizes", "0"], "give positive edge counts"),
        (["refine", "mib.json", "--out", "afile/x.json"], "afile is a file, not a folder"),
        (["render", "bad.json"], "bad.json is not valid JSON"),
        (["export", "other.json", "--format", "mib"], "not a circuit"),
        (["export", "mib.json", "--format", "dot", "--out", "afile/sub"], "afile is a file, not a folder"),
    ]
    results = run_cases([args for args, _ in cases], tmp_path)
    for (args, message), case in zip(cases, results):
        assert case["exit"] == 2 and message in case["output"], case
        assert "Traceback" not in case["output"], case
        assert case["heavy"] == [], f"`edgeatp {' '.join(args)}` imported {case['heavy']} before its error"


def test_timings_add_up_per_phase_and_marks_outside_a_recording_do_nothing(monkeypatch):
    from edgeatp import timings

    clock = iter([0.0, 1.0, 3.0, 3.5, 10.0])
    monkeypatch.setattr(timings.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(timings.time, "process_time", lambda: 0.0)
    timings.mark("load")  # no recording: the clock is not read
    with timings.recording() as t:
        timings.mark("load")
        timings.mark("attribute")
        timings.mark("load")
    timings.mark("write")
    assert t.wall == {"load": 1.5, "attribute": 2.0} and t.cpu == {"load": 0.0, "attribute": 0.0}
    assert t.describe().startswith("load 1.50, attribute 2.00 s wall (total 3.50 s)")


def test_the_heap_is_frozen_at_exit_so_the_last_collection_is_skipped():
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"  # runs after the CLI's
            "from edgeatp.cli import main\n"
            "print('frozen before exit:', gc.get_freeze_count() > 0)\n"
            "main(['tasks'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr
    assert "frozen before exit: False" in done.stdout and "frozen at exit: True" in done.stdout, done.stdout
