"""``eval.precision``: evaluation and test-time adaptation forwards under autocast, float32 merging,
job keys that change only when the precision is not fp32."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

import methods.wemoe as wemoe
from harness.config import validate_config
from harness.evaluation import correct_predictions
from harness.models import ImageClassifier
from harness.plan import plan_jobs
from harness.runner import run_sweep
from methods.adamerging import AdaMerging
from methods.base import MergeContext
from tests.conftest import TRAINED_TASKS, make_sweep_dict, perturbed_micro_encoders
from tests.test_job_keys import _identities

TASKS = ["a", "b"]


@pytest.fixture(scope="module")
def micro():
    return perturbed_micro_encoders(TASKS)


def _heads(classes: int = 4, dim: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {t: 10 * torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1) for t in TASKS}


def _unlabeled() -> dict:
    data = {t: [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i))] for i, t in enumerate(TASKS)}
    return {t: (lambda t=t: iter(data[t])) for t in TASKS}


class OutputDtypes:
    """Records, per module class, the dtypes of the tensors modules return while active. Linear
    holds the Linear modules called (the micro tower's MLPs, WeMoE's routers); nn.MultiheadAttention
    applies its projections without calling them."""

    def __enter__(self) -> dict[str, set]:
        self.seen: dict[str, set] = {}

        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                self.seen.setdefault(type(module).__name__, set()).add(out.dtype)

        self.handle = nn.modules.module.register_module_forward_hook(hook)
        return self.seen

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------------------------
# keys


def _sweep(precision: str | None, **extra) -> dict:
    d = make_sweep_dict(Path("/nonexistent"), Path("/nonexistent-out"))
    d["references"] = {"perfect_routing": True}
    d["robustness"] = {"tasks": ["toy_stripes"], "corruptions": ["gaussian_noise"]}
    d["methods"] = [{"name": "task_arithmetic", "grid": {"scaling": [0.2, 0.6]}},
                    {"name": "adamerging", "params": {"steps": 5}},
                    {"name": "wemoe", "params": {"steps": 5, "batch_reduce": True}}]
    if precision is not None:
        d["eval"] = {"precision": precision}
    d.update(extra)
    return d


def _keys(d: dict) -> dict:
    cfg = validate_config(d, "s.yaml")
    return {(s.kind, s.label, s.task, str(s.params), s.protocol): s.key for s in plan_jobs(cfg, *_identities(cfg))}


def test_fp32_keys_are_the_keys_without_the_field_and_other_precisions_change_every_key():
    for extra in ({}, {"generalization": {"unseen": ["toy_colours"]}, "robustness": None}):
        absent, fp32 = _keys(_sweep(None, **extra)), _keys(_sweep("fp32", **extra))
        bf16, fp16 = _keys(_sweep("bf16", **extra)), _keys(_sweep("fp16", **extra))
        assert absent == fp32 and len(absent) >= 7
        assert {k[0] for k in absent} >= {"pretrained", "individual", "perfect_routing", "merge"}
        for job, key in absent.items():  # every job evaluates: every key holds the precision
            assert len({key, bf16[job], fp16[job]}) == 3, job
    digests = [validate_config(_sweep(p)).digest() for p in (None, "fp32", "bf16")]
    assert digests[0] == digests[1] != digests[2]  # the sweep's MLflow parent run


def test_a_study_is_measured_at_its_precision():
    from harness.tuning import study_measures

    def measures(precision: str | None) -> str:
        d = _sweep(precision, robustness=None)
        d["methods"] = [{"name": "adamerging", "params": {"steps": 5},
                         "tune": {"n_trials": 2, "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2}}}}]
        cfg = validate_config(d, "s.yaml")
        return study_measures(cfg, cfg.methods[0], *_identities(cfg))

    assert measures(None) == measures("fp32") != measures("bf16") != measures("fp16")


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("value", ["fp8", "float16", 16])
def test_an_unknown_precision_is_one_line_naming_the_field(value, sweep_dict, tmp_path):
    from harness.cli import main

    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({**sweep_dict, "eval": {"precision": value}}))
    result = CliRunner().invoke(main, ["validate", str(f)])
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2, message
    assert message.startswith(f"error: {f}: eval.precision:"), message
    assert "'fp32', 'bf16' or 'fp16'" in message and repr(value) in message, message
    assert "Traceback" not in result.stderr + result.stdout


def test_a_precision_the_device_cannot_run_fails_the_job_with_one_message(monkeypatch):
    import harness.precision as precision

    monkeypatch.setattr(precision, "_CHECKED", {})
    precision.check_precision("bf16", "cpu")  # runs here (torch's CPU autocast has bf16 and fp16)
    precision.check_precision("fp16", "cpu")
    monkeypatch.setattr(precision, "_CHECKED", {})
    monkeypatch.setattr(precision, "_probe", lambda dtype, device: "autocast computes in torch.float32")
    with pytest.raises(precision.PrecisionError, match=r"^eval\.precision: fp16 does not run on cpu with torch "
                                                       r".*\(autocast computes in torch.float32\)"):
        precision.check_precision("fp16", "cpu")
    precision.check_precision("fp32", "cpu")  # no autocast, nothing to check


def test_a_precision_the_device_cannot_run_is_refused_before_any_job_naming_the_field(sweep_dict, tmp_path,
                                                                                      monkeypatch):
    """``eval.precision: fp16`` on a device whose autocast refuses it: validate and the dry run
    said ``valid`` and every job then failed with the same error; now one line names the file,
    field and value before any job, as a missing device is. A SLURM sweep's jobs check on their node."""
    from harness.cli import main

    import harness.precision as precision

    monkeypatch.setattr(precision, "_CHECKED", {})
    monkeypatch.setattr(precision, "_probe",
                        lambda dtype, device: "autocast computes in torch.float32" if dtype == torch.float16 else None)
    d = {**sweep_dict, "device": "cpu", "eval": {**sweep_dict.get("eval", {}), "precision": "fp16"}}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    want = (f"error: {f}: eval.precision: fp16 does not run on cpu with torch {torch.__version__} (autocast computes "
            "in torch.float32), where the jobs run (executor: local); use fp32 or bf16 (got 'fp16')")
    for args in (["validate", str(f)], ["sweep", str(f), "--dry-run"], ["sweep", "-q", str(f)]):
        r = CliRunner().invoke(main, args)
        err = " ".join(r.stderr.split())
        assert r.exit_code == 2 and err == want, (args, err, r.stdout)
    assert "failed" not in r.stdout and not list(Path(d["output_dir"]).glob("results/*.json"))
    for override in ("eval.precision=bf16", "executor.kind=slurm"):
        r = CliRunner().invoke(main, ["validate", str(f), override])
        assert r.exit_code == 0 and "valid" in r.stdout, r.output


def test_an_autocast_that_silently_stays_float32_is_refused_and_checked_per_device(monkeypatch):
    """An autocast that warns and disables itself (a dtype the backend lacks) computes in float32:
    the job would run in float32 under a bf16 key. The probe reads the dtype actually computed;
    its verdict is kept per device, so another device is probed on its own."""
    import contextlib

    import harness.precision as precision

    monkeypatch.setattr(precision, "_CHECKED", {})
    monkeypatch.setattr(torch, "autocast", lambda **kwargs: contextlib.nullcontext())
    with pytest.raises(precision.PrecisionError, match=r"autocast computes in torch\.float32, not torch\.bfloat16"):
        precision.check_precision("bf16", "cpu")
    assert set(precision._CHECKED) == {("bf16", "cpu")}
    monkeypatch.setattr(precision, "_probe", lambda dtype, device: None)
    precision.check_precision("bf16", "meta")  # another device: its own probe's verdict
    assert set(precision._CHECKED) == {("bf16", "cpu"), ("bf16", "meta")}


def test_an_autocast_the_backend_refuses_is_a_precision_error_with_its_reason(monkeypatch):
    """A backend that raises on the dtype (no fp16 kernels) is not a device the precision runs on:
    the job fails with that reason, not later mid-evaluation or silently in float32."""
    import harness.precision as precision

    def refuses(**kwargs):
        raise RuntimeError("fp16 autocast is not supported here\nsecond line")

    monkeypatch.setattr(precision, "_CHECKED", {})
    monkeypatch.setattr(torch, "autocast", refuses)
    with pytest.raises(precision.PrecisionError,
                       match=r"fp16 does not run on cpu .*\(RuntimeError: fp16 autocast is not supported here\);"):
        precision.check_precision("fp16", "cpu")


def test_autocast_runs_on_the_devices_kind_in_the_precisions_dtype_and_is_probed_once(monkeypatch):
    """``cuda:1`` autocasts as device type ``cuda`` (a CPU autocast there would leave the GPU in
    float32), each precision in its own dtype; a device is probed once per process, not per job."""
    import harness.precision as precision

    monkeypatch.setattr(torch, "autocast", lambda **kwargs: kwargs)
    assert precision.autocast("bf16", "cuda:1") == {"device_type": "cuda", "dtype": torch.bfloat16}
    assert precision.autocast("fp16", torch.device("cpu")) == {"device_type": "cpu", "dtype": torch.float16}
    probed = []
    monkeypatch.setattr(precision, "_CHECKED", {})
    monkeypatch.setattr(precision, "_probe", lambda dtype, device: probed.append((dtype, device)))
    for _ in range(3):
        precision.check_precision("bf16", "cuda:1")
    assert probed == [(torch.bfloat16, torch.device("cuda:1"))]


def test_a_device_whose_autocast_keeps_layer_norm_in_float32_runs_bf16(monkeypatch):
    """CUDA's autocast runs layer_norm in float32 (torch's autocast op reference) while its matmuls
    run in bf16: such a device runs bf16, judged by the Linear after it, not refused for the norm.
    Here CPU layer_norm is made to return float32 as CUDA's does."""
    import harness.precision as precision

    layer_norm = torch.nn.functional.layer_norm
    normed = []

    def float32_layer_norm(x, *a, **k):
        normed.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return layer_norm(x.float(), *a, **k)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", float32_layer_norm)
    monkeypatch.setattr(precision, "_CHECKED", {})
    precision.check_precision("bf16", "cpu")
    # the probe put a bf16 activation through the float32 norm under autocast, and found the device runs bf16
    assert normed == [(torch.bfloat16, True)]
    assert precision._CHECKED == {("bf16", "cpu"): None}


def test_fp32_runs_with_no_autocast_at_all():
    """fp32 is float32 as before the field: no autocast, not a float32 one that warns and disables
    itself on every forward pass."""
    import harness.precision as precision

    assert isinstance(precision.autocast("fp32", "cpu"), contextlib.nullcontext)
    assert isinstance(precision.autocast("fp32", "cuda:0"), contextlib.nullcontext)


# ---------------------------------------------------------------------------------------------
# evaluation and adaptation run in reduced precision


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_evaluation_runs_the_encoder_at_the_precision_and_scores_float32_logits(micro, precision, dtype):
    pre, _ = micro
    head = _heads()["a"]
    clf = ImageClassifier(pre, head)
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(images, torch.arange(24) % 4)
    logits = []
    handle = clf.register_forward_hook(lambda m, a, out: logits.append(out.dtype))
    try:
        with OutputDtypes() as seen:
            hits = correct_predictions(clf, data, batch_size=8, precision=precision)
    finally:
        handle.remove()
    assert seen["Linear"] == seen["Conv2d"] == {dtype}  # the patch embedding and every MLP Linear
    assert logits == [torch.float32] * 3  # the head in float32
    exact = correct_predictions(clf, data, batch_size=8)
    assert (hits == exact).float().mean() >= 0.75  # the same model, rounded: mostly the same top-1
    assert all(p.dtype == torch.float32 for p in pre.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_wemoe_adapts_under_autocast_with_float32_routers(micro, precision):
    pre, ft = micro
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    method = wemoe.WeMoE(steps=2, lr=1e-2, checkpoint_every=0, routing_stats_batches=1, routing="softmax",
                         task_id_weight=0.5)
    losses = {}
    for p in ("fp32", precision):
        ctx = MergeContext(heads=_heads(), unlabeled=_unlabeled(), precision=p)
        with OutputDtypes() as seen:
            model = method.merge(pre, ft, ctx)
        losses[p] = ctx.artifacts["tta_loss"]
        routers = [q for m in wemoe.moe_layers(model) for q in m.router.parameters()]
        assert routers and all(q.dtype == torch.float32 for q in routers)
        assert all(t.dtype == torch.float32 for m in wemoe.moe_layers(model) for t in m.buffers())  # task vectors
        reduced = torch.float32 if p == "fp32" else dtype
        assert seen["Conv2d"] == seen["WeightEnsemblingMLP"] == {reduced}  # the tower's activations
        assert seen["Linear"] == {torch.float32}  # the routers, inside the float32 MoE MLP
    assert len(losses[precision]) == 2
    assert losses[precision] == pytest.approx(losses["fp32"], rel=0.05)  # the same adaptation, rounded


def test_adamerging_adapts_under_autocast_and_merges_in_float32(micro):
    pre, ft = micro
    method = AdaMerging(steps=2, lr=1e-2, checkpoint_every=0, granularity="layer")
    out = {}
    for p in ("fp32", "bf16"):
        ctx = MergeContext(heads=_heads(), unlabeled=_unlabeled(), precision=p)
        with OutputDtypes() as seen:
            merged = method.merge(pre, ft, ctx)
        out[p] = (ctx.artifacts["tta_loss"], torch.tensor(ctx.artifacts["adamerging_coefficients"]["values"]), merged)
        assert seen["Linear"] == seen["Conv2d"] == {torch.bfloat16 if p == "bf16" else torch.float32}
        assert all(t.dtype == torch.float32 for t in merged.state_dict().values() if t.is_floating_point())
    assert out["bf16"][0] == pytest.approx(out["fp32"][0], rel=0.05)
    assert out["bf16"][1].dtype == torch.float32
    # the exported encoder is theta_0 + sum_t lambda_t tau_t computed in float32 at its coefficients
    from methods.adamerging import AdaMergedEncoder

    again = AdaMergedEncoder(pre, ft, granularity="layer")
    with torch.no_grad():
        again.coef.copy_(out["bf16"][1])
    for k, v in again.export().state_dict().items():
        torch.testing.assert_close(out["bf16"][2].state_dict()[k], v, rtol=0, atol=0)


def test_fp16_adaptation_scales_its_loss_and_resumes_with_the_scale(micro, tmp_path, monkeypatch):
    """Under fp16 the backward runs on the loss times the scaler's scale (gradients that would
    flush to zero in half precision survive) and the scale is in the checkpoint: a resumed
    adaptation equals an uninterrupted one. Other precisions scale nothing."""
    from methods import tta

    pre, ft = micro
    method = AdaMerging(steps=4, lr=1e-2, checkpoint_every=2, granularity="layer")
    scales: list[float] = []
    real_scale = torch.amp.GradScaler.scale

    def seen(self, outputs):
        scales.append(float(self.get_scale()))
        return real_scale(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", seen)

    def adapt(workdir: Path, precision: str = "fp16", steps: int = 4):
        ctx = MergeContext(heads=_heads(), unlabeled=_unlabeled(), precision=precision, workdir=str(workdir))
        merged = method.model_copy(update={"steps": steps}).merge(pre, ft, ctx)
        return ctx.artifacts["tta_loss"], merged.state_dict()

    adapt(tmp_path / "bf16", "bf16")
    assert scales == []
    full_loss, full = adapt(tmp_path / "full")
    assert len(scales) == 4 and scales[0] == 65536.0  # one scaled backward a step (joint forward)
    saved = torch.load(tta.checkpoint_path(tmp_path / "full", "adamerging"), weights_only=True)
    assert saved["scaler"]["scale"] == scales[-1]
    adapt(tmp_path / "resumed", steps=2)
    path = tta.checkpoint_path(tmp_path / "resumed", "adamerging")
    state = torch.load(path, weights_only=True)
    state["scaler"]["scale"] = 1024.0  # a scale lowered by an overflow: the resumed steps go on with it
    torch.save(state, path)
    scales.clear()
    resumed_loss, resumed = adapt(tmp_path / "resumed")
    assert scales == [1024.0, 1024.0]
    assert resumed_loss == full_loss  # a power of two scales and unscales exactly
    assert all(torch.equal(full[k], resumed[k]) for k in full)


# ---------------------------------------------------------------------------------------------
# a whole sweep


def test_a_bf16_sweep_scores_like_fp32_under_other_keys(trained_checkpoints, tmp_path):
    """Measured: every row's test average within 0.42 points of float32 (weight averaging 75.00 ->
    74.58, the other rows equal), on the three really fine-tuned micro models."""
    base = make_sweep_dict(trained_checkpoints, tmp_path)
    base["tasks"] = list(TRAINED_TASKS)
    base["methods"] = [{"name": "weight_averaging"}, {"name": "task_arithmetic", "params": {"scaling": 0.6}},
                       {"name": "adamerging", "params": {"steps": 2, "batch_size": 4, "checkpoint_every": 0}}]
    outcomes = {}
    for precision in ("fp32", "bf16"):
        d = copy.deepcopy(base)
        d["output_dir"] = str(tmp_path / precision)
        d["eval"] = {"precision": precision}
        with OutputDtypes() as seen:  # the zero-shot heads (float32) were built by the fp32 sweep first
            outcome = run_sweep(validate_config(d), quiet=True)
        assert not outcome.failed and len(outcome.executed) == 1 + len(TRAINED_TASKS) + 3
        assert seen["Linear"] == seen["Conv2d"] == {getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[precision])}
        outcomes[precision] = {(r.label, r.task): r for r in outcome.results}
    fp32, bf16 = outcomes["fp32"], outcomes["bf16"]
    assert fp32.keys() == bf16.keys()
    for job, result in fp32.items():
        metric = "acc/avg" if "acc/avg" in result.metrics else f"acc/{job[1]}"
        assert abs(bf16[job].metrics[metric] - result.metrics[metric]) <= 2.0, job
        assert bf16[job].key != result.key
    assert fp32[("task_arithmetic", None)].metrics["acc/avg"] > 60  # a model that scores, not chance
