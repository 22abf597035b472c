"""AdaMerging: the functional merged forward against explicit merges, gradients, TTA, shared loop."""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn.functional as F

import methods.adamerging as adamerging
from tests.conftest import perturbed_micro_encoders
from methods.base import MergeContext, float_state, with_state
from methods.task_arithmetic import task_arithmetic_state
from methods.tta import BatchStream, entropy

TASKS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def models():
    return perturbed_micro_encoders(TASKS)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def heads() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {t: 10 * F.normalize(torch.randn(5, 32, generator=g), dim=-1) for t in TASKS}


def fixed_unlabeled() -> dict:
    data = {t: images(4, i) for i, t in enumerate(TASKS)}
    return {t: (lambda t=t: iter([data[t]])) for t in TASKS}


def manual_merge(pre, ft, coef: dict[str, list[float]] | dict[str, float]) -> torch.nn.Module:
    """theta_0 + sum_t c_t,j (theta_t - theta_0), written out tensor by tensor."""
    base = float_state(pre)
    state = {}
    for j, k in enumerate(base):
        state[k] = base[k].clone()
        for t in TASKS:
            c = coef[t][j] if isinstance(coef[t], list) else coef[t]
            state[k] += c * (float_state(ft[t])[k] - base[k])
    return with_state(pre, state)


def total_entropy(model, hd, unlabeled) -> float:
    with torch.no_grad():
        return sum(float(entropy(F.normalize(model(next(unlabeled[t]())), dim=-1) @ hd[t].T)) for t in TASKS)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_init_equals_task_arithmetic(models, granularity):
    pre, ft = models
    x = images(4, 9)
    reference = with_state(pre, task_arithmetic_state(pre, ft, 0.3))
    enc = adamerging.AdaMergedEncoder(pre, ft, granularity=granularity, init_lambda=0.3)
    merged = adamerging.AdaMerging(granularity=granularity, steps=0).merge(pre, ft, MergeContext(heads=heads()))
    with torch.no_grad():
        assert float((enc(x) - reference(x)).abs().max()) < 1e-5
        assert float((merged(x) - reference(x)).abs().max()) < 1e-5


def test_layerwise_coefficients_and_clamp(models):
    pre, ft = models
    enc = adamerging.AdaMergedEncoder(pre, ft, granularity="layer", clamp=True)
    names = list(float_state(pre))
    assert enc.coef.shape == (3, len(names)) and enc.names == names
    g = torch.Generator().manual_seed(3)
    raw = torch.rand(3, len(names), generator=g) * 1.6 - 0.3  # some outside [0, 1]
    with torch.no_grad():
        enc.coef.copy_(raw)
    clamped = raw.clamp(0, 1)
    reference = manual_merge(pre, ft, {t: clamped[i].tolist() for i, t in enumerate(TASKS)})
    x = images(3, 4)
    with torch.no_grad():
        assert float((enc(x) - reference(x)).abs().max()) < 1e-5
    enc_unclamped = adamerging.AdaMergedEncoder(pre, ft, granularity="task", clamp=False)
    with torch.no_grad():
        enc_unclamped.coef.copy_(torch.tensor([1.5, -0.2, 0.3]))
        reference = manual_merge(pre, ft, {"a": 1.5, "b": -0.2, "c": 0.3})
        assert float((enc_unclamped(x) - reference(x)).abs().max()) < 1e-5


def test_clamped_start_outside_unit_interval_is_a_config_error(models):
    pre, ft = models
    enc = adamerging.AdaMergedEncoder(pre, ft, granularity="task", init_lambda=1.5, clamp=True)
    entropy(F.normalize(enc(images(4, 0)), dim=-1) @ heads()["a"].T).backward()
    assert float(enc.coef.grad.abs().max()) == 0.0  # why the config is refused: it could never move
    with pytest.raises(ValueError, match="init_lambda 1.5 > 1 with clamp"):
        adamerging.AdaMerging(init_lambda=1.5)
    assert adamerging.AdaMerging(init_lambda=1.0).init_lambda == 1.0
    assert adamerging.AdaMerging(init_lambda=1.5, clamp=False).init_lambda == 1.5


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_gradients_reach_coefficients_only(models, granularity):
    pre, ft = models
    enc = adamerging.AdaMergedEncoder(pre, ft, granularity=granularity)
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == ["coef"]
    hd = heads()
    loss = entropy(F.normalize(enc(images(4, 0)), dim=-1) @ hd["a"].T)
    loss.backward()
    assert enc.coef.grad is not None and enc.coef.grad.shape == enc.coef.shape
    assert float((enc.coef.grad != 0).float().mean()) > 0.5


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_tta_lowers_entropy(models, granularity):
    pre, ft = models
    hd, unlabeled = heads(), fixed_unlabeled()
    start = total_entropy(with_state(pre, task_arithmetic_state(pre, ft, 0.3)), hd, unlabeled)
    ctx = MergeContext(heads=hd, unlabeled=unlabeled)
    merged = adamerging.AdaMerging(granularity=granularity, steps=15, lr=2e-2, checkpoint_every=0).merge(pre, ft, ctx)
    end = total_entropy(merged, hd, unlabeled)
    assert ctx.artifacts["tta_loss"][0] == pytest.approx(start, rel=1e-5)
    assert end < start - 0.02
    coefs = torch.tensor(ctx.artifacts["adamerging_coefficients"]["values"])
    assert coefs.shape == ((3,) if granularity == "task" else (3, len(float_state(pre))))
    assert float((coefs - 0.3).abs().max()) > 0.05
    # The returned encoder holds exactly the learned merge.
    reference = manual_merge(pre, ft, {t: coefs[i].tolist() if coefs.dim() == 2 else float(coefs[i])
                                       for i, t in enumerate(TASKS)})
    x = images(2, 5)
    with torch.no_grad():
        assert float((merged(x) - reference(x)).abs().max()) < 1e-5


def test_joint_and_per_task_forward_give_same_steps(models):
    """The loop's two gradient paths (one joint batch vs per-task accumulation) agree."""
    from methods.tta import run_tta

    pre, ft = models
    results = []
    for joint in (True, False):
        enc = adamerging.AdaMergedEncoder(pre, ft, granularity="layer")
        losses = run_tta(enc, MergeContext(heads=heads(), unlabeled=fixed_unlabeled()), lr=1e-2, steps=3,
                         joint_forward=joint)
        results.append((losses, enc.coef.detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_an_adaptation_is_the_same_at_any_seed(models, granularity):
    """AdaMerging declares ``seeded = False``, so its job keys leave the sweep's seed out: its
    adapted merge must not change with the global generator or ``ctx.seed`` (its batches are the
    streams given to it, drawn by adapt.shuffle_seed)."""
    pre, ft = models
    merges = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), seed=seed)
        merges.append(adamerging.AdaMerging(granularity=granularity, steps=3, lr=1e-2).merge(pre, ft, ctx).state_dict())
    assert all(torch.equal(merges[0][k], merges[1][k]) for k in merges[0])
    start = float_state(with_state(pre, task_arithmetic_state(pre, ft, 0.3)))
    assert any(not torch.equal(merges[0][k], start[k]) for k in start)  # it adapted


def test_batch_stream_recreates_exhausted_iterators():
    calls = []

    def factory():
        calls.append(1)
        return iter([torch.zeros(1), (torch.ones(1), torch.tensor([3]))])

    stream = BatchStream(factory, "t")
    got = [float(next(stream)[0]) for _ in range(5)]
    assert got == [0.0, 1.0, 0.0, 1.0, 0.0] and len(calls) == 3
    with pytest.raises(ValueError, match="^unlabeled data of task 'empty' yields no batches$"):
        next(BatchStream(lambda: iter([]), "empty"))


def test_missing_unlabeled_data_is_an_error(models):
    pre, ft = models
    with pytest.raises(ValueError, match="no unlabeled data"):
        adamerging.AdaMerging(steps=2).merge(pre, ft, MergeContext(heads=heads(), unlabeled={}))


@pytest.mark.parametrize("kind", ["flag", "instance", "factory"])
def test_progress_conventions_do_not_change_the_run(models, kind):
    from rich.console import Console
    from rich.progress import Progress

    from methods.tta import run_tta

    pre, ft = models
    bar = Progress(console=Console(file=open("/dev/null", "w")))
    progress = {"flag": True, "instance": bar, "factory": lambda: bar}[kind]
    runs = []
    for p in (None, progress):
        enc = adamerging.AdaMergedEncoder(pre, ft)
        runs.append(run_tta(enc, MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), progress=p),
                            lr=1e-2, steps=2, joint_forward=True))
    assert runs[0] == runs[1] and len(runs[0]) == 2


def written_out_inputs(pre, ft):
    """Heads, three batches per task, and the pretrained weights and task vectors by tensor
    name: what the written-out update rules below start from."""
    g = torch.Generator().manual_seed(1)
    hd = {t: 30 * F.normalize(torch.randn(5, 32, generator=g), dim=-1) for t in TASKS}
    data = {t: [images(4, 10 * i + j) for j in range(3)] for i, t in enumerate(TASKS)}
    names = [n for n, _ in pre.named_parameters()]
    theta0 = {n: p.detach() for n, p in pre.named_parameters()}
    taus = [{n: dict(ft[t].named_parameters())[n].detach() - theta0[n] for n in names} for t in TASKS]
    return hd, data, names, theta0, taus


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_steps_match_the_original_update_rule(models, granularity):
    """Three steps against the original scripts' rule, written out: coefficients [P, T] (or
    [1, T]) from 0.3, clamped to [0, 1] in the forward, the pretrained weight at 1; loss the sum
    over tasks of the batch-mean softmax entropy of normalised features times the head; Adam
    lr 1e-3, betas (0.9, 0.999), no weight decay."""
    from torch.func import functional_call

    pre, ft = models
    hd, data, names, theta0, taus = written_out_inputs(pre, ft)
    raw = torch.nn.Parameter(torch.full((len(names) if granularity == "layer" else 1, len(TASKS)), 0.3))
    opt = torch.optim.Adam([raw], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    for step in range(3):
        lam = raw.clamp(0.0, 1.0)
        params = {n: theta0[n] + sum(lam[j if granularity == "layer" else 0, i] * taus[i][n] for i in range(len(TASKS)))
                  for j, n in enumerate(names)}
        loss = 0.0
        for t in TASKS:
            feats = functional_call(pre, params, (data[t][step],))
            logits = feats / feats.norm(dim=-1, keepdim=True) @ hd[t].T
            loss = loss + (-(logits.softmax(1) * logits.log_softmax(1)).sum(1)).mean(0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    want = raw.detach().clamp(0.0, 1.0)

    ctx = MergeContext(heads=hd, unlabeled={t: (lambda t=t: iter(data[t])) for t in TASKS})
    adamerging.AdaMerging(granularity=granularity, steps=3, checkpoint_every=0).merge(pre, ft, ctx)
    got = torch.tensor(ctx.artifacts["adamerging_coefficients"]["values"])
    got = got.unsqueeze(0) if granularity == "task" else got.T
    assert (want - 0.3).abs().max() > 1e-3  # the steps moved the coefficients
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_marginal_entropy_of_known_batches():
    from methods.tta import marginal_entropy

    same = torch.tensor([[9.0, 0.0, 0.0], [9.0, 0.0, 0.0]])  # one class for every image
    spread = torch.tensor([[50.0, 0.0, 0.0], [0.0, 50.0, 0.0], [0.0, 0.0, 50.0]])  # confident, each a class
    p = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]])
    mean = p.mean(0)
    assert float(marginal_entropy(same)) == pytest.approx(-sum(q * torch.log(q) for q in same.softmax(-1)[0]).item(),
                                                          abs=1e-6)
    assert float(marginal_entropy(spread)) == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=1e-6)
    assert float(marginal_entropy(p.log())) == pytest.approx(float(-(mean * mean.log()).sum()), abs=1e-6)


@pytest.mark.parametrize("joint", [True, False])
def test_diversity_weight_steps_match_information_maximisation_written_out(models, joint):
    """``diversity_weight`` w: per task, the batch-mean softmax entropy minus w times the
    entropy of the batch's mean prediction (SHOT's information-maximisation loss), written out
    here; three Adam steps of AdaMerging's task-wise coefficients, through the joint forward and
    the per-task one. The loss parts add up to the loss and the diversity part is -w H(mean)."""
    from torch.func import functional_call

    from methods.tta import run_tta

    pre, ft = models
    w = 2.0
    hd, data, names, theta0, taus = written_out_inputs(pre, ft)
    raw = torch.nn.Parameter(torch.full((1, len(TASKS)), 0.3))
    opt = torch.optim.Adam([raw], lr=1e-2)
    want_losses, want_diversity = [], []
    for step in range(3):
        lam = raw.clamp(0.0, 1.0)
        params = {n: theta0[n] + sum(lam[0, i] * taus[i][n] for i in range(len(TASKS))) for n in names}
        loss, diversity = 0.0, 0.0
        for t in TASKS:
            feats = functional_call(pre, params, (data[t][step],))
            p = (feats / feats.norm(dim=-1, keepdim=True) @ hd[t].T).softmax(1)
            mean = p.mean(0)
            div = -w * -(mean * mean.log()).sum()
            loss = loss + (-(p * p.log()).sum(1)).mean(0) + div
            diversity += float(div.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        want_losses.append(float(loss.detach()))
        want_diversity.append(diversity)

    enc = adamerging.AdaMergedEncoder(pre, ft, granularity="task")
    ctx = MergeContext(heads=hd, unlabeled={t: (lambda t=t: iter(data[t])) for t in TASKS})
    losses = run_tta(enc, ctx, lr=1e-2, steps=3, joint_forward=joint, diversity_weight=w)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    parts = ctx.artifacts["tta_parts"]
    assert set(parts) == {"entropy", "diversity"}
    assert parts["diversity"] == pytest.approx(want_diversity, rel=1e-5)
    assert [e + d for e, d in zip(parts["entropy"], parts["diversity"])] == pytest.approx(losses, rel=1e-6)
    assert (raw.detach() - 0.3).abs().max() > 1e-3  # the steps moved the coefficients
    torch.testing.assert_close(enc.coefficients().detach()[:, 0], raw.detach().clamp(0, 1)[0], rtol=0, atol=1e-6)


def test_an_added_hyperparameter_at_its_default_keeps_the_job_keys():
    """``diversity_weight`` came after results were cached: at 0 (its default) keys leave it
    out, so those results stay cached; set, it enters the key."""
    from methods.wemoe import WeMoE

    for cls in (adamerging.AdaMerging, WeMoE):
        assert "diversity_weight" not in cls(steps=3).key_params()
        assert cls(steps=3).key_params() == cls(steps=3, diversity_weight=0.0).key_params()
        assert cls(steps=3, diversity_weight=0.5).key_params()["diversity_weight"] == 0.5
        assert set(cls().key_params()) == set(cls.model_fields) - {"diversity_weight"}


@pytest.mark.parametrize("adapted_on, shown", [
    ({}, "adamerging"),
    ({"split": "test", "corruption": None}, "adamerging"),
    ({"split": "test", "corruption": "gaussian_noise", "severity": 2, "corruption_seed": 0},
     "adamerging [gaussian_noise 2]"),
])
def test_a_per_corruption_adaptation_names_its_corruption_on_its_progress_line(models, adapted_on, shown):
    """A robustness study adapts once per corruption: lines that all read ``adamerging: 1/1``
    could not be told apart in a log."""
    from methods.tta import run_tta

    class Bar:  # a live Progress as the loop takes one: add_task / update / remove_task
        def __init__(self):
            self.descriptions = []

        def add_task(self, description, **fields):
            self.descriptions.append(description)
            return 0

        def update(self, task, **fields):
            pass

        def remove_task(self, task):
            pass

    pre, ft = models
    bar = Bar()
    run_tta(adamerging.AdaMergedEncoder(pre, ft), MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), progress=bar,
                                                               adapted_on=adapted_on),
            lr=1e-2, steps=1, joint_forward=True, name="adamerging")
    assert bar.descriptions == [shown]


@pytest.mark.parametrize("method,field", [
    ({"name": "wemoe", "params": {"steps": 1, "batch_size": 81}}, "methods.0.params.batch_size"),
    ({"name": "adamerging", "params": {"steps": 1}, "grid": {"batch_size": [8, 81]}}, "methods.0.grid.batch_size"),
    ({"name": "adamerging", "tune": {"n_trials": 2, "space": {"batch_size": {"type": "int", "low": 4, "high": 81}}}},
     "methods.0.tune.space.batch_size"),
])
@pytest.mark.parametrize("command", [["sweep", "-q"], ["validate"], ["sweep", "--dry-run"]])
def test_a_batch_larger_than_the_split_adapted_on_is_one_line_naming_the_field(sweep_dict, tmp_path, method, field,
                                                                               command):
    """The toy tasks' test splits hold 80 images: 81 per step cannot be drawn, so the sweep stops
    before anything runs, naming the file, the field and the value (80 runs); validate and a dry
    run, which build no model, say the same."""
    import yaml
    from click.testing import CliRunner

    from harness.cli import main
    from harness.config import validate_config
    from harness.workspace import Workspace

    d = dict(sweep_dict, methods=[method])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, [*command, str(f)])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {f}: {field}: larger than the test split of task ") and "(80 images)" in lines[0]
    assert lines[0].endswith("(got 81)")
    assert not (tmp_path / "out").exists()
    fits = dict(sweep_dict, methods=[{"name": "wemoe", "params": {"batch_size": 80}},
                                     {"name": "adamerging", "tune": {"n_trials": 2, "space": {
                                         "batch_size": {"type": "int", "low": 4, "high": 80}}}}])
    Workspace(validate_config(fits)).preflight()
    f.write_text(yaml.safe_dump(fits))
    assert CliRunner().invoke(main, ["validate", str(f)]).exit_code == 0


def test_a_task_left_out_of_adaptation_does_not_bound_its_batch(sweep_dict, monkeypatch):
    """Only the splits adaptation reads bound ``batch_size``: an unseen task's smaller test split
    (40 images here, beside 80) is never adapted on."""
    from harness.config import validate_config
    from harness.errors import FieldError
    from harness.workspace import Workspace
    from tasks.synthetic import make_toy_task

    d = dict(sweep_dict, unseen=["toy_colours"], references={"individual": False},
             methods=[{"name": "wemoe", "params": {"batch_size": 60}}])
    ws = Workspace(validate_config(d))
    small = make_toy_task("toy_colours", n_test=40)
    real = ws.task
    monkeypatch.setattr(ws, "task", lambda name: small if name == "toy_colours" else real(name))
    ws.check_adaptation_batches()
    ws = Workspace(validate_config(dict(d, methods=[{"name": "wemoe", "params": {"batch_size": 81}}])))
    with pytest.raises(FieldError, match=r"task 'toy_stripes' \(80 images\)"):
        ws.check_adaptation_batches()


def _with_small_split(monkeypatch, ws, name: str, n_test: int) -> None:
    """``ws`` reads task ``name`` with ``n_test`` test images (the other toy tasks keep 80)."""
    from tasks.synthetic import make_toy_task

    small = make_toy_task(name, n_test=n_test)
    real = ws.task
    monkeypatch.setattr(ws, "task", lambda t: small if t == name else real(t))


def test_the_smallest_split_adapted_on_bounds_the_batch(sweep_dict, monkeypatch):
    """Of two adapted tasks (80 and 40 test images) the smaller bounds ``batch_size``: 60 fits the
    one, not the other, and the error names the 40-image task."""
    from harness.config import validate_config
    from harness.errors import FieldError
    from harness.workspace import Workspace

    ws = Workspace(validate_config(dict(sweep_dict, methods=[{"name": "wemoe", "params": {"batch_size": 60}}])))
    _with_small_split(monkeypatch, ws, "toy_colours", 40)
    with pytest.raises(FieldError, match=r"task 'toy_colours' \(40 images\)") as err:
        ws.check_adaptation_batches()
    assert err.value.field == "methods.0.params.batch_size" and err.value.value == 60


def test_a_capped_study_adapting_on_corruptions_bounds_the_batch_by_max_samples(sweep_dict):
    """With ``eval.max_samples: 30`` the per-corruption adaptations (``adapt: corrupted``) read the
    30 images per task the study scores, not the 80 of the test split: a batch of 40 would adapt
    on all 30 at every step, so it is refused naming the cap; 30 fits, and so does 40 when the
    study adapts on clean images (the whole split)."""
    from harness.config import validate_config
    from harness.errors import FieldError
    from harness.workspace import Workspace

    def workspace(batch_size: int, adapt: str = "corrupted") -> Workspace:
        robustness = {"tasks": ["toy_stripes"], "corruptions": ["contrast"], "adapt": adapt}
        return Workspace(validate_config(dict(sweep_dict, eval={"max_samples": 30}, robustness=robustness,
                                              methods=[{"name": "wemoe", "params": {"batch_size": batch_size}}])))

    with pytest.raises(FieldError, match=r"larger than the 30 images per task \(eval.max_samples\)") as err:
        workspace(40).check_adaptation_batches()
    assert err.value.field == "methods.0.params.batch_size" and err.value.value == 40
    workspace(30).check_adaptation_batches()
    workspace(40, adapt="clean").check_adaptation_batches()


def test_a_categorical_batch_space_is_bounded_by_its_largest_choice(sweep_dict):
    """A tuned ``batch_size`` drawn from choices [8, 81] may run with 81, one more than the
    toy tasks' 80 test images: refused, naming the space; choices [8, 80] fit."""
    from harness.config import validate_config
    from harness.errors import FieldError
    from harness.workspace import Workspace

    def method(choices):
        return {"name": "adamerging", "tune": {"n_trials": 2, "space": {
            "batch_size": {"type": "categorical", "choices": choices}}}}

    ws = Workspace(validate_config(dict(sweep_dict, methods=[method([8, 81])])))
    with pytest.raises(FieldError, match=r"\(80 images\)") as err:
        ws.check_adaptation_batches()
    assert err.value.field == "methods.0.tune.space.batch_size" and err.value.value == 81
    Workspace(validate_config(dict(sweep_dict, methods=[method([8, 80])]))).check_adaptation_batches()


def test_a_batch_size_left_to_its_default_is_bounded_by_that_default(sweep_dict, monkeypatch):
    """wemoe without ``batch_size`` runs with its documented default, 16 images per step: a
    split of 10 cannot give that many."""
    from harness.config import validate_config
    from harness.errors import FieldError
    from harness.workspace import Workspace

    ws = Workspace(validate_config(dict(sweep_dict, methods=[{"name": "wemoe"}])))
    _with_small_split(monkeypatch, ws, "toy_stripes", 10)
    with pytest.raises(FieldError, match=r"task 'toy_stripes' \(10 images\)") as err:
        ws.check_adaptation_batches()
    assert err.value.field == "methods.0.params.batch_size" and err.value.value == 16


def test_a_batch_size_of_a_method_that_reads_no_test_data_is_not_bounded(sweep_dict):
    """Only test-time adaptation reads the splits: another method's ``batch_size`` (500 here,
    over the toy tasks' 80 images) is its own business."""
    from harness.config import validate_config
    from harness.workspace import Workspace, adaptation_batch_sizes

    cfg = validate_config(dict(sweep_dict, methods=[{"name": "tests.tuning_methods:BatchedTaskArithmetic"}]))
    assert adaptation_batch_sizes(cfg) == []
    Workspace(cfg).check_adaptation_batches()


@pytest.mark.parametrize("cosine", [False, True])
def test_learning_rate_of_every_step_follows_torchs_cosine_annealing(models, monkeypatch, cosine):
    """The lr Adam steps with, step by step: constant ``lr`` without ``cosine``; with it, what
    torch's CosineAnnealingLR(T_max=steps) gives (lr at step 0, annealed towards 0)."""
    from methods.tta import run_tta

    pre, ft = models
    seen: list[float] = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step",
                        lambda self, *a, **k: (seen.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    enc = adamerging.AdaMergedEncoder(pre, ft)
    run_tta(enc, MergeContext(heads=heads(), unlabeled=fixed_unlabeled()), lr=0.02, steps=5, cosine=cosine,
            joint_forward=True)
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=5)
    want = []
    for _ in range(5):
        want.append(reference.param_groups[0]["lr"] if cosine else 0.02)
        reference.step()
        schedule.step()
    assert seen == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_extending_an_adaptation_from_its_checkpoint_reads_the_batches_an_uninterrupted_run_reads(models, tmp_path):
    """Two steps checkpointed, then five asked of the same workdir: it resumes at step 2 and
    must go on with each task's third batch (of three: the streams are fast-forwarded), with
    Adam's moments restored, giving the uninterrupted five-step run's losses and coefficients."""
    from methods.tta import run_tta

    pre, ft = models
    data = {t: [images(4, 10 * i + j) for j in range(3)] for i, t in enumerate(TASKS)}

    def run(workdir, steps):
        enc = adamerging.AdaMergedEncoder(pre, ft, granularity="layer")
        ctx = MergeContext(heads=heads(), unlabeled={t: (lambda t=t: iter(data[t])) for t in TASKS}, workdir=str(workdir))
        losses = run_tta(enc, ctx, lr=5e-2, steps=steps, checkpoint_every=2, joint_forward=True)
        return losses, enc.coef.detach().clone()

    full_losses, full_coef = run(tmp_path / "full", 5)
    run(tmp_path / "resumed", 2)
    losses, coef = run(tmp_path / "resumed", 5)
    assert losses == full_losses and len(losses) == 5
    assert torch.equal(coef, full_coef)


def test_the_last_step_is_checkpointed_and_a_rerun_adapts_no_further(models, tmp_path, monkeypatch):
    """``checkpoint_every`` steps and at the end (README: the best trial's copy is "AdaMerging's
    checkpoint at its last step"): three steps checkpointed every two leave step 3 on disk, and
    the job run again in that workdir (a kill while evaluating) takes no step, giving the same
    losses and coefficients."""
    import methods.tta as tta

    pre, ft = models
    steps_taken = []
    monkeypatch.setattr(tta, "failpoint", lambda name: steps_taken.append(name) if name == "tta_step" else None)

    def run():
        enc = adamerging.AdaMergedEncoder(pre, ft, granularity="layer")
        ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), workdir=str(tmp_path))
        losses = tta.run_tta(enc, ctx, lr=5e-2, steps=3, checkpoint_every=2, joint_forward=True, name="coefficients")
        return losses, enc.coef.detach().clone()

    losses, coef = run()
    assert len(steps_taken) == 3
    state = torch.load(tta.checkpoint_path(tmp_path, "coefficients"), weights_only=True)
    assert state["step"] == 3
    steps_taken.clear()
    again, again_coef = run()
    assert steps_taken == [] and again == losses and torch.equal(again_coef, coef)


def test_a_checkpoint_write_a_kill_cut_short_is_deleted_and_never_read(models, tmp_path):
    """A killed write leaves a hidden temporary beside the checkpoint (atomic_write_bytes): the
    next run in that workdir deletes it, and adapts from the whole checkpoint alone."""
    from methods.tta import checkpoint_path, run_tta

    pre, ft = models
    stale = [tmp_path / f".{checkpoint_path(tmp_path, 'tta').name}.k1ll3d.tmp",
             tmp_path / f"{checkpoint_path(tmp_path, 'tta').name}.tmp4321"]
    for f in stale:
        f.write_bytes(b"a write a kill cut short")
    enc = adamerging.AdaMergedEncoder(pre, ft, granularity="layer")
    ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), workdir=str(tmp_path))
    assert len(run_tta(enc, ctx, lr=5e-2, steps=2, checkpoint_every=1, joint_forward=True)) == 2
    assert not any(f.exists() for f in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_path(tmp_path, "tta").name]


def test_defaults_are_the_papers_and_bounds_refuse_outside_values():
    """Yang et al. (ICLR 2024): coefficients start at 0.3, Adam lr 1e-3, 500 steps of 16
    unlabeled images per task, clamped to [0, 1]; one coefficient per task by default."""
    method = adamerging.AdaMerging()
    assert (method.granularity, method.init_lambda, method.lr, method.steps, method.batch_size, method.clamp,
            method.cosine, method.diversity_weight) == ("task", 0.3, 1e-3, 500, 16, True, False, 0.0)
    for edge in [dict(lr=1.0), dict(steps=0), dict(steps=1_000_000), dict(batch_size=1), dict(batch_size=4096),
                 dict(init_lambda=0.0), dict(init_lambda=1.0), dict(init_lambda=10.0, clamp=False),
                 dict(granularity="layer")]:
        method = adamerging.AdaMerging(**edge)
        assert {k: getattr(method, k) for k in edge} == edge
    for bad in [dict(lr=0.0), dict(lr=1.5), dict(steps=-1), dict(steps=1_000_001), dict(batch_size=0),
                dict(batch_size=4097), dict(init_lambda=-0.1, clamp=False), dict(init_lambda=10.5, clamp=False),
                dict(granularity="block")]:
        field = next(iter(bad))
        with pytest.raises(pydantic.ValidationError, match=rf"(?m)^1 validation error for AdaMerging\n{field}\n"):
            adamerging.AdaMerging(**bad)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_reported_coefficients_name_their_tasks_and_tensors(models, granularity):
    """Layer-wise coefficients are reported as [T, P] with the P tensor names in state-dict
    order; task-wise ones as [T] without names."""
    pre, ft = models
    ctx = MergeContext(heads=heads())
    adamerging.AdaMerging(granularity=granularity, steps=0).merge(pre, ft, ctx)
    report = ctx.artifacts["adamerging_coefficients"]
    names = list(float_state(pre))
    assert report["tasks"] == TASKS
    if granularity == "layer":
        assert report["tensors"] == names
        assert torch.equal(torch.tensor(report["values"]), torch.full((3, len(names)), 0.3))
    else:
        assert report["tensors"] is None and report["values"] == pytest.approx([0.3] * 3)


def test_the_method_adapts_with_its_cosine_diversity_and_validation_options(models, monkeypatch):
    """``cosine``, ``diversity_weight`` and ``eval_every`` given to the method reach its
    adaptation: the lr of each step is torch's CosineAnnealingLR(T_max=steps), the loss has a
    diversity part, and validation runs at steps 0, 2 and 4 on the merge of that moment."""
    pre, ft = models
    seen: list[float] = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step",
                        lambda self, *a, **k: (seen.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    data = {t: [images(4, 10 * i + j) for j in range(4)] for i, t in enumerate(TASKS)}
    x = images(2, 5)
    outputs = []

    def validate(model):
        with torch.no_grad():
            outputs.append(model(x))
        return {"acc": 1.0}

    ctx = MergeContext(heads=heads(), unlabeled={t: (lambda t=t: iter(data[t])) for t in TASKS}, validate=validate)
    method = adamerging.AdaMerging(steps=4, lr=0.02, cosine=True, diversity_weight=2.0, eval_every=2,
                                   checkpoint_every=0)
    merged = method.merge(pre, ft, ctx)

    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=4)
    want = []
    for _ in range(4):
        want.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert seen == pytest.approx(want, rel=1e-12, abs=1e-15)
    parts = ctx.artifacts["tta_parts"]
    assert set(parts) == {"entropy", "diversity"} and all(d < 0 for d in parts["diversity"])
    assert [v["step"] for v in ctx.artifacts["tta_validation"]] == [0.0, 2.0, 4.0]
    start = with_state(pre, task_arithmetic_state(pre, ft, 0.3))
    with torch.no_grad():
        assert float((outputs[0] - start(x)).abs().max()) < 1e-5
        assert float((outputs[-1] - merged(x)).abs().max()) < 1e-5


def test_the_start_is_the_given_init_lambda_reported_unclamped_when_clamp_is_off(models):
    """steps = 0: the merge is task arithmetic at ``init_lambda`` and the report says so, also
    outside [0, 1] when ``clamp`` is off (the coefficients the merge used)."""
    pre, ft = models
    x = images(3, 2)
    for init, clamp in [(0.7, True), (1.5, False)]:
        ctx = MergeContext(heads=heads())
        merged = adamerging.AdaMerging(init_lambda=init, clamp=clamp, steps=0).merge(pre, ft, ctx)
        reference = with_state(pre, task_arithmetic_state(pre, ft, init))
        assert ctx.artifacts["adamerging_coefficients"]["values"] == pytest.approx([init] * 3)
        with torch.no_grad():
            assert float((merged(x) - reference(x)).abs().max()) < 1e-5


def test_float_buffers_are_merged_like_parameters():
    """Every float tensor of the state, buffers included, is theta_0 + sum_t lambda_t tau_t in
    the forward and the export (by hand: w and scale below, lambda = 0.3 for both tasks)."""

    class Scaled(torch.nn.Module):
        def __init__(self, w, scale):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(w))
            self.register_buffer("scale", torch.tensor(scale))

        def forward(self, x):
            return x * self.w * self.scale

    pre = Scaled([1.0, 2.0], [1.0, 1.0])
    ft = {"a": Scaled([2.0, 2.0], [3.0, 1.0]), "b": Scaled([1.0, 4.0], [1.0, -1.0])}
    enc = adamerging.AdaMergedEncoder(pre, ft, init_lambda=0.3)
    w, scale = torch.tensor([1.3, 2.6]), torch.tensor([1.6, 0.4])
    x = torch.tensor([[1.0, -2.0]])
    with torch.no_grad():
        torch.testing.assert_close(enc(x), x * w * scale)
    exported = enc.export()
    torch.testing.assert_close(exported.w.detach(), w)
    torch.testing.assert_close(exported.scale, scale)


def test_a_checkpoint_ahead_of_the_steps_asked_for_gives_the_result_of_those_steps(models, tmp_path, caplog):
    """A workdir checkpointed at step 4, then asked for 2 steps: the run returns the losses, loss
    parts, validation and coefficients of an uninterrupted two-step run (no workdir), not the
    fourth step's, and says so."""
    from methods.tta import run_tta

    pre, ft = models

    def run(steps: int, workdir: str | None) -> tuple[list[float], torch.Tensor, dict]:
        enc = adamerging.AdaMergedEncoder(pre, ft, granularity="layer")
        ctx = MergeContext(heads=heads(), unlabeled=fixed_unlabeled(), workdir=workdir,
                           validate=lambda model: {"coef_sum": float(model.coef.sum())})
        losses = run_tta(enc, ctx, lr=5e-2, steps=steps, checkpoint_every=2, eval_every=1, joint_forward=True)
        return losses, enc.coef.detach().clone(), ctx.artifacts

    four, four_coef, _ = run(4, str(tmp_path))
    two, two_coef, two_artifacts = run(2, None)
    assert len(four) == 4 and two == four[:2]
    assert not torch.equal(two_coef, four_coef)
    with caplog.at_level("WARNING", logger="harness"):
        got, got_coef, got_artifacts = run(2, str(tmp_path))
    assert got == two
    assert torch.equal(got_coef, two_coef)
    assert len(two_artifacts["tta_parts"]["entropy"]) == 2 and len(two_artifacts["tta_validation"]) == 3
    assert {k: got_artifacts[k] for k in ("tta_parts", "tta_validation")} == {
        k: two_artifacts[k] for k in ("tta_parts", "tta_validation")}
    assert any("checkpoint at step 4, ahead of the 2 steps asked for; adapting from the start" in r.getMessage()
               for r in caplog.records)


def test_a_non_finite_adaptation_loss_fails_the_run_naming_its_step(models):
    """A head with a NaN weight makes every logit NaN: the first step's loss is NaN, and the run
    stops there rather than stepping Adam on NaN gradients and returning a NaN-filled merge."""
    from methods.tta import run_tta

    pre, ft = models
    hd = heads()
    hd["b"] = hd["b"].clone()
    hd["b"][0, 0] = float("nan")
    enc = adamerging.AdaMergedEncoder(pre, ft)
    with pytest.raises(FloatingPointError, match="not finite at step 1"):
        run_tta(enc, MergeContext(heads=hd, unlabeled=fixed_unlabeled()), lr=5e-2, steps=3, joint_forward=True)
    assert torch.equal(enc.coef.detach(), torch.full((3,), 0.3))


def test_joint_forward_gives_each_task_its_own_rows_when_batch_sizes_differ(models):
    """Tasks' batches of 2, 5 and 3 images: the joint forward splits its features back by those
    sizes, so each head scores its own task's images, as the per-task forwards do."""
    from methods.tta import run_tta

    pre, ft = models
    data = {t: images(n, 40 + i) for i, (t, n) in enumerate(zip(TASKS, (2, 5, 3)))}
    results = []
    for joint in (True, False):
        enc = adamerging.AdaMergedEncoder(pre, ft)
        ctx = MergeContext(heads=heads(), unlabeled={t: (lambda t=t: iter([data[t]])) for t in TASKS})
        results.append(run_tta(enc, ctx, lr=1e-2, steps=2, joint_forward=joint))
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_the_task_vectors_are_float32_differences_of_the_given_weights(models):
    """Each stacked task vector is theta_t - theta_0 in float32, also for bfloat16 weights (a
    difference rounded to bfloat16 would lose the small fine-tuning steps)."""
    import copy

    pre, ft = models
    half_pre = copy.deepcopy(pre).to(torch.bfloat16)
    half_ft = {t: copy.deepcopy(m).to(torch.bfloat16) for t, m in ft.items()}
    enc = adamerging.AdaMergedEncoder(half_pre, half_ft, granularity="layer")
    base = float_state(half_pre)
    for j, name in enumerate(enc.names):
        tau = getattr(enc, f"tau_{j}")
        assert tau.dtype == torch.float32
        want = torch.stack([float_state(half_ft[t])[name].double() - base[name].double() for t in TASKS])
        assert torch.equal(tau.double(), want), name  # bfloat16 - bfloat16 is exact in float32


def test_a_fine_tuned_model_of_another_shape_is_named(models):
    import copy

    pre, ft = models
    odd = copy.deepcopy(ft["b"])
    name, param = next(iter(odd.named_parameters()))
    with torch.no_grad():
        param.data = torch.zeros(param.shape[0] + 1, *param.shape[1:])
    with pytest.raises(ValueError, match=rf"checkpoint 'b': tensor '{name}' has shape"):
        adamerging.AdaMergedEncoder(pre, {**ft, "b": odd})
