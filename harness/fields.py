"""One validation rule shared by every YAML-facing model (the sweep's blocks, each method's
hyperparameters): a boolean is never taken as a number.

pydantic's lax mode reads ``true`` as 1 for an ``int`` or ``float`` field, so ``steps: true``
(a slip for another key, or ``steps: yes``) would run one step without a word. Strings such as
``1e-3`` (a string to YAML 1.1) still convert: that leniency is wanted."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationInfo


def _takes_numbers_only(ann: Any) -> bool:
    """Whether ``ann`` accepts numbers and not booleans (int, float, int|None, Literal[0, 1])."""
    origin = get_origin(ann)
    if origin is Literal:
        values = get_args(ann)
        return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        return any(_takes_numbers_only(a) for a in args) and bool not in args
    return ann in (int, float)


def no_bool_for_number(cls: Any, value: Any, info: ValidationInfo) -> Any:
    """A ``field_validator("*", mode="before")`` body: refuses ``true``/``false`` for a number."""
    if isinstance(value, bool) and info.field_name:
        field = cls.model_fields.get(info.field_name)
        if field is not None and _takes_numbers_only(field.annotation):
            raise ValueError(f"expects a number, not the boolean {str(value).lower()}")
    return value
