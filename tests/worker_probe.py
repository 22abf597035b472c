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


class ThreadProbe(MergeMethod):
    """Reports the threads its merge ran with, those evaluation gets and the job's cores."""

    def merge(self, pretrained, finetuned, ctx):
        import torch

        from harness import runtime

        with runtime.evaluation_threads():
            evaluation = torch.get_num_threads()
        ctx.artifacts["threads"] = {"merge": torch.get_num_threads(), "evaluation": evaluation,
                                    "job_cores": runtime.job_cores()}
        return copy.deepcopy(pretrained)
