"""Statistics of joint patches of random subsets (the AtP* paper's Algorithm 1) and the Welch bound.

Pure tensor functions shared by verification (the bound on missed edges) and the research
baselines (Subsampling, the node diagnostic): per item, the counts, means and sample variances of
the effects of the subsets that included / excluded it, the estimate ``ī+ − ī−``, and the one-sided
Welch upper confidence bound ``|ĉ| + t_{ν,1−α}·SE`` on its ``|effect|``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import stats as scipy_stats

from .errors import EdgeatpError, OptionError, option_error


@dataclass(frozen=True, eq=False)
class SubsetStats:
    """Algorithm 1's statistics per node over the subsets that included (+) / excluded (−) it.

    Means are nan for a count of 0 and sample variances (``ddof=1``) nan for a count below 2.
    """

    n_plus: torch.Tensor  # [n] long
    n_minus: torch.Tensor
    mean_plus: torch.Tensor  # [n] float64
    mean_minus: torch.Tensor
    var_plus: torch.Tensor
    var_minus: torch.Tensor

    @property
    def estimate(self) -> torch.Tensor:
        """``ĉ = ī+ − ī−``: the node's expected marginal effect in a random context."""
        return self.mean_plus - self.mean_minus


def subset_statistics(effects: torch.Tensor, included: torch.Tensor) -> SubsetStats:
    """Per-node counts, means and sample variances of subset effects ``[m]`` split by the
    inclusion masks ``[m, n]`` (Algorithm 1's output)."""
    if effects.dim() != 1 or included.dim() != 2 or included.shape[0] != effects.shape[0]:
        raise EdgeatpError("subset statistics need effects [m] and inclusion masks [m, nodes] with the same m")
    e = effects.double()[:, None]
    stats = []
    for mask in (included.bool(), ~included.bool()):
        count = mask.sum(0)
        w = mask.double()
        mean = (w * e).sum(0) / count.double()
        sq = (w * (e - torch.nan_to_num(mean)[None]) ** 2).sum(0)
        var = torch.where(count >= 2, sq / (count.double() - 1), torch.tensor(math.nan, dtype=torch.float64))
        stats.append((count, torch.where(count > 0, mean, torch.tensor(math.nan, dtype=torch.float64)), var))
    (n_p, m_p, v_p), (n_m, m_m, v_m) = stats
    return SubsetStats(n_p, n_m, m_p, m_m, v_p, v_m)


@dataclass(frozen=True, eq=False)
class WelchStats:
    """Per-node Welch quantities behind the bound (all ``[n]`` float64)."""

    estimate: torch.Tensor  # ĉ = ī+ − ī−
    se: torch.Tensor  # sqrt(s+²/m+ + s−²/m−)
    df: torch.Tensor  # Welch–Satterthwaite ν (inf when both variances are 0)
    t_quantile: torch.Tensor  # t_{ν, 1−α}
    upper: torch.Tensor  # |ĉ| + t·SE: the node's own 1−α upper bound on |c|


def welch_upper_bounds(stats: SubsetStats, alpha: float = 0.05, names: Sequence[str] | None = None,
                       kind: str = "node", samples_option: str = "m", p_option: str = "p") -> WelchStats:
    """Per-item ``|ĉ| + t_{ν,1−α}·SE`` from Algorithm 1's statistics (pure; needs ≥ 2 included
    and ≥ 2 excluded samples per item, since fewer leave the variance undefined). The error for
    too few samples names the caller's parameters ``samples_option`` and ``p_option``."""
    if not 0.0 < alpha < 1.0:
        raise option_error(f"{{alpha}}={alpha} must lie strictly between 0 and 1")
    n_p, n_m = stats.n_plus.long(), stats.n_minus.long()
    short = ((n_p < 2) | (n_m < 2)).nonzero()[:, 0]
    if len(short):
        i = int(short[0])
        name = names[i] if names is not None else f"#{i}"
        raise OptionError(
            f"{len(short)} {kind}(s) (first: {name}, included in {int(n_p[i])} and excluded from {int(n_m[i])} "
            "subsets) lack the >= 2 included and >= 2 excluded samples a variance needs, which makes the bound "
            "infinite; raise {samples}, the number of subsets (or move {p} toward 0.5)",
            samples=samples_option, p=p_option)
    a = stats.var_plus.double() / n_p.double()
    b = stats.var_minus.double() / n_m.double()
    se2 = a + b
    den = a ** 2 / (n_p.double() - 1) + b ** 2 / (n_m.double() - 1)
    df = torch.where(den > 0, se2 ** 2 / den.clamp(min=torch.finfo(torch.float64).tiny),
                     torch.tensor(math.inf, dtype=torch.float64))
    t = torch.from_numpy(np.asarray(scipy_stats.t.ppf(1.0 - alpha, df.numpy()), dtype=np.float64))
    se = se2.sqrt()
    estimate = stats.estimate.double()
    return WelchStats(estimate, se, df, t, estimate.abs() + t * se)


def theta_star(stats: SubsetStats, alpha: float = 0.05) -> tuple[float, int]:
    """``θ* = max_n (|ĉ(n)| + t_{ν_n,1−α}·SE_n)`` and the index of the node attaining it."""
    upper = welch_upper_bounds(stats, alpha).upper
    i = int(torch.argmax(upper))
    return float(upper[i]), i
