"""The job's evaluation against hand-counted accuracies: each task scored with its own head,
per-task accuracies averaged (not pooled over images), seen and unseen tasks apart."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from harness.job import evaluate_encoder
from harness.significance import unpack_correct

X, Y = [1.0, 0.0], [0.0, 1.0]
# The encoder is the identity: an image is its own 2-d feature. Head "a" predicts class 0 for
# X and 1 for Y; head "b" the other way round.
HEADS = {"a": torch.eye(2), "b": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
DATA = {
    # head a: 4/4 correct (head b would get 0/4)
    "a": {"test": ([X, Y, X, Y], [0, 1, 0, 1]), "val": ([X, Y], [0, 0])},  # val: 1/2
    # head b predicts 1, 0, 1 -> 2/3 correct (head a would get 1/3)
    "b": {"test": ([X, Y, X], [1, 0, 0]), "val": ([X, Y, Y, Y], [1, 0, 0, 1])},  # val: 3/4
}


def stub_workspace(merge_tasks: list[str]) -> SimpleNamespace:
    def dataset(task, split):
        images, labels = DATA[task][split]
        return TensorDataset(torch.tensor(images), torch.tensor(labels))

    cfg = SimpleNamespace(merge_tasks=merge_tasks, robustness=None,
                          eval=SimpleNamespace(batch_size=2, max_samples=None, precision="fp32"))
    return SimpleNamespace(cfg=cfg, head=lambda t: HEADS[t],
                           task=lambda t: SimpleNamespace(dataset=lambda split: dataset(t, split)),
                           build_free_corrupted_splits=lambda corruptions, adapting: None)  # nothing to build


def test_each_task_is_scored_with_its_own_head_and_the_average_is_per_task():
    correct: dict[str, str] = {}
    m = evaluate_encoder(stub_workspace(["a", "b"]), nn.Identity(), ["a", "b"], torch.device("cpu"),
                         test_correct=correct)
    assert m["acc/a"] == pytest.approx(100.0)
    assert m["acc/b"] == pytest.approx(200 / 3)
    assert m["acc/avg"] == pytest.approx((100 + 200 / 3) / 2)  # pooled over images would be 6/7
    assert m["val/acc/a"] == pytest.approx(50.0) and m["val/acc/b"] == pytest.approx(75.0)
    assert m["val/acc/avg"] == pytest.approx(62.5)
    assert "unseen/avg" not in m
    assert unpack_correct(correct["a"]).tolist() == [True] * 4
    assert unpack_correct(correct["b"]).tolist() == [True, True, False]


def test_unseen_tasks_are_left_out_of_the_average_and_reported_apart():
    m = evaluate_encoder(stub_workspace(["a"]), nn.Identity(), ["a", "b"], torch.device("cpu"))
    assert m["acc/avg"] == m["seen/avg"] == pytest.approx(100.0)
    assert m["val/acc/avg"] == pytest.approx(50.0)
    assert m["unseen/b"] == m["unseen/avg"] == pytest.approx(200 / 3)


def test_a_tuning_trial_is_scored_on_validation_only():
    m = evaluate_encoder(stub_workspace(["a", "b"]), nn.Identity(), ["a", "b"], torch.device("cpu"), test=False)
    assert m == pytest.approx({"val/acc/a": 50.0, "val/acc/b": 75.0, "val/acc/avg": 62.5})


class _ScoredInTrainingMode(nn.Module):
    """Logits are the image itself in eval mode and its negation in training mode (as dropout
    or batch statistics would change them): only an eval-mode forward scores 100%."""

    def forward(self, x):
        return -x if self.training else x


def test_a_classifier_left_in_training_mode_is_scored_in_eval_mode():
    """A method may hand back an encoder still in training mode (after adaptation); evaluation
    scores it with dropout and batch statistics off."""
    from harness.evaluation import correct_predictions

    clf = _ScoredInTrainingMode().train()
    data = TensorDataset(torch.tensor([X, Y, Y, X]), torch.tensor([0, 1, 1, 0]))
    assert correct_predictions(clf, data, batch_size=2).tolist() == [True] * 4


def test_non_finite_logits_are_an_error_not_a_score():
    """argmax takes a NaN for the largest logit: a diverged model would be scored, here 100%."""
    from harness.evaluation import correct_predictions

    data = TensorDataset(torch.tensor([[float("nan"), 0.0], X]), torch.tensor([0, 0]))
    with pytest.raises(FloatingPointError, match="non-finite logits during evaluation"):
        correct_predictions(nn.Identity(), data, batch_size=2)


@pytest.mark.parametrize("label", [-1, 2])
def test_a_label_just_outside_the_heads_classes_is_refused_not_scored_wrong(label):
    """A 2-class head has classes 0 and 1: a label of -1 or 2 matches no prediction, so it would
    count as a miss and lower the accuracy silently instead of naming the bad split."""
    from harness.evaluation import EvaluationDataError, correct_predictions

    data = TensorDataset(torch.tensor([X, Y]), torch.tensor([0, label]))
    with pytest.raises(EvaluationDataError, match=rf"label {label} is outside the head's 2 classes \(0..1\)"):
        correct_predictions(nn.Identity(), data, batch_size=2)


CORRUPTED = {"a": ([X, X], [0, 0]), "b": ([X, X, X, Y], [1, 1, 1, 1])}


class Swap(nn.Module):
    """Swaps the two features: head a then predicts class 1 for X, head b class 0."""

    def forward(self, x):
        return x.flip(-1)


def test_robustness_averages_by_hand():
    from harness.job import robustness_metrics

    ws = stub_workspace(["a", "b"])
    ws.cfg.robustness = SimpleNamespace(tasks=["a", "b"], corruptions=["noise"], severity=1)
    ws.corrupted = lambda t, c: TensorDataset(torch.tensor(CORRUPTED[t][0]), torch.tensor(CORRUPTED[t][1]))
    cpu = torch.device("cpu")
    # identity: a 2/2, b 3/4; clean test accuracies evaluated here: a 100, b 200/3
    m = robustness_metrics(ws, nn.Identity(), cpu)
    assert m["robust/noise/a"] == pytest.approx(100.0) and m["robust/noise/b"] == pytest.approx(75.0)
    assert m["robust/noise/avg"] == pytest.approx(87.5)
    assert m["robust/clean/avg"] == pytest.approx((100 + 200 / 3) / 2)
    # a clean accuracy given is used as given; the adapted encoder scores the corrupted images
    m = robustness_metrics(ws, nn.Identity(), cpu, clean={"a": 10.0}, adapted=lambda c: Swap())
    assert m["robust/clean/avg"] == pytest.approx((10 + 200 / 3) / 2)
    assert m["robust/noise/a"] == pytest.approx(0.0) and m["robust/noise/b"] == pytest.approx(25.0)
    assert m["robust/noise/avg"] == pytest.approx(12.5)


def test_the_clean_column_averages_the_study_tasks_only():
    """The job passes every task's clean accuracy; the study's clean average is over its own tasks."""
    from harness.job import robustness_metrics

    ws = stub_workspace(["a", "b"])
    ws.cfg.robustness = SimpleNamespace(tasks=["a"], corruptions=["noise"], severity=1)
    ws.corrupted = lambda t, c: TensorDataset(torch.tensor(CORRUPTED[t][0]), torch.tensor(CORRUPTED[t][1]))
    m = robustness_metrics(ws, nn.Identity(), torch.device("cpu"), clean={"a": 10.0, "b": 90.0})
    assert m == pytest.approx({"robust/clean/avg": 10.0, "robust/noise/a": 100.0, "robust/noise/avg": 100.0})


def test_study_records_are_read_back_at_their_own_severity_only(tmp_path):
    """A recorded corruption score is reused at the severity it was scored at, never at another."""
    from harness.job import robustness_metrics

    ws = stub_workspace(["a", "b"])
    ws.cfg.robustness = SimpleNamespace(tasks=["a", "b"], corruptions=["noise"], severity=1)
    ws.corrupted = lambda t, c: TensorDataset(torch.tensor(CORRUPTED[t][0]), torch.tensor(CORRUPTED[t][1]))
    cpu = torch.device("cpu")
    first = robustness_metrics(ws, nn.Identity(), cpu, records=tmp_path)
    assert first["robust/noise/a"] == pytest.approx(100.0) and first["robust/noise/b"] == pytest.approx(75.0)
    # the same severity: read back, so the swapped encoder's scores (a 0, b 25) are not evaluated
    again = robustness_metrics(ws, nn.Identity(), cpu, adapted=lambda c: Swap(), records=tmp_path)
    assert again == pytest.approx(first)
    ws.cfg.robustness.severity = 2
    other = robustness_metrics(ws, nn.Identity(), cpu, adapted=lambda c: Swap(), records=tmp_path)
    assert other["robust/noise/a"] == pytest.approx(0.0) and other["robust/noise/b"] == pytest.approx(25.0)
