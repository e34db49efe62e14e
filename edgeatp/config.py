"""What ``edgeatp discover`` is asked to do, checked before any heavy import or any work.

:class:`DiscoverConfig` records every option (it is saved in the circuit, so ``edgeatp verify``
can rerun on the same model and data). :func:`check_config` refuses contradictory or impossible
options at once, and does not import torch, so mistakes are reported in well under a second.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any

from .errors import OptionError, option_error
from .methods import get_method

SELECTION_RULES = ("top_k", "threshold", "cumulative", "greedy")
LEVEL_CHOICES = ("edge", "node", "neuron")
METRIC_CHOICES = ("logit_diff", "logprob", "prob", "kl")
DTYPE_CHOICES = ("float32", "float64", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")  # what torch.device takes and edgeatp runs on
BACKEND_CHOICES = ("auto", "hooked", "bridge")


@dataclass(frozen=True)
class DiscoverConfig:
    """Everything ``edgeatp discover`` was asked for (recorded in the circuit for re-verification)."""

    model: str = "zoo:ioi"
    task: str | None = None
    data: str | None = None
    n_pairs: int = 64
    metric: str = "logit_diff"
    method: str = "atp-qk"
    level: str = "edge"
    positions: bool = False
    group: str | None = None
    top_k: int | None = None
    threshold: float | None = None
    cumulative: float | None = None
    greedy: int | None = None
    target: float = 0.8
    n_verify: int = 20
    sample_below: int = 20
    bound: bool = False
    bound_samples: int = 256
    bound_p: float = 0.05
    direction: str = "noising"
    device: str | None = None  # None: torch's default device (the host unless changed)
    n_devices: int = 1
    dtype: str | None = None
    batch_size: int = 32
    memory_budget: float = 1024.0
    offload: bool = False
    seed: int = 0
    allow_download: bool = False
    threads: int | None = None  # None: one thread for small models (multi-threading only adds overhead there)
    refine: bool = False
    refine_budget: int = 2000
    refine_sizes: str | None = None  # comma list of edge counts or "mib"; None: the curve's sizes up to the circuit's
    backend: str = "auto"  # TransformerLens class: hooked (HookedTransformer), bridge (TransformerBridge), auto

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the saved configuration") -> "DiscoverConfig":
        """A config from saved JSON data; unknown keys are refused with their names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OptionError(f"{where} has unknown option(s) {', '.join(unknown)}; it was written by another "
                              "edgeatp version: pass the options yourself ({model}, {task} or {data})",
                              model="model", task="task", data="data")
        return cls(**data)


def check_config(cfg: DiscoverConfig) -> str | None:
    """Refuse contradictory or impossible options; return the selection rule given (if any)."""
    rules = [r for r in SELECTION_RULES if getattr(cfg, r) is not None]
    if len(rules) > 1:
        raise option_error("choose one of {top_k}, {threshold}, {cumulative} and {greedy}")
    rule = rules[0] if rules else None
    if cfg.level not in LEVEL_CHOICES:
        raise option_error(f"{{level}} {cfg.level!r} is unknown; choose from {', '.join(LEVEL_CHOICES)}")
    if cfg.metric not in METRIC_CHOICES:
        raise option_error(f"{{metric}} {cfg.metric!r} is unknown; choose from {', '.join(METRIC_CHOICES)}")
    if cfg.direction not in ("noising", "denoising"):
        raise option_error(f"{{direction}} {cfg.direction!r} is unknown; use noising or denoising")
    if cfg.backend not in BACKEND_CHOICES:
        raise option_error(f"{{backend}} {cfg.backend!r} is unknown; choose from {', '.join(BACKEND_CHOICES)}")
    if cfg.dtype is not None and cfg.dtype not in DTYPE_CHOICES:
        raise option_error(f"{{dtype}} {cfg.dtype!r} is unknown; choose from {', '.join(DTYPE_CHOICES)}")
    if cfg.device is not None and not DEVICE_PATTERN.fullmatch(cfg.device):
        raise option_error(f"{{device}} {cfg.device!r} is unknown; use cpu, cuda, cuda:N, mps or xpu")
    level = "group" if cfg.group and cfg.level != "edge" else cfg.level
    method = get_method(cfg.method, "node" if level == "neuron" else level)
    if cfg.level != "edge" and rule not in (None, "top_k"):
        raise option_error(f"{{{rule}}} works on edges; node and neuron circuits use {{top_k}}")
    if cfg.task and cfg.data:
        raise option_error("give either {task} or {data}, not both")
    if cfg.task:
        from .tasks.builtin import task_spec  # torch-free, imported only when a task is named

        task_spec(cfg.task)
    if cfg.n_pairs < 1:
        raise option_error("{n_pairs} must be at least 1")
    if cfg.n_devices < 1:
        raise option_error("{n_devices} must be at least 1")
    if cfg.batch_size < 1:
        raise option_error("{batch_size} must be at least 1")
    if not math.isfinite(cfg.memory_budget) or cfg.memory_budget <= 0:
        raise option_error("{memory_budget} must be a positive number of megabytes")
    if cfg.threads is not None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cfg.threads < 1 or cfg.threads > cores:
            raise option_error(f"{{threads}} must lie in 1..{cores} (the cores of this machine), got {cfg.threads}")
    if cfg.top_k is not None and cfg.top_k < 0:
        raise option_error("{top_k} must be non-negative")
    if cfg.threshold is not None and (not math.isfinite(cfg.threshold) or cfg.threshold < 0):
        raise option_error(f"{{threshold}} must be a non-negative number (scores are magnitudes), got {cfg.threshold}")
    if cfg.cumulative is not None and not 0 < cfg.cumulative <= 1:
        raise option_error(f"{{cumulative}} must be a share in (0, 1], got {cfg.cumulative}")
    if cfg.greedy is not None and cfg.greedy < 1:
        raise option_error("{greedy} must be at least 1")
    if not math.isfinite(cfg.target):
        raise option_error("{target} must be a number")
    if cfg.n_verify < 0 or cfg.sample_below < 0:
        raise option_error("{n_verify} and {sample_below} must be non-negative")
    if cfg.bound and (cfg.bound_samples < 2 or not 0 < cfg.bound_p < 1):
        raise option_error("{bound} needs {bound_samples} >= 2 and 0 < {bound_p} < 1")
    if cfg.level == "edge" and cfg.group not in (None, "layer"):
        raise option_error("at edge level {group} takes 'layer' (edges between whole layers); node groups "
                           "(head, span:..., files) go with {level} node")
    if cfg.greedy is not None and cfg.positions:
        raise option_error("{greedy} works on position-aggregated graphs; drop {positions}")
    if cfg.bound and cfg.level != "edge":
        raise option_error("{bound} bounds missed edges; it works with {level} edge")
    if cfg.group and cfg.level != "edge" and cfg.positions:
        raise option_error("node groups carry their own positions (e.g. span:0-3); drop {positions}")
    if cfg.group == "layer" and cfg.level == "edge" and cfg.positions:
        raise option_error("coarse edges between layers are position-aggregated; drop {positions}")
    if cfg.refine and cfg.level != "edge":
        raise option_error("{refine} searches edge circuits; drop it or use {level} edge")
    if cfg.refine_sizes is not None and not cfg.refine:
        raise option_error("{refine_sizes} says what {refine} searches; add {refine} or drop it")
    if cfg.refine_budget < 1:
        raise option_error("{refine_budget} must be a positive number of forwards")
    parse_sizes(cfg.refine_sizes, "refine_sizes")
    if method.is_estimate and cfg.metric == "kl" and cfg.direction == "noising":
        raise option_error("{metric} kl has zero gradient at the clean run, so gradient methods cannot estimate "
                           "noising effects with it; use {direction} denoising, another metric or {method} exact")
    return rule


def parse_sizes(spec: str | None, option: str = "sizes") -> tuple[int, ...] | str | None:
    """Circuit sizes to search: a comma list of positive edge counts, ``"mib"`` (MIB's grid) or ``None``."""
    if spec is None or spec.strip().lower() == "mib":
        return None if spec is None else "mib"
    try:
        sizes = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(k < 1 for k in sizes):
        raise OptionError(f"{{{option}}} {spec!r}: give positive edge counts separated by commas (e.g. 5,10,20) "
                          "or mib", **{option: option})
    return sizes
