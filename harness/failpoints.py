"""Named kill points for resume tests: ``HARNESS_FAILPOINT=name[:n]`` SIGKILLs the process the
n-th time (default first) execution passes ``failpoint(name)``. Unset, a call costs one lookup."""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    spec = os.environ.get("HARNESS_FAILPOINT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
