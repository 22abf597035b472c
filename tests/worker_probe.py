"""Methods that report which process ran them, or kill it, for executor tests."""

import copy
import os

from methods.base import MergeMethod


class WorkerPid(MergeMethod):
    tag: int = 0

    def merge(self, pretrained, finetuned, ctx):
        ctx.artifacts["pid"] = os.getpid()
        return copy.deepcopy(pretrained)


class KillsWorker(MergeMethod):
    def merge(self, pretrained, finetuned, ctx):
        os._exit(3)  # a worker that dies mid-job (out of memory, killed)


class EnvProbe(MergeMethod):
    """Reports the environment variables named ``HARNESS_PROBE_*`` of the process that ran it."""

    def merge(self, pretrained, finetuned, ctx):
        ctx.artifacts["env"] = {k: v for k, v in os.environ.items() if k.startswith("HARNESS_PROBE_")}
        return copy.deepcopy(pretrained)
