"""A method that always raises, for failure-isolation tests."""

from methods.base import MergeMethod


class AlwaysFails(MergeMethod):
    def merge(self, pretrained, finetuned, ctx):
        raise RuntimeError("deliberate failure")


class AlwaysFailsWithParam(MergeMethod):
    """The same, with a hyperparameter a study can tune."""

    strength: float = 0.5

    def merge(self, pretrained, finetuned, ctx):
        raise RuntimeError(f"deliberate failure at strength {self.strength:.2f}")


class InterruptedAtStrength(MergeMethod):
    """Like a user's Ctrl-C arriving while the trial with ``strength`` above ``stop_above`` runs."""

    strength: float = 0.5
    stop_above: float = 2.0

    def merge(self, pretrained, finetuned, ctx):
        if self.strength > self.stop_above:
            raise KeyboardInterrupt
        from methods.task_arithmetic import TaskArithmetic

        return TaskArithmetic(scaling=self.strength).merge(pretrained, finetuned, ctx)


class FailsWithBrackets(MergeMethod):
    """Fails above ``strength`` 0.5 with an error holding what a console reads as markup."""

    strength: float = 0.5

    def merge(self, pretrained, finetuned, ctx):
        if self.strength > 0.5:
            raise RuntimeError("no head [emb_mnist] under ckpt[/b]")
        from methods.task_arithmetic import TaskArithmetic

        return TaskArithmetic(scaling=self.strength).merge(pretrained, finetuned, ctx)


class FailsUntilMarked(MergeMethod):
    """Fails until the file ``marker`` exists (a transient failure: out of memory, a busy disk),
    then merges as task arithmetic at ``strength``."""

    strength: float = 0.5
    marker: str

    def merge(self, pretrained, finetuned, ctx):
        import os

        if not os.path.exists(self.marker):
            raise RuntimeError("transient failure")
        from methods.task_arithmetic import TaskArithmetic

        return TaskArithmetic(scaling=self.strength).merge(pretrained, finetuned, ctx)


class FailsWithWhatItReads(MergeMethod):
    """Fails with the text of the file ``reason``: a job failing again, for another reason."""

    reason: str

    def merge(self, pretrained, finetuned, ctx):
        from pathlib import Path

        raise RuntimeError(Path(self.reason).read_text())
