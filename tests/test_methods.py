"""The method registry and the shape of the package: one place for methods, no import cycles, a light import."""

import subprocess
import sys

import pytest
import torch

from edgeatp.errors import OptionError
from edgeatp.methods import METHODS, Kind, get_method
from edgeatp.tasks.pairs import PromptPairs


def test_every_method_is_described_once_and_costed() -> None:
    assert list(METHODS) == ["atp", "atp-qk", "atp-gd", "atp*", "ig", "exact"]
    assert [m.name for m in METHODS.values() if m.qk_fix] == ["atp-qk", "atp*"]
    assert [m.name for m in METHODS.values() if m.graddrop] == ["atp-gd", "atp*"]
    star = METHODS["atp*"].cost(graddrop_terms=12)
    assert (star.forwards, star.backwards) == (2, 13)
    ig = METHODS["ig"].cost(ig_steps=5, reference=True)
    assert (ig.forwards, ig.backwards) == (12, 5) and METHODS["exact"].kind is Kind.EXACT
    assert METHODS["exact"].cost(patches=40).forwards == 42


def test_unknown_methods_and_levels_fail_in_one_place() -> None:
    with pytest.raises(OptionError, match="method 'eap' is unknown; choose from atp, atp-qk"):
        get_method("eap")
    with pytest.raises(OptionError, match="level 'layer' is unknown"):
        get_method("atp", "layer")
    assert get_method(METHODS["ig"], "node") is METHODS["ig"]


def test_errors_name_parameters_in_the_library_and_flags_on_the_command_line() -> None:
    from edgeatp.cli import _one_line

    exc = OptionError("{top_k} must be non-negative; see {n_verify} and file {name}.json", top_k="top_k",
                      n_verify="n_verify")
    assert str(exc) == "top_k must be non-negative; see n_verify and file {name}.json"
    assert _one_line(exc) == "--top-k must be non-negative; see --verify and file {name}.json"


def test_from_tokens_defaults_lengths_and_answer_positions() -> None:
    clean = torch.tensor([[5, 6, 7], [5, 8, 9]])
    pairs = PromptPairs.from_tokens(clean, clean.flip(1), [1, 2], [3, 4])
    assert pairs.lengths.tolist() == [3, 3] and pairs.answer_pos.tolist() == [2, 2]
    assert pairs.wrong.shape == (2, 1)
    padded = PromptPairs.from_tokens(clean, clean, torch.tensor([1, 2]), [[3, -1], [3, 4]], lengths=[2, 3])
    assert padded.answer_pos.tolist() == [1, 2] and padded.wrong.tolist() == [[3, -1], [3, 4]]
    with pytest.raises(ValueError, match="one shape"):
        PromptPairs.from_tokens(clean, clean[:, :2], [1, 2], [3, 4])


def test_no_import_cycles_and_a_light_top_level_import() -> None:
    code = ("import sys, edgeatp, edgeatp.cli, edgeatp.config, edgeatp.methods; "
            "assert 'torch' not in sys.modules, 'importing edgeatp or its CLI loaded torch'; "
            "import edgeatp.circuit; assert 'edgeatp.export' not in sys.modules, 'circuit imports export'; "
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    zoo = subprocess.run([sys.executable, "-c", "import sys, edgeatp.zoo; print('edgeatp.model' in sys.modules)"],
                         capture_output=True, text=True)
    assert zoo.stdout.strip() == "False", zoo.stderr
