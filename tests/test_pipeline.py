"""Fine-tuning and the embedded suite's cached model pipeline (tiny sizes, a few steps)."""

from __future__ import annotations

import copy
import math

import pydantic
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import harness.finetune as finetune
from harness.finetune import finetune_encoder, relative_feature_distance, warmup_cosine
from harness.models import ImageClassifier, build_clip, load_state_dict

torch.set_num_threads(1)


def _separable(n: int = 96, classes: int = 3, seed: int = 0) -> TensorDataset:
    """16x16 images whose class is a colour shift: easy for any encoder to separate."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = 0.3 * torch.randn(n, 3, 16, 16, generator=g)
    for c in range(classes):
        images[labels == c, c % 3] += 1.5
    return TensorDataset(images, labels)


def _loss_acc(encoder, head, ds):
    with torch.no_grad():
        logits = ImageClassifier(encoder, head).eval()(ds.tensors[0])
    return F.cross_entropy(logits, ds.tensors[1]).item(), (logits.argmax(-1) == ds.tensors[1]).float().mean().item()


def test_warmup_cosine_by_hand():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)  # halfway through the cosine
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_finetune_lowers_loss_and_leaves_input_untouched():
    torch.manual_seed(0)
    encoder = build_clip("harness-micro-vit").visual
    before_state = {k: v.clone() for k, v in encoder.state_dict().items()}
    head = F.normalize(torch.randn(3, 32), dim=-1) * 20
    ds = _separable()
    loss0, acc0 = _loss_acc(encoder, head, ds)
    tuned = finetune_encoder(encoder, head, ds, steps=60, lr=3e-3, batch_size=32, warmup=5, seed=0)
    loss1, acc1 = _loss_acc(tuned, head, ds)
    assert loss1 < 0.5 * loss0
    assert acc1 >= 0.9 and acc1 > acc0
    assert all(torch.equal(v, before_state[k]) for k, v in encoder.state_dict().items())


def test_feature_preservation_limits_drift():
    torch.manual_seed(0)
    encoder = build_clip("harness-micro-vit").visual
    head = F.normalize(torch.randn(3, 32), dim=-1) * 20
    ds = _separable()
    general = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = encoder(general)
    drifts = {}
    for weight in (0.0, 20.0):
        tuned = finetune_encoder(encoder, head, ds, steps=40, lr=3e-3, batch_size=32, warmup=5,
                                 preserve_weight=weight, preserve_images=general)
        with torch.no_grad():
            drifts[weight] = relative_feature_distance(tuned(general), reference).item()
    assert drifts[20.0] < 0.5 * drifts[0.0]


def test_relative_feature_distance_by_hand():
    ref = torch.tensor([[3.0, 4.0]])
    assert relative_feature_distance(torch.tensor([[3.0, 4.0]]), ref).item() == 0.0
    assert relative_feature_distance(torch.tensor([[0.0, 4.0]]), ref).item() == pytest.approx(9 / 25)


def test_finetune_is_deterministic_given_seed():
    encoder = build_clip("harness-micro-vit").visual
    head = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), dim=-1) * 20
    ds = _separable()
    general = torch.randn(16, 3, 16, 16)
    runs = [finetune_encoder(encoder, head, ds, steps=5, batch_size=16, warmup=2, seed=s,
                             preserve_weight=1.0, preserve_images=general).state_dict() for s in (3, 3, 4)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_sgd_finetuning_matches_two_momentum_steps_by_hand():
    """optimizer="sgd": w1 = w0 - lr g0, w2 = w1 - lr (0.9 g0 + g1), full-batch gradients."""
    torch.manual_seed(0)
    encoder = build_clip("harness-micro-vit").visual
    head = F.normalize(torch.randn(3, 32), dim=-1) * 20
    ds = _separable()
    lr = 0.05

    def full_batch_grads(model):
        model.zero_grad()
        F.cross_entropy(ImageClassifier(model, head)(ds.tensors[0]), ds.tensors[1]).backward()
        return [p.grad.clone() for p in model.parameters()]

    model = copy.deepcopy(encoder).train()
    g0 = full_batch_grads(model)
    with torch.no_grad():
        for p, g in zip(model.parameters(), g0):
            p -= lr * g
    g1 = full_batch_grads(model)
    with torch.no_grad():
        for p, a, b in zip(model.parameters(), g0, g1):
            p -= lr * (0.9 * a + b)
    tuned = finetune_encoder(encoder, head, ds, steps=2, lr=lr, weight_decay=0.0, batch_size=len(ds), warmup=1,
                             grad_clip=0.0, optimizer="sgd")
    for (name, p), q in zip(tuned.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    adam = finetune_encoder(encoder, head, ds, steps=2, lr=lr, weight_decay=0.0, batch_size=len(ds), warmup=1,
                            grad_clip=0.0)
    assert any(not torch.allclose(a, b) for a, b in zip(adam.parameters(), model.parameters()))
    with pytest.raises(ValueError, match="optimizer"):
        finetune_encoder(encoder, head, ds, steps=1, optimizer="lbfgs")


def test_adamw_finetuning_matches_one_decoupled_weight_decay_step_by_hand():
    """The protocol's first AdamW step: bias-corrected moments are g and g^2, so
    w1 = w0 (1 - lr wd) - lr g / (|g| + eps), with weight decay as given (not AdamW's default)."""
    torch.manual_seed(0)
    encoder = build_clip("harness-micro-vit").visual
    head = F.normalize(torch.randn(3, 32), dim=-1) * 20
    ds = _separable()
    lr, wd = 0.01, 0.5
    model = copy.deepcopy(encoder).train()
    model.zero_grad()
    F.cross_entropy(ImageClassifier(model, head)(ds.tensors[0]), ds.tensors[1]).backward()
    tuned = finetune_encoder(encoder, head, ds, steps=1, lr=lr, weight_decay=wd, batch_size=len(ds), warmup=0,
                             grad_clip=0.0)
    for (name, p), q in zip(tuned.named_parameters(), model.parameters()):
        want = q.detach() * (1 - lr * wd) - lr * q.grad / (q.grad.abs() + 1e-8)
        # a gradient that is 0 but for rounding (the attention's key bias) has a step of any sign
        clear = q.grad.abs() > 1e-5
        torch.testing.assert_close(p[clear], want[clear], rtol=1e-4, atol=1e-6, msg=name)
        assert torch.all((p - q.detach() * (1 - lr * wd)).abs() <= lr * (1 + 1e-4)), name


def test_sgd_finetuning_follows_the_schedule_clipping_and_weight_decay_by_hand():
    """Three SGD steps with no warmup: lr multipliers 1, (1 + cos(pi/3)) / 2 = 0.75 and
    (1 + cos(2 pi/3)) / 2 = 0.25; each full-batch gradient clipped to norm 0.5 over all
    parameters, then weight decay added and momentum 0.9 applied."""
    torch.manual_seed(0)
    encoder = build_clip("harness-micro-vit").visual
    head = F.normalize(torch.randn(3, 32), dim=-1) * 20
    ds = _separable()
    lr, wd, clip = 0.05, 0.1, 0.5
    model = copy.deepcopy(encoder).train()
    buffers = None
    clipped = 0
    for mult in (1.0, 0.75, 0.25):
        model.zero_grad()
        F.cross_entropy(ImageClassifier(model, head)(ds.tensors[0]), ds.tensors[1]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        clipped += norm > clip
        grads = [g * min(1.0, clip / (norm + 1e-6)) for g in grads]
        with torch.no_grad():
            grads = [g + wd * p for g, p in zip(grads, model.parameters())]
            buffers = grads if buffers is None else [0.9 * b + g for b, g in zip(buffers, grads)]
            for p, b in zip(model.parameters(), buffers):
                p -= lr * mult * b
    assert clipped >= 2  # the clipping is exercised, not a no-op
    tuned = finetune_encoder(encoder, head, ds, steps=3, lr=lr, weight_decay=wd, batch_size=len(ds), warmup=0,
                             grad_clip=clip, optimizer="sgd")
    for (name, p), q in zip(tuned.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_an_encoder_whose_parameters_are_frozen_is_fine_tuned_whole():
    """Every encoder parameter trains, whatever requires_grad the given module carries (the
    argument keeps its flags)."""
    torch.manual_seed(0)
    encoder = build_clip("harness-micro-vit").visual
    for p in encoder.parameters():
        p.requires_grad_(False)
    head = F.normalize(torch.randn(3, 32), dim=-1) * 20
    tuned = finetune_encoder(encoder, head, _separable(), steps=1, lr=1e-3, batch_size=32, warmup=0)
    moved = {n for (n, p), q in zip(tuned.named_parameters(), encoder.parameters()) if not torch.equal(p, q)}
    assert moved == {n for n, _ in encoder.named_parameters()}
    assert not any(p.requires_grad for p in encoder.parameters())


def test_batches_cover_the_data_once_per_epoch_in_a_new_order_each_time():
    """Full passes over the data (a last partial batch dropped), reshuffled every epoch."""
    batches = finetune._batches(10, 3, torch.Generator().manual_seed(0))
    epochs = [torch.cat([next(batches) for _ in range(3)]) for _ in range(4)]
    for e in epochs:
        assert len(e) == 9 and len(set(e.tolist())) == 9
    assert len({tuple(e.tolist()) for e in epochs}) > 1


def test_batches_of_data_the_batch_size_divides_cover_it_all_each_epoch():
    """9 images in batches of 3 are 3 batches an epoch (none dropped); 4 images in batches of 8 are
    one batch of all 4, not a wait for a batch that never fills."""
    batches = finetune._batches(9, 3, torch.Generator().manual_seed(0))
    for _ in range(3):
        assert sorted(torch.cat([next(batches) for _ in range(3)]).tolist()) == list(range(9))
    small = finetune._batches(4, 8, torch.Generator().manual_seed(0))
    assert [sorted(next(small).tolist()) for _ in range(2)] == [[0, 1, 2, 3]] * 2


class _Spy(torch.nn.Module):
    """A linear encoder of 2x2 RGB images that tells ``record`` of each forward pass."""

    def __init__(self, record):
        super().__init__()
        self.lin = torch.nn.Linear(12, 4)
        self.record = record

    def forward(self, x):
        self.record(self, x)
        return self.lin(x.flatten(1))


def test_finetuning_preserves_on_half_batches_reports_each_step_and_returns_an_eval_model():
    """With preservation each step draws ``batch_size // 2`` pool images, which the encoder being
    tuned and the pretrained one both see; ``progress`` gets steps 1..steps; the tuned encoder
    comes back in eval mode (dropout off), ready to evaluate."""
    seen: list[int] = []
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(20, 3, 2, 2, generator=gen), torch.arange(20) % 3)
    steps = []
    tuned = finetune_encoder(_Spy(lambda spy, x: seen.append(len(x))), torch.randn(3, 4, generator=gen), data,
                             steps=2, batch_size=8, warmup=0,
                             preserve_weight=1.0, preserve_images=torch.randn(30, 3, 2, 2, generator=gen),
                             progress=lambda step, total, metrics: steps.append((step, total)))
    assert seen == [8, 4, 4] * 2  # the task batch, then the pool batch through the reference and the tuned copy
    assert steps == [(1, 2), (2, 2)] and not tuned.training


def test_a_dataset_that_is_not_a_tensor_dataset_gives_every_item_in_order():
    """Any map-style dataset fine-tunes on all of its items, not only in-memory tasks' TensorDatasets."""

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.full((3, 2, 2), float(i)), i % 2

    images, labels = finetune._dataset_tensors(Items())
    assert images[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert labels.tolist() == [0, 1, 0, 1, 0] and labels.dtype == torch.long


def test_the_loss_adds_the_drift_times_the_preservation_weight():
    """loss = cross-entropy + preserve_weight * drift, as each step reports them."""
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 3, 2, 2, generator=gen), torch.arange(12) % 3)
    reports: list[dict[str, float]] = []
    finetune_encoder(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)), torch.randn(3, 4, generator=gen),
                     data, steps=3, lr=0.1, batch_size=6, warmup=0, preserve_weight=7.0,
                     preserve_images=torch.randn(10, 3, 2, 2, generator=gen),
                     progress=lambda step, total, metrics: reports.append(dict(metrics)))
    assert reports[-1]["drift"] > 0  # the encoder has moved by the last step
    for m in reports:
        assert m["loss"] == pytest.approx(m["ce"] + 7.0 * m["drift"], rel=1e-6)


def test_an_encoder_given_in_eval_mode_trains_in_train_mode():
    """Dropout and the like are on while fine-tuning, whatever mode the given encoder is in."""
    modes: list[bool] = []
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 2, 2, generator=gen), torch.arange(8) % 3)
    finetune_encoder(_Spy(lambda spy, x: modes.append(spy.training)).eval(), torch.randn(3, 4, generator=gen), data,
                     steps=2, batch_size=4, warmup=0)
    assert modes == [True, True]


def test_finetune_rejects_a_negative_preservation_weight():
    """A negative weight would reward drifting from the pretrained features."""
    encoder = build_clip("harness-micro-vit").visual
    with pytest.raises(ValueError, match="preserve_weight must be >= 0"):
        finetune_encoder(encoder, torch.randn(3, 32), _separable(), steps=1, preserve_weight=-0.5,
                         preserve_images=_separable().tensors[0])


def test_finetune_rejects_preservation_with_an_empty_pool():
    encoder = build_clip("harness-micro-vit").visual
    with pytest.raises(ValueError, match="preserve_weight > 0 needs preserve_images"):
        finetune_encoder(encoder, torch.randn(3, 32), _separable(), steps=1, preserve_weight=1.0,
                         preserve_images=torch.empty(0, 3, 16, 16))


def test_finetune_rejects_preservation_without_images():
    encoder = build_clip("harness-micro-vit").visual
    with pytest.raises(ValueError, match="^preserve_weight > 0 needs preserve_images$"):
        finetune_encoder(encoder, torch.randn(3, 32), _separable(), steps=1, preserve_weight=1.0)


# ---------------------------------------------------------------------------------------
# CLIP loss and the suite pipeline.

pipeline = pytest.importorskip("tasks.embedded.pipeline")


def test_clip_loss_equals_standard_clip_loss_for_distinct_captions():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = torch.tensor(10.0)
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    target = torch.arange(5)
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    assert pipeline.clip_loss(img, txt, target, scale).item() == pytest.approx(expected.item(), rel=1e-6)


def test_clip_loss_shares_a_repeated_caption_between_its_images():
    # Two images carry caption 0, one caption 1; features chosen so similarities are simple.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([0, 0, 1])
    s = 2.0
    # image->text: every image has similarity 1 to its own caption and 0 to the other.
    li = -math.log(math.exp(s) / (math.exp(s) + 1))
    # text->image: caption 0 scores (s, s, 0) and targets (1/2, 1/2, 0); caption 1 (0, 0, s), target image 2.
    z0 = 2 * math.exp(s) + 1
    lt0 = -(0.5 * math.log(math.exp(s) / z0) * 2)
    lt1 = -math.log(math.exp(s) / (2 + math.exp(s)))
    expected = 0.5 * (li + 0.5 * (lt0 + lt1))
    assert pipeline.clip_loss(img, txt, ids, torch.tensor(s)).item() == pytest.approx(expected, rel=1e-6)


def test_options_are_validated():
    """A misspelt key is refused by its name (not ignored, leaving the default in effect), and a
    size outside the suite's sizes is refused listing them; both sizes are taken."""
    with pytest.raises(pydantic.ValidationError, match=r"(?m)^pretrain_stpes\n  Extra inputs are not permitted"):
        pipeline.SuiteOptions.model_validate({"pretrain_stpes": 3})
    with pytest.raises(pydantic.ValidationError, match=r"(?m)^size\n  Input should be 'full' or 'tiny'"):
        pipeline.SuiteOptions.model_validate({"size": "huge"})
    assert [pipeline.SuiteOptions(size=size).size for size in ("full", "tiny")] == ["full", "tiny"]
    assert pipeline.SuiteOptions.model_validate({"pretrain_steps": 3}).pretrain_steps == 3
    assert pipeline.SuiteOptions().preserve_weight == 5.0  # the default regime (README), a documented deviation
    assert pipeline.SuiteOptions(preserve_weight=0).preserve_weight == 0


@pytest.mark.parametrize("env", [None, "given"])
def test_the_pipeline_command_caches_where_the_harness_does(env, sweep_dict, tmp_path, monkeypatch):
    """``python -m tasks.embedded.pipeline`` built the suite in ``./.cache`` by default, where no
    sweep (``$HARNESS_CACHE`` or ``~/.cache/harness``) would read it. Truth: the folder the
    harness resolves for a sweep without ``cache_dir``, and the documented paths."""
    from harness.config import validate_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if env is None:
        monkeypatch.delenv("HARNESS_CACHE", raising=False)
        expected = tmp_path / "home" / ".cache" / "harness"
    else:
        monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "given"))
        expected = tmp_path / "given"
    default = pipeline.parser().parse_args([]).cache_dir
    sweep_dict.pop("cache_dir")
    assert default.resolve() == expected.resolve() == validate_config(sweep_dict).resolved_cache_dir()


TINY = {"size": "tiny", "pretrain_pool": 64, "pretrain_steps": 3, "pretrain_batch_size": 16,
        "pretrain_warmup": 1, "finetune_steps": 3, "finetune_batch_size": 8, "finetune_warmup": 1,
        "preserve_weight": 1.0, "preserve_pool": 16, "workers": 1}


@pytest.fixture(scope="module")
def two_tasks():
    data = pytest.importorskip("tasks.embedded")
    if not hasattr(data, "EMBEDDED_TASKS"):
        pytest.skip("embedded task data not available")
    return list(data.EMBEDDED_TASKS)[:2]


@pytest.fixture(scope="module")
def suite(tmp_path_factory, two_tasks):
    cache = tmp_path_factory.mktemp("cache")
    return cache, pipeline.prepare_suite(two_tasks, cache, TINY, progress=False)


def test_suite_produces_loadable_artifacts(suite, two_tasks):
    _, art = suite
    assert set(art.finetuned) == set(two_tasks)
    assert art.timings["pretrain"] > 0 and all(art.timings[f"finetune:{t}"] > 0 for t in two_tasks)
    clip = build_clip(art.arch, pretrained=str(art.pretrained))
    for task in two_tasks:
        state = load_state_dict(art.finetuned[task])
        visual = build_clip(art.arch).visual
        visual.load_state_dict(state, strict=True)
        assert any(not torch.equal(state[k], v) for k, v in clip.visual.state_dict().items())


def test_second_call_reuses_everything(suite, two_tasks, monkeypatch):
    cache, art = suite

    def forbidden(*args, **kwargs):
        raise AssertionError("training was called for a cached artifact")

    monkeypatch.setattr(pipeline, "pretrain_clip", forbidden)
    monkeypatch.setattr(finetune, "finetune_encoder", forbidden)
    again = pipeline.prepare_suite(two_tasks, cache, TINY, progress=False)
    assert again.pretrained == art.pretrained and again.finetuned == art.finetuned
    assert again.identity == art.identity
    assert all(v == 0.0 for k, v in again.timings.items() if k != "total")


def test_look_up_finds_the_built_suite_and_builds_nothing(suite, two_tasks, tmp_path):
    """``train=False`` (a dry run naming job keys) returns what the build returned, and for
    models not built yet raises NotBuilt without training or writing anything."""
    from harness.errors import NotBuilt

    cache, art = suite
    found = pipeline.prepare_suite(two_tasks, cache, TINY, progress=False, train=False)
    assert (found.arch, found.pretrained, found.finetuned, found.identity) == (
        art.arch, art.pretrained, art.finetuned, art.identity)
    with pytest.raises(NotBuilt, match=f"fine-tuned models of {two_tasks[0]} are not built yet"):
        pipeline.prepare_suite(two_tasks[:1], cache, {**TINY, "finetune_lr": 1e-5}, progress=False, train=False)
    empty = tmp_path / "empty"
    with pytest.raises(NotBuilt, match="pretrained model is not built yet"):
        pipeline.prepare_suite(two_tasks, empty, {**TINY, "pretrain_lr": 7e-4}, progress=False, train=False)
    assert not empty.exists()


def test_changed_finetune_option_keeps_pretrained_and_retrains_encoders(suite, two_tasks):
    cache, art = suite
    other = pipeline.prepare_suite(two_tasks[:1], cache, {**TINY, "finetune_lr": 3e-4}, progress=False)
    assert other.pretrained == art.pretrained and other.timings["pretrain"] == 0.0
    assert other.finetuned[two_tasks[0]] != art.finetuned[two_tasks[0]]

    # a run killed while saving that encoder left its temporary file; the retraining deletes it
    path = other.finetuned[two_tasks[0]]
    path.unlink()
    stale = [path.parent / f".{path.name}.dead1234.tmp", path.parent / f"{path.name}.tmp4321"]  # the older naming too
    for f in stale:
        f.write_bytes(b"a write a kill cut short")
    again = pipeline.prepare_suite(two_tasks[:1], cache, {**TINY, "finetune_lr": 3e-4}, progress=False)
    assert again.finetuned[two_tasks[0]] == path and path.is_file() and not any(f.exists() for f in stale)


def test_finetune_seed_retrains_encoders_from_the_same_pretrained_model(suite, two_tasks):
    """Another fine-tuning seed: same pretrained weights, other encoders; unset, nothing moves."""
    cache, art = suite
    assert "finetune_seed" not in pipeline.SuiteOptions(**TINY).finetune_identity("v", two_tasks[0], "d", "s")
    other = pipeline.prepare_suite(two_tasks[:1], cache, {**TINY, "finetune_seed": 1}, progress=False)
    task = two_tasks[0]
    assert other.pretrained == art.pretrained and other.timings["pretrain"] == 0.0
    assert other.finetuned[task] != art.finetuned[task] and other.timings[f"finetune:{task}"] > 0
    a, b = load_state_dict(art.finetuned[task]), load_state_dict(other.finetuned[task])
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_finetune_optimizer_enters_the_identity_only_when_not_the_protocol(two_tasks):
    """AdamW (the default) leaves the identity, and so every cached encoder, as it was."""
    base = pipeline.SuiteOptions(**TINY).finetune_identity("v", two_tasks[0], "d", "s")
    assert "finetune_optimizer" not in base
    sgd = pipeline.SuiteOptions(**TINY, finetune_optimizer="sgd").finetune_identity("v", two_tasks[0], "d", "s")
    assert sgd == {**base, "finetune_optimizer": "sgd"}
    with pytest.raises(pydantic.ValidationError, match="finetune_optimizer"):
        pipeline.SuiteOptions(**TINY, finetune_optimizer="rmsprop")


def test_finetuned_checkpoint_is_deterministic_given_seed(suite, two_tasks, tmp_path):
    _, art = suite
    fresh = pipeline.prepare_suite(two_tasks[:1], tmp_path, TINY, progress=False)
    task = two_tasks[0]
    a, b = load_state_dict(art.finetuned[task]), load_state_dict(fresh.finetuned[task])
    assert fresh.finetuned[task].name == art.finetuned[task].name
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_cached_model_is_trained_again(two_tasks, tmp_path):
    """A model file of the suite truncated or emptied in the cache is not reported ready (every
    sweep then refused it, naming the file): prepare trains it again, to the same weights."""
    from harness.models import file_digest

    art = pipeline.prepare_suite(two_tasks[:1], tmp_path, TINY, progress=False)
    files = [art.pretrained, art.finetuned[two_tasks[0]]]
    digests = [file_digest(f) for f in files]
    for damaged in files:
        whole = damaged.read_bytes()
        for content in (whole[: len(whole) // 2], b""):
            damaged.write_bytes(content)
            again = pipeline.prepare_suite(two_tasks[:1], tmp_path, TINY, progress=False)
            assert [file_digest(f) for f in (again.pretrained, again.finetuned[two_tasks[0]])] == digests
            assert damaged.read_bytes() == whole


def _flip_a_weight_bit(path) -> None:
    """One bit of the tensor data flipped in place, the safetensors header left valid."""
    import struct

    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header + 1001] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_cached_model_edited_under_a_valid_header_is_trained_again(two_tasks, tmp_path, monkeypatch):
    """A flipped bit under a valid header (every merge of it silently changed) differs from the
    sha256 recorded when the file was written: a dry run says so, naming the file; prepare
    trains it again, to the same bytes, with a warning naming the file."""
    from harness.cache import digest_path
    from harness.errors import NotBuilt
    from harness.models import whole_safetensors

    art = pipeline.prepare_suite(two_tasks[:1], tmp_path, TINY, progress=False)
    files = [art.pretrained, art.finetuned[two_tasks[0]]]
    for damaged in files:
        whole = damaged.read_bytes()
        _flip_a_weight_bit(damaged)
        assert whole_safetensors(damaged) and damaged.read_bytes() != whole
        with pytest.raises(NotBuilt, match=f"{damaged.name}: its content differs from the sha256"):
            pipeline.prepare_suite(two_tasks[:1], tmp_path, TINY, progress=False, train=False)
        with pytest.warns(UserWarning, match=f"{damaged.name}: its content differs .*building it again"):
            pipeline.prepare_suite(two_tasks[:1], tmp_path, TINY, progress=False)
        assert damaged.read_bytes() == whole

    # Cached before digests were kept: used as it is, its digest recorded at the first run's read.
    import hashlib

    for f in files:
        digest_path(f).unlink()
    calls = []
    monkeypatch.setattr(pipeline, "pretrain_clip", lambda *a, **k: calls.append(1))
    pipeline.prepare_suite(two_tasks[:1], tmp_path, TINY, progress=False, train=False)
    assert not any(digest_path(f).exists() for f in files)  # a dry run writes nothing
    pipeline.prepare_suite(two_tasks[:1], tmp_path, TINY, progress=False)
    assert not calls
    assert [digest_path(f).read_text() for f in files] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


@pytest.mark.parametrize("edit", ["images", "captions"])
def test_a_cached_pool_edited_in_place_is_generated_again(edit, tmp_path):
    """The pool trains the pretrained model (and the preservation term) whenever one is built:
    a flipped bit in its cached images, or a caption edited in its valid JSON, silently trained
    a different model. It is checked against the digest recorded when written, and generated
    again, as ``pretraining_pool`` makes it, with a warning naming the file."""
    import json

    from tasks.embedded import pretraining_pool

    truth_images, truth_captions = pretraining_pool(32, seed=1, size="tiny")
    pipeline.cached_pool(32, 1, "tiny", tmp_path)
    (images_file,) = (tmp_path / "pool").glob("*.safetensors")
    damaged = images_file if edit == "images" else images_file.with_suffix(".json")
    whole = damaged.read_bytes()
    if edit == "images":
        _flip_a_weight_bit(damaged)
    else:
        damaged.write_text(json.dumps({"captions": ["a photo of nothing", *truth_captions[1:]]}))
    with pytest.warns(UserWarning, match=f"{damaged.name}: its content differs .*generating it again"):
        images, captions = pipeline.cached_pool(32, 1, "tiny", tmp_path)
    assert torch.equal(images, truth_images) and captions == list(truth_captions)
    assert damaged.read_bytes() == whole


def test_shipped_pretrained_is_used_only_when_its_identity_matches(suite, two_tasks, tmp_path, monkeypatch, capsys):
    import shutil

    from harness.cache import atomic_write_json

    cache, art = suite
    data = pytest.importorskip("tasks.embedded")
    assets = tmp_path / "assets"
    assets.mkdir()
    opts = pipeline.SuiteOptions.model_validate(TINY)
    shipped = assets / f"{opts.arch}-pretrained.safetensors"
    shutil.copy(art.pretrained, shipped)
    atomic_write_json(shipped.with_suffix(".json"), {"identity": opts.pretrain_identity(data.DATA_VERSION)})
    monkeypatch.setattr(pipeline, "ASSETS_DIR", assets)
    used = pipeline.prepare_suite(two_tasks[:1], tmp_path / "c1", TINY, progress=False)
    assert used.pretrained == shipped and used.timings["pretrain"] == 0.0

    calls = []
    real = pipeline.pretrain_clip
    monkeypatch.setattr(pipeline, "pretrain_clip", lambda *a, **k: calls.append(1) or real(*a, **k))
    capsys.readouterr()
    pipeline.prepare_suite(two_tasks[:1], tmp_path / "c2", TINY, progress=True, from_scratch=True)
    logged = capsys.readouterr().out.splitlines()  # not a terminal: a line per tenth of each bar
    pipeline.prepare_suite(two_tasks[:1], tmp_path / "c3", {**TINY, "pretrain_lr": 5e-4}, progress=False)
    assert len(calls) == 2
    opts = pipeline.SuiteOptions.model_validate(TINY)
    for bar, total in ((f"pretrain {opts.arch}", opts.pretrain_steps), (f"finetune {two_tasks[0]}", opts.finetune_steps)):
        lines = [line for line in logged if line.startswith(f"{bar}: ")]
        assert lines and lines[-1].startswith(f"{bar}: {total}/{total} "), logged


def test_finetuning_reads_task_data_from_the_given_cache(two_tasks, tmp_path, monkeypatch):
    """A sweep's ``cache_dir`` holds everything it builds: no task images land in $HARNESS_CACHE."""
    from tasks.embedded import data

    elsewhere = tmp_path / "env-cache"
    monkeypatch.setenv("HARNESS_CACHE", str(elsewhere))
    pipeline.prepare_suite(two_tasks[:1], tmp_path / "sweep-cache", TINY, progress=False)
    assert data.cache_path(two_tasks[0], "tiny", tmp_path / "sweep-cache").is_file()
    assert not elsewhere.exists()


def test_concurrent_preparations_train_each_model_once(two_tasks, tmp_path):
    """Two sweeps sharing a cache: one builds, the other waits for the lock and reuses."""
    import threading

    outcomes = []

    def prepare() -> None:
        outcomes.append(pipeline.prepare_suite(two_tasks[:1], tmp_path, TINY, progress=False))

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trained = sorted(a.timings["pretrain"] > 0 for a in outcomes)
    assert trained == [False, True]
    assert sorted(a.timings[f"finetune:{two_tasks[0]}"] > 0 for a in outcomes) == [False, True]
    assert outcomes[0].finetuned == outcomes[1].finetuned


def test_finetuned_cache_key_tells_real_data_from_its_stand_in(monkeypatch):
    import warnings

    from harness.cache import content_key
    from tasks.embedded import data

    def key() -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", data.EmbeddedSourceWarning)
            source = data.source_variant("emb_fashion")
        return source, content_key(pipeline.SuiteOptions().finetune_identity("v", "emb_fashion", "d", source))

    monkeypatch.delenv("HARNESS_EMBEDDED_FALLBACK", raising=False)
    real_source, real = key()
    monkeypatch.setenv("HARNESS_EMBEDDED_FALLBACK", "1")
    stand_in_source, stand_in = key()
    if real_source == stand_in_source:
        pytest.skip("Debian dataset-fashion-mnist is not installed: only the stand-in exists here")
    assert real != stand_in


def test_prepare_command_names_the_pretrained_file_and_the_fine_tuned_folder(suite, two_tasks, tmp_path):
    import yaml
    from click.testing import CliRunner

    from harness.cli import main

    cache, art = suite
    sweep = tmp_path / "suite.yaml"
    sweep.write_text(yaml.safe_dump({"name": "prep", "cache_dir": str(cache), "tasks": two_tasks,
                                     "model": {"source": "embedded", "suite": TINY}}))
    r = CliRunner().invoke(main, ["prepare", "-q", str(sweep)], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    folder = art.finetuned[two_tasks[0]].parent
    assert folder.name == "finetuned" and art.pretrained.parent != folder
    assert f"pretrained {art.pretrained}, 2 fine-tuned encoders under {folder}\n" in r.output


def test_a_damaged_digest_file_is_a_mismatch_naming_the_cached_file(tmp_path):
    """A digest file with a flipped high bit (no longer UTF-8) is a digest that differs, as any
    other damage to it: the pool is generated again with the warning naming the pool file (it
    was a bare "'utf-8' codec can't decode" line, naming no file). Truth: ``pretraining_pool``."""
    from harness.cache import digest_path
    from tasks.embedded import pretraining_pool

    truth_images, truth_captions = pretraining_pool(32, seed=1, size="tiny")
    pipeline.cached_pool(32, 1, "tiny", tmp_path)
    (images_file,) = (tmp_path / "pool").glob("*.safetensors")
    recorded = digest_path(images_file)
    good = recorded.read_bytes()
    recorded.write_bytes(bytes([good[0] ^ 0x80]) + good[1:])
    with pytest.warns(UserWarning, match=f"{images_file.name}: its content differs .*generating it again"):
        images, captions = pipeline.cached_pool(32, 1, "tiny", tmp_path)
    assert torch.equal(images, truth_images) and captions == list(truth_captions)
    assert recorded.read_bytes() == good


def test_a_writer_killed_just_after_the_rename_leaves_its_own_digest(tmp_path, monkeypatch):
    """The digest is recorded before the new file is moved into place: a pool regenerated over an
    older build's digest, its writer killed right after the move, is read back next time, not
    taken as damaged and generated a second time. Truth: ``pretraining_pool``."""
    import os
    import warnings

    from harness.cache import digest_path
    from tasks.embedded import pretraining_pool

    truth_images, _ = pretraining_pool(32, seed=1, size="tiny")
    pipeline.cached_pool(32, 1, "tiny", tmp_path)
    (images_file,) = (tmp_path / "pool").glob("*.safetensors")
    digest_path(images_file).write_bytes(b"0" * 64)  # an older build's digest
    real_replace = os.replace

    def killed_after_the_move(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".safetensors"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed_after_the_move)
    with pytest.warns(UserWarning, match="generating it again"), pytest.raises(KeyboardInterrupt):
        pipeline.cached_pool(32, 1, "tiny", tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(pipeline._data(), "pretraining_pool", lambda *a, **k: pytest.fail("generated again"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, _ = pipeline.cached_pool(32, 1, "tiny", tmp_path)
    assert torch.equal(images, truth_images)


#: What each stage of the suite reads (its training code): pretraining, and fine-tuning from the
#: pretrained file (whose digest carries the pretraining settings). ``workers`` changes neither.
PRETRAINING_READS = {"arch", "size", "seed", "pretrain_pool", "pretrain_pool_seed", "pretrain_steps",
                     "pretrain_batch_size", "pretrain_lr", "pretrain_weight_decay", "pretrain_warmup", "grad_clip"}
FINETUNING_READS = {"size", "seed", "finetune_seed", "finetune_optimizer", "finetune_steps", "finetune_lr",
                    "finetune_batch_size", "finetune_weight_decay", "finetune_warmup", "grad_clip",
                    "preserve_weight", "preserve_pool"}


def _another(name: str, value):
    """A valid value of option ``name`` other than ``value``."""
    if name == "arch":
        return "harness-micro-vit"
    if name == "size":
        return "tiny" if value == "full" else "full"
    if name == "finetune_optimizer":
        return "sgd"
    if value is None:
        return 3
    return value + 1 if isinstance(value, int) else value / 2


@pytest.mark.parametrize("name", sorted(pipeline.SuiteOptions.model_fields))
def test_each_option_is_in_the_identity_of_the_models_it_trains(name):
    """An option changed reruns the stage that reads it (another cached model file), and the
    fine-tuned models of another pretrained file are other files: none is reused for settings it
    was not trained under."""
    base = pipeline.SuiteOptions(**TINY)
    other = pipeline.SuiteOptions(**{**TINY, name: _another(name, getattr(base, name))})
    assert getattr(other, name) != getattr(base, name)
    assert (base.pretrain_identity("v") != other.pretrain_identity("v")) == (name in PRETRAINING_READS)
    tuned = base.finetune_identity("v", "t", "d", "s") != other.finetune_identity("v", "t", "d", "s")
    assert tuned == (name in FINETUNING_READS)
    assert base.finetune_identity("v", "t", "d", "s") != base.finetune_identity("v", "t", "e", "s")  # the pretrained digest
    assert base.finetune_identity("v", "t", "d", "s") != base.finetune_identity("w", "t", "d", "s")  # the data version


def test_a_cached_pool_is_never_another_seeds_or_sizes(tmp_path):
    """The pool cache is keyed by everything ``pretraining_pool`` is given: pools of another seed,
    size or count sharing the cache folder are each the generator's own, never one read back."""
    from tasks.embedded import pretraining_pool

    for n, seed, size in ((16, 1, "tiny"), (16, 2, "tiny"), (16, 1, "full"), (24, 1, "tiny")):
        images, captions = pipeline.cached_pool(n, seed, size, tmp_path)
        truth_images, truth_captions = pretraining_pool(n, seed=seed, size=size)
        assert torch.equal(images, truth_images) and captions == list(truth_captions), (n, seed, size)


def test_each_stage_trains_with_the_options_it_is_given(two_tasks, tmp_path, monkeypatch):
    """Pretraining gets ``seed``; fine-tuning gets the task's train split, ``finetune_seed`` and
    ``preserve_pool`` preservation images (the trainers are stand-ins recording their inputs)."""
    from tasks.embedded import data

    opts = {**TINY, "seed": 3, "finetune_seed": 5, "preserve_pool": 24}
    calls = {}

    def pretrain(arch, images, captions, **kw):
        calls["pretrain"] = kw
        return build_clip(arch).float().eval()

    def tune(encoder, head, dataset, **kw):
        calls["finetune"] = (dataset, kw)
        return encoder

    monkeypatch.setattr(pipeline, "pretrain_clip", pretrain)
    monkeypatch.setattr(finetune, "finetune_encoder", tune)
    pipeline.prepare_suite(two_tasks[:1], tmp_path, opts, progress=False)
    assert calls["pretrain"]["seed"] == 3 and calls["pretrain"]["steps"] == TINY["pretrain_steps"]
    dataset, kw = calls["finetune"]
    truth = data.load_task(two_tasks[0], size="tiny", cache_dir=str(tmp_path)).dataset("train")
    assert len(dataset) == len(truth)
    assert all(torch.equal(dataset[i][0], truth[i][0]) and dataset[i][1] == truth[i][1] for i in range(len(truth)))
    assert kw["seed"] == 5 and kw["steps"] == TINY["finetune_steps"]
    assert kw["preserve_images"].shape[0] == 24


def test_pretraining_clamps_the_logit_scale_at_100(monkeypatch):
    """open_clip's recipe: exp(logit_scale) never exceeds 100, whatever it starts at."""
    def started_high(arch):
        model = build_clip(arch)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1000.0))
        return model

    monkeypatch.setattr(pipeline, "build_clip", started_high)
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model = pipeline.pretrain_clip("harness-micro-vit", images, [f"c{i % 4}" for i in range(8)], steps=1,
                                   batch_size=8, lr=1e-6, warmup=0)
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-4)


def test_pretraining_decays_only_matrices(monkeypatch):
    """No weight decay on gains, biases, embeddings' scale or the logit scale (open_clip's rule:
    parameters of fewer than two dimensions, and the embeddings, are exempt)."""
    groups = {}

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            params = list(params)
            groups["decay"] = {id(p) for g in params if g["weight_decay"] > 0 for p in g["params"]}
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model = pipeline.pretrain_clip("harness-micro-vit", images, ["a", "b", "a", "b"], steps=1, batch_size=4)
    for name, p in model.named_parameters():
        exempt = p.ndim < 2 or name.endswith(("positional_embedding", "class_embedding", "logit_scale"))
        assert (id(p) in groups["decay"]) == (not exempt), name


def test_pretraining_sees_every_image_once_per_epoch(monkeypatch):
    """32 images in batches of 8: four steps are one epoch, each image in exactly one batch."""
    import tasks.base

    seen = []
    real = tasks.base.normalize_uint8

    def recording(images):
        seen.extend(images[:, 0, 0, 0].tolist())
        return real(images)

    monkeypatch.setattr(tasks.base, "normalize_uint8", recording)
    images = torch.randint(0, 256, (32, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, 0, 0, 0] = torch.arange(32, dtype=torch.uint8)
    pipeline.pretrain_clip("harness-micro-vit", images, [f"c{i % 4}" for i in range(32)], steps=4, batch_size=8)
    assert sorted(seen) == list(range(32))


def test_suite_identity_changes_with_any_fine_tuned_encoder(suite, two_tasks):
    """Two suites over one pretrained model but other encoders are other suites."""
    cache, art = suite
    other = pipeline.prepare_suite(two_tasks, cache, {**TINY, "finetune_lr": 3e-4}, progress=False)
    assert other.pretrained == art.pretrained and other.finetuned != art.finetuned
    assert other.identity != art.identity


def test_quality_report_rows_by_their_definitions(suite, two_tasks, monkeypatch):
    """Weight averaging is the mean of the fine-tuned encoders; perfect routing at lambda 0 is
    the pretrained encoder with the task's own MLPs; relative norms are ||tau|| / ||theta_0||."""
    from harness.evaluation import accuracy
    from harness.models import get_tokenizer, zeroshot_head
    from tasks.embedded import data

    cache, art = suite
    monkeypatch.setenv("HARNESS_CACHE", str(cache))
    report = pipeline.quality_report(art, size="tiny", lambdas=(0.0, 0.5, 1.0), routing_lambda=0.0)
    clip = build_clip(art.arch, pretrained=str(art.pretrained))
    base = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    fts = {t: load_state_dict(art.finetuned[t]) for t in two_tasks}

    def acc(state, task):
        enc = build_clip(art.arch).visual
        enc.load_state_dict(state)
        loaded = data.load_task(task, size="tiny")
        head = zeroshot_head(clip, get_tokenizer(art.arch), loaded.prompts())
        return accuracy(ImageClassifier(enc.eval(), head), loaded.dataset("test"))

    mean = {k: (fts[two_tasks[0]][k] + fts[two_tasks[1]][k]) / 2 if v.is_floating_point() else v
            for k, v in base.items()}
    for t in two_tasks:
        assert report["weight_averaging"][t] == pytest.approx(acc(mean, t))
        own_mlps = {k: fts[t][k] if ".mlp." in k else v for k, v in base.items()}
        assert report["perfect_routing"][t] == pytest.approx(acc(own_mlps, t))
        tau = torch.sqrt(sum(((fts[t][k] - v) ** 2).sum() for k, v in base.items()))
        assert report["tau_relative_norm"][t] == pytest.approx((tau / torch.sqrt(sum((v ** 2).sum()
                                                                for v in base.values()))).item(), rel=1e-5)
    assert report["pretrained"] == pytest.approx({t: acc(base, t) for t in two_tasks})


def test_quality_report_chooses_the_task_arithmetic_lambda_on_val(suite, two_tasks, monkeypatch):
    """A stand-in accuracy reads lambda back from the merged encoder: on val it peaks at 0.5,
    on test it grows with lambda. The best lambda is val's peak, task arithmetic is scored on
    test at it, and the grid bar holds only for a best lambda strictly inside the grid."""
    import harness.evaluation
    from tasks.embedded import data

    cache, art = suite
    monkeypatch.setenv("HARNESS_CACHE", str(cache))
    base = build_clip(art.arch, pretrained=str(art.pretrained)).visual.state_dict()
    key = next(k for k, v in base.items() if v.is_floating_point() and v.ndim == 2)
    direction = sum(load_state_dict(art.finetuned[t])[key] - base[key] for t in two_tasks)
    assert direction.abs().sum() > 0
    n_val = round(data.VAL_FRACTION * data.SIZES["tiny"][0])

    def accuracy(classifier, dataset):
        lam = float(((classifier.encoder.state_dict()[key] - base[key]) * direction).sum() / direction.pow(2).sum())
        lam = round(lam, 3)
        return -100 * (lam - 0.5) ** 2 if len(dataset) == n_val else 100 * lam

    monkeypatch.setattr(harness.evaluation, "accuracy", accuracy)
    report = pipeline.quality_report(art, size="tiny", lambdas=(0.0, 0.5, 1.0))
    assert report["ta_grid_val"] == pytest.approx({0.0: -25.0, 0.5: 0.0, 1.0: -25.0})
    assert report["ta_best_lambda"] == 0.5
    assert report["task_arithmetic"] == pytest.approx({t: 50.0 for t in two_tasks})
    assert report["bars"]["TA best lambda strictly inside grid"]
    edge = pipeline.quality_report(art, size="tiny", lambdas=(0.5, 1.0))
    assert edge["ta_best_lambda"] == 0.5 and not edge["bars"]["TA best lambda strictly inside grid"]


def test_each_stage_gets_every_option_it_reads(suite, two_tasks, monkeypatch):
    """Every option in a stage's identity reaches its trainer (one keyed but not passed on would
    name a model trained under other settings); each is set off its default. The suite's cache
    holds the data and pools already; these options key other model files."""
    opts = {**TINY, "pretrain_batch_size": 12, "pretrain_lr": 2e-3, "pretrain_weight_decay": 0.3,
            "pretrain_warmup": 2, "grad_clip": 0.7, "finetune_optimizer": "sgd", "finetune_lr": 3e-2,
            "finetune_batch_size": 6, "finetune_weight_decay": 0.05, "finetune_warmup": 4, "preserve_weight": 2.5}
    calls = {}

    def pretrain(arch, images, captions, **kw):
        calls["pretrain"] = kw
        return build_clip(arch).float().eval()

    def tune(encoder, head, dataset, **kw):
        calls["finetune"] = kw
        return encoder

    monkeypatch.setattr(pipeline, "pretrain_clip", pretrain)
    monkeypatch.setattr(finetune, "finetune_encoder", tune)
    pipeline.prepare_suite(two_tasks[:1], suite[0], opts, progress=False)
    assert {k: calls["pretrain"][k] for k in ("batch_size", "lr", "weight_decay", "warmup", "grad_clip")} == {
        "batch_size": 12, "lr": 2e-3, "weight_decay": 0.3, "warmup": 2, "grad_clip": 0.7}
    assert {k: calls["finetune"][k] for k in ("optimizer", "lr", "batch_size", "weight_decay", "warmup", "grad_clip",
                                                "preserve_weight")} == {
        "optimizer": "sgd", "lr": 3e-2, "batch_size": 6, "weight_decay": 0.05, "warmup": 4, "grad_clip": 0.7,
        "preserve_weight": 2.5}


def test_pretraining_follows_the_warmup_cosine_schedule_and_clips_gradients(monkeypatch):
    """Four steps with two of warmup: lr multipliers 1/2, 1, 1 and (1 + cos(pi/2)) / 2 = 1/2; every
    step's gradient norm over all parameters is at most the clip."""
    seen = []

    class Recording(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            seen.append((self.param_groups[0]["lr"], math.sqrt(sum(float(g.pow(2).sum()) for g in grads))))
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pipeline.pretrain_clip("harness-micro-vit", images, [f"c{i % 4}" for i in range(8)], steps=4, batch_size=8,
                           lr=1e-3, warmup=2, grad_clip=1e-3)
    assert [lr for lr, _ in seen] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])
    assert all(norm <= 1e-3 * (1 + 1e-4) for _, norm in seen)


def test_a_finetune_seed_of_0_is_its_own_identity():
    """finetune_seed=0 with seed=3 trains with seed 0: it must not share a key with seed 3's encoders."""
    plain, zero = pipeline.SuiteOptions(seed=3), pipeline.SuiteOptions(seed=3, finetune_seed=0)
    assert zero.effective_finetune_seed == 0
    assert plain.finetune_identity("v", "t", "d", "s") != zero.finetune_identity("v", "t", "d", "s")


def test_the_pretrained_identity_follows_the_architectures_config_file(tmp_path, monkeypatch):
    """Resizing a model in its JSON config (same name) is another pretrained model."""
    monkeypatch.setattr(pipeline, "CONFIG_DIR", tmp_path)
    (tmp_path / "arch-x.json").write_text('{"embed_dim": 32}')
    before = pipeline.SuiteOptions(arch="arch-x").pretrain_identity("v")
    (tmp_path / "arch-x.json").write_text('{"embed_dim": 64}')
    assert pipeline.SuiteOptions(arch="arch-x").pretrain_identity("v") != before


def test_pretraining_gives_the_same_weights_whatever_the_thread_count():
    """The shipped weights were trained on one thread, and a cached model is keyed by its options,
    not by the cores of the machine that trained it: `harness prepare --from-scratch` reproduces
    them bit for bit on any machine, and the caller's thread count is left as it was."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=g)
    captions = [f"a photo of the digit {i % 5}." for i in range(64)]
    before = torch.get_num_threads()
    states = []
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            model = pipeline.pretrain_clip("harness-tiny-vit", images, captions, steps=3, batch_size=64, warmup=0)
            assert torch.get_num_threads() == threads
            states.append(model.state_dict())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_preservation_draws_on_a_pool_of_its_own_generated_as_the_pretraining_one(two_tasks, tmp_path, monkeypatch):
    """The preservation term's images are a pool of ``preserve_pool`` generated with the pretraining
    pool's seed + 1000: images of the pretraining kind, a draw of their own (this small one shares
    none with the pretraining pool; at full size 17 of 2,048 plain garment silhouettes repeat)."""
    import tasks.embedded as emb
    from tasks.base import normalize_uint8
    from tasks.embedded.data import image_hashes

    opts = {**TINY, "preserve_pool": 24}
    seen = {}

    def tune(encoder, head, dataset, **kw):
        seen["preserve"] = kw["preserve_images"]
        return encoder

    monkeypatch.setattr(finetune, "finetune_encoder", tune)
    pipeline.prepare_suite(two_tasks[:1], tmp_path, opts, progress=False)
    options = pipeline.SuiteOptions.model_validate(opts)
    expected, _ = emb.pretraining_pool(24, seed=options.pretrain_pool_seed + 1000, size="tiny")
    assert torch.equal(seen["preserve"], normalize_uint8(expected))
    pretraining, _ = emb.pretraining_pool(options.pretrain_pool, seed=options.pretrain_pool_seed, size="tiny")
    assert not set(image_hashes(expected.numpy())) & set(image_hashes(pretraining.numpy()))
