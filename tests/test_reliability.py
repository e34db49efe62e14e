"""Regressions for what a new user and a prober hit: warnings that say what differs from what was
asked, outputs written atomically and as a set, options checked up front, one-line errors."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import edgeatp as ea
from edgeatp.circuit import CircuitWarning
from edgeatp.cli import main
from edgeatp.errors import DataError, EdgeatpError
from edgeatp.export import read_circuit, write_outputs
from edgeatp.export.files import MANIFEST
from edgeatp.setup import Setup

from .conftest import random_pairs, tiny_model


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_error(res) -> str:
    """The single ``error:`` line of a failed command (and no traceback)."""
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A discovered zoo:induction circuit with its report set, and the data file it used."""
    out = tmp_path_factory.mktemp("saved")
    res = cli("discover", "--model", "zoo:induction", "--n-pairs", "12", "--out", str(out), "--format",
              "json,dot,svg,md", "--verify", "4", "--sample-below", "2", "--quiet")
    assert res.exit_code == 0, res.output
    return out


# ------------------------------------------------------------------------------------ saying what differs
def test_circuits_say_when_they_differ_from_what_was_asked(zoo_induction) -> None:
    pairs = ea.make_task("induction", zoo_induction.tokenizer, 8)
    scores = ea.attribute_edges(Setup(zoo_induction, pairs), "atp")
    with pytest.warns(CircuitWarning, match="asked for 5000 edges but only"):
        big = ea.prune(scores, top_k=5000)
    assert big.warnings and big.selection.requested == scores.graph.n_edges
    with pytest.warns(CircuitWarning, match="the circuit is empty"):
        empty = ea.prune(scores, threshold=1e9)
    assert empty.n_edges == 0 and any("empty" in w for w in empty.warnings)


def test_discover_warns_about_a_missed_target_and_records_it(tmp_path) -> None:
    res = cli("discover", "--model", "zoo:induction", "--method", "atp*", "--top-k", "3", "--n-pairs", "8",
              "--verify", "0", "--sample-below", "0", "--format", "json", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "warning: faithfulness" in res.stderr and "below the target 0.8" in res.stderr
    circuit = read_circuit(tmp_path / "circuit.json")
    assert any("below the target" in w for w in circuit.warnings)
    assert json.loads((tmp_path / "circuit.json").read_text())["warnings"] == list(circuit.warnings)


def test_json_summary_lists_top_edges_and_warnings(tmp_path) -> None:
    res = cli("discover", "--model", "zoo:induction", "--n-pairs", "8", "--verify", "2", "--sample-below", "1",
              "--format", "json", "--json", "--out", str(tmp_path))
    summary = json.loads(res.stdout)
    assert [e["edge"] for e in summary["top_edges"]] == [e.name for e in read_circuit(tmp_path / "circuit.json").edges()][:10]
    assert {"warnings", "selection", "n_components", "faithfulness", "necessity"} <= set(summary)
    assert "outputs" in summary and summary["outputs"]["json"].endswith("circuit.json")


# ------------------------------------------------------------------------------------ groups, node levels, methods
def test_span_groups_keep_their_spans_and_exact_effects(tmp_path) -> None:
    res = cli("discover", "--level", "node", "--group", "span:0-9,10-19", "--n-pairs", "8", "--format", "json",
              "--json", "--out", str(tmp_path))
    summary = json.loads(res.stdout)
    circuit = read_circuit(tmp_path / "circuit.json")
    assert circuit.level == "group" and all("@" in u.name for u in circuit.units)
    assert all(u.exact is not None for u in circuit.units)
    outside = [abs(u.exact) for u in circuit.units if not u.in_circuit]
    assert circuit.verification.outside_max == pytest.approx(max(outside, default=0.0))
    assert summary["top_groups"][0]["exact"] is not None


def test_exact_group_method_is_not_replaced(tmp_path) -> None:
    res = cli("discover", "--level", "node", "--group", "layer", "--method", "exact", "--n-pairs", "8",
              "--format", "json", "--out", str(tmp_path), "--quiet")
    assert res.exit_code == 0, res.output
    circuit = read_circuit(tmp_path / "circuit.json")
    assert circuit.method == "exact" and all(u.exact == pytest.approx(u.signed) for u in circuit.units)


def test_neuron_circuits_search_past_64_components(tmp_path) -> None:
    res = cli("discover", "--level", "neuron", "--n-pairs", "8", "--verify", "3", "--sample-below", "2",
              "--format", "json", "--out", str(tmp_path), "--quiet")
    assert res.exit_code == 0, res.output
    circuit = read_circuit(tmp_path / "circuit.json")
    assert max(circuit.curve.sizes) > 64 and circuit.faithfulness is not None
    if circuit.faithfulness < 0.8:
        assert any("below the target" in w for w in circuit.warnings)


def test_reverifying_a_node_circuit_patches_again_and_rewrites_the_report(tmp_path) -> None:
    res = cli("discover", "--level", "node", "--n-pairs", "8", "--verify", "3", "--sample-below", "1",
              "--format", "json,md", "--out", str(tmp_path), "--quiet")
    assert res.exit_code == 0, res.output
    before = read_circuit(tmp_path / "circuit.json")
    report = (tmp_path / "circuit.md").read_text()
    res = cli("verify", str(tmp_path / "circuit.json"), "--verify", "5", "--sample-below", "2", "--quiet")
    assert res.exit_code == 0, res.output
    after = read_circuit(tmp_path / "circuit.json")
    assert after.verification.n_ranked == 5 != before.verification.n_ranked
    assert "reverified" in after.meta and (tmp_path / "circuit.md").read_text() != report


# ------------------------------------------------------------------------------------ output sets
def test_missing_graphviz_writes_the_rest_and_warns_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    out = tmp_path / "out"
    res = cli("discover", "--model", "zoo:induction", "--n-pairs", "8", "--verify", "0", "--sample-below", "0",
              "--format", "json,svg,png,md", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert res.stderr.count("warning: skipped") == 1 and "svg, png" in res.stderr
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        "circuit.json", "circuit.md", "circuit.dot", "circuit_faithfulness.svg"}


def test_an_interrupted_write_leaves_the_folder_as_it_was(saved, monkeypatch) -> None:
    import edgeatp.export.outputs as ex

    before = {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()}
    circuit = read_circuit(saved / "circuit.json")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ex, "render_bytes", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(circuit, saved, ["json", "svg", "md"])
    assert {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()} == before
    assert not [p for p in saved.iterdir() if ".staging." in p.name]


def test_a_full_disk_keeps_the_input_circuit(saved, monkeypatch) -> None:
    original = (saved / "circuit.json").read_bytes()
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(EdgeatpError, match="the disk is full"):
        ea.export.write_json(read_circuit(saved / "circuit.json"), saved / "circuit.json")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (saved / "circuit.json").read_bytes() == original
    assert not [p for p in saved.iterdir() if p.name.endswith(".tmp")]


def test_two_runs_into_one_folder_leave_one_consistent_set(tmp_path) -> None:
    pairs = random_pairs(n=3)
    adapter = tiny_model(seed=3)
    scores = ea.attribute_edges(Setup(adapter, pairs), "atp")
    small, large = ea.prune(scores, top_k=3, cleanup=False), ea.prune(scores, top_k=30, cleanup=False)
    errors = []

    def run(c, formats):
        try:
            for _ in range(3):
                write_outputs(c, tmp_path, formats)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(small, ["json", "dot"])),
               threading.Thread(target=run, args=(large, ["json", "md"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    listed = json.loads((tmp_path / MANIFEST).read_text())["circuit"]
    present = {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert present == set(listed)
    n_edges = read_circuit(tmp_path / "circuit.json").n_edges
    assert ("circuit.md" in present) == (n_edges == large.n_edges)


def test_export_refuses_to_overwrite_foreign_files(saved, tmp_path) -> None:
    (tmp_path / "circuit.mib.json").write_text("mine")
    err = one_error(CliRunner().invoke(main, ["export", str(saved / "circuit.json"), "--format", "mib",
                                              "--out", str(tmp_path)]))
    assert "already exists" in err and "--force" in err and (tmp_path / "circuit.mib.json").read_text() == "mine"
    assert cli("export", str(saved / "circuit.json"), "--format", "mib", "--out", str(tmp_path), "--force").exit_code == 0
    assert "nothing to write" in one_error(CliRunner().invoke(main, ["export", str(saved / "circuit.json"),
                                                                     "--format", "json"]))


def test_unwritable_output_is_found_before_any_work(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    t = time.time()
    err = one_error(CliRunner().invoke(main, ["discover", "--out", str(blocker / "out")]))
    assert "is a file, not a folder" in err and time.time() - t < 5


def test_no_carriage_returns_in_a_pipe(saved) -> None:
    res = CliRunner().invoke(main, ["verify", str(saved / "circuit.json"), "--out", str(saved / "re.json")])
    assert res.exit_code == 0, res.output
    assert "\r" not in res.output and "wrote" in res.stdout


# ------------------------------------------------------------------------------------ up-front checks
@pytest.mark.parametrize("args, message", [
    (["--threshold", "nan"], "--threshold must be a non-negative number"),
    (["--threshold", "-1"], "--threshold must be a non-negative number"),
    (["--cumulative", "1.5"], "--cumulative must be a share in (0, 1]"),
    (["--metric", "kl"], "--metric kl has zero gradient"),
    (["--threads", "100000"], "--threads must lie in 1.."),
    (["--format", ""], "--format is empty"),
    (["--group", "no-such-file.json", "--level", "node"], "no such file"),
    (["--model", "zoo:nope"], "the zoo has"),
])
def test_options_are_checked_before_loading(tmp_path, args, message) -> None:
    t = time.time()
    err = one_error(CliRunner().invoke(main, ["discover", *args, "--out", str(tmp_path)]))
    assert message in err and time.time() - t < 3


def test_undecodable_and_unknown_word_data_name_the_file_and_row(tmp_path) -> None:
    binary = tmp_path / "pairs.jsonl"
    binary.write_bytes(b'{"clean": "caf\xe9"}\n')
    assert "pairs.jsonl: not UTF-8 text" in one_error(CliRunner().invoke(main, ["discover", "--data", str(binary),
                                                                               "--out", str(tmp_path)]))
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from edgeatp.tokenizer import HFTokenizer

    vocab = {"<unk>": 0, "the": 1, "cat": 2, "dog": 3, "sat": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>"))
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"clean": "the cat sat", "corrupt": "the zebra sat", "answer": "dog",
                                "wrong": "cat"}) + "\n")
    with pytest.raises(DataError, match=r"ok.jsonl, line 1: the corrupt prompt has a word .*'zebra'"):
        ea.load_pairs(good, tok, prepend_bos=False)


def test_saved_configs_are_checked_like_the_command_line(saved, tmp_path) -> None:
    data = json.loads((saved / "circuit.json").read_text())
    data["meta"]["config"]["threads"] = 100000
    edited = tmp_path / "threads.json"
    edited.write_text(json.dumps(data))
    assert "--threads must lie in" in one_error(CliRunner().invoke(main, ["verify", str(edited)]))
    data["meta"]["config"]["colour"] = "red"
    edited.write_text(json.dumps(data))
    assert "unknown option(s) colour" in one_error(CliRunner().invoke(main, ["verify", str(edited)]))


def test_verify_finds_its_data_and_refuses_other_data(tmp_path, monkeypatch) -> None:
    rows = [{"clean": f"BOS t{i} t{i + 1} t{i + 2} t{i} t{i + 1}", "corrupt": f"BOS t{i} t{i + 9} t{i + 2} t{i} t{i + 1}",
             "answer": f"t{i + 2}", "wrong": f"t{i + 9}"} for i in range(1, 9)]
    work = tmp_path / "work"
    work.mkdir()
    (work / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.chdir(work)
    res = cli("discover", "--model", "zoo:induction", "--data", "pairs.jsonl", "--verify", "2", "--sample-below",
              "1", "--format", "json", "--out", "out", "--quiet")
    assert res.exit_code == 0, res.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    monkeypatch.chdir(elsewhere)
    res = cli("verify", str(work / "out" / "circuit.json"), "--verify", "2", "--sample-below", "1", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_pairs"] == 8
    (work / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:5]) + "\n")
    assert "is not the data it was found on" in one_error(CliRunner().invoke(main, ["verify", str(work / "out" /
                                                                                              "circuit.json")]))


def test_interrupted_start_up_is_one_line(tmp_path, monkeypatch) -> None:
    import edgeatp.pipeline as pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "run_discover", interrupt)
    res = CliRunner().invoke(main, ["discover", "--out", str(tmp_path)])
    assert res.exit_code == 130 and res.output.strip() == "interrupted; nothing was written"


def test_help_texts_cover_every_option() -> None:
    for command in ("discover", "verify", "render", "export", "models", "tasks"):
        cmd = main.commands[command]
        missing = [p.name for p in cmd.params if getattr(p, "help", "x") in (None, "") and p.name != "circuit_file"]
        assert not missing, (command, missing)


def test_models_prints_the_cards_accuracy() -> None:
    from edgeatp.zoo import ZOO, read_card

    out = cli("models").output
    for name in ZOO:
        assert f"acc={read_card(name)['evaluation']['accuracy']}" in out


# ------------------------------------------------------------------------------------ library robustness
def test_token_ids_below_zero_are_refused() -> None:
    adapter = tiny_model()
    with pytest.raises(DataError, match="clean token id -1 is outside"):
        Setup(adapter, ea.PromptPairs.from_lists([[1, -1]], [[1, 2]], [1], [2]))
    with pytest.raises(DataError, match="answer token id -3 is outside"):
        Setup(adapter, ea.PromptPairs.from_lists([[1, 2]], [[1, 3]], [-3], [2]))


def test_an_adapter_shared_by_threads_gives_the_serial_numbers() -> None:
    adapter = tiny_model(seed=9)
    pairs = random_pairs(n=4)
    serial = ea.attribute_edges(Setup(adapter, pairs), "atp-qk").scores
    results: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: results.append(ea.attribute_edges(Setup(adapter, pairs), "atp-qk")
                                                               .scores)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(torch.equal(r, serial) for r in results)


def test_each_module_gets_its_own_training_mode_back() -> None:
    adapter = tiny_model(seed=10)
    m = adapter.model
    m.train()
    m.blocks[0].eval()
    modes = [mod.training for mod in m.modules()]
    ea.attribute_nodes(Setup(adapter, random_pairs()), "atp")
    assert [mod.training for mod in m.modules()] == modes


def test_non_finite_estimates_are_an_error() -> None:
    adapter = tiny_model(seed=11)
    with torch.no_grad():
        adapter.model.unembed.W_U[:, 1] = float("inf")
    with pytest.raises(EdgeatpError, match="not finite.*float32 or float64"):
        ea.attribute_edges(Setup(adapter, random_pairs()), "atp")


def test_networkx_export_is_strict_json(saved, tmp_path) -> None:
    circuit = read_circuit(saved / "circuit.json")
    path = write_outputs(circuit.with_(signed=circuit.signed.clone().fill_(float("nan"))), tmp_path,
                         ["networkx"]).paths["networkx"]
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in the networkx JSON"))
