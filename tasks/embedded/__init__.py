"""The embedded offline benchmark: eight small 32x32 tasks and a captioned pretraining pool.

Importing the package registers the tasks (``emb_*``) with :func:`tasks.base.register_task`.
"""

from tasks.embedded.data import DATA_VERSION, EMBEDDED_TASKS, SPECS, EmbeddedSourceWarning, load_task, source_variant
from tasks.embedded.pool import pretraining_pool

__all__ = ["DATA_VERSION", "EMBEDDED_TASKS", "SPECS", "EmbeddedSourceWarning", "load_task", "pretraining_pool", "source_variant"]
