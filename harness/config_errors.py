"""Config errors: one line per bad field, naming the file (or the override that set it), the
dotted field path and the value; pydantic's validation errors turned into those lines."""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterable, Iterator, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from harness.errors import FieldError, HarnessError, KeyRefused, closest_name, did_you_mean


class ConfigError(HarnessError):
    """A bad field: ``file: path: message (got value)``. ``further`` holds the sweep's other bad
    fields, when validation found several (each one more line of the message), and ``more`` the
    count of those left out past the last line. ``also`` names other fields the fault lies in as
    much as in ``path`` (a task both ``seen`` and ``unseen``): an override of one of them is blamed."""

    def __init__(self, file: str, path: str, message: str, value: Any = None, show_value: bool = True,
                 further: Iterable["ConfigError"] = (), more: int = 0, also: tuple[str, ...] = ()):
        self.file, self.path, self.value, self.also = file, path, value, also
        self.message, self.show_value = message, show_value
        self.further, self.more = list(further), more
        where = f"{file}: {path}: " if path else f"{file}: "
        got = f" (got {value!r})" if show_value else ""
        self.line = f"{where}{message}{got}"
        lines = [self.line, *(e.line for e in self.further)] + ([f"... and {more} more"] if more else [])
        super().__init__("\n".join(lines))

    @classmethod
    def of_field(cls, file: str, exc: FieldError, overrides: Iterable[str] = ()) -> "ConfigError":
        """A sweep field found at fault once the sweep runs (a device this machine lacks, a SLURM
        option sbatch refuses), named with the sweep file, or the override that set it, as
        validation names a field."""
        return cls(file, exc.field, exc.message, exc.value, show_value=exc.value is not None
                   ).blamed_on_overrides(list(overrides))

    def blamed_on_overrides(self, overrides: list[str], raw: Any = None) -> "ConfigError":
        """The same error, naming the command line when the bad field came from an override (the
        last one of that field: it is the one in effect); each further error likewise. Given
        ``raw``, the file as read, a field missing from a mapping an override made (``tune`` for
        ``methods.0.tune.n_trials=3`` over a file without it) is the override's too."""
        first, further = self._blamed(overrides, raw), [e._blamed(overrides, raw) for e in self.further]
        if first is self and all(a is b for a, b in zip(further, self.further)):
            return self
        return ConfigError(first.file, first.path, first.message, first.value, first.show_value, further, self.more,
                           first.also)

    def _blamed(self, overrides: list[str], raw: Any = None) -> "ConfigError":
        """This error's own line (not the further ones) blamed on the override that set its field,
        or one of the fields it names ``also``, then named as the field at fault."""
        for item in reversed(overrides):
            key = item.partition("=")[0].strip()
            made = made_by_override(raw, key)
            for path in (self.path, *self.also):
                if path and (path == key or path.startswith(key + ".") or key.startswith(path + ".")
                             or (made and path.startswith(made + "."))):
                    return ConfigError(f"<command line> ({item}, over {self.file})", path, self.message,
                                       self.value, self.show_value)
        return self


def _format_loc(loc: tuple, raw: Any = None) -> str:
    """The dotted path of a pydantic error location, without pydantic's own entries (a
    validator's ``function-after[...]``, a union member's type); a key the file has is kept
    whatever its characters."""
    parts: list[str] = []
    absent = object()
    cur = raw
    for p in loc:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and 0 <= p < len(cur):
            cur = cur[p]
        elif cur is not absent and raw is not None and (not isinstance(cur, (dict, list)) or isinstance(cur, list)
                                                        and not isinstance(p, int)):
            continue  # below a value the file gives (a list's items by number): a union member's or a validator's name
        elif p in {"function-after", "function-before", "function-wrap"} or "[" in str(p):
            continue
        else:
            cur = absent
        parts.append(str(p))
    return ".".join(parts)


def _value_at(raw: Any, loc: tuple) -> Any:
    cur = raw
    for p in loc:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and p < len(cur):
            cur = cur[p]
        else:
            return None
    return cur


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _members(t: Any) -> list[Any]:
    """The types of a union but None (``Optional[X]``: ``[X]``); ``[t]`` for any other type."""
    if get_origin(t) not in (Union, types.UnionType):
        return [t]
    return [a for a in get_args(t) if a is not type(None)] or [t]


def _followed(t: Any) -> Any:
    """The type a walk down the schema follows at ``t``: the model among a union's members, else the first."""
    members = _members(t)
    return next((a for a in members if _is_model(a)), members[0])


def _annotations_along(schema: Any, loc: tuple) -> list[Any]:
    """The annotation of each value on the way to ``loc`` under the pydantic model ``schema``:
    ``schema``, then ``loc[:1]``'s, and so on; shorter where ``loc`` leaves the schema. Past a
    union it follows the model among its members, else the first."""
    found = [schema]
    for part in loc:
        current = _followed(found[-1])
        if _is_model(current):
            if part not in current.model_fields:
                break
            found.append(current.model_fields[part].annotation)
        elif get_origin(current) in (list, dict):
            found.append(get_args(current)[-1] if get_args(current) else Any)
        else:
            break
    return found


def _model_at(schema: Any, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model the mapping at ``loc`` is read as under ``schema`` (None when ``loc``
    leads elsewhere)."""
    found = _annotations_along(schema, loc)
    if len(found) <= len(loc):
        return None
    current = _followed(found[-1])
    return current if _is_model(current) else None


def _keys_at(schema: Any, loc: tuple) -> list[str]:
    """The keys the mapping at ``loc`` takes under the pydantic model ``schema`` (none when
    ``loc`` leads elsewhere), for the closest name to an unknown key."""
    model = _model_at(schema, loc)
    return list(model.model_fields) if model is not None else []


def _sbatch_hint(schema: Any, loc: tuple, path: str, raw: Any) -> str:
    """Where an unknown key of a mapping with an ``sbatch`` field belongs, most likely: an sbatch
    option (``exclude: node1``) written beside the executor's fields instead of under ``sbatch``."""
    model = _model_at(schema, loc[:-1]) if schema is not None and loc else None
    if model is None or "sbatch" not in model.model_fields:
        return ""
    parent, _, key = path.rpartition(".")
    section = f"{parent}.sbatch" if parent else "sbatch"
    value = _value_at(raw, loc)
    shown = yaml.safe_dump(value, default_flow_style=True).splitlines()[0] if value is not None else ""
    example = f"{section}.{key}: {shown}" if 0 < len(shown) <= 60 else f"{section}.{key}"
    return f"; an sbatch option goes under {section} ({example})"


def _union_at(schema: Any, loc: tuple) -> tuple | None:
    """The location of the first field on the way to ``loc`` whose type is a union (``float |
    list[float]``), or None: pydantic reports a value that fits no member once per member."""
    for depth, annotation in enumerate(_annotations_along(schema, loc)):
        if len(_members(annotation)) > 1:
            return loc[:depth]
    return None


def _meant_key(err: dict, schema: Any) -> str | None:
    """For an unknown key, the valid key closest to it under ``schema`` (what the did-you-mean names)."""
    loc = tuple(err["loc"])
    return closest_name(str(loc[-1]), _keys_at(schema, loc[:-1])) if schema is not None and loc else None


#: The most errors one validation reports, one line each; a last line counts the rest.
MAX_ERRORS = 20


def validation_error(file: str, exc: ValidationError, raw: Any, prefix: str = "", schema: Any = None) -> ConfigError:
    """Every pydantic error of ``exc`` as one error, a line each (:func:`validation_error_line`),
    at most :data:`MAX_ERRORS` lines and then a count of the rest. An unknown key comes first (the
    line a file with one mistake gets); the rest follow in pydantic's order, each mistake once: a
    field once, a value that fits no member of a union once (pydantic reports it per member), and
    a required field an unknown key misspells not as missing (``task:`` for ``tasks:`` is told
    as the unknown key naming it: the typo is the news)."""
    errors = exc.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    misspelt = {tuple(e["loc"][:-1]) + (meant,) for e in errors if e["type"] == "extra_forbidden"
                and (meant := _meant_key(e, schema)) is not None}
    lines: list[ConfigError] = []
    seen: set[Any] = set()
    unions: dict[tuple, int] = {}
    for err in [first, *(e for e in errors if e is not first)]:
        loc = tuple(err["loc"])
        if err["type"] == "missing" and loc in misspelt:
            continue
        line = validation_error_line(file, err, raw, prefix, schema)
        union = _union_at(schema, loc)
        if union in unions:  # the member reaching deepest into what the file gives says where: a list's bad item
            at = unions[union]
            if line.path.count(".") > lines[at].path.count(".") and line.path not in seen:
                seen.add(line.path)
                lines[at] = line
            continue
        if line.path in seen:
            continue
        seen.add(line.path)
        if union is not None:
            unions[union] = len(lines)
        lines.append(line)
    return gathered(lines)


def gathered(errors: list[ConfigError], one_per_field: bool = False) -> ConfigError:
    """``errors`` (each with its further lines) as one error, a line each in order, no line
    twice, at most :data:`MAX_ERRORS` lines and then a count of the rest. With ``one_per_field``,
    a field an earlier error names is not named again by a later one: two checks finding one
    field at fault (an unknown task, which the embedded suite has no model of either), the
    first says why."""
    lines: list[ConfigError] = []
    told: set[str] = set()
    fields: set[tuple[str, str]] = set()
    more = 0
    for error in errors:
        more += error.more
        group = [line for line in (error, *error.further) if not (one_per_field and (line.file, line.path) in fields)]
        for line in group:
            if line.line not in told:
                told.add(line.line)
                lines.append(line)
        fields |= {(line.file, line.path) for line in group}
    shown = lines[:MAX_ERRORS]
    head = shown[0]
    return ConfigError(head.file, head.path, head.message, head.value, head.show_value, shown[1:],
                       len(lines) - len(shown) + more, head.also)


class Gathering:
    """Runs checks that each raise at their first fault, or collects faults in ``errors``, and
    raises them together (:func:`gathered`): a typo in ``tasks:`` and another in ``methods:``
    are told in one run. ``one_per_field`` where the checks are distinct ones that may meet one
    field."""

    def __init__(self, one_per_field: bool = False) -> None:
        self.errors: list[ConfigError] = []
        self.one_per_field = one_per_field

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as exc:
            self.errors.append(exc)

    def raise_any(self) -> None:
        if self.errors:
            raise gathered(self.errors, self.one_per_field)


def validation_error_line(file: str, err: dict, raw: Any, prefix: str = "", schema: Any = None) -> ConfigError:
    """One pydantic error (an item of ``ValidationError.errors()``) as one line: file, dotted
    path, message, value. An unknown key names, given ``schema``, the closest valid key."""
    loc = tuple(err["loc"])
    path = _format_loc(loc, raw)
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _keys_at(schema, loc[:-1])) if schema is not None and loc else ""
        hint = hint or _sbatch_hint(schema, loc, path, raw)
        return ConfigError(file, path, f"unknown key{hint}", show_value=False)
    if err["type"] == "missing":
        return ConfigError(file, path, "required field is missing", show_value=False)
    value = err.get("input", _value_at(raw, loc))
    refused = (err.get("ctx") or {}).get("error")
    if isinstance(refused, KeyRefused) and isinstance(value, dict):  # the mapping's key at fault, not the mapping
        path, value = f"{path}.{refused.key}", value.get(refused.key)
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "model_type":  # not "... or instance of MethodSpec": the class is no YAML name
        entry = len(loc) == 2 and loc[0] in ("tasks", "methods") and isinstance(loc[1], int)
        msg = "Input should be a name or a mapping" if entry else "Input should be a mapping"
    if err["type"] == "list_type" and len(loc) == 4 and loc[0] == "methods" and loc[2] == "grid":
        shown = yaml.safe_dump(value, default_flow_style=True).splitlines()[0]
        msg = f"a grid takes a list of values (write [{shown}], or give it in params)"
    show = not isinstance(value, dict) or err["type"] not in {"value_error", "assertion_error"}
    short = not isinstance(value, (dict, list)) or len(repr(value)) <= 60  # a whole block would swamp the line
    return ConfigError(file, path, msg, value, show_value=show and short)


def made_by_override(raw: Any, key: str) -> str | None:
    """The dotted path of the first mapping that override ``key`` creates in ``raw`` (the file as
    read), None when every mapping above its field is already there or ``raw`` is not given."""
    if raw is None:
        return None
    parts = key.split(".")
    cur = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        elif isinstance(cur, dict) and cur.get(part) is not None:
            cur = cur[part]
        else:  # absent, null, or below a method or task given by name alone (``- ties``)
            return ".".join(parts[: i + 1])
    return None
