"""Merge methods: one module per method, each a :class:`MergeMethod` subclass."""

from methods.base import MergeContext, MergeMethod, PruneTrial, available_methods, register_method, resolve_method
from methods import task_arithmetic, weight_averaging  # noqa: F401  (registers them)

__all__ = ["MergeContext", "MergeMethod", "PruneTrial", "available_methods", "register_method", "resolve_method"]
