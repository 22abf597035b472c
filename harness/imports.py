"""Objects named by import path (``pkg.module:Name``), as YAML names user methods and tasks."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import traceback
import types
from pathlib import Path
from typing import Any

from harness.errors import did_you_mean


def import_object(path: str) -> Any:
    """The attribute ``Name`` of module ``pkg.module``; KeyError with the reason otherwise."""
    module_name, _, attr = path.partition(":")
    module = import_module(module_name)
    if not attr:
        raise KeyError(f"{path!r} names no object: write module:Name")
    obj = getattr(module, attr, None)
    if obj is None:
        names = [n for n in vars(module) if not n.startswith("_")]
        raise KeyError(f"module {module_name!r} ({getattr(module, '__file__', None) or 'built in'}) has no "
                       f"{attr!r}{did_you_mean(attr, names)}")
    return obj


def import_module(module_name: str) -> types.ModuleType:
    """The module ``pkg.module``; KeyError saying whether it was not found or failed to import."""
    if module_name.startswith(".") or module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        folder, _, stem = module_name.removesuffix(".py").replace("\\", "/").rpartition("/")
        raise KeyError(f"{module_name!r} is a file path, not a module: name the module as Python imports it "
                       f"({stem.lstrip('.')!r}, run with PYTHONPATH={folder or '.'})")
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and _names_the_module(exc.name, module_name):
            hint = _beside_hint(module_name) if exc.name == module_name.split(".")[0] else ""  # else the package was found
            raise KeyError(f"cannot import module {module_name!r} ({exc}){hint}") from None
        # The module was found and is broken (a syntax error, an exception, an import of its own
        # that fails): say where, in one line, rather than that the module was not found.
        raise KeyError(f"importing module {module_name!r} failed{_where(exc, module_name)}: "
                       f"{type(exc).__name__}: {exc}") from None


def _beside_hint(module_name: str) -> str:
    """A hint when the module not found lies in the current folder, which the ``harness`` command
    (unlike ``python -m harness``) does not put on the import path."""
    top = module_name.split(".")[0]
    if (Path.cwd() / f"{top}.py").is_file() or (Path.cwd() / top / "__init__.py").is_file():
        return f"; {top} lies in the current folder, which harness does not import from: run PYTHONPATH=. harness ..."
    return ""


def _names_the_module(missing: str | None, module_name: str) -> bool:
    """Whether the module that was not found is ``module_name`` or a package above it."""
    return missing is not None and (module_name == missing or module_name.startswith(missing + "."))


def _where(exc: BaseException, module_name: str) -> str:
    """`` at FILE:LINE``: the line of the failing module the error came from, if known."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" at {exc.filename}:{exc.lineno}"
    try:
        spec = importlib.util.find_spec(module_name)
    except Exception:
        return ""
    origin = spec.origin if spec is not None else None
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == origin]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def source_file(obj: Any) -> str | None:
    """The file that defines ``obj`` (a class or function), None when it has none (a built-in, or
    a class of a ``__main__`` without a file: a notebook's, ``python -c``'s, for which Python
    raises OSError "source code not available")."""
    try:
        return inspect.getsourcefile(obj)
    except (TypeError, OSError):
        return None


def defined_as(obj: Any) -> tuple[str, str]:
    """An object's module and qualified name: what a reloaded module's new definition shares
    with the old one, so a registry takes it in place of the old instead of refusing the name."""
    return getattr(obj, "__module__", "?"), getattr(obj, "__qualname__", repr(obj))
