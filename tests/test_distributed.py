"""Data-parallel runs over prompt pairs (torch.distributed, gloo on CPU): two processes give what one
gives, only rank 0 speaks, and a failing rank stops every rank with a clear message.

Each torchrun launch costs three interpreter start-ups (the launcher and two workers), so there are
two launches that check several things each.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeatp.distributed import SINGLE, Ranks, local_device

from .dist_work import workload
from .test_model import WORDS, _word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60  # the collectives' backstop in these runs: the failures below are reported before it


def torchrun(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` with this checkout first on the path."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_shards_split_the_pairs_into_contiguous_blocks_once():
    for n in (0, 1, 5, 24):
        for world in (1, 2, 3):
            parts = [Ranks(r, world).shard(n) for r in range(world)]
            assert torch.equal(torch.cat(parts), torch.arange(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert SINGLE.is_main and not SINGLE.active


def test_each_rank_of_a_node_takes_its_own_devices(monkeypatch):
    """Under torchrun ``--device cuda --n-devices N`` gives local rank r the devices cuda:r*N onwards
    (no two processes share one), and too few devices on the node are one line naming both flags."""
    from edgeatp.cli import _one_line
    from edgeatp.errors import OptionError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for local, n, first in ((0, 1, 0), (1, 1, 1), (0, 2, 0), (1, 2, 2)):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        assert local_device("cuda", n) == f"cuda:{first}"
    assert (local_device("cuda:3", 2), local_device("cpu", 2), local_device(None, 2)) == ("cuda:3", "cpu", None)
    with pytest.raises(OptionError) as caught:
        local_device("cuda", 3)
    assert _one_line(caught.value) == ("--device cuda under torchrun: 2 processes on this node with --n-devices 3 "
                                       "each need 6 CUDA devices, but this machine has 4; start fewer processes per "
                                       "node (--nproc-per-node) or lower --n-devices")
    monkeypatch.setenv("WORLD_SIZE", "1")  # not launched by torchrun: the device as given
    assert local_device("cuda", 2) == "cuda"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(WORDS), n_positions=16,
                                    bos_token_id=0, eos_token_id=0))
    path = tmp_path_factory.mktemp("gpt2-local")
    hf.save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return str(path)


def _close(a, b, name: str) -> None:
    """Same results up to 1e-6 relative (float32 models; batches are composed differently)."""
    if isinstance(a, torch.Tensor) and a.dtype == torch.bool:
        assert torch.equal(a, b), name
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape, name
        scale = a.abs().max().clamp(min=1e-12)
        assert ((a - b).abs().max() / scale) <= 1e-6, name
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), name
        for x, y in zip(a, b):
            _close(x, y, name)
    elif isinstance(a, float):  # faithfulness and the like: numbers of order one
        assert abs(a - b) <= 1e-6 * max(abs(a), 1.0), name
    else:
        assert a == b, name


def test_two_gloo_processes_give_the_single_process_results_and_fail_together(tmp_path, checkpoint):
    res = torchrun(str(ROOT / "tests" / "dist_work.py"), str(tmp_path), checkpoint)
    assert res.returncode == 0, res.stderr[-3000:]
    parallel = torch.load(tmp_path / "results.pt")
    single = workload(checkpoint)
    assert set(parallel) == set(single)
    for name, value in single.items():
        _close(value, parallel[name], name)
    assert torch.equal(single["circuit"], parallel["circuit"])  # the identical circuit

    rank0, rank1 = (json.loads((tmp_path / f"caught{r}.json").read_text()) for r in (0, 1))
    assert rank1["bad data"][0] == "DataError" and "outside zoo:ioi's vocabulary" in rank1["bad data"][1]
    assert rank0["bad data"][0] == "RankFailed"
    assert rank0["bad data"][1].startswith("rank 1 of 2 failed, so every rank stopped: ")
    assert "outside zoo:ioi's vocabulary" in rank0["bad data"][1]
    assert rank1["hook"][:2] == ["RuntimeError", "boom in a hook"]
    assert rank0["hook"][:2] == ["RankFailed", "rank 1 of 2 failed, so every rank stopped: RuntimeError: boom in a hook"]
    for caught in (rank0, rank1):  # pair counts that differ: one line naming them on every rank, not a gloo abort
        assert caught["uneven pairs"][:2] == [
            "DistributedError", "the 2 processes cannot combine their results at attribution (rank 0: 8 prompt "
            "pairs, estimates [1, 11, 27], per-pair rows; rank 1: 7 prompt pairs, estimates [1, 11, 27], per-pair rows); "
            "every rank must run the same command on the same data"]
    scenarios = ("bad data", "hook", "uneven pairs")
    assert max(r[s][2] for r in (rank0, rank1) for s in scenarios) < TIMEOUT / 2  # no waiting for timeouts
    # the command: each rank exits with one line (non-zero), rank 1 names its error, rank 0 names rank 1
    cmd0, cmd1 = rank0["command"], rank1["command"]
    assert cmd0["exit_code"] == 2 and cmd1["exit_code"] == 1
    assert cmd0["output"].splitlines()[-1] == ("error: rank 1 of 2 failed, so every rank stopped: "
                                               "RuntimeError: boom in a hook")
    assert cmd1["output"].strip() == ("Error: rank 1: internal error (RuntimeError: boom in a hook); rerun with "
                                      "--debug for the traceback and please report it")
    assert not (tmp_path / "cli-failure" / "circuit.json").exists()
    # leaving the process group stops its threads, though the run imported more of torch.distributed
    # after joining (a group kept alive past the run aborts the process at exit now and then)
    for caught in (rank0, rank1):
        assert not [t for t in caught["threads after"] if "gloo" in t], caught["threads after"]


def _circuit(folder: Path) -> dict:
    return json.loads((folder / "circuit.json").read_text())


def test_torchrun_discover_matches_one_process_and_only_rank_0_speaks(tmp_path):
    from click.testing import CliRunner

    from edgeatp.cli import main

    args = ["discover", "--model", "zoo:induction", "--n-pairs", "20", "--batch-size", "8", "--format", "json",
            "--verify", "6", "--sample-below", "4"]
    one = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")], catch_exceptions=False)
    assert one.exit_code == 0, one.output
    two = torchrun("-m", "edgeatp", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("edge circuit by atp-qk") == 1 and two.stdout.count("wrote ") == 1
    assert "error" not in two.stderr.lower()
    a, b = _circuit(tmp_path / "one"), _circuit(tmp_path / "two")
    assert a["edges"]["in_graph"] == b["edges"]["in_graph"] and a["n_edges"] == b["n_edges"]
    _close(torch.tensor(a["edges"]["score"]), torch.tensor(b["edges"]["score"]), "scores")
    _close(torch.tensor(a["edges"]["signed"]), torch.tensor(b["edges"]["signed"]), "signed")
    _close([a["faithfulness"], a["necessity"], *a["curve"]["faithfulness"], *a["curve"]["necessity"]],
           [b["faithfulness"], b["necessity"], *b["curve"]["faithfulness"], *b["curve"]["necessity"]], "faithfulness")
    _close(a["verification"]["rank_correlation"], b["verification"]["rank_correlation"], "verification")


def test_torchrun_refine_verify_and_export_match_one_process_and_only_rank_0_speaks(tmp_path):
    """``discover --refine`` (its search spends and reports one process's forwards, so it takes the
    same path) and, on its circuit, ``refine`` and ``verify``: the same circuits, faithfulness and
    forward counts as one process, printed and written by rank 0 only; ``export`` is refused on every
    rank in one line (it does no model work, and every rank would write the same files)."""
    from click.testing import CliRunner

    from edgeatp.cli import main

    from .dist_work import commands

    single = [CliRunner().invoke(main, args) for args in commands(tmp_path / "one")]
    assert [r.exit_code for r in single] == [0, 0, 0, 0], [r.output for r in single]
    res = torchrun(str(ROOT / "tests" / "dist_work.py"), "--commands", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"commands{r}.json").read_text()) for r in (0, 1))
    assert [r["exit_code"] for r in rank0] == [0, 0, 0, 2] and [r["exit_code"] for r in rank1] == [0, 0, 0, 2]
    assert all(r["stdout"] == "" and r["stderr"] == "" for r in rank1[:3])  # rank 1 neither prints nor warns
    refused = ("render and export only read and write files, so every torchrun process would write the same ones; "
               "run them as one process, without torchrun")
    assert rank0[3]["stderr"] == f"error: {refused}\n" and rank1[3]["stderr"] == f"error: rank 1: {refused}\n"
    for step, name in enumerate(("circuit", "refined", "verified")):
        one, two = json.loads(single[step].stdout), json.loads(rank0[step]["stdout"])
        a, b = (json.loads((tmp_path / f / f"{name}.json").read_text()) for f in ("one", "two"))
        assert a["edges"]["in_graph"] == b["edges"]["in_graph"], name
        _close_refinement(a["refinement"], b["refinement"])
        assert a["verification"]["n_forwards"] == b["verification"]["n_forwards"], name
        _close([a["faithfulness"], a["necessity"]], [b["faithfulness"], b["necessity"]], name)
        assert set(one["outputs"]) == set(two["outputs"]), name
    assert json.loads(rank0[0]["stdout"])["refinement"]["n_forwards"] <= 200
    assert not (tmp_path / "two" / "circuit.mib.json").exists()


def _close_refinement(a: dict, b: dict) -> None:
    """Two searches' records: the same path, forwards and circuits, faithfulness up to float rounding."""
    for one, two in zip(a["sizes"], b["sizes"]):
        _close([one.pop(k) for k in ("faithfulness", "necessity", "before_faithfulness", "before_necessity")],
               [two.pop(k) for k in ("faithfulness", "necessity", "before_faithfulness", "before_necessity")],
               "refinement")
    _close([a.pop("clean_metric"), a.pop("corrupt_metric")], [b.pop("clean_metric"), b.pop("corrupt_metric")],
           "refinement")
    assert a == b, "refinement"


def test_a_rank_that_stops_answering_times_out_with_one_line(tmp_path):
    """Rank 1 sleeps past a 4-second collective timeout: rank 0 gives up at the first combination
    point instead of waiting for ever, and both name the lost processes and the timeout option."""
    res = torchrun(str(ROOT / "tests" / "dist_work.py"), "--hang", str(tmp_path), "4")
    assert res.returncode == 0, res.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"hang{r}.json").read_text()) for r in (0, 1))
    for name, message, _ in (rank0, rank1):
        assert name == "DistributedError"
        assert message.startswith("lost the other processes of the data-parallel run at ")
        assert message.endswith("within the collective timeout (collective_timeout); see the other ranks' output")
    assert rank0[2] < 12 <= rank1[2]  # the timeout ends rank 0's wait, before rank 1 wakes up at 12 s
