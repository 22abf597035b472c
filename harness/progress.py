"""Progress bars that also read well in a log file.

On a terminal, rich draws live bars. Redirected output (a SLURM log, ``nohup``, a pipe) gets
nothing from a live bar until it stops, so there each bar instead prints one plain line every
time it passes another tenth of its total and when it ends: a pretraining run or a long
adaptation in a log file shows that it is alive and how fast it goes.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape


class LineProgress:
    """The part of ``rich.progress.Progress``'s interface the harness uses, printing lines."""

    def __init__(self, console: Console | None = None, steps: int = 10):
        from rich import get_console

        self.console = console or get_console()
        self.steps = steps
        self._tasks: dict[int, dict[str, Any]] = {}
        self._next_id = 0  # never reused, as rich's: a removed bar's id must not name a later one

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0, **fields: Any) -> int:
        task_id, self._next_id = self._next_id, self._next_id + 1
        self._tasks[task_id] = {"description": description, "total": total, "completed": completed,
                                "fields": dict(fields), "start": time.monotonic(),
                                "shown": self._tenth(completed, total)}
        return task_id

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        task = self._tasks[task_id]
        if total is not None:
            task["total"] = total
        if description is not None:
            task["description"] = description
        if completed is not None:
            task["completed"] = completed
        if advance is not None:
            task["completed"] += advance
        task["fields"].update(fields)
        tenth = self._tenth(task["completed"], task["total"])
        if tenth > task["shown"]:
            task["shown"] = tenth
            self._print(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def _tenth(self, completed: float, total: float | None) -> int:
        if not total:
            return 0
        return int(self.steps * min(completed, total) / total)

    def _print(self, task: dict[str, Any]) -> None:
        total = task["total"]
        done = f"{task['completed']:g}/{total:g}"
        extra = " ".join(str(v) if k == "info" else f"{k} {v}" for k, v in task["fields"].items() if v not in ("", None))
        elapsed = time.monotonic() - task["start"]
        line = f"{task['description']}: {done}" + (f" {extra}" if extra else "") + f" [{elapsed:.0f} s]"
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)


def progress_bars(*columns: Any, console: Console | None = None, transient: bool = False,
                  enabled: bool = True) -> Any:
    """rich's ``Progress`` with ``columns`` on a terminal, a :class:`LineProgress` elsewhere."""
    from rich import get_console
    from rich.progress import Progress

    shown = console or get_console()
    if enabled and not shown.is_terminal:
        return LineProgress(shown)
    return Progress(*columns, console=shown, transient=transient, disable=not enabled)


@contextlib.contextmanager
def counting_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """Yields ``advance(k)`` of one transient bar counting to ``total`` (None when not ``enabled``),
    for work whose count is known up front: images corrupted, classes of a zero-shot head."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with progress_bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn(), transient=True) as bars:
        bar = bars.add_task(description, total=total)
        yield lambda k: bars.advance(bar, k)


def print_warning(console: Console, text: str) -> None:
    """Print a warning even when ``-q`` made ``console`` quiet: each names an input or a queued job
    that is likely wrong (a zero task vector, a copy-pasted checkpoint, jobs queued under other
    settings or code), which only the progress output may silence."""
    quiet, console.quiet = console.quiet, False
    try:
        console.print(f"[yellow]warning[/] {escape(text)}", highlight=False)
    finally:
        console.quiet = quiet


def plain_warning_lines() -> None:
    """Warnings as the plain ``path: message`` lines the harness writes elsewhere, all command
    long (the CLI's process and each job's: a pool worker, a SLURM job): Python prints them so
    until something calls ``logging.basicConfig``, and open_clip's module-level
    ``logging.warning`` calls do, once a model is built, switching the rest of the process to
    ``WARNING:name:message``. A root handler in place first makes theirs a no-op."""
    root = logging.getLogger()
    if not root.handlers:  # a program (or test runner) that configured logging keeps its own
        root.addHandler(_StderrNow())


class _StderrNow(logging.StreamHandler):
    """Python's last-resort handler, kept: plain messages, WARNING and up, to whatever
    ``sys.stderr`` is when a record comes (a test runner swaps it between commands)."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.WARNING)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        """Always the current ``sys.stderr`` (the setter keeps ``StreamHandler.__init__`` working)."""
