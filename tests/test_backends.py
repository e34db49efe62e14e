"""The TransformerBridge backend against the HookedTransformer backend, and what it leaves behind.

Runs under either TransformerLens: with 3.x both backends run here (3.9 ships the bridge); with
4.x the HookedTransformer reference comes from ``EDGEATP_REFERENCE_PYTHON`` (a TransformerLens 3.x
Python, see ``make test-tl4``), on the very checkpoint folders this run then loads. Oracle: the
same node and edge scores for every method, the same exact patching effects and the same circuit,
to 1e-5 of the largest reference value in float32.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import edgeatp as ea
from edgeatp.cli import main
from edgeatp.errors import ModelError
from edgeatp.model import Site
from edgeatp.model.loading import default_backend
from edgeatp.pipeline import load_inputs

from . import backend_cases as cases

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5


@pytest.fixture(scope="session")
def agreement(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folders and the HookedTransformer backend's results of every case."""
    root = tmp_path_factory.mktemp("agreement")
    if default_backend() == "hooked":
        return root, cases.reference(root)
    python = os.environ.get("EDGEATP_REFERENCE_PYTHON")
    if not python:
        pytest.fail("TransformerLens 4 has no HookedTransformer: set EDGEATP_REFERENCE_PYTHON to a Python with "
                    "TransformerLens 3.x for the reference results (`make test-tl4` does)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([python, "-m", "tests.backend_cases", str(root)], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, f"the reference run failed:\n{run.stderr[-3000:]}"
    return root, torch.load(root / "reference.pt")


@pytest.mark.parametrize("case", cases.CASES)
def test_both_backends_give_the_same_scores_effects_and_circuit(case: str, agreement) -> None:
    root, reference = agreement
    want = reference[case]
    got = cases.results(case, root, "bridge")
    assert sorted(got) == sorted(want)
    assert got["circuit"] == want["circuit"]
    for key, ref in want.items():
        if key == "circuit":
            continue
        assert got[key].shape == ref.shape, key
        err, scale = float((got[key] - ref).abs().max()), float(ref.abs().max())
        assert err <= RTOL * scale, f"{case}, {key}: off by {err:.2e} (largest value {scale:.2e})"


def test_the_scores_the_bridge_hooks_are_masked_by_sliding_windows(agreement, tmp_path) -> None:
    # the QK fix and score patches read the mask from these scores: the window must be in them
    root, _ = agreement
    # Qwen2 with sliding windows from its second layer on (TransformerLens 3.x ignores them: no reference)
    qwen = shutil.copytree(root / "qwen2-gqa", tmp_path / "qwen2-swa")
    config = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": cases.WINDOW,
                                                  "max_window_layers": 1,
                                                  "layer_types": ["full_attention", "sliding_attention"]}))
    for folder, case, windowed in ((root / "mistral-swa", "mistral-swa", [True, True]),
                                   (qwen, "qwen2-gqa", [False, True])):
        adapter = ea.load_model(str(folder), backend="bridge")
        pairs, _ = load_inputs(cases.discover_config(case, root, "bridge"), adapter)
        T = pairs.clean.shape[1]
        assert T > cases.WINDOW + 1, "the prompts are longer than the window"
        query, key = torch.arange(T)[:, None], torch.arange(T)[None]
        for layer, window in enumerate(windowed):
            seen: list[torch.Tensor] = []
            adapter.forward(pairs.clean[:2], [(Site("scores", layer), seen.append)])
            visible = (key <= query) & ((query - key < cases.WINDOW) | (not window))
            assert torch.equal(torch.isfinite(seen[0]), visible.expand_as(seen[0])), (folder.name, layer)
            assert torch.isneginf(seen[0][..., ~visible]).all()


# ------------------------------------------------------------------------------------------- bridge objects
def _bridge(folder: Path) -> Any:
    """A TransformerBridge a user booted on a checkpoint folder (model and tokenizer loaded by transformers)."""
    import transformers as tf
    from transformer_lens.model_bridge import TransformerBridge

    hf = tf.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tok, device="cpu")


def _snapshot(adapter: ea.ModelAdapter) -> dict[str, Any]:
    """Everything a run may touch on a bridge: flags, training modes, instance patches, grouping,
    hooks, the tokenizer's padding side and the weights."""
    from edgeatp.model.bridge import _FLAGS

    m = adapter.model
    modules = list({id(x): x for x in (*m.modules(), *m.original_model.modules())}.values())
    attns = [b.attn for b in m.blocks]
    return {
        "flags": {f: bool(getattr(m.cfg, f)) for f in _FLAGS},
        "training": [x.training for x in modules],
        "patches": [sorted({"_apply_rotary_pos_emb", "forward", "_edgeatp_attn"}
                           & (set(a.__dict__) | set(a.original_component.__dict__))) for a in attns],
        "groups": [getattr(a.original_component, "num_key_value_groups", None) for a in attns],
        "hooks": adapter.backend.foreign_hooks(),
        "padding": getattr(m.tokenizer, "padding_side", None),
        "weights": {k: v.clone() for k, v in m.state_dict().items()},
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]) and \
        {k: v for k, v in a.items() if k != "weights"} == {k: v for k, v in b.items() if k != "weights"}


@pytest.mark.parametrize("case", ["zoo:llama-induction", "pythia", "llama-gqa", "qwen2-gqa"])
def test_a_users_bridge_is_left_as_it_was_on_every_exit_path(case: str, agreement) -> None:
    root, _ = agreement
    adapter = ea.load_model(case if case.startswith("zoo:") else _bridge(root / case), backend="bridge")
    m = adapter.model
    pairs, _ = load_inputs(cases.discover_config(case, root, "bridge"), adapter)
    setup = ea.Setup(adapter, pairs)
    plain = ea.patch_nodes(setup, [ea.Node.parse("a1.h0"), ea.Node.parse("a0.h1<k>")]).per_pair
    # the user's own state: training mode, per-head results (where the bridge has them), left padding
    m.train()
    if adapter.backend.architecture != "TransformerLensNative":
        m.set_use_attn_result(True)
    if m.tokenizer is not None:
        m.tokenizer.padding_side = "left"
    before = _snapshot(adapter)
    inside: list[dict[str, Any]] = []

    def explode(t: torch.Tensor) -> None:
        inside.append(_snapshot(adapter))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with adapter.ungrouped():
            adapter.forward(pairs.clean[:2], [(Site("z", 1), explode)])
    assert not _same(inside[0], before), "the run changes the model while it lasts"
    assert _same(_snapshot(adapter), before)
    flagged = ea.patch_nodes(setup, [ea.Node.parse("a1.h0"), ea.Node.parse("a0.h1<k>")]).per_pair
    assert torch.equal(flagged, plain), "the user's flags and training mode do not change results"
    ea.attribute_edges(setup, "atp*", ea.EdgeGraph.from_shape(adapter.shape, ungrouped=adapter.shape.grouped))
    assert _same(_snapshot(adapter), before)
    m.add_hook("blocks.0.attn.hook_z", lambda t, hook: t)
    with pytest.raises(ModelError, match="has hooks attached"):
        ea.patch_nodes(setup, [ea.Node.parse("a0.h0")])
    m.reset_hooks(including_permanent=True)


# ------------------------------------------------------------------------------------------- refusals
def _config_folder(root: Path, name: str, config: Any) -> Path:
    folder = root / name
    config.save_pretrained(str(folder))
    return folder


def test_architectures_the_bridge_cannot_open_are_refused_in_one_line(agreement, tmp_path) -> None:
    import transformers as tf

    from .test_families import LLAMA, H, L, NH, P, V

    root, _ = agreement
    configs = {
        "gemma-2-2b": tf.Gemma2Config(**LLAMA, num_key_value_heads=2, head_dim=8,
                                      architectures=["Gemma2ForCausalLM"]),
        "gpt-j-6b": tf.GPTJConfig(vocab_size=V, n_embd=H, n_head=NH, n_layer=L, n_positions=P, rotary_dim=4,
                                  architectures=["GPTJForCausalLM"]),
        "gpt-neo-125m": tf.GPTNeoConfig(vocab_size=V, hidden_size=H, num_heads=NH, num_layers=L,
                                        attention_types=[[["global"], L]], architectures=["GPTNeoForCausalLM"]),
        "opt-125m": tf.OPTConfig(vocab_size=V, hidden_size=H, num_attention_heads=NH, num_hidden_layers=L, ffn_dim=64,
                                 word_embed_proj_dim=H, architectures=["OPTForCausalLM"]),
    }
    hint = r"use an environment with TransformerLens 3.x \(pip install 'edgeatp\[tl3\]' in a fresh virtualenv\)"
    for name, config in configs.items():
        with pytest.raises(ModelError, match=f"not {config.architectures[0]} yet; {hint} for it$") as exc:
            ea.load_model(str(_config_folder(tmp_path, name, config)), backend="bridge")
        assert "\n" not in str(exc.value) and name in str(exc.value)
    # a bridge a user booted on one: its attention runs inside Hugging Face code
    opt = tmp_path / "opt-weights"
    tf.AutoModelForCausalLM.from_config(configs["opt-125m"]).save_pretrained(str(opt))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "gpt2" / f, opt)
    with pytest.raises(ModelError, match="does not support OPTForCausalLM yet") as exc:
        ea.load_model(_bridge(opt))
    assert "\n" not in str(exc.value)
    # GPT-2 without score scaling: the bridge's attention would not compute what the checkpoint does
    unscaled = shutil.copytree(root / "gpt2", tmp_path / "gpt2-unscaled")
    config = json.loads((unscaled / "config.json").read_text())
    (unscaled / "config.json").write_text(json.dumps({**config, "scale_attn_weights": False}))
    with pytest.raises(ModelError, match=r"unscaled attention scores \(scale_attn_weights=false"):
        ea.load_model(str(unscaled), backend="bridge")
    # compatibility mode rewrites the weights for good
    compat = _bridge(root / "gpt2")
    compat.enable_compatibility_mode(disable_warnings=True)
    with pytest.raises(ModelError, match="without compatibility mode"):
        ea.load_model(compat)


# ------------------------------------------------------------------------------------------- loading
def test_cached_pretrained_names_load_as_bridges_offline(agreement, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hc

    root, _ = agreement
    snapshot = tmp_path / "hub" / "models--edgeatp-tests--tiny-gpt2" / "snapshots" / ("0" * 40)
    shutil.copytree(root / "gpt2", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    adapter = ea.load_model("edgeatp-tests/tiny-gpt2", backend="bridge")
    assert adapter.name == "edgeatp-tests/tiny-gpt2" and adapter.backend.kind == "bridge"
    assert adapter.prepend_bos  # GPT-2: <|endoftext|> first, as the HookedTransformer backend does
    with pytest.raises(ModelError, match="is not in the local Hugging Face cache") as exc:
        ea.load_model("edgeatp-tests/not-cached", backend="bridge")
    assert "\n" not in str(exc.value)


def test_discover_runs_on_a_checkpoint_folder_under_the_bridge(agreement, tmp_path) -> None:
    root, reference = agreement
    args = ["discover", "--model", str(root / "llama-gqa"), "--data", str(root / "llama-gqa.jsonl"), "--n-pairs",
            str(cases.N_PAIRS), "--verify", "6", "--sample-below", "6", "--threads", "1", "--format", "json", "--json",
            "--out", str(tmp_path)]
    # TransformerLens 4: the plain command (auto picks the bridge); 3.x: the bridge asked for
    res = CliRunner().invoke(main, args if default_backend() == "bridge" else [*args, "--backend", "bridge"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_edges"] == len(reference["llama-gqa"]["circuit"])
    saved = ea.read_circuit(tmp_path / "circuit.json")
    assert [e.name for e in saved.edges()] == reference["llama-gqa"]["circuit"]
    if default_backend() == "bridge":  # TransformerLens 4: no HookedTransformer to fall back on
        res = CliRunner().invoke(main, [*args, "--backend", "hooked"])
        assert res.exit_code == 2 and "--backend hooked needs TransformerLens 3.x" in res.output
    # a circuit found with --backend hooked (under TransformerLens 3.x) is verified and refined on the bridge
    found = json.loads((tmp_path / "circuit.json").read_text())
    found["meta"]["config"]["backend"] = "hooked"
    hooked = tmp_path / "hooked.json"
    hooked.write_text(json.dumps(found))
    for command in (["verify", str(hooked), "--verify", "2", "--sample-below", "0", "--out",
                     str(tmp_path / "v.json")],
                    ["refine", str(hooked), "--sizes", "2", "--refine-budget", "20", "--out",
                     str(tmp_path / "r.json")]):
        res = CliRunner().invoke(main, [*command, "--backend", "bridge", "--quiet"])
        assert res.exit_code == 0, res.output
        if default_backend() == "bridge":  # the recorded backend is only a default, refused where it is missing
            res = CliRunner().invoke(main, command)
            assert res.exit_code == 2 and f"{hooked} records --backend hooked, used unless --backend is given; " \
                "--backend hooked needs TransformerLens 3.x" in res.output and len(res.output.splitlines()) == 1
    assert ea.read_circuit(tmp_path / "v.json").faithfulness == pytest.approx(saved.faithfulness, abs=1e-5)


def test_splitting_layers_over_devices_is_refused_on_the_bridge_in_one_line() -> None:
    with pytest.raises(ModelError, match="n_devices splits HookedTransformer models") as exc:
        ea.load_model("zoo:induction", backend="bridge", device="cpu", n_devices=2)
    message = str(exc.value)
    assert "\n" not in message
    if default_backend() == "hooked":
        assert message.endswith("load the model with backend hooked")
    else:  # TransformerLens 4 alone: no HookedTransformer to load it with here
        assert "which this environment lacks; use an environment with TransformerLens 3.x" in message
        assert "backend hooked" not in message


# ------------------------------------------------------------------------------------------- planning
def test_the_planner_reads_configs_under_either_version(agreement, tmp_path) -> None:
    import transformers as tf

    from edgeatp.model_config import describe_model

    from .test_families import LLAMA

    root, _ = agreement
    folded = {"LN": "LNPre", "RMS": "RMSPre"}  # planned as HookedTransformer folds them; the bridge keeps the weights
    for name in cases.CHECKPOINTS:  # read without TransformerLens: the loaded bridge's description
        alone = tmp_path / name
        alone.mkdir()
        shutil.copy(root / name / "config.json", alone / "config.json")
        loaded = ea.load_model(str(root / name), backend="bridge").spec
        # planned as TransformerLens 3.x translates Mistral, 2048 positions at most (the planner only
        # takes min(32, n_ctx) of it); the bridge keeps max_position_embeddings
        n_ctx = 2048 if name == "mistral-swa" else loaded.n_ctx
        assert describe_model(str(alone)) == replace(loaded, name=name, norm=folded[loaded.norm], n_ctx=n_ctx)
    gemma = _config_folder(tmp_path, "gemma-2-2b", tf.Gemma2Config(**LLAMA, num_key_value_heads=2, head_dim=8,
                                                                   architectures=["Gemma2ForCausalLM"]))
    if default_backend() == "hooked":  # TransformerLens 3.x translates every family it converts
        assert describe_model(str(gemma)).shape.kv_heads == 2
        return
    with pytest.raises(ModelError, match="needs TransformerLens 3.x's translation for a Gemma2ForCausalLM config") as exc:
        describe_model(str(gemma))
    assert "\n" not in str(exc.value) and "gemma-2-2b" in str(exc.value)
    res = CliRunner().invoke(main, ["plan", "--model", "gpt2"])  # no built-in configs: the cache or nothing
    assert res.exit_code == 2 and "not in the local Hugging Face cache" in res.output
