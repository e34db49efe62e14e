"""On CUDA devices: the CPU results, bfloat16 rankings, a memory budget that bounds peak device
memory, a model split over two GPUs and data-parallel NCCL runs. Skipped without CUDA (and the
multi-GPU ones without two GPUs); ``pytest -m gpu`` or ``scripts/gpu_check.sh`` runs them."""

import json

import pytest
import torch

import edgeatp as ea
from edgeatp.attribution import attribute_edges, attribute_nodes
from edgeatp.model.devices import devices_of
from edgeatp.patching import patch_edges
from edgeatp.setup import Setup
from edgeatp.tasks import make_task

from .test_precision import gpt2_shaped, random_task

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    """Equal up to ``rel`` of the largest magnitude (GPU kernels sum in other orders)."""
    assert float((a - b).abs().max()) <= rel * float(a.abs().max().clamp(min=1e-30))


def test_cuda_gives_the_cpu_results():
    cpu, gpu = ea.load_model("zoo:ioi"), ea.load_model("zoo:ioi", device="cuda")
    assert gpu.device.type == "cuda"
    pairs = make_task("ioi", cpu.tokenizer, 24, seed=1)
    here, there = Setup(cpu, pairs, batch_size=8), Setup(gpu, pairs, batch_size=8)
    for method in ("atp", "atp-qk", "atp*", "ig"):
        a, b = attribute_edges(here, method, ig_steps=2), attribute_edges(there, method, ig_steps=2)
        _close(a.scores.cpu(), b.scores.cpu(), 1e-4)
    _close(attribute_nodes(here, "atp*").scores.cpu(), attribute_nodes(there, "atp*").scores.cpu(), 1e-4)
    scores = attribute_edges(here, "atp-qk")
    top = [e for e, *_ in scores.top(5)]
    _close(patch_edges(here, scores.graph, top).per_pair, patch_edges(there, scores.graph, top).per_pair, 1e-4)


def test_bfloat16_on_cuda_ranks_like_float32():
    from scipy.stats import spearmanr

    full = ea.load_model(gpt2_shaped(0), device="cuda")
    low = ea.load_model(gpt2_shaped(0), device="cuda", dtype="bfloat16")
    pairs = random_task(64)
    for method in ("atp-qk", "atp*"):
        a = attribute_edges(Setup(full, pairs), method).scores.flatten().cpu()
        b = attribute_edges(Setup(low, pairs), method).scores.flatten().cpu()
        top = a.argsort(descending=True)[:100]
        assert spearmanr(a[top].numpy(), b[top].numpy()).statistic >= 0.99
        assert set(top[:10].tolist()) == set(b.argsort(descending=True)[:10].tolist())


def test_a_memory_budget_bounds_peak_device_memory():
    model = ea.load_model(gpt2_shaped(1), device="cuda")
    pairs = random_task(64, n=64, length=16)
    peaks = {}
    for budget in (1024.0, 2.0):
        setup = Setup(model, pairs, batch_size=64, memory_budget_mb=budget)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        scores = attribute_edges(setup, "atp*")
        torch.cuda.synchronize()
        peaks[budget] = (torch.cuda.max_memory_allocated() - held) / 2 ** 20
        assert scores.meta["peak_buffer_mb"] <= budget or scores.meta["batch_size"] == 1
    assert peaks[2.0] < peaks[1024.0] / 2, peaks


@two_gpus
def test_a_model_split_over_two_gpus_gives_the_one_gpu_results():
    one = ea.load_model("zoo:ioi", device="cuda:0")
    two = ea.load_model("zoo:ioi", device="cuda:0", n_devices=2)
    assert devices_of(two.model) == [torch.device("cuda:0"), torch.device("cuda:1")]
    pairs = make_task("ioi", one.tokenizer, 16, seed=2)
    for method in ("atp*", "ig"):
        a = attribute_edges(Setup(one, pairs), method, ig_steps=2)
        b = attribute_edges(Setup(two, pairs), method, ig_steps=2)
        _close(a.scores.cpu(), b.scores.cpu(), 1e-5)
    scores = attribute_edges(Setup(one, pairs), "atp-qk")
    top = [e for e, *_ in scores.top(5)]
    _close(patch_edges(Setup(one, pairs), scores.graph, top).per_pair,
           patch_edges(Setup(two, pairs), scores.graph, top).per_pair, 1e-5)


@two_gpus
def test_torchrun_over_two_gpus_with_nccl_matches_one_process(tmp_path):
    from click.testing import CliRunner

    from edgeatp.cli import main

    from .test_distributed import torchrun

    args = ["discover", "--model", "zoo:induction", "--n-pairs", "20", "--batch-size", "8", "--format", "json",
            "--verify", "6", "--device", "cuda"]
    one = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")], catch_exceptions=False)
    assert one.exit_code == 0, one.output
    two = torchrun("-m", "edgeatp", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "circuit.json").read_text()) for d in ("one", "two"))
    assert a["edges"]["in_graph"] == b["edges"]["in_graph"]
    _close(torch.tensor(a["edges"]["score"]), torch.tensor(b["edges"]["score"]), 1e-5)
