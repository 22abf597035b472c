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
