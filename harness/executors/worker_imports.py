"""Imported once by the worker server (see ``server``): the modules every job needs, with
open_clip imported the harness's way. A failure here is left to the worker, which repeats the
import when it builds the model and reports the error as a job failure."""

try:
    import harness.executors.local  # noqa: F401  (torch, the job runner, methods, tasks)
    from harness.models import open_clip_module

    open_clip_module()
except Exception:  # noqa: BLE001
    pass
