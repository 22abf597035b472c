"""Progress in a log file: a line per tenth of a bar, live bars only on a terminal."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from harness.progress import LineProgress, print_warning, progress_bars


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=200), out


def test_a_log_gets_one_line_per_tenth_with_the_fields():
    console, out = _console(False)
    with progress_bars(console=console) as bars:
        assert isinstance(bars, LineProgress)
        task = bars.add_task("pretrain", total=500, info="")
        for step in range(1, 501):
            bars.update(task, completed=step, info=f"loss {1 / step:.3g}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("pretrain: 50/500 loss 0.02 [")
    assert lines[-1].startswith("pretrain: 500/500 loss 0.002 [")
    assert all(line.endswith(" s]") for line in lines)


def test_a_bar_that_starts_part_done_reports_only_new_tenths_and_advance_counts():
    console, out = _console(False)
    bars = progress_bars(console=console)
    task = bars.add_task("tta", total=20, completed=10, loss="-")
    bars.advance(task)  # 11/20: still the fifth tenth
    assert out.getvalue() == ""
    bars.advance(task)
    assert len(out.getvalue().splitlines()) == 1
    assert out.getvalue().startswith("tta: 12/20 loss - [")
    bars.update(task, completed=20, description="tta done")
    assert out.getvalue().splitlines()[-1].startswith("tta done: 20/20")
    bars.remove_task(task)


def test_a_terminal_gets_rich_bars_and_disabled_means_silent():
    console, out = _console(True)
    assert isinstance(progress_bars(console=console), Progress)
    console, out = _console(False)
    quiet = progress_bars(console=console, enabled=False)
    with quiet:
        quiet.update(quiet.add_task("x", total=2), completed=2)
    assert out.getvalue() == ""


def test_a_log_gets_no_line_past_the_total_and_empty_fields_are_left_out():
    """A count that passes its total (a last partial batch counted whole) ends at the tenth line;
    a field with no value yet reads as nothing, not as its bare name."""
    console, out = _console(False)
    bars = progress_bars(console=console)
    task = bars.add_task("adapt", total=10, loss="")
    for step in range(1, 14):
        bars.update(task, completed=step)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("adapt: 1/10 [") and lines[-1].startswith("adapt: 10/10 [")


def test_a_total_given_later_is_the_one_counted():
    """The jobs bar grows its total as tuning asks for more trials: lines count against the new total."""
    console, out = _console(False)
    bars = progress_bars(console=console)
    task = bars.add_task("jobs", total=None)
    bars.update(task, completed=1)
    assert out.getvalue() == ""
    bars.update(task, total=4, completed=2)
    assert out.getvalue().startswith("jobs: 2/4 [")


def test_a_terminal_bar_asked_to_vanish_does():
    """A test-time adaptation's bar is transient: it leaves the jobs bar's screen when it ends."""
    console, _ = _console(True)
    assert progress_bars(console=console, transient=True).live.transient is True
    assert progress_bars(console=console).live.transient is False


def test_a_bar_added_after_another_is_removed_gets_an_id_of_its_own():
    """Ids were the count of bars held: removing the first of two gave the next bar the second's id,
    and the second's updates then moved the new bar (as rich's own ids, each is new)."""
    console, out = _console(False)
    bars = progress_bars(console=console)
    first, second = bars.add_task("finetune a", total=2), bars.add_task("finetune b", total=2)
    bars.remove_task(first)
    third = bars.add_task("adapt", total=2)
    assert len({first, second, third}) == 3
    bars.update(second, completed=2)
    bars.update(third, completed=1)
    assert [line.split(" [")[0] for line in out.getvalue().splitlines()] == ["finetune b: 2/2", "adapt: 1/2"]


def test_a_warning_is_printed_under_quiet_as_written_and_quiet_holds_after_it():
    """``-q`` silences progress, never a warning; the warning's text is printed as written (a
    ``[bold]`` in a file name is no markup); the console is quiet again afterwards."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200, quiet=True)
    print_warning(console, "runs/[bold]a[/bold].pt: a zero task vector")
    console.print("progress")
    assert out.getvalue() == "warning runs/[bold]a[/bold].pt: a zero task vector\n"
    assert console.quiet is True


def test_plain_warning_lines_keep_a_configured_logger_and_print_warnings_only(monkeypatch, capsys):
    """A program's own root handler is kept (no second copy of each warning); without one, a
    single handler prints ``message`` lines for warnings and up, as Python's last resort does,
    even from a logger set to INFO. Truth: Python's last-resort handler."""
    import logging

    from harness.progress import plain_warning_lines

    root, own = logging.getLogger(), logging.NullHandler()
    monkeypatch.setattr(root, "handlers", [own])
    plain_warning_lines()
    assert root.handlers == [own]
    monkeypatch.setattr(root, "handlers", [])
    plain_warning_lines()
    plain_warning_lines()
    assert len(root.handlers) == 1
    chatty = logging.getLogger("tests.progress.chatty")
    monkeypatch.setattr(chatty, "level", logging.INFO)
    chatty.info("step 3 of 10")
    chatty.warning("work/k/ckpt.pt: unreadable")
    assert capsys.readouterr().err == "work/k/ckpt.pt: unreadable\n"
