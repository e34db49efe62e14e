"""The shipped zoo models reach their recorded accuracy and carry complete cards."""

import pytest
import torch

from edgeatp.model import load_model
from edgeatp.tasks import make_task
from edgeatp.tokenizer import WordTokenizer
from edgeatp.zoo import WEIGHTS, ZOO, read_card, hooked_config
from edgeatp.zoo.train import _attention_scores, _eval_pairs

def _raw_zoo_model(name):
    """The committed weights in a plain HookedTransformer, without the ModelAdapter."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer

    model = HookedTransformer(hooked_config(name))
    model.load_state_dict(load_file(str(WEIGHTS / f"{name}.safetensors")))
    return model.eval()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_reaches_its_recorded_accuracy(name):
    card = read_card(name)
    adapter = load_model(f"zoo:{name}")
    ev = card["evaluation"]
    pairs = make_task(card["task"], adapter.tokenizer, ev["n_pairs"], seed=ev["seed"])
    got = _eval_pairs(adapter.model, pairs)
    assert got["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-3)
    assert got["accuracy"] >= 0.99
    assert got["clean_logit_diff"] == pytest.approx(ev["clean_logit_diff"], abs=1e-3)
    assert got["clean_logit_diff"] - got["corrupt_logit_diff"] > 4.0
    assert not adapter.model.training


@pytest.mark.parametrize("name", list(ZOO))
def test_cards_document_architecture_task_and_recipe(name):
    card = read_card(name)
    for key in ("architecture", "task", "metric", "known_mechanism", "evaluation", "training", "vocab", "n_params"):
        assert key in card, key
    assert card["training"]["regenerate"] == f"python -m edgeatp.zoo.train {name}"
    assert card["training"]["seed"] == 0 and card["training"]["threads"] == 1
    assert len(card["vocab"]) == card["architecture"]["d_vocab"]
    params = sum(p.numel() for p in _raw_zoo_model(name).parameters())
    assert params == card["n_params"] and params * 4 < 1_000_000
    assert (WEIGHTS / f"{name}.safetensors").stat().st_size < 1_000_000


def test_induction_model_has_a_previous_token_head_feeding_induction_heads(zoo_induction):
    card = zoo_induction.card["attention_scores"]
    H = zoo_induction.shape.n_heads
    prev_head = max(range(H), key=lambda h: card["prev"][h])
    assert max(card["induction"][H:]) > 0.6
    pattern_peak = torch.tensor(card["prev"][:H])
    assert int(pattern_peak.argmax()) == prev_head


def test_llama_induction_card_is_reproduced_from_the_raw_weights():
    """Llama shape (RMSNorm, rotary, gated SiLU, 4 query heads on 2 kv heads, no biases): the
    card's accuracy, logit differences and per-head attention scores from the committed weights."""
    name = "llama-induction"
    card, model, entry = read_card(name), _raw_zoo_model(name), ZOO[name]
    cfg = model.cfg
    assert cfg.n_key_value_heads == 2 < cfg.n_heads == 4 and cfg.gated_mlp and cfg.act_fn == "silu"
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary" and not cfg.default_prepend_bos
    biases = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1].lstrip("_").startswith("b_")}
    assert len(biases) == 6 * cfg.n_layers + 1  # attn b_Q, _b_K, _b_V, b_O; mlp b_in, b_out; unembed b_U
    assert all(not v.any() for v in biases.values())
    ev = card["evaluation"]
    tok = WordTokenizer(entry.vocab, bos="BOS", name=f"zoo:{name}")
    got = _eval_pairs(model, make_task(card["task"], tok, ev["n_pairs"], seed=ev["seed"]))
    assert got["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-3) and got["accuracy"] >= 0.95
    assert got["clean_logit_diff"] == pytest.approx(ev["clean_logit_diff"], abs=1e-3)
    assert got["corrupt_logit_diff"] == pytest.approx(ev["corrupt_logit_diff"], abs=1e-3)
    assert got["clean_logit_diff"] > 4.0 and got["corrupt_logit_diff"] < 0.5
    scores = _attention_scores(model)
    for kind in ("prev", "induction"):
        assert scores[kind] == pytest.approx(card["attention_scores"][kind], abs=0.02), kind
    H, checks = cfg.n_heads, card["mechanism_checks"]
    assert checks["previous_token_head"] == f"a0.h{max(range(H), key=lambda h: scores['prev'][h])}"
    assert all(scores["induction"][H + int(h[-1])] > 0.5 for h in checks["induction_heads"])


def test_llama_induction_exact_edge_patches_match_the_hook_level_checks():
    """edgeatp's exact patches of the shared key/value inputs agree with the card's path patches,
    which were measured with plain TransformerLens hooks (edgeatp/zoo/checks.py)."""
    from edgeatp.graph import EdgeGraph
    from edgeatp.patching import patch_edges
    from edgeatp.setup import Setup
    from edgeatp.zoo.train import EVAL_SEED

    name = "llama-induction"
    checks = read_card(name)["mechanism_checks"]
    adapter = load_model(f"zoo:{name}")
    pairs = make_task("induction", adapter.tokenizer, checks["n_pairs"], seed=checks["seed"])
    assert checks["seed"] == EVAL_SEED + 2
    graph = EdgeGraph.from_shape(adapter.shape)
    edge = {e.name: e for e in graph.edges()}
    cases = {"a0.h0 -> a1 k of kv heads [0] (direct)": ["a0.h0->a1.kv0<k>"],
             "a0.h0 -> a1 k of kv heads [1] (direct)": ["a0.h0->a1.kv1<k>"],
             "a0.h0 -> a1 k of kv heads [0, 1] (direct)": ["a0.h0->a1.kv0<k>", "a0.h0->a1.kv1<k>"],
             "a0.h0 -> a1 v of kv heads [0, 1] (direct)": ["a0.h0->a1.kv0<v>", "a0.h0->a1.kv1<v>"],
             "a0.h0 -> a1 q of query heads [0, 1, 2, 3] (direct)": [f"a0.h0->a1.h{h}<q>" for h in range(4)]}
    effects = patch_edges(Setup(adapter, pairs, direction="noising"), graph,
                          [[edge[n] for n in names] for names in cases.values()])
    clean = checks["clean"]["logit_diff"]
    for label, got in zip(cases, effects.mean.tolist()):
        assert clean + got == pytest.approx(checks["path_patching"][label]["logit_diff"], abs=2e-3), label
