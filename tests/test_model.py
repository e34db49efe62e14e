"""The model adapter: loading, validation and leaving the user's model as it was."""

import time

import pytest
import torch

from edgeatp.errors import ModelError
from edgeatp.model import ModelAdapter, Site, load_model
from edgeatp.model.backend import OpaqueNorm
from edgeatp.patching import patch_nodes
from edgeatp.graph import Node
from edgeatp.setup import Setup

from .conftest import random_pairs, tiny_model

WORDS = ["<bos>", "<unk>"] + [f"w{i}" for i in range(30)]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox-parallel", "gpt_neox-sequential"])
def hf_checkpoint(request, tmp_path_factory):
    """A tiny randomly initialised HF checkpoint with its own word-level tokenizer, saved offline."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    if request.param == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(WORDS), n_positions=16,
                                        bos_token_id=0, eos_token_id=0))
    else:
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(
            hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=len(WORDS),
            max_position_embeddings=16, rotary_pct=0.5, use_parallel_residual=request.param.endswith("parallel"),
            bos_token_id=0, eos_token_id=0))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return path, hf.eval()


def test_local_checkpoint_matches_hugging_face(hf_checkpoint):
    path, hf = hf_checkpoint
    adapter = load_model(str(path))
    tokens = torch.tensor([adapter.tokenizer.encode("w1 w5 w7 w2 w9 w3")])
    with torch.no_grad():
        ours = torch.log_softmax(adapter.forward(tokens), -1)
        theirs = torch.log_softmax(hf(tokens).logits, -1)
    assert (ours - theirs).abs().max() < 1e-4
    assert adapter.shape.n_layers == 2 and adapter.shape.n_heads == 4
    assert adapter.shape.parallel_attn_mlp == ("parallel" in path.name)


def test_unknown_and_uncached_models_fail_fast_with_one_line():
    t = time.time()
    with pytest.raises(ModelError, match="not in the local Hugging Face cache") as exc:
        load_model("gpt2")
    assert time.time() - t < 5 and "\n" not in str(exc.value)
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(ModelError, match="unknown zoo model"):
        load_model("zoo:nope")
    with pytest.raises(ModelError, match="expected a transformer_lens.HookedTransformer"):
        ModelAdapter(torch.nn.Linear(2, 2))


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_is_named():
    with pytest.raises(ModelError, match="edgeatp does not support QK normalisation yet"):
        tiny_model(use_qk_norm=True)
    with pytest.raises(ModelError, match="attention sinks"):
        tiny_model(use_attention_sinks=True)


def test_session_restores_flags_mode_and_hooks_even_on_error():
    adapter = tiny_model()
    m = adapter.model
    m.train()
    m.cfg.use_attn_result = True
    m.cfg.use_split_qkv_input = True
    m.W_E.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.session():
            assert not m.training and not m.cfg.use_attn_result and m.cfg.use_hook_mlp_in
            assert not any(p.requires_grad for p in m.parameters())
            def explode(t):
                raise RuntimeError("boom")
            adapter.forward(torch.zeros(1, 3, dtype=torch.long), [(Site("z", 0), explode)])
    assert m.training and m.cfg.use_attn_result and m.cfg.use_split_qkv_input and not m.cfg.use_hook_mlp_in
    assert not m.W_E.requires_grad and all(p.requires_grad for n, p in m.named_parameters() if n != "embed.W_E")
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in m.hook_dict.values())


def test_algorithms_leave_the_model_as_it_was_and_work_in_eval_mode():
    adapter = tiny_model(seed=3)
    m = adapter.model
    m.train()
    pairs = random_pairs()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    eff = patch_nodes(Setup(adapter, pairs), [Node.parse("a0.h0")])
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert eff.per_pair.shape == (5, 1)


def test_foreign_hooks_are_refused():
    adapter = tiny_model()
    adapter.model.add_hook("blocks.0.attn.hook_z", lambda t, hook: t)
    with pytest.raises(ModelError, match="has hooks attached"):
        patch_nodes(Setup(adapter, random_pairs()), [Node.parse("a0.h0")])
    adapter.model.reset_hooks()


def test_user_flags_do_not_change_results():
    plain = tiny_model(seed=4)
    flagged = tiny_model(seed=4)
    flagged.model.cfg.use_split_qkv_input = True
    flagged.model.cfg.use_attn_result = True
    pairs = random_pairs()
    nodes = [Node.parse("a1.h0"), Node.parse("a0.h1<k>")]
    assert torch.allclose(patch_nodes(Setup(plain, pairs), nodes).per_pair, patch_nodes(Setup(flagged, pairs), nodes).per_pair)


def test_zoo_models_load_in_eval_mode_with_their_vocabulary(zoo_ioi, zoo_induction):
    assert not zoo_ioi.model.training
    assert zoo_ioi.tokenizer.encode("BOS Alice GAVE TO") == [0, 4, 2, 3]
    assert zoo_induction.shape.attn_only and zoo_induction.card["task"] == "induction"


def test_dtype_and_device_options():
    adapter = load_model("zoo:dup", dtype="float64")
    assert adapter.dtype == torch.float64
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model("zoo:dup", dtype="float8")


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre", None])
def test_closed_form_norm_backward_equals_autograd(norm):
    adapter = tiny_model(seed=9, normalization=norm, n_layers=1, scale=1.0)
    ln = adapter.model.blocks[0].ln1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64) * 3
    u = torch.randn(3, 5, 7, 16, generator=g, dtype=torch.float64)
    with torch.enable_grad():
        xe = x.clone().requires_grad_(True)[:, :, None, :].expand(-1, -1, 7, -1)
        (ref,) = torch.autograd.grad(ln(xe), xe, u)
    assert torch.allclose(ModelAdapter.norm_vjp(adapter.backend.norm(0, "ln1"), x, u), ref, atol=1e-12)
    assert torch.allclose(ModelAdapter.norm_vjp(OpaqueNorm(ln), x, u), ref, atol=1e-12)  # a norm without a closed form
    adapter.model.blocks[0].ln1 = torch.nn.Sequential(torch.nn.Identity())  # an unknown module: the autograd path
    assert isinstance(adapter.backend.norm(0, "ln1"), OpaqueNorm)
    assert torch.allclose(ModelAdapter.norm_vjp(adapter.backend.norm(0, "ln1"), x, u), u)


def test_cached_pretrained_names_load_offline_and_restore_the_flags(monkeypatch):
    import os

    import huggingface_hub.constants as hc
    from transformer_lens import HookedTransformer

    import edgeatp.model.loading as em

    seen = {}
    tiny = tiny_model(seed=1).model

    def fake_from_pretrained(name, **kwargs):
        seen["offline"] = (hc.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
        seen["name"] = name
        return tiny

    monkeypatch.setattr(em, "_in_hf_cache", lambda repo: repo == "openai-community/gpt2" or repo == "gpt2")
    monkeypatch.setattr(HookedTransformer, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    adapter = load_model("gpt2")
    assert seen["name"] == "gpt2" and seen["offline"] == (True, "1", "1")
    assert hc.HF_HUB_OFFLINE is False and "TRANSFORMERS_OFFLINE" not in os.environ
    assert adapter.name == "gpt2" and adapter.model is tiny


def test_bad_devices_and_pairs_the_model_cannot_run():
    from edgeatp.errors import DataError
    from edgeatp.graph import Node
    from edgeatp.patching import patch_nodes
    from edgeatp.tasks.pairs import PromptPairs
    import edgeatp as ea

    with pytest.raises(ModelError, match="unknown device 'foo'"):
        load_model("zoo:dup", device="foo")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device; use device cpu"):
            load_model("zoo:dup", device="cuda")
    adapter = tiny_model()  # n_ctx 12, vocabulary 20
    long = PromptPairs.from_lists([list(range(13))], [list(range(13))], [1], [2])
    with pytest.raises(DataError, match="13 tokens exceed tiny's context of 12"):
        patch_nodes(Setup(adapter, long), [Node.parse("a0.h0")])
    big = PromptPairs.from_lists([[1, 25]], [[1, 3]], [1], [2])
    with pytest.raises(DataError, match="pair 0: clean token id 25 is outside tiny's vocabulary 0..19"):
        ea.attribute_edges(Setup(adapter, big))
    with pytest.raises(ea.EdgeatpError, match="the node list is empty"):
        ea.attribute_nodes(Setup(adapter, random_pairs()), nodes=[])
