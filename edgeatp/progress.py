"""Progress displays for long work: a bar on a terminal, plain lines in a pipe or a log file, or nothing.

A :data:`Progress` is a callable ``(description, total) -> context manager`` whose value has
``update(n)``. Library functions take one (default: silent); the command line picks
:func:`for_stream`, which draws a tqdm bar only when the stream is a terminal and otherwise
writes plain lines for the tasks that take a while, so logs carry no carriage-return debris.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Protocol, TextIO


class Bar(Protocol):
    """What a running progress display accepts."""

    def update(self, n: int = 1) -> None:
        """``n`` more steps are done."""


Progress = Callable[[str, int], ContextManager[Bar]]


class _Silent:
    def update(self, n: int = 1) -> None:
        """Ignore progress."""


@contextmanager
def silent(description: str, total: int) -> Iterator[Bar]:
    """No display at all (the library's default)."""
    yield _Silent()


class _Lines:
    """Counts steps; reports every ``every`` seconds while a task runs and once at its end,
    but only for tasks that take at least ``after`` seconds (short ones stay silent)."""

    def __init__(self, stream: TextIO, description: str, total: int, after: float, every: float) -> None:
        self.stream, self.description, self.total = stream, description, total
        self.after, self.every = after, every
        self.done = 0
        self.t0 = time.perf_counter()
        self.next_report = self.t0 + after

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now >= self.next_report and self.done < self.total:
            self.stream.write(f"{self.description}: {self.done}/{self.total} steps, {now - self.t0:.0f} s\n")
            self.stream.flush()
            self.next_report = now + self.every

    def close(self) -> None:
        elapsed = time.perf_counter() - self.t0
        if elapsed >= self.after:
            self.stream.write(f"{self.description}: {self.done}/{self.total} steps in {elapsed:.1f} s\n")
            self.stream.flush()


def lines(stream: TextIO, after: float = 5.0, every: float = 30.0) -> Progress:
    """Plain lines for pipes and log files: a line every ``every`` seconds while a task runs and
    one when it ends, for tasks that take ``after`` seconds or more."""
    @contextmanager
    def show(description: str, total: int) -> Iterator[Bar]:
        bar = _Lines(stream, description, total, after, every)
        yield bar
        bar.close()
    return show


def bar(stream: TextIO) -> Progress:
    """A tqdm bar that disappears when done (for terminals)."""
    @contextmanager
    def show(description: str, total: int) -> Iterator[Bar]:
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=description, leave=False, file=stream) as t:
            yield t
    return show


def for_stream(stream: TextIO | None = None) -> Progress:
    """A bar when ``stream`` (default stderr) is a terminal, plain lines otherwise."""
    s = stream if stream is not None else sys.stderr
    return bar(s) if s.isatty() else lines(s)
