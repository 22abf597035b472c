"""Reading a sweep file: YAML that keeps SLURM times as written and refuses a key given twice,
and the dotted ``key.path=value`` overrides of the command line."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from harness.config_errors import ConfigError


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError("<command line>", item, "override must look like key.path=value", show_value=False)
    key, _, text = item.partition("=")
    key = key.strip()  # "a.b = 1", quoted whole
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("<command line>", key, "malformed key path", show_value=False)
    index = re.search(r"\[(\d*)\]", key)
    if index:
        dotted = re.sub(r"\[(\d*)\]", lambda m: f".{m.group(1) or 'N'}", key)
        raise ConfigError("<command line>", key, f"list items are dotted indices: write {dotted}={text}",
                          show_value=False)
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader) if text != "" else ""
    except DuplicateKeyError as exc:  # as in a file: plain YAML would keep the last silently
        raise ConfigError("<command line>", key, f"malformed YAML: {exc.problem}", text) from None
    except yaml.YAMLError as exc:
        if text.lstrip().startswith("["):  # a list left unclosed, not a string: told so, not taken as text
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError("<command line>", key, f"malformed YAML list: {problem}", text) from None
        value = text  # a string YAML cannot read alone, such as a pattern '{task}/x.pt'
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str], file: str | None = None) -> dict:
    """Apply ``a.b.0.c=value`` overrides (values parsed as YAML) to a raw config dict. An override
    that does not fit is an error naming it and ``file``, the sweep it was given over."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        try:
            _apply_override(raw, item)
        except ConfigError as exc:
            if file is None or exc.file != "<command line>":
                raise
            raise ConfigError(f"<command line> ({item}, over {file})", exc.path, exc.message, exc.value,
                              exc.show_value) from None
    return raw


def _apply_override(raw: dict, item: str) -> None:
    """Apply one override to ``raw`` in place."""
    parts, value = parse_override(item)
    cur: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                raise ConfigError("<command line>", ".".join(parts[: i + 1]),
                                  f"no list item {part} (list has {len(cur)})", show_value=False)
            if last:
                cur[int(part)] = value
            else:
                if parts[:i] in (["methods"], ["tasks"]) and isinstance(cur[int(part)], str):
                    cur[int(part)] = {"name": cur[int(part)]}  # the short form, given a field
                cur = cur[int(part)]
        elif isinstance(cur, dict):
            if last:
                cur[part] = value
            else:
                if cur.get(part) is None:
                    _no_list_to_index(parts, i)
                    cur[part] = {}
                cur = cur[part]
        else:
            raise ConfigError("<command line>", ".".join(parts[:i]), "is not a mapping or list", cur)


def _no_list_to_index(parts: list[str], i: int) -> None:
    """Refuse an override that indexes (``methods.0.name``) a field ``parts[: i + 1]`` the file does
    not give: a mapping keyed '0' made in its place would be refused as no list, naming no index."""
    index = parts[i + 1]
    if index.isdigit():
        field = ".".join(parts[: i + 1])
        raise ConfigError("<command line>", f"{field}.{index}",
                          f"no list item {index} ({field} is not given: set the whole list, {field}=[...])",
                          show_value=False)


class _SlurmTimeLoader(yaml.SafeLoader):
    """YAML that keeps ``2:30:00`` a string: YAML 1.1 reads it as the base-60 number 9000, so a
    SLURM time (``timeout_min: 2:30:00``, an unquoted ``sbatch: {begin: 16:00}``) would pass as
    another number instead of being refused or handed to sbatch as written."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        return self.construct_scalar(node) if ":" in node.value else super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> Any:
        return self.construct_scalar(node) if ":" in node.value else super().construct_yaml_float(node)


_SlurmTimeLoader.add_constructor("tag:yaml.org,2002:int", _SlurmTimeLoader.construct_yaml_int)
_SlurmTimeLoader.add_constructor("tag:yaml.org,2002:float", _SlurmTimeLoader.construct_yaml_float)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _UniqueKeyLoader(_SlurmTimeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently), and
    keeps a key YAML 1.1 reads as a boolean (``on:``, ``no:``) the word written: every key names a
    field, a task or an option, and ``Keys should be strings (got True)`` named none of them."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.tag == "tag:yaml.org,2002:bool" and key_node.style is None:
                    key_node.tag = "tag:yaml.org,2002:str"
                if key_node.value in seen:
                    several = " (merge several mappings with <<: [*a, *b])" if key_node.value == "<<" else ""
                    raise DuplicateKeyError(None, None, f"key {key_node.value!r} given twice{several}",
                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _utf8_text(path: Path) -> str:
    """The file's text; a file in another encoding (a Latin-1 comment, a checkpoint named by
    mistake) is a config error naming where its first non-UTF-8 byte lies, not a traceback."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(str(path), "", f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, "
                          f"column {column}; save the file as UTF-8", show_value=False) from None


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():  # one line, as for any bad sweep path; naming the sweeps it holds (``sweeps/``)
        found = sorted(p.name for p in path.glob("*.y*ml"))
        held = f" (it holds {', '.join(found[:6])}{', ...' if len(found) > 6 else ''})" if found else ""
        raise ConfigError(str(path), "", f"is a folder, not a sweep file{held}", show_value=False)
    if not path.is_file():
        raise ConfigError(str(path), "", "file does not exist", show_value=False)
    try:
        raw = yaml.load(_utf8_text(path), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(str(path), "", f"malformed YAML: {where}{problem}", show_value=False) from None
    if raw is None:  # no value at all: 'got None' would name one the file does not hold
        raise ConfigError(str(path), "", "the file holds no fields (it is empty or only comments)", show_value=False)
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "", "top level must be a mapping", raw)
    return raw
