"""Methods that fail in the ways real jobs do, for isolation tests."""

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from methods.base import MergeContext, MergeMethod, PruneTrial, with_state
from methods.task_arithmetic import task_arithmetic_state


class NanWeights(MergeMethod):
    """Returns an encoder whose weights are NaN (a diverged merge)."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        state = task_arithmetic_state(pretrained, finetuned, 0.3)
        return with_state(pretrained, {k: torch.full_like(v, float("nan")) for k, v in state.items()})


class OutOfMemory(MergeMethod):
    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        raise MemoryError()


class NanLoss(MergeMethod):
    """Stops like an adaptation whose loss became NaN."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        loss = torch.tensor(float("nan"))
        if not torch.isfinite(loss):
            raise FloatingPointError("adaptation loss is NaN at step 3")
        return pretrained


class FailsOnce(MergeMethod):
    """Fails the first time (creating ``marker``), works from then on: a transient failure."""

    marker: str

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        import os

        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError("transient failure")
        return with_state(pretrained, task_arithmetic_state(pretrained, finetuned, 0.3))


class ChangesItsInputs(MergeMethod):
    """Returns a fine merge after changing an input in place, in one of the ways code does it."""

    how: str

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        merged = with_state(pretrained, task_arithmetic_state(pretrained, finetuned, 0.3))
        first = next(iter(finetuned.values()))
        with torch.no_grad():
            if self.how == "in_place":
                for p in pretrained.parameters():
                    p.zero_()
            elif self.how == "through_data":  # bypasses the version counter
                next(first.parameters()).data.mul_(0.5)
            elif self.how == "data_replaced":
                p = next(first.parameters())
                p.data = torch.zeros_like(p)
            elif self.how == "head":
                next(iter(ctx.heads.values())).mul_(-1.0)
            elif self.how == "load_state_dict":
                pretrained.load_state_dict(merged.state_dict())
        return merged


class ReadsTestDataUnasked(MergeMethod):
    """Adapts on test data without declaring uses_test_data."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        next(ctx.unlabeled[next(iter(finetuned))]())
        return pretrained


class ReturnsNone(MergeMethod):
    """Forgets to return the merged encoder."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        task_arithmetic_state(pretrained, finetuned, 0.3)


class WrongWidth(MergeMethod):
    """Returns an encoder with a projection of its own: features of another width than the heads'."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        width = next(iter(ctx.heads.values())).shape[1]
        return nn.Sequential(with_state(pretrained, {}), nn.Linear(width, 7))


class NotAnImageEncoder(MergeMethod):
    """Returns a module that cannot take images at all."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        return nn.Linear(5, 3)


class Widget:
    """An object of the method's own, which JSON cannot hold."""

    def __repr__(self) -> str:
        return "Widget(3)"


class OddArtifacts(MergeMethod):
    """Puts what a research method might into ``ctx.artifacts``: tensors (one sparse), numpy values, sets, tuples,
    an object of its own, an infinite ratio, and its adaptation loss as a numpy array with a NaN step."""

    tag: int = 0

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        import threading

        import numpy as np

        ctx.artifacts.update({
            "coefs": torch.tensor([[0.5, 0.25], [1.0, 2.0]]),
            "mask": torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse(),  # as TIES-style masks may be kept
            "array": np.arange(3, dtype=np.int64),
            "scalar": np.float32(0.5),
            "count": np.int64(7),
            "flag": np.bool_(True),
            "tags": {"b", "a", "c"},
            "nested": {"pair": (1, np.float64(2.5)), 3: torch.tensor(1.5)},
            "odd": Widget(),
            "lock": threading.Lock(),  # cannot even be pickled back from a worker process
            "ratio": float("inf"),  # e.g. a norm ratio over a zero task vector
            "tta_loss": np.array([3.0, np.nan, 1.0]),  # one diverged step the method recovered from
        })
        return with_state(pretrained, task_arithmetic_state(pretrained, finetuned, 0.3))


class FailsAdaptingOn(MergeMethod):
    """A test-time-adaptation method whose adaptation fails on one corruption's images only."""

    uses_test_data = True
    corruption: str

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        if ctx.adapted_on.get("corruption") == self.corruption:
            raise FloatingPointError("adaptation loss is NaN at step 3")
        return with_state(pretrained, task_arithmetic_state(pretrained, finetuned, 0.3))


class FailsAdaptingWhile(MergeMethod):
    """A test-time-adaptation method whose adaptation on one corruption fails while the file
    ``flag`` exists (mended between two runs: a transient failure). As AdaMerging and WeMoE do,
    it saves each adaptation in its workdir and resumes a saved one; each adaptation it runs
    (not resumes) appends the corruption adapted on (``None``: clean) to the file ``log``."""

    uses_test_data = True
    corruption: str
    flag: str
    log: str

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        on = ctx.adapted_on.get("corruption")
        saved = Path(ctx.workdir) / "adapted.txt"
        if not saved.is_file():
            with open(self.log, "a") as fh:
                fh.write(f"{on}\n")
            if on == self.corruption and Path(self.flag).exists():
                raise FloatingPointError("adaptation loss is NaN at step 3")
            saved.write_text("adapted")
        return with_state(pretrained, task_arithmetic_state(pretrained, finetuned, 0.3))


class NanRouting(MergeMethod):
    """A fine merge whose reported router task identification (a job metric) is NaN: a router
    whose statistics diverged."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        ctx.artifacts["router_task_id"] = {"mean_per_layer": [float("nan"), 0.5]}
        return with_state(pretrained, task_arithmetic_state(pretrained, finetuned, 0.3))


class InfRouting(MergeMethod):
    """As :class:`NanRouting`, its statistic infinite: an overflow, not a NaN."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        ctx.artifacts["router_task_id"] = {"mean_per_layer": [0.5, float("inf")]}
        return with_state(pretrained, task_arithmetic_state(pretrained, finetuned, 0.3))


class PrunesOutsideAStudy(MergeMethod):
    """Raises PruneTrial in a job no study runs (ctx.report is None): a method's own bug, as a
    failure of its job, not a trial stopped early."""

    def merge(self, pretrained: nn.Module, finetuned: Mapping[str, nn.Module], ctx: MergeContext) -> nn.Module:
        raise PruneTrial("pruned at step 1")
