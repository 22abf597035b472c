"""Tasks: one module per task family, each registering factories by name."""

from tasks.base import InMemoryTask, Task, TaskDataError, available_tasks, build_task, register_task, resolve_task

__all__ = ["InMemoryTask", "Task", "TaskDataError", "available_tasks", "build_task", "register_task", "resolve_task"]

from tasks import synthetic  # noqa: E402,F401  (registers the toy tasks)
