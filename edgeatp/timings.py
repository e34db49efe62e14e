"""Where a run's time goes: named phases in wall and CPU seconds (``edgeatp discover --timings``).

The pipeline calls :func:`mark` where a phase ends (load, attribute, select, metrics — MIB's
CPR/CMD of the ranking —, refine, verify); a mark costs nothing unless a :func:`recording` is
active, so library calls are untouched. A phase marked twice (an attribution run for a second
view, say) adds up under its name.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class Timings:
    """Wall and CPU seconds per phase, in the order phases first ended; the clock starts at creation."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    _last: tuple[float, float] = field(default_factory=lambda: (time.perf_counter(), time.process_time()))

    def mark(self, phase: str) -> None:
        """End ``phase`` now: the time since the previous mark is its."""
        now = (time.perf_counter(), time.process_time())
        self.wall[phase] = self.wall.get(phase, 0.0) + now[0] - self._last[0]
        self.cpu[phase] = self.cpu.get(phase, 0.0) + now[1] - self._last[1]
        self._last = now

    def describe(self) -> str:
        """One line: each phase's wall seconds, then the total and the CPU seconds."""
        phases = ", ".join(f"{name} {s:.2f}" for name, s in self.wall.items())
        return (f"{phases} s wall (total {sum(self.wall.values()):.2f} s); "
                f"CPU {', '.join(f'{name} {s:.2f}' for name, s in self.cpu.items())} s")


_ACTIVE: ContextVar[Timings | None] = ContextVar("edgeatp_timings", default=None)


def mark(phase: str) -> None:
    """End ``phase`` of the recording in progress, if any."""
    timings = _ACTIVE.get()
    if timings is not None:
        timings.mark(phase)


@contextmanager
def recording() -> Iterator[Timings]:
    """Record the phases marked inside the block (the clock starts on entry)."""
    timings = Timings()
    token = _ACTIVE.set(timings)
    try:
        yield timings
    finally:
        _ACTIVE.reset(token)
