"""Objects named by import path (``pkg.module:Name``), as YAML names user methods and tasks."""

from __future__ import annotations

import importlib
from typing import Any

from harness.errors import did_you_mean


def import_object(path: str) -> Any:
    """The attribute ``Name`` of module ``pkg.module``; KeyError with the reason otherwise."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KeyError(f"cannot import module {module_name!r} ({exc})") from None
    except Exception as exc:  # the module itself is broken: say where, in one line
        where = f" at {exc.filename}:{exc.lineno}" if isinstance(exc, SyntaxError) else ""
        raise KeyError(f"importing module {module_name!r} failed{where}: {type(exc).__name__}: {exc}") from None
    if not attr:
        raise KeyError(f"{path!r} names no object: write module:Name")
    obj = getattr(module, attr, None)
    if obj is None:
        names = [n for n in vars(module) if not n.startswith("_")]
        raise KeyError(f"module {module_name!r} ({getattr(module, '__file__', None) or 'built in'}) has no "
                       f"{attr!r}{did_you_mean(attr, names)}")
    return obj
