"""Per-pair metrics of the model output at the answer position.

Every metric returns one value per prompt pair; gradient methods differentiate the *sum*
over a batch, so each pair's gradient is exactly its own (no ``1/B`` to undo).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import EdgeatpError
from .tasks.pairs import PairBatch

MetricFn = Callable[[torch.Tensor, PairBatch, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """A named per-pair metric ``fn(answer_logits [B, V], batch, clean_logprobs [B, V] | None) -> [B]``.

    ``needs_reference`` metrics (KL) compare with the clean run's log-probabilities at the
    answer position, which the caller computes once per batch.
    """

    name: str
    fn: MetricFn
    description: str = ""
    needs_reference: bool = False
    higher_is_better: bool = True  # False for divergences: a larger value means less of the behaviour

    def __call__(self, logits: torch.Tensor, batch: PairBatch, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Metric per pair from full logits ``[B, T, V]``."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        at = logits[rows, batch.answer_pos.to(logits.device)]
        at = at.to(torch.promote_types(at.dtype, torch.float32))  # low-precision logits: metric in float32
        if self.needs_reference and reference is None:
            raise ValueError(f"metric {self.name} needs the clean run's log-probabilities")
        return self.fn(at, batch, reference)


def _gather(at: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return at.gather(-1, tokens.to(at.device)[:, None])[:, 0]


def _logit_diff(at: torch.Tensor, batch: PairBatch, _: torch.Tensor | None) -> torch.Tensor:
    wrong = batch.wrong.to(at.device)
    valid = wrong >= 0
    wl = at.gather(-1, wrong.clamp(min=0))
    mean_wrong = (wl * valid).sum(-1) / valid.sum(-1)
    return _gather(at, batch.answer) - mean_wrong


def _logprob(at: torch.Tensor, batch: PairBatch, _: torch.Tensor | None) -> torch.Tensor:
    return _gather(torch.log_softmax(at, -1), batch.answer)


def _prob(at: torch.Tensor, batch: PairBatch, _: torch.Tensor | None) -> torch.Tensor:
    return _gather(torch.softmax(at, -1), batch.answer)


def _kl(at: torch.Tensor, batch: PairBatch, ref: torch.Tensor | None) -> torch.Tensor:
    logp = torch.log_softmax(at, -1)
    assert ref is not None
    return (ref.exp() * (ref - logp)).sum(-1)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("logit_diff", _logit_diff, "logit of the answer minus the mean logit of the wrong answers"),
        Metric("logprob", _logprob, "log-probability of the answer"),
        Metric("prob", _prob, "probability of the answer"),
        Metric("kl", _kl, "KL divergence from the clean run's next-token distribution", needs_reference=True,
               higher_is_better=False),
    )
}


def sign_convention(direction: str, metric: str | Metric = "logit_diff") -> str:
    """What the sign of an effect means for a direction and a metric (custom metrics: higher = more behaviour)."""
    m = metric if isinstance(metric, Metric) else METRICS.get(metric)
    better = m.higher_is_better if m is not None else True
    if str(getattr(direction, "value", direction)) == "noising":
        return ("effect = metric(clean run with corrupt values patched in) - metric(clean run); "
                f"{'negative' if better else 'positive'} = the patch destroys the behaviour")
    return ("effect = metric(corrupt run with clean values patched in) - metric(corrupt run); "
            f"{'positive' if better else 'negative'} = the patch restores the behaviour")


def get_metric(metric: str | Metric) -> Metric:
    """A metric by name (``logit_diff``, ``logprob``, ``prob``, ``kl``) or a :class:`Metric` as is."""
    if isinstance(metric, Metric):
        return metric
    if metric not in METRICS:
        raise EdgeatpError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return METRICS[metric]
