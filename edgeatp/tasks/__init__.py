"""Tasks: prompt pairs, built-in generators and user files."""

from .builtin import TASKS, TaskSpec, make_task
from .files import load_pairs
from .pairs import Direction, PairBatch, PromptPairs

__all__ = ["TASKS", "TaskSpec", "make_task", "load_pairs", "Direction", "PairBatch", "PromptPairs"]
