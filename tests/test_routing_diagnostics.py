"""Whether entropy picks WeMoE's right expert: hand-computed cases and the perfect-routing bound."""

from __future__ import annotations

import math

import pytest
import torch

from harness.config import validate_config
from harness.routing_diagnostics import ExpertScores, diagnose, expert_scores
from harness.runner import run_sweep
from harness.workspace import Workspace
from tests.conftest import TOY_TASKS


def _entropy(row: list[float]) -> float:
    z = [math.exp(v) for v in row]
    p = [v / sum(z) for v in z]
    return -sum(q * math.log(q) for q in p)


# Task "a"'s four images under its own expert "a" and under "b"; labels 0, 0, 0, 1.
OWN = [[3.0, 0.0], [0.0, 0.1], [2.0, 0.0], [0.0, 0.05]]
OTHER = [[0.0, 5.0], [1.0, 0.0], [0.5, 0.0], [0.2, 0.0]]
LABELS = [0, 0, 0, 1]


def test_diagnose_matches_a_hand_computed_case():
    scores = ExpertScores("a", ["a", "b"], torch.tensor([OWN, OTHER]), torch.zeros(4, 2), torch.tensor(LABELS))
    d = diagnose(scores, batch_size=4)
    # Own expert: right on images 0, 2, 3 (image 1's argmax is class 1).
    assert d.own == pytest.approx(75.0)
    # Lowest entropy per image: b (confident and wrong), b, a, b -> own on 1 of 4; those experts
    # are wrong, right, right, wrong.
    assert [_entropy(o) < _entropy(x) for o, x in zip(OWN, OTHER)] == [False, False, True, False]
    assert d.identified == pytest.approx(25.0)
    assert d.min_entropy == pytest.approx(50.0)
    # Right images' entropies against the wrong one's: images 0 and 2 are more certain, image 3 less.
    assert d.auroc == pytest.approx(2 / 3)
    assert d.entropy_start == pytest.approx(math.log(2))  # uniform predictions
    assert d.entropy_own == pytest.approx(sum(map(_entropy, OWN)) / 4)
    assert d.entropy_min == pytest.approx(sum(min(_entropy(o), _entropy(x)) for o, x in zip(OWN, OTHER)) / 4)
    # One batch of all four: the expert with the lower mean entropy.
    own_wins = sum(map(_entropy, OWN)) < sum(map(_entropy, OTHER))
    assert d.identified_batch == (100.0 if own_wins else 0.0)


def test_diagnose_scores_the_own_expert_wherever_it_stands_among_the_experts():
    """Task "b" is the second expert: the hand-computed case above, its experts' order reversed,
    gives the same measures (its own expert is not the first one)."""
    first = diagnose(ExpertScores("a", ["a", "b"], torch.tensor([OWN, OTHER]), torch.zeros(4, 2),
                                  torch.tensor(LABELS)), batch_size=4)
    second = diagnose(ExpertScores("b", ["a", "b"], torch.tensor([OTHER, OWN]), torch.zeros(4, 2),
                                   torch.tensor(LABELS)), batch_size=4)
    assert (second.own, second.identified, second.min_entropy) == (pytest.approx(75.0), pytest.approx(25.0),
                                                                   pytest.approx(50.0))
    assert second.auroc == pytest.approx(2 / 3)
    assert {**vars(second), "task": "a"} == vars(first)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batches_of_one_image_choose_and_score_as_each_image_does(seed):
    """With one image per batch the shuffle only reorders images: the batch measures are the
    per-image ones, whichever order the seed gives."""
    scores = ExpertScores("b", ["a", "b"], torch.tensor([OTHER, OWN]), torch.zeros(4, 2), torch.tensor(LABELS))
    d = diagnose(scores, batch_size=1, seed=seed)
    assert d.identified_batch == pytest.approx(d.identified) and d.batch_accuracy == pytest.approx(d.min_entropy)


def test_diagnose_temperature_changes_the_choice_not_the_predictions():
    """Image 0: own [1, 0, 0] against other [0, 1.6, 1.6]. Sharp heads make the other's tie at the
    top the more uncertain; flat ones compare the logits' spread, where the other's is larger."""
    own = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    other = [[0.0, 1.6, 1.6], [0.0, 0.0, 0.0]]
    scores = ExpertScores("a", ["a", "b"], torch.tensor([own, other]), torch.tensor(own), torch.tensor([0, 0]))
    for t in (0.25, 1.0, 4.0):
        d = diagnose(scores, temperature=t, batch_size=1)
        expected = [_entropy([v / t for v in o]) < _entropy([v / t for v in x]) for o, x in zip(own, other)]
        assert d.identified == pytest.approx(100.0 * sum(expected) / 2)
        assert d.own == pytest.approx(100.0)
    assert diagnose(scores, temperature=0.25, batch_size=1).identified == pytest.approx(100.0)
    assert diagnose(scores, temperature=4.0, batch_size=1).identified == pytest.approx(50.0)


def test_diagnose_with_diversity_weight_prefers_the_expert_whose_batch_spreads_over_classes():
    """One batch of two images, labels 0 and 1. The own expert is confident in both, rightly;
    the other is more confident still, in class 0 for both. Entropy alone picks the other
    (batch accuracy 50%); minus the entropy of the batch's mean prediction (log 2 for the own
    expert, about 0 for the other), the own (100%)."""
    own, other = [[5.0, 0.0], [0.0, 5.0]], [[9.0, 0.0], [9.0, 0.0]]
    scores = ExpertScores("a", ["a", "b"], torch.tensor([own, other]), torch.tensor(own), torch.tensor([0, 1]))
    assert sum(map(_entropy, other)) < sum(map(_entropy, own))
    plain = diagnose(scores, batch_size=2)
    assert (plain.identified_batch, plain.batch_accuracy) == (0.0, pytest.approx(50.0))
    q = math.exp(9.0) / (math.exp(9.0) + 1)  # the other's mean prediction: (q, 1 - q)
    margin = (sum(map(_entropy, own)) / 2 - math.log(2)) - (sum(map(_entropy, other)) / 2 + q * math.log(q)
                                                             + (1 - q) * math.log(1 - q))
    assert margin < 0  # with weight 1 the own expert's objective is the lower
    diverse = diagnose(scores, batch_size=2, diversity_weight=1.0)
    assert (diverse.identified_batch, diverse.batch_accuracy) == (100.0, pytest.approx(100.0))
    assert diverse.identified == plain.identified  # per image: entropy alone, as before


def test_diagnose_refuses_a_split_smaller_than_a_batch():
    scores = ExpertScores("a", ["a", "b"], torch.tensor([OWN, OTHER]), torch.tensor(OWN), torch.tensor(LABELS))
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        diagnose(scores, batch_size=16)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_own_expert_is_the_perfect_routing_bound_and_the_start_is_task_arithmetic(sweep_dict, precision):
    """At either eval.precision the diagnosis scores the models the sweep's own jobs scored."""
    d = dict(sweep_dict, methods=[{"name": "task_arithmetic", "params": {"scaling": 0.4}}],
             references={"perfect_routing": True, "routing_bound_lambda": 0.4},
             eval=dict(sweep_dict.get("eval", {}), precision=precision))
    cfg = validate_config(d)
    out = run_sweep(cfg, quiet=True)
    bound = {r.task: r.metrics for r in out.results if r.kind == "perfect_routing"}
    merged = next(r.metrics for r in out.results if r.kind == "merge")
    scores = expert_scores(Workspace(cfg), "val", 0.4)
    assert [s.task for s in scores] == list(TOY_TASKS)
    for s in scores:
        assert s.logits.dtype == torch.float32 and s.start.dtype == torch.float32
        assert s.experts == list(TOY_TASKS)
        assert s.logits.shape[:2] == (len(TOY_TASKS), len(s.labels))
        assert diagnose(s, batch_size=8).own == pytest.approx(bound[s.task][f"val/acc/{s.task}"], abs=1e-9)
        start_acc = 100.0 * (s.start.argmax(-1) == s.labels).float().mean().item()
        assert start_acc == pytest.approx(merged[f"val/acc/{s.task}"], abs=1e-9)
    if precision != "fp32":  # the forwards ran in bf16: near the float32 logits, not equal to them
        full = expert_scores(Workspace(validate_config(dict(d, eval=dict(d["eval"], precision="fp32")))), "val", 0.4)
        for s, f in zip(scores, full):
            assert not torch.equal(s.logits, f.logits) and not torch.equal(s.start, f.start)
            assert torch.allclose(s.logits, f.logits, atol=0.1, rtol=0.05)


def test_start_and_one_hot_experts_are_built_at_the_scaling_asked_for(sweep_dict):
    """Against the formulas written out on the state dicts: the start is pre + s x sum of task
    vectors everywhere; expert e's is that with e's fine-tuned MLPs."""
    from harness.models import ImageClassifier
    from methods.base import with_state

    ws = Workspace(validate_config(sweep_dict))
    scaling = 0.7
    scores = expert_scores(ws, "val", scaling)
    pre = ws.pretrained_encoder.state_dict()
    fts = {t: e.state_dict() for t, e in ws.finetuned_encoders().items()}
    start = {k: v + scaling * sum(ft[k] - v for ft in fts.values()) for k, v in pre.items()}

    def logits(state: dict, task: str) -> torch.Tensor:
        clf = ImageClassifier(with_state(ws.pretrained_encoder, state), ws.head(task)).eval()
        x = torch.stack([img for img, _ in ws.task(task).dataset("val")])
        with torch.no_grad():
            return clf(x[:ws.cfg.eval.max_samples] if ws.cfg.eval.max_samples else x)

    for s in scores:
        torch.testing.assert_close(s.start, logits(start, s.task), atol=1e-4, rtol=1e-4)
        for e, expert in enumerate(s.experts):
            own = {k: fts[expert][k] if ".mlp." in k else v for k, v in start.items()}
            torch.testing.assert_close(s.logits[e], logits(own, s.task), atol=1e-4, rtol=1e-4)


def _marginal_entropy(rows: list[list[float]]) -> float:
    probs = [[math.exp(v) / sum(math.exp(u) for u in r) for v in r] for r in rows]
    mean = [sum(col) / len(probs) for col in zip(*probs)]
    return -sum(q * math.log(q) for q in mean)


@pytest.mark.parametrize("temperature, weight", [(1.0, 0.5), (2.0, 0.5), (2.0, 1.0), (4.0, 0.25)])
def test_the_diversity_objective_is_mean_entropy_minus_weighted_marginal_entropy_at_the_temperature(
        temperature, weight):
    """One batch of two images (labels 0, 1): the own expert is right on both, the other says 0 for
    both. The chosen expert is the one with the lower mean per-image entropy minus ``weight`` x
    the entropy of the batch's mean prediction, every logit divided by the temperature."""
    own, other = [[2.0, 0.0], [0.0, 2.0]], [[4.0, 0.0], [3.0, 0.0]]

    def objective(rows: list[list[float]]) -> float:
        scaled = [[v / temperature for v in r] for r in rows]
        return sum(map(_entropy, scaled)) / len(scaled) - weight * _marginal_entropy(scaled)

    own_wins = objective(own) < objective(other)
    scores = ExpertScores("a", ["a", "b"], torch.tensor([own, other]), torch.tensor(own), torch.tensor([0, 1]))
    d = diagnose(scores, temperature=temperature, batch_size=2, diversity_weight=weight)
    assert d.identified_batch == (100.0 if own_wins else 0.0)
    assert d.batch_accuracy == pytest.approx(100.0 if own_wins else 50.0)


def test_each_seed_shuffles_the_images_into_its_own_batches():
    """Batches of two of four images, formed from the seed's permutation of the split. The own
    expert is the more certain on images 0 and 1 by more than it is the less certain on 2 and 3:
    batches {0, 1} and {2, 3} identify one of two, any other pairing both."""
    own, other = [[3.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [[1.5, 0.0]] * 4
    scores = ExpertScores("a", ["a", "b"], torch.tensor([own, other]), torch.zeros(4, 2), torch.tensor(LABELS))
    found = set()
    for seed in range(6):
        order = torch.randperm(4, generator=torch.Generator().manual_seed(seed)).tolist()
        pairs = [order[:2], order[2:]]
        own_wins = [sum(_entropy(own[i]) for i in p) < sum(_entropy(other[i]) for i in p) for p in pairs]
        d = diagnose(scores, batch_size=2, seed=seed)
        assert d.identified_batch == pytest.approx(100.0 * sum(own_wins) / 2), seed
        found.add(d.identified_batch)
    assert len(found) > 1  # the seeds' pairings differ in what they identify


def test_the_starting_points_entropy_is_taken_at_the_head_temperature():
    start = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]]
    scores = ExpertScores("a", ["a", "b"], torch.tensor([OWN, OTHER]), torch.tensor(start), torch.tensor(LABELS))
    for t in (0.5, 2.0):
        d = diagnose(scores, temperature=t, batch_size=4)
        assert d.entropy_start == pytest.approx(sum(_entropy([v / t for v in r]) for r in start) / 4)


def test_an_own_expert_wrong_on_every_image_has_no_auroc_and_the_other_measures():
    """All of the own expert's predictions are wrong: entropy cannot separate right from wrong
    (one class only), so the AUROC is undefined; the other measures stand."""
    own, labels = [[3.0, 0.0], [1.0, 0.1], [2.0, 0.0], [0.0, 0.05]], [1, 1, 1, 0]  # predicts 0, 0, 0, 1
    scores = ExpertScores("a", ["a", "b"], torch.tensor([own, OTHER]), torch.zeros(4, 2), torch.tensor(labels))
    d = diagnose(scores, batch_size=4)
    assert math.isnan(d.auroc) and d.own == 0.0


def test_expert_scores_keep_to_the_sweeps_max_samples(sweep_dict):
    """With ``eval.max_samples`` the diagnosis scores the images the jobs score
    (:func:`harness.evaluation.evaluation_indices`), no others."""
    from harness.evaluation import evaluation_indices

    full = expert_scores(Workspace(validate_config(sweep_dict)), "val", 0.3)
    capped = dict(sweep_dict, eval=dict(sweep_dict.get("eval", {}), max_samples=5))
    some = expert_scores(Workspace(validate_config(capped)), "val", 0.3)
    for s, f in zip(some, full):
        subset = evaluation_indices(len(f.labels), 5)
        assert len(f.labels) > 5 and len(s.labels) == 5
        assert torch.equal(s.labels, f.labels[subset])
        torch.testing.assert_close(s.logits, f.logits[:, subset])
        torch.testing.assert_close(s.start, f.start[subset])
