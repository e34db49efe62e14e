"""The cost planner (``edgeatp plan``): config readers, and its figures against measured runs.

Oracles: TransformerLens' own translation of a ``config.json`` (the torch-free reader must give the
same model), the loaded model's config (zoo), and runs measured by :mod:`edgeatp.research.measure`
— forward rows and backward calls exactly, the peak of live tensor bytes within a stated error.
``benchmarks/plan_check.py`` does the same on larger models and adds CPU time.
"""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from edgeatp.cli import main
from edgeatp.errors import ModelError
from edgeatp.graph import graph_size
from edgeatp.methods import get_method
from edgeatp.model import load_model
from edgeatp.model.checkpoint import config_only
from edgeatp.model_config import _folder_spec, describe_model, spec_of
from edgeatp.plan import Workload, attribution_passes, edge_budget, exact_stacking, plan
from edgeatp.research.measure import check_plan, shared_prefix, workload_of
from edgeatp.setup import Setup
from edgeatp.zoo import ZOO

from .conftest import random_pairs, tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
MEMORY_TOLERANCE = 0.35  # the planned peak is within 35% of the measured one (typically within 15%)
SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
             max_position_embeddings=64)


def _config_folder(tmp_path: Path, name: str, config) -> Path:
    folder = tmp_path / name
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name,config", [
    ("gpt2-tiny", lambda: tf.GPT2Config(vocab_size=64, n_embd=32, n_head=4, n_layer=2, n_positions=64,
                                        architectures=["GPT2LMHeadModel"])),
    ("pythia-seq", lambda: tf.GPTNeoXConfig(**SMALL, use_parallel_residual=False, architectures=["GPTNeoXForCausalLM"])),
    ("my-llama-gqa", lambda: tf.LlamaConfig(**SMALL, num_key_value_heads=2, architectures=["LlamaForCausalLM"])),
    ("mistral-tiny", lambda: tf.MistralConfig(**SMALL, num_key_value_heads=2, architectures=["MistralForCausalLM"])),
    ("qwen2-tiny", lambda: tf.Qwen2Config(**SMALL, num_key_value_heads=4, architectures=["Qwen2ForCausalLM"])),
])
def test_config_json_reader_gives_transformerlens_translation(tmp_path, name, config):
    folder = _config_folder(tmp_path, name, config())
    fast = _folder_spec(folder, None)
    assert fast is not None, "a plain config of a common family is read without TransformerLens"
    assert fast == spec_of(config_only(folder), folder.name)


@pytest.mark.parametrize("folder", ["pythia-12b", "Meta-Llama-3-8B"])
def test_paper_scale_fixtures_read_like_transformerlens(folder):
    fast = describe_model(str(FIXTURES / folder))
    assert fast == spec_of(config_only(FIXTURES / folder), folder)
    assert describe_model(str(FIXTURES / folder / "config.json")) == fast
    assert replace(describe_model(str(FIXTURES / folder), "float32"), dtype=fast.dtype) == fast


def test_paper_scale_numbers():
    pythia = describe_model(str(FIXTURES / "pythia-12b"))
    assert pythia.dtype == "float16" and pythia.shape.parallel_attn_mlp and 11.8e9 < pythia.params < 11.9e9
    llama = describe_model(str(FIXTURES / "Meta-Llama-3-8B"))
    assert llama.dtype == "bfloat16" and llama.shape.kv_heads == 8 and 8.0e9 < llama.params < 8.1e9
    work = Workload(n_pairs=1000, seq_len=32)
    p = plan(pythia, work)
    assert (p.graph.writers, p.graph.readers, p.graph.edges) == (1477, 4357, graph_size(pythia.shape).edges)
    gd = p.methods["atp-gd"].passes
    assert gd.backwards == 36 and 17 < gd.backward_equivalents < 18.5  # L²/2 block-backwards, in full backwards
    assert p.methods["exact"].passes.forwards == 2 + p.graph.edges


def test_settings_the_reader_does_not_know_go_through_the_loader(tmp_path):
    scaled = _config_folder(tmp_path, "scaled", tf.LlamaConfig(**SMALL, architectures=["LlamaForCausalLM"],
                                                               rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert _folder_spec(scaled, None) is None
    with pytest.raises(ModelError, match="rope_type"):
        describe_model(str(scaled))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        describe_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_specs_equal_the_loaded_models(name):
    assert describe_model(f"zoo:{name}") == load_model(f"zoo:{name}").spec


@pytest.mark.parametrize("offload", [False, True])
def test_the_batch_rule_is_the_one_attribution_uses(offload):
    """The planner picks the pairs per batch (and QK-fix writer chunk) each attribution run picks, at
    budgets that hold every pair, two, one, and less than one pair's caches."""
    from edgeatp.attribution import attribute_edges, attribute_nodes

    model = tiny_model(d_model=32, n_heads=4)
    for budget in (1024.0, 1.0, 0.5, 0.02):
        setup = Setup(model, random_pairs(n=6, length=10), batch_size=4, memory_budget_mb=budget, offload=offload)
        for method in ("atp", "atp-qk", "atp*", "ig"):
            scores = attribute_edges(setup, method)
            rule = edge_budget(model.spec, workload_of(setup), get_method(method, "edge"))
            assert (scores.meta["batch_size"], scores.meta["writer_chunk"], scores.meta["peak_buffer_mb"]) == \
                (rule.batch_size, rule.writer_chunk, rule.peak_mb), (budget, method)
            planned = plan(model.spec, workload_of(setup), [method]).methods[method].memory
            assert planned.batch_size == rule.batch_size
            if method == "atp-qk":
                assert planned.writer_chunk == rule.writer_chunk
        for method in ("atp", "atp*"):
            nodes = attribute_nodes(setup, method, ["head", "q", "k", "v", "mlp"])
            planned = plan(model.spec, workload_of(setup, "node"), [method]).methods[method].memory
            assert nodes.meta["batch_size"] == planned.batch_size, (budget, method)
    sizes = [edge_budget(model.spec, workload_of(Setup(model, random_pairs(n=6, length=10), batch_size=4,
                                                       memory_budget_mb=b)), get_method("atp", "edge")).batch_size
             for b in (1024.0, 1.0, 0.5)]
    assert sizes[0] == 4 and 1 < sizes[1] < 4 and sizes[2] == 1, "the budgets above must exercise the rule"


@pytest.mark.parametrize("level", ["edge", "node"])
def test_the_stacking_rule_is_the_one_exact_patching_uses(level):
    """Exact patching's pairs per batch and patch sets per forward follow the memory budget by the rule
    the planner uses: the same stacking, forward calls and batch at budgets that hold every row, some,
    one pair, and less than one row; the planned peak follows the budget down."""
    from edgeatp.attribution.nodes import resolve_nodes
    from edgeatp.graph import EdgeGraph
    from edgeatp.patching import EdgePatch, NodePatch

    model = tiny_model(d_model=32, n_heads=4)
    pairs = random_pairs(n=3, length=10)
    graph = EdgeGraph.from_shape(model.shape)
    seen, peaks = set(), []
    for budget in (1024.0, 0.5, 0.3, 0.2, 0.12, 0.001):
        setup = Setup(model, pairs, batch_size=8, memory_budget_mb=budget)
        work = workload_of(setup, level)
        if level == "edge":
            coords = graph.all_coords
            masks = torch.zeros(len(coords), graph.P, graph.n_writers, graph.n_readers, dtype=torch.bool)
            masks[torch.arange(len(coords)), coords[:, 0], coords[:, 1], coords[:, 2]] = True
            load = EdgePatch(model, graph, masks).load(pairs.n_positions)
        else:
            index = resolve_nodes(model, ["head", "q", "k", "v", "mlp"], False, pairs.n_positions)
            load = NodePatch(model, [[n] for n in index], pairs.n_positions).load(pairs.n_positions)
        stacking = setup.stacking(load)
        assert stacking == exact_stacking(model.spec, work, get_method("exact", level)), budget
        (check,) = check_plan(setup, model.spec, work, ["exact"])
        assert check.measured.forward_calls == check.planned.passes.forward_calls, budget
        assert check.planned.memory.batch_size == stacking[0]
        assert abs(check.memory_error) <= MEMORY_TOLERANCE, (budget, check.measured.peak_mb, check.planned_peak_mb)
        seen.add(stacking)
        peaks.append(check.planned.memory.device_peak - check.planned.memory.fixed["weights"])
    assert len(seen) >= 4, f"the budgets above must exercise the rule: {seen}"
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0] / 3


CASES = {
    "gpt2-like": dict(d_model=64, n_heads=4, d_vocab=50),
    "llama-gqa": dict(d_model=64, n_heads=4, n_key_value_heads=2, normalization="RMS", rotary=True, gated_mlp=True,
                      act_fn="silu", d_vocab=50),
    "parallel-rotary": dict(d_model=64, n_heads=4, parallel=True, rotary=True, d_vocab=50),
    "attn-only-nonorm": dict(d_model=64, n_heads=4, attn_only=True, normalization=None, d_vocab=50),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("level,methods", [("edge", ["atp", "atp-qk", "atp*", "ig"]), ("node", ["atp", "atp*", "ig"]),
                                           ("neuron", ["atp-qk"])])
def test_passes_exactly_and_memory_within_tolerance(case, level, methods):
    model = tiny_model(**CASES[case])
    if level == "neuron" and model.shape.attn_only:
        pytest.skip("no neurons in an attention-only model")
    _check_runs(model, level, methods)


@pytest.mark.parametrize("level", ["edge", "node"])
def test_exact_patching_passes_and_memory(level):
    _check_runs(tiny_model(**{**CASES["gpt2-like"], "d_model": 32, "n_layers": 2}), level, ["exact"])


def _check_runs(model, level: str, methods: list[str]) -> None:
    pairs = random_pairs(n=6, length=12, d_vocab=50)
    setup = Setup(model, pairs, batch_size=4)  # two batches: the second runs beside the first one's results
    work = workload_of(setup, level)
    assert work.shared_prefix == shared_prefix(pairs)
    for check in check_plan(setup, model.spec, work, methods):
        p, m = check.planned, check.measured
        batches = -(-setup.n_pairs // p.memory.batch_size)
        assert m.forwards == p.passes.forwards, p.method
        assert m.backward_calls == p.passes.backwards * batches, p.method
        assert abs(check.memory_error) <= MEMORY_TOLERANCE, (p.method, m.peak_mb, check.planned_peak_mb)


def test_graddrop_passes_and_sublayer_units():
    model = tiny_model(d_model=32, n_heads=4, n_layers=3)
    setup = Setup(model, random_pairs(n=4, length=8), batch_size=4)
    for mode in ("block", "sublayer"):
        work = workload_of(setup, graddrop=mode)
        (check,) = check_plan(setup, model.spec, work, ["atp-gd"])
        # a unit with nothing below it (layer 0's block or attention) needs no backward of its own
        assert check.measured.backward_calls == check.planned.passes.backwards == (3 if mode == "block" else 6)
        assert abs(check.memory_error) <= MEMORY_TOLERANCE
    spec = model.spec
    equiv = attribution_passes(spec, Workload(seq_len=8), get_method("atp-gd")).backward_equivalents
    # three block-backwards (below units 1 and 2: 1 + 2), each a third of a full backward less the unembedding's share
    assert 1.8 < equiv <= 2.0


@pytest.mark.parametrize("case", ["gpt2-like", "llama-gqa"])
def test_split_models_weights_per_device_follow_transformerlens(case):
    """Weights per device of a split model: the loaded model's parameters of the blocks TransformerLens
    puts on each device (block i on device i·n // L), the embedding on the first, the unembedding and
    final norm on the last."""
    from edgeatp.model.devices import block_devices
    from edgeatp.plan import _device_weights, block_counts

    model = tiny_model(n_layers=5, **CASES[case])
    spec, ht = model.spec, model.model
    size = lambda module: sum(p.numel() for p in module.parameters()) * spec.dtype_bytes  # noqa: E731
    for n in (2, 3, 5):
        cuda = [d.index for d in block_devices(torch.device("cuda:0"), n, spec.shape.n_layers)]
        assert block_counts(spec.shape.n_layers, n) == [cuda.count(k) for k in range(n)]
        work = Workload(n_devices=n)
        expected = [sum(size(ht.blocks[i]) for i in range(spec.shape.n_layers) if cuda[i] == k) for k in range(n)]
        expected[0] += size(ht.embed) + (size(ht.pos_embed) if spec.learned_positions else 0)
        expected[-1] += size(ht.unembed) + (size(ht.ln_final) if hasattr(ht, "ln_final") else 0)
        assert [_device_weights(spec, work, k) for k in range(n)] == expected
        assert sum(expected) == spec.params * spec.dtype_bytes == size(ht)


def test_split_models_peaks_per_device():
    """Splitting moves per-layer memory off the first device but keeps the gathered buffers there: every
    device's peak is below the one-device peak, the first device's is the largest, and one device is the
    unsplit plan."""
    spec = describe_model(str(FIXTURES / "Meta-Llama-3-8B"))
    one = plan(spec, Workload(n_pairs=1000, memory_budget=16384))
    for n in (2, 4):
        split = plan(spec, Workload(n_pairs=1000, memory_budget=16384, n_devices=n))
        for name, m in split.methods.items():
            peaks = m.memory.per_device
            assert len(peaks) == n and max(peaks) == peaks[0] == m.memory.device_peak, name
            assert all(p < one.methods[name].memory.device_peak for p in peaks), name
            assert m.memory.batch_size == one.methods[name].memory.batch_size  # the batch rule does not change
    assert plan(spec, Workload(n_pairs=1000, n_devices=1)).methods["atp"].memory.per_device == ()
    res = run("plan", "--model", str(FIXTURES / "Meta-Llama-3-8B"), "--n-devices", "4", "--json")
    assert len(json.loads(res.stdout)["methods"]["atp*"]["memory_mb"]["per_device"]) == 4


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_plan_command_text_and_json():
    res = run("plan", "--model", str(FIXTURES / "Meta-Llama-3-8B"), "--n-pairs", "1000", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["model"]["n_kv_heads"] == 8 and data["workload"]["n_pairs"] == 1000
    assert set(data["methods"]) == {"atp", "atp-qk", "atp-gd", "atp*", "ig", "exact"}
    atp = data["methods"]["atp"]
    assert atp["passes"]["forwards"] == 2 and atp["memory_mb"]["fixed"]["weights"] > 15_000
    assert atp["device"].endswith("GB")
    text = run("plan", "--model", "zoo:ioi", "--level", "node", "--method", "atp*")
    assert text.exit_code == 0 and "atp*" in text.output and "graph: 11 writers" in text.output
    assert text.output.count("\n") < 12


@pytest.mark.parametrize("args,match", [
    (["--model", "/no/such/folder"], "no such folder"),
    (["--seq-len", "8", "--shared-prefix", "8"], "--shared-prefix 8"),
    (["--model", "zoo:nope"], "the zoo has"),
    (["--model", str(FIXTURES / "pythia-12b"), "--seq-len", "100000"],
     "--seq-len 100000 is longer than pythia-12b's context of 2048 tokens; use --seq-len 2048 or fewer"),
    (["--model", __file__], "this is a file; pass the checkpoint folder"),
])
def test_plan_command_errors_are_one_line(args, match):
    res = CliRunner().invoke(main, ["plan", *args])
    assert res.exit_code == 2 and match in res.output and res.output.count("\n") == 1, res.output


def test_plan_reads_a_config_json_path_like_its_folder():
    folder = FIXTURES / "pythia-12b"
    by_file = run("plan", "--model", str(folder / "config.json"), "--seq-len", "2048", "--json")
    assert by_file.exit_code == 0, by_file.output
    assert json.loads(by_file.stdout) == json.loads(run("plan", "--model", str(folder), "--seq-len", "2048",
                                                        "--json").stdout)


def test_plan_answers_without_importing_torch():
    code = ("import sys; from edgeatp.cli import main; "
            f"main(['plan', '--model', {str(FIXTURES / 'pythia-12b')!r}, '--n-pairs', '1000', '--json'], "
            "standalone_mode=False); assert 'torch' not in sys.modules, 'plan imported torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["graph"]["writers"] == 1477
    assert torch.__version__  # the test process itself may import torch
