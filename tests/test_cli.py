"""The edgeatp command line (click's CliRunner), end to end on the zoo."""

import json

import pytest
from click.testing import CliRunner

from edgeatp.cli import main
from edgeatp.export import read_circuit


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def discovered(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    res = run("discover", "--out", str(out), "--n-pairs", "24", "--format", "json,dot,svg,md,mib,networkx", "--quiet")
    assert res.exit_code == 0, res.output
    return out


def test_discover_with_no_arguments_writes_a_verified_circuit(discovered):
    names = {p.name for p in discovered.iterdir()}
    assert {"circuit.json", "circuit.dot", "circuit.svg", "circuit.md", "circuit.mib.json",
            "circuit.networkx.json"} <= names
    circuit = read_circuit(discovered / "circuit.json")
    assert circuit.n_edges > 0 and circuit.verification is not None
    assert circuit.faithfulness >= 0.8
    assert circuit.meta["config"]["model"] == "zoo:ioi"
    assert "<svg" in (discovered / "circuit.svg").read_text()


def test_discover_json_summary_and_text_summary(tmp_path):
    res = run("discover", "--model", "zoo:induction", "--n-pairs", "16", "--out", str(tmp_path), "--json",
              "--format", "json", "--verify", "5", "--sample-below", "3", "--timings")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    phases = summary["timings"]
    assert list(phases) == ["import", "load", "attribute", "select", "metrics", "verify", "write"]
    assert all(p["wall"] >= 0 and p["cpu"] >= 0 for p in phases.values()) and "timings: import" in res.stderr
    assert sum(p["wall"] for p in phases.values()) <= summary["seconds"] + 0.1
    assert summary["model"] == "zoo:induction" and summary["n_edges"] > 0
    assert summary["verification"]["n_checked"] == 8
    assert summary["direction"] == "noising" and "clean run with corrupt values" in summary["sign_convention"]
    text = run("discover", "--model", "zoo:dup", "--n-pairs", "16", "--out", str(tmp_path), "--format", "json",
               "--top-k", "30", "--method", "atp")
    assert text.exit_code == 0 and "edge circuit by atp" in text.output and "faithfulness" in text.output


@pytest.mark.parametrize("level", ["node", "neuron"])
def test_node_and_neuron_levels(tmp_path, level):
    res = run("discover", "--level", level, "--n-pairs", "16", "--out", str(tmp_path), "--format", "json,md",
              "--quiet")
    assert res.exit_code == 0, res.output
    circuit = read_circuit(tmp_path / "circuit.json")
    assert circuit.level == level and circuit.node_scores


def test_groups_and_user_data(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"clean": f"BOS Alice AND Bob f{i} Bob GAVE TO",
                                          "corrupt": f"BOS Alice AND Bob f{i} Carol GAVE TO",
                                          "answer": "Alice", "wrong": "Bob"}) for i in range(8)) + "\n")
    res = run("discover", "--data", str(data), "--group", "layer", "--out", str(tmp_path), "--format", "json", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_pairs"] == 8
    coarse = {g["name"]: g for g in summary["top_coarse_edges"]}
    assert "m1->logits" in coarse and coarse["m1->logits"]["exact"] is not None
    res = run("discover", "--level", "node", "--group", "head", "--n-pairs", "16", "--out", str(tmp_path),
              "--format", "json", "--json", "--timings")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert list(summary["timings"]) == ["import", "load", "attribute", "select", "verify", "write"]
    kept = [g["name"] for g in summary["top_groups"] if g["in_circuit"]]
    assert kept and all(name.startswith("a") for name in kept) and summary["faithfulness"] is not None
    circuit = read_circuit(tmp_path / "circuit.json")
    assert circuit.level == "group" and {u.name for u in circuit.units if u.in_circuit} == set(kept)
    assert all(u.exact is not None for u in circuit.units) and circuit.verification.checks[0].name in kept


def test_verify_render_and_export_saved_circuits(discovered, tmp_path):
    res = run("verify", str(discovered / "circuit.json"), "--out", str(tmp_path / "re.json"), "--verify", "4",
              "--sample-below", "2", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["verification"]["n_checked"] == 6
    res = run("render", str(discovered / "circuit.json"), "--format", "svg,png", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "circuit.png").read_bytes()[:4] == b"\x89PNG"
    res = run("export", str(discovered / "circuit.json"), "--format", "mib,html", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    mib = json.loads((tmp_path / "circuit.mib.json").read_text())
    assert set(mib) >= {"cfg", "nodes", "edges"}


def test_discover_refine_keeps_a_better_circuit_with_its_search_and_mib_metrics(tmp_path):
    res = run("discover", "--model", "zoo:induction", "--n-pairs", "12", "--refine", "--refine-budget", "200",
              "--refine-sizes", "3,6", "--top-k", "6", "--verify", "2", "--sample-below", "0", "--out", str(tmp_path),
              "--format", "json,md", "--json", "--timings")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert list(summary["timings"]) == ["import", "load", "attribute", "select", "metrics", "refine", "verify", "write"]
    circuit = read_circuit(tmp_path / "circuit.json")
    search = circuit.refinement
    assert [r.size for r in search.sizes] == [3, 6] and search.n_forwards <= 200 and search.budget == 200
    assert circuit.selection.rule == "refined" and circuit.n_edges <= 6
    assert circuit.faithfulness == search.at(6).faithfulness >= search.at(6).before_faithfulness
    assert [m.label for m in circuit.circuit_metrics] == ["top-k of atp-qk"]
    assert summary["refinement"]["n_forwards"] == search.n_forwards
    assert summary["circuit_metrics"][0]["cpr"] == circuit.circuit_metrics[0].cpr
    assert "## Circuit search" in (tmp_path / "circuit.md").read_text()


def test_refine_at_mibs_sizes_gives_the_searched_circuits_cpr_and_cmd_everywhere(tmp_path):
    res = run("discover", "--model", "zoo:induction", "--n-pairs", "8", "--refine", "--refine-budget", "300",
              "--refine-sizes", "mib", "--top-k", "6", "--verify", "0", "--sample-below", "0", "--out", str(tmp_path),
              "--format", "json,md", "--json")
    assert res.exit_code == 0, res.output
    circuit = read_circuit(tmp_path / "circuit.json")
    ranking, refined = circuit.circuit_metrics
    assert ranking.label == "top-k of atp-qk" and refined.label == "refined from atp-qk"
    searched = {r.size: r for r in circuit.refinement.sizes}
    n = circuit.graph.n_edges
    assert refined.n_edges == n and refined.grid == ranking.grid
    for x, kept, f in zip(refined.grid, refined.cpr_sizes, refined.cpr_faithfulness):
        k = int(x * n)
        assert (kept, f) == ((0, 0.0) if k == 0 else (n, 1.0) if k >= n else
                             (len(searched[k].edges), searched[k].faithfulness))
    assert refined.cpr >= ranking.cpr - 1e-9
    summary = json.loads(res.stdout)
    assert [m["label"] for m in summary["circuit_metrics"]] == [ranking.label, refined.label]
    assert summary["circuit_metrics"][1]["cpr"] == refined.cpr
    assert "refined from atp-qk" in (tmp_path / "circuit.md").read_text()


def test_refine_a_saved_circuit(discovered, tmp_path):
    res = run("refine", str(discovered / "circuit.json"), "--sizes", "4", "--refine-budget", "150", "--seed", "1",
              "--out", str(tmp_path / "better.json"), "--quiet")
    assert res.exit_code == 0, res.output
    before, after = read_circuit(discovered / "circuit.json"), read_circuit(tmp_path / "better.json")
    assert [r.size for r in after.refinement.sizes] == [4, before.selection.requested] and after.refinement.seed == 1
    assert after.refinement.ranking == before.method and after.n_edges <= before.selection.requested
    assert after.faithfulness >= before.faithfulness - 1e-6 and after.verification is not None
    assert after.refinement.budget == 150 and (tmp_path / "better.json").is_file()


def _recorded_with(circuit_file, backend: str, dest):
    """A copy of a saved circuit that records ``--backend backend`` (as one found with it would)."""
    saved = json.loads(circuit_file.read_text())
    saved["meta"]["config"]["backend"] = backend
    dest.write_text(json.dumps(saved))
    return dest


def test_verify_and_refine_take_a_backend_over_the_recorded_one(discovered, tmp_path, monkeypatch):
    import edgeatp.model.loading as loading
    import edgeatp.pipeline as pipeline

    used = []

    def spy(*args, **kwargs):
        model = loading.load_model(*args, **kwargs)
        used.append(model.backend.kind)
        return model

    monkeypatch.setattr(pipeline, "load_model", spy)
    hooked = _recorded_with(discovered / "circuit.json", "hooked", tmp_path / "hooked.json")
    res = run("verify", str(hooked), "--out", str(tmp_path / "a.json"), "--verify", "2", "--sample-below", "0",
              "--json")
    assert res.exit_code == 0, res.output
    res = run("verify", str(hooked), "--backend", "bridge", "--out", str(tmp_path / "b.json"), "--verify", "2",
              "--sample-below", "0", "--json")
    assert res.exit_code == 0, res.output
    res = run("refine", str(hooked), "--backend", "bridge", "--sizes", "4", "--refine-budget", "40",
              "--out", str(tmp_path / "c.json"), "--quiet")
    assert res.exit_code == 0, res.output
    assert used == ["hooked", "bridge", "bridge"]
    a, b = read_circuit(tmp_path / "a.json"), read_circuit(tmp_path / "b.json")
    assert b.faithfulness == pytest.approx(a.faithfulness, abs=1e-4), "both backends measure the same circuit"
    # where TransformerLens 4 is the only install, the recorded hooked is refused unless --backend replaces it
    monkeypatch.setattr(loading, "default_backend", lambda: "bridge")
    for command in (["verify", str(hooked)], ["refine", str(hooked), "--sizes", "4"]):
        res = CliRunner().invoke(main, command)
        assert res.exit_code == 2, res.output
        assert res.output.strip().splitlines() == [
            f"error: {hooked} records --backend hooked, used unless --backend is given; --backend hooked needs "
            "TransformerLens 3.x (HookedTransformer), which this environment lacks; use --backend bridge, or an "
            "environment with TransformerLens 3.x (pip install 'edgeatp[tl3]' in a fresh virtualenv)"]


def test_listings():
    res = run("models")
    assert res.exit_code == 0 and "zoo:ioi" in res.output and "zoo:induction" in res.output
    assert "dup" in run("tasks").output
    assert json.loads(run("models", "--json").stdout)[0]["name"].startswith("zoo:")


@pytest.mark.parametrize("args,message", [
    (["discover", "--model", "gpt2"], "not in the local Hugging Face cache"),
    (["discover", "--task", "nope"], "unknown task 'nope'"),
    (["discover", "--data", "missing.jsonl"], "no such file"),
    (["discover", "--task", "ioi", "--data", "x.jsonl"], "either --task or --data"),
    (["discover", "--top-k", "3", "--threshold", "0.1"], "choose one of --top-k"),
    (["discover", "--format", "json,gif"], "unknown format"),
    (["discover", "--metric", "kl"], "zero gradient at the clean run"),
    (["discover", "--level", "node", "--threshold", "0.1"], "--threshold works on edges"),
    (["discover", "--model", "zoo:dup", "--task", "factual"], "natural-language tokenizer"),
    (["render", "README.md"], "not valid JSON"),
    (["discover", "--group", "head"], "at edge level --group takes 'layer'"),
    (["discover", "--greedy", "5", "--positions"], "drop --positions"),
    (["discover", "--level", "node", "--bound"], "--bound bounds missed edges"),
    (["discover", "--task", "induction"], "fewer than 50 plain word tokens"),
    (["discover", "--device", "cuda:0"], "use --device cpu"),
    (["discover", "--level", "node", "--refine"], "--refine searches edge circuits"),
    (["discover", "--refine", "--refine-sizes", "5,x"], "--refine-sizes '5,x': give positive edge counts"),
    (["discover", "--refine-sizes", "5"], "--refine-sizes says what --refine searches"),
    (["refine", "README.md", "--sizes", "0"], "--sizes '0': give positive edge counts"),
])
def test_user_errors_are_one_line_with_exit_status_2(tmp_path, args, message):
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path)] if args[0] == "discover" else args)
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and res.output.strip().endswith(errors[0]), res.output
    assert "Traceback" not in res.output


def test_json_output_is_strict_json(tmp_path):
    res = run("discover", "--n-pairs", "8", "--verify", "0", "--sample-below", "2", "--format", "json", "--json",
              "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "NaN" not in res.output and json.loads(res.stdout)["verification"]["rank_correlation"] is None


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="unknown task"):
        CliRunner().invoke(main, ["discover", "--task", "nope", "--debug", "--out", str(tmp_path)],
                           catch_exceptions=False)
