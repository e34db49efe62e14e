"""The shipped zoo models reach their recorded accuracy and carry complete cards."""

import pytest
import torch

from edgeatp.model import load_model
from edgeatp.tasks import make_task
from edgeatp.zoo import ZOO, read_card
from edgeatp.zoo.train import _eval_pairs


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
    params = sum(p.numel() for p in load_model(f"zoo:{name}").model.parameters())
    assert params == card["n_params"] and params * 4 < 1_000_000


def test_induction_model_has_a_previous_token_head_feeding_induction_heads(zoo_induction):
    card = zoo_induction.card["attention_scores"]
    H = zoo_induction.shape.n_heads
    prev_head = max(range(H), key=lambda h: card["prev"][h])
    assert max(card["induction"][H:]) > 0.6
    pattern_peak = torch.tensor(card["prev"][:H])
    assert int(pattern_peak.argmax()) == prev_head
