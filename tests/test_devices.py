"""Devices: nothing in the package names a device, and a model split over two "devices" gives the
one-device results.

On CPU the split runs TransformerLens' multi-device path (``n_devices=2``: its per-block device
rule, our placement, every ``.to(layer's device)``), but both devices are the host, so no tensor
actually changes device; tests/test_gpu.py repeats the comparison across real GPUs.
"""

import ast
import re
from pathlib import Path

import pytest
import torch

import edgeatp as ea
from edgeatp.attribution import attribute_edges, attribute_nodes
from edgeatp.circuit import prune
from edgeatp.errors import ModelError
from edgeatp.model.devices import block_devices, devices_of
from edgeatp.patching import patch_edges
from edgeatp.setup import Setup
from edgeatp.tasks import make_task
from edgeatp.verification import faithfulness_curve

PACKAGE = Path(__file__).resolve().parents[1] / "edgeatp"
DEVICE_NAME = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")
# where results leave the device for good: returned to the user, printed, exported or sent over gloo
TO_HOST = {
    ("attribution/edges.py", "per_head_kv"), ("attribution/grouping.py", "GroupScores.top"),
    ("attribution/grouping.py", "CoarseEdgeScores.top"), ("circuit.py", "circuit_from_edges"),
    ("distributed.py", "Ranks._wire"), ("export/report.py", "stderr_lookup"), ("memory.py", "HostCache.__setitem__"),
    ("patching.py", "sweep"), ("scores.py", "Accumulator.result"), ("scores.py", "NodeScores.order"),
    ("scores.py", "NodeScores.top"), ("scores.py", "NodeScores.to_table"), ("scores.py", "EdgeScores.flat"),
    ("scores.py", "EdgeScores.top"), ("scores.py", "EdgeScores.to_table"),
    ("mib.py", "helpfulness"), ("mib.py", "ranking_metrics"),  # circuit metrics from the finished scores
}


def _device_literals(text: str, rel: str) -> list[str]:
    """Places in one module (source ``text``, path ``rel`` in the package) that name a device or
    move a tensor to the host."""
    tree = ast.parse(text)
    compared = {id(n) for c in ast.walk(tree) if isinstance(c, ast.Compare)
                for side in (c.left, *c.comparators) for n in ast.walk(side)}
    compared |= {id(k) for d in ast.walk(tree) if isinstance(d, ast.Dict) for k in d.keys}  # "cpu" seconds
    found: list[str] = []

    def visit(node: ast.AST, scope: tuple[str, ...]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = (*scope, node.name)
        where = f"{rel}:{getattr(node, 'lineno', '?')} in {'.'.join(scope) or 'module'}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and DEVICE_NAME.match(node.value) \
                and id(node) not in compared:  # comparisons with a device's type (and dict keys) are fine
            found.append(f"{where}: device name {node.value!r}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "cuda" or (node.func.attr == "cpu" and (rel, ".".join(scope)) not in TO_HOST):
                found.append(f"{where}: .{node.func.attr}()")
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, ())
    return found


def test_the_package_names_no_device():
    """Every tensor edgeatp makes goes to the model's device (or the device of the tensor it goes
    with): no device literal anywhere, and ``.cpu()`` only where results leave for good."""
    found = [hit for path in sorted(PACKAGE.rglob("*.py"))
             for hit in _device_literals(path.read_text(), path.relative_to(PACKAGE).as_posix())]
    assert not found, "\n".join(found)
    planted = _device_literals("def f(x):\n    return x.to('cuda:0').cpu()\n", "attribution/passes.py")
    assert len(planted) == 2  # the check can fail


@pytest.fixture(scope="module")
def split_ioi() -> ea.ModelAdapter:
    return ea.load_model("zoo:ioi", device="cpu", n_devices=2)


def test_a_model_split_over_two_host_devices_gives_the_one_device_results(zoo_ioi, split_ioi):
    assert split_ioi.cfg.n_devices == 2 and zoo_ioi.cfg.n_devices == 1
    assert devices_of(split_ioi.model) == [torch.device("cpu")]
    pairs = make_task("ioi", zoo_ioi.tokenizer, 12, seed=2)
    one, two = Setup(zoo_ioi, pairs, batch_size=6), Setup(split_ioi, pairs, batch_size=6)
    for method in ("atp*", "ig"):
        a, b = attribute_edges(one, method, ig_steps=2), attribute_edges(two, method, ig_steps=2)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.signed, b.signed), method
    assert torch.equal(attribute_nodes(one, "atp*").scores, attribute_nodes(two, "atp*").scores)
    scores = attribute_edges(one, "atp-qk")
    top = [e for e, *_ in scores.top(4)]
    assert torch.equal(patch_edges(one, scores.graph, top).per_pair, patch_edges(two, scores.graph, top).per_pair)
    curve_one, curve_two = faithfulness_curve(one, scores, [4, 12]), faithfulness_curve(two, scores, [4, 12])
    assert curve_one.faithfulness == curve_two.faithfulness
    assert torch.equal(prune(scores, top_k=8).in_graph, prune(attribute_edges(two, "atp-qk"), top_k=8).in_graph)


def test_block_devices_follow_transformer_lens_and_bad_splits_are_refused():
    assert block_devices(torch.device("cuda:0"), 2, 4) == [torch.device(f"cuda:{i}") for i in (0, 0, 1, 1)]
    assert block_devices(torch.device("cuda:1"), 3, 3) == [torch.device(f"cuda:{i}") for i in (1, 2, 3)]
    assert set(block_devices(torch.device("cpu"), 2, 4)) == {torch.device("cpu")}
    with pytest.raises(ModelError, match="n_devices"):
        ea.load_model("zoo:dup", device="cpu", n_devices=0)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ModelError):  # no CUDA at all, or too few devices: one line, not a crash
            ea.load_model("zoo:dup", device="cuda", n_devices=2)


def test_discover_with_a_split_model_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from edgeatp.cli import main

    args = ["discover", "--model", "zoo:induction", "--n-pairs", "8", "--format", "json", "--verify", "0"]
    res = CliRunner().invoke(main, [*args, "--device", "cpu", "--n-devices", "2", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "circuit.json").exists()


def test_every_device_type_is_checked_before_loading(monkeypatch):
    """Accelerators this machine lacks, indices beyond its devices and device types edgeatp does not
    run on are one-line errors naming --device, not torch's assertion or a missing module."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    for device, message in (("xpu", "device 'xpu': this torch build has no XPU device; use device cpu"),
                            ("mps", "device 'mps': this torch build has no MPS device; use device cpu"),
                            ("cuda:2", "device 'cuda:2': this machine has 2 CUDA device(s), numbered from 0"),
                            ("hpu", "device 'hpu': edgeatp runs on cpu, cuda, mps or xpu devices; use one of those"),
                            ("meta", "device 'meta': edgeatp runs on cpu, cuda, mps or xpu devices")):
        with pytest.raises(ModelError, match=re.escape(message)):
            ea.load_model("zoo:dup", device=device)


def test_an_unavailable_device_on_the_command_line_is_one_line(tmp_path):
    from click.testing import CliRunner

    from edgeatp.cli import main

    if hasattr(torch, "xpu") and torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    res = CliRunner().invoke(main, ["discover", "--model", "zoo:dup", "--n-pairs", "4", "--device", "xpu",
                                    "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert res.output.strip() == "error: --device 'xpu': this torch build has no XPU device; use --device cpu"
