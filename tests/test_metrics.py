"""Per-pair metrics."""

import pytest
import torch

from edgeatp.errors import EdgeatpError
from edgeatp.metrics import get_metric
from edgeatp.tasks.pairs import PromptPairs


def _batch():
    pairs = PromptPairs.from_lists([[1, 2, 3], [1, 2]], [[1, 2, 4], [1, 3]], [3, 0], [[1, 2], [4]])
    return pairs.batch(torch.arange(2))


def test_metric_values_at_the_answer_position():
    batch = _batch()
    logits = torch.randn(2, 3, 6, dtype=torch.float64)
    at = torch.stack([logits[0, 2], logits[1, 1]])
    ld = get_metric("logit_diff")(logits, batch)
    assert torch.allclose(ld, torch.stack([at[0, 3] - (at[0, 1] + at[0, 2]) / 2, at[1, 0] - at[1, 4]]))
    lp = get_metric("logprob")(logits, batch)
    assert torch.allclose(lp, torch.log_softmax(at, -1)[[0, 1], [3, 0]])
    assert torch.allclose(get_metric("prob")(logits, batch), lp.exp())
    ref = torch.log_softmax(at, -1)
    assert torch.allclose(get_metric("kl")(logits, batch, ref), torch.zeros(2, dtype=torch.float64))
    other = torch.log_softmax(torch.randn(2, 6, dtype=torch.float64), -1)
    kl = get_metric("kl")(logits, batch, other)
    assert torch.allclose(kl, (other.exp() * (other - ref)).sum(-1)) and bool((kl > 0).all())


def test_metric_errors():
    with pytest.raises(EdgeatpError, match="unknown metric 'acc'; choose from logit_diff"):
        get_metric("acc")
    with pytest.raises(ValueError, match="needs the clean run"):
        get_metric("kl")(torch.zeros(2, 3, 6), _batch())
