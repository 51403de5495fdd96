"""Progress of long phases on stderr: a rich bar on a terminal, plain periodic lines in a log, nothing
when disabled (stdout stays clean in every case).

    with progress(enabled) as bar:
        task = bar.add("evaluating", total=len(batches))
        for batch in batches:
            ...
            bar.advance(task, info=f"loss {loss:.3f}")

In a log (stderr not a terminal) a task prints a line when it starts, at every tenth of its total and
when it ends: ``evaluating 40/200  loss 1.234  3.1 it/s``.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["progress", "Progress", "plain_line", "due"]


def plain_line(description: str, done: int, total: int, info: str = "", rate: float | None = None) -> str:
    """One progress line: ``description done/total  info  rate it/s`` (empty parts left out)."""
    parts = [f"{description} {done}/{total}"]
    if info:
        parts.append(info)
    if rate is not None:
        parts.append(f"{rate:.1f} it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/it")
    return "  ".join(parts)


def due(before: int, after: int, total: int, parts: int = 10) -> bool:
    """Whether advancing from `before` to `after` of `total` crosses one of `parts` equal marks
    (or reaches the end)."""
    if total <= 0:
        return False
    return after >= total or after * parts // total > before * parts // total


@dataclass
class _Task:
    description: str
    total: int
    done: int
    started: float = field(default_factory=time.perf_counter)
    first: int = 0


class Progress:
    """The tasks of one `progress` block; `add` a task, `advance` it. Disabled: does nothing."""

    def __init__(self, mode: str, bar=None):
        self.mode, self.bar = mode, bar
        self.tasks: list[_Task] = []
        self.ids: list = []

    @property
    def active(self) -> bool:
        """Whether anything is shown (callers may skip building an ``info`` text otherwise)."""
        return self.mode != "off"

    def add(self, description: str, total: int, completed: int = 0) -> int:
        task = _Task(description, int(total), int(completed), first=int(completed))
        self.tasks.append(task)
        if self.mode == "rich":
            self.ids.append(self.bar.add_task(description, total=total, completed=completed, info=""))
        elif self.mode == "plain" and total > 0:
            self._print(task, "")
        return len(self.tasks) - 1

    def advance(self, task_id: int, steps: int = 1, info: str = "") -> None:
        task = self.tasks[task_id]
        before, task.done = task.done, task.done + steps
        if self.mode == "rich":
            self.bar.update(self.ids[task_id], advance=steps, info=info)
        elif self.mode == "plain" and due(before, task.done, task.total):
            self._print(task, info)

    @staticmethod
    def _print(task: _Task, info: str) -> None:
        elapsed = time.perf_counter() - task.started
        rate = (task.done - task.first) / elapsed if task.done > task.first and elapsed > 0 else None
        print(plain_line(task.description, task.done, task.total, info, rate), file=sys.stderr, flush=True)


def _rich_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
        TimeElapsedColumn, TimeRemainingColumn

    return RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True))


def _mode(enabled: bool) -> str:
    if not enabled:
        return "off"
    isatty = getattr(sys.stderr, "isatty", None)
    return "rich" if isatty is not None and isatty() else "plain"


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[Progress]:
    """A `Progress` on stderr: rich on a terminal, plain lines otherwise, silent when not `enabled`."""
    mode = _mode(enabled)
    if mode != "rich":
        yield Progress(mode)
        return
    bar = _rich_bar()
    with bar:
        yield Progress(mode, bar)
