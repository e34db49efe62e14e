"""The README's library example runs as written (documentation that drifts from the API is a defect)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(section: str) -> str:
    text = README.read_text()
    body = text[text.index(f"## {section}"):]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_python_block("The library"), "README.md", "exec"), scope)
    assert "m1->logits" in capsys.readouterr().out
    assert scope["circuit"].faithfulness is not None and scope["circuit"].verification is not None
    assert scope["exact"].per_pair.shape == (64, 5)
    assert {"circuit.json", "circuit.dot", "circuit.md"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert scope["G"].number_of_edges() > 0
