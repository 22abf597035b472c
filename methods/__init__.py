"""Merge methods: one module per method, each a :class:`MergeMethod` subclass."""

from methods.base import MergeContext, MergeMethod, PruneTrial, available_methods, register_method, resolve_method
from methods import adamerging, task_arithmetic, ties, weight_averaging, wemoe  # noqa: F401,E402  (register)

__all__ = ["MergeContext", "MergeMethod", "PruneTrial", "available_methods", "register_method", "resolve_method"]
