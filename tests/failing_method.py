"""A method that always raises, for failure-isolation tests."""

from methods.base import MergeMethod


class AlwaysFails(MergeMethod):
    def merge(self, pretrained, finetuned, ctx):
        raise RuntimeError("deliberate failure")
