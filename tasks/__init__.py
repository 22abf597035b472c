"""Tasks: one module per task family, each registering factories by name."""

from tasks.base import InMemoryTask, Task, TaskDataError, available_tasks, build_task, register_task, resolve_task
from tasks import embedded, synthetic, vision8  # noqa: E402,F401  (register the built-in tasks)

__all__ = ["InMemoryTask", "Task", "TaskDataError", "available_tasks", "build_task", "register_task", "resolve_task"]
