"""Where local workers come from: one server process that imports torch, open_clip and the
harness once, and forks every worker from that state (multiprocessing's forkserver).

A spawned worker imports those libraries itself (6-7 s on 2 cores), so two workers spent
twice the CPU of one import, after the driver's own. The server does it once, and it can be
started before the driver has imported anything heavy, so the two overlap. Workers keep spawn's
other properties: a fresh ``__main__``, the driver's ``sys.path`` and working directory, and
(forwarded by the executor) its environment at the time the pool starts. This module imports
nothing heavy so the command line can start the server first."""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import signal
import warnings
from multiprocessing.context import BaseContext

PRELOAD = ["harness.executors.worker_imports"]
_failed: str | None = None  # why the server could not start in this process
_stop_registered = False


def worker_context() -> BaseContext:
    """The forkserver context with the harness preloaded where the platform has one (Linux,
    macOS) and the server starts, else spawn."""
    if _failed or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def prestart() -> None:
    """Start the server now (returns at once): its imports then run beside the driver's."""
    global _stop_registered, _failed
    if worker_context().get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    try:
        forkserver.ensure_running()
    except OSError as exc:  # no Unix sockets or processes left: workers are spawned instead
        _failed = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"local workers will be spawned: their server did not start ({_failed})", stacklevel=2)
        return
    if not _stop_registered:
        atexit.register(_stop)
        _stop_registered = True


def _stop() -> None:
    """At exit, end a server still importing: it would otherwise outlive the driver by seconds,
    holding the driver's stdout open (a pipe reading it would wait; an idle server exits alone)."""
    from multiprocessing import forkserver

    # multiprocessing keeps the server's pid only privately; where it has moved, nothing is done
    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if not pid:
        return
    with contextlib.suppress(OSError):  # ChildProcessError: not ours (any more)
        if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still running: a pid that exited is never signalled
            os.kill(pid, signal.SIGTERM)
