"""Run one job: load models, merge (or not, for reference rows), evaluate, return results.

Jobs never touch MLflow or the result cache; the driver records what they return, so a job
runs the same in-process, in a worker process or on a cluster node.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch

from harness.cache import atomic_write_json, build_lock, make_folder, read_json, remove_empty
from harness.config import MAIN, SweepConfig
from harness.evaluation import EvaluationDataError, correct_predictions, percent, stream_workers, unlabeled_batches
from harness.failpoints import failpoint
from harness.models import ImageClassifier, tensor_stamp
from harness.plan import (JobSpec, adapts_on_corruptions, capped_subset, check_harness_code, check_method_code,
                          check_task_code, import_sweep_methods, job_title, robustness_inline)
from harness.precision import autocast, check_precision
from harness.runtime import evaluation_threads
from harness.significance import pack_correct
from harness.workspace import Workspace
from methods.base import PruneTrial

EVAL_SPLITS = ("val", "test")


#: The result statuses the driver records (``results/<key>.json``): a pruned Optuna trial ended
#: as its pruner asked, its result told to its study, like a finished job; a failed one runs again.
RECORDED = ("ok", "pruned")


@dataclass
class JobResult:
    key: str
    kind: str
    label: str
    params: dict[str, Any]
    task: str | None
    status: str  # "ok" | "failed" | "pruned" (an Optuna trial stopped early)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_detail: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    protocol: str = MAIN  # "generalization" for the generalization block's jobs; older cached results read as main
    test_correct: dict[str, str] = field(default_factory=dict)  # task -> packed per-image correctness (test split)
    warnings: list[str] = field(default_factory=list)  # what the driver shows besides the result (artifacts JSON cannot hold)
    ran_on: dict[str, str] = field(default_factory=dict)  # where it ran, when not here: SLURM job id and log
    # the robustness study run inside the job failed (its RobustnessStudyFailed line; its traceback in
    # error_detail): the job's other metrics stand, and a rerun of the sweep runs the job again
    study_error: str | None = None
    # digests of the parts of the job's key (plan.key_inputs), for export to name what changed when the
    # row is stale; empty in results written before they were recorded
    inputs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def title(self) -> str:
        """Without the setting (a grid point's run is named by it instead: Tracker.log_job)."""
        return job_title(self.kind, self.task, self.label)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobResult":
        """The result of ``to_dict``; fields this code does not know (written by a newer harness,
        which records more of a job) are dropped: the key names the same computation, so the
        result is reused rather than the job run again."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def of(cls, spec: JobSpec, status: str, **fields: Any) -> "JobResult":
        """A result for ``spec``, carrying its identity (key, label, params, task, protocol)."""
        return cls(spec.key, spec.kind, spec.label, spec.params, spec.task, status=status,
                   protocol=spec.protocol, inputs=dict(spec.inputs), **fields)


#: The metric every successful result of a kind carries (what the tables read).
_REQUIRED_METRIC = {"pretrained": "acc/avg", "merge": "acc/avg", "robustness": "robust/clean/avg",
                    "trial": "val/acc/avg"}


def read_result(path: Path, key: str) -> JobResult | None:
    """The result cached at ``path`` for job ``key``; None when missing or unusable.

    A file that parses yet is not a whole result of this job (hand-edited, written by another
    program) is treated as not cached, with one warning naming it: the job runs again instead
    of the sweep failing on it, or logging it, later."""
    data = read_json(path)
    if data is None and not path.is_file():
        return None
    problem = "not JSON (cut short or damaged)" if data is None else _result_problem(data, key)
    if problem is None:
        try:
            result = JobResult.from_dict(data)
        except TypeError as exc:
            problem = str(exc)
        else:
            return result
    logging.getLogger("harness").warning(f"{path}: not a usable result ({problem}); the job runs again")
    return None


def _result_problem(data: Any, key: str) -> str | None:
    if not isinstance(data, dict):
        return f"a {type(data).__name__}, not a mapping"
    if data.get("key") != key:
        return f"its key is {data.get('key')!r}"
    if data.get("status") not in ("ok", "failed", "pruned"):
        return f"status {data.get('status')!r}"
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in metrics.values()):
        return "metrics are not finite numbers"
    for name in ("params", "timings", "artifacts", "test_correct", "ran_on", "inputs"):
        if not isinstance(data.get(name, {}), dict):
            return f"{name} is not a mapping"
    if not isinstance(data.get("warnings", []), list):
        return "warnings is not a list"
    if not isinstance(data.get("study_error") or "", str):
        return "study_error is not a string"
    kind = data.get("kind")
    need = f"acc/{data.get('task')}" if kind in ("individual", "perfect_routing") else _REQUIRED_METRIC.get(kind)
    if data["status"] == "ok" and need not in metrics:
        return f"no metric {need!r}"
    return None


def evaluate_encoder(ws: Workspace, encoder: torch.nn.Module, task_names: list[str],
                     device: torch.device, robustness: bool = False, test: bool = True,
                     merged: list[str] | None = None, test_correct: dict[str, str] | None = None) -> dict[str, float]:
    """acc/<task> (test) and val/acc/<task>; averages over the merged (seen) tasks; unseen and
    corrupted-split metrics when the sweep asks for them.

    ``merged``: the tasks the encoder was merged on (default: the sweep's); the rest are unseen.
    ``test_correct``: filled with each task's packed per-image test correctness (for paired tests)."""
    with evaluation_threads():
        return _evaluate_encoder(ws, encoder, task_names, device, robustness, test, merged, test_correct)


def _evaluate_encoder(ws: Workspace, encoder: torch.nn.Module, task_names: list[str], device: torch.device,
                      robustness: bool, test: bool, merged: list[str] | None,
                      test_correct: dict[str, str] | None) -> dict[str, float]:
    metrics: dict[str, float] = {}
    encoder = encoder.to(device).eval()
    merged = ws.cfg.merge_tasks if merged is None else merged
    seen = [t for t in task_names if t in merged] or task_names
    unseen = [t for t in task_names if t not in seen]

    splits = (("val", "val/acc"), ("test", "acc")) if test else (("val", "val/acc"),)
    for split, prefix in splits:
        for t in task_names:
            hits = task_correct(ws, encoder, t, ws.task(t).dataset(split), device)
            metrics[f"{prefix}/{t}"] = percent(hits)
            if split == "test" and test_correct is not None:
                test_correct[t] = pack_correct(hits.numpy())
            failpoint("evaluate")
        metrics[f"{prefix}/avg"] = _mean(metrics[f"{prefix}/{t}"] for t in seen)
    if not test:  # a tuning trial: validation only, test labels stay unseen
        return metrics
    if unseen:
        metrics["seen/avg"] = metrics["acc/avg"]
        for t in unseen:
            metrics[f"unseen/{t}"] = metrics[f"acc/{t}"]
        metrics["unseen/avg"] = _mean(metrics[f"acc/{t}"] for t in unseen)
    if robustness and ws.cfg.robustness:
        metrics.update(robustness_metrics(ws, encoder, device, {t: metrics[f"acc/{t}"] for t in task_names}))
    return metrics


def task_accuracy(ws: Workspace, encoder: torch.nn.Module, task: str, dataset, device: torch.device) -> float:
    """Top-1 % of ``encoder`` with ``task``'s head on ``dataset``, at the sweep's eval settings."""
    return percent(task_correct(ws, encoder, task, dataset, device))


def task_correct(ws: Workspace, encoder: torch.nn.Module, task: str, dataset, device: torch.device) -> torch.Tensor:
    """Per-image top-1 correctness of ``encoder`` with ``task``'s head on ``dataset``."""
    clf = ImageClassifier(encoder, ws.head(task))
    try:
        return correct_predictions(clf, dataset, ws.cfg.eval.batch_size, device, ws.cfg.eval.max_samples,
                                   ws.cfg.eval.precision)
    except EvaluationDataError as exc:  # a disk-backed split's labels are read only here: say whose
        raise EvaluationDataError(f"task {task!r}: {exc}") from None


def robustness_metrics(ws: Workspace, encoder: torch.nn.Module, device: torch.device,
                       clean: dict[str, float] | None = None,
                       adapted: Callable[[str], torch.nn.Module] | None = None,
                       records: Path | None = None) -> dict[str, float]:
    """robust/<corruption>/<task> and their averages, and robust/clean/avg over the study's tasks
    (from ``clean`` test accuracies where given, else evaluated here).

    ``adapted(corruption)``, when given, returns the encoder to score on that corruption (a
    test-time-adaptation method adapted on its corrupted test images); else ``encoder`` is.
    ``records``: a folder of the job's own where each evaluation (clean, each corruption) is
    recorded as it finishes, and read back instead of evaluated again: a study retried after a
    failure on one corruption scores only what it had not scored."""
    rob = ws.cfg.robustness
    encoder = encoder.to(device).eval()
    clean = clean or {}

    def acc(model: torch.nn.Module, task: str, dataset) -> float:
        with evaluation_threads():
            return task_accuracy(ws, model, task, dataset, device)

    def scored(name: str, tasks: list[str], score: Callable[[], dict[str, float]]) -> dict[str, float]:
        found = recorded_scores(records, name, tasks, rob.severity)
        if found is None:
            found = score()
            if records is not None:
                atomic_write_json(records / f"{name}.json", {"severity": rob.severity, "accuracy": found})
        return found

    missing = [t for t in rob.tasks if t not in clean]
    if missing:
        clean = {**clean, **scored("clean", missing, lambda: {t: acc(encoder, t, ws.task(t).dataset("test"))
                                                              for t in missing})}
    metrics = {"robust/clean/avg": _mean(clean[t] for t in rob.tasks)}
    ws.build_free_corrupted_splits([c for c in rob.corruptions if recorded_scores(records, c, rob.tasks, rob.severity)
                                    is None], adapting=adapted is not None)
    for c in rob.corruptions:
        with naming_corruption(c, rob.severity):
            def score() -> dict[str, float]:
                model = encoder if adapted is None else adapted(c).to(device).eval()
                return {t: acc(model, t, ws.corrupted(t, c)) for t in rob.tasks}

            metrics.update({f"robust/{c}/{t}": v for t, v in scored(c, rob.tasks, score).items()})
        metrics[f"robust/{c}/avg"] = _mean(metrics[f"robust/{c}/{t}"] for t in rob.tasks)
    return metrics


def recorded_scores(records: Path | None, name: str, tasks: list[str], severity: int) -> dict[str, float] | None:
    """The accuracies per task a study recorded for ``name`` (clean or a corruption), when the
    record is whole (every task, finite values, this severity); None otherwise: evaluated again."""
    data = read_json(records / f"{name}.json") if records is not None else None
    found = data.get("accuracy") if isinstance(data, dict) and data.get("severity") == severity else None
    if not isinstance(found, dict) or set(found) != set(tasks):
        return None
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in found.values())
    return {t: float(found[t]) for t in tasks} if ok else None


def study_records(workdir: Path) -> Path:
    """Where a job's robustness study records its evaluations: beside its workdir, which holds
    only what its method saved (``harness export`` reads a non-empty one as a saved adaptation)."""
    return workdir.parent / f"{workdir.name}.robustness"


class RobustnessStudyFailed(RuntimeError):
    """The robustness study failed on one corruption (adapting on its images, or scoring them).
    Not :class:`harness.tuning.StudyFailed` (a tuning study's trials failed, bad input the driver
    raises): this one is caught in the job's own process and recorded as its ``study_error``."""


@contextlib.contextmanager
def naming_corruption(name: str, severity: int) -> Iterator[None]:
    """Errors raised inside name the corruption: a job's error line otherwise reads as if its
    merge or clean adaptation had failed, hiding which of the study's adaptations did.
    Out-of-memory (the host's or an accelerator's) and pruning keep their own handling: they fail
    or stop the job."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, PruneTrial):
        raise
    except Exception as exc:
        raise RobustnessStudyFailed(f"robustness study, {name} (severity {severity}): "
                                    f"{type(exc).__name__}: {exc}") from exc


def run_robustness_study(result: JobResult, study: Callable[[], dict[str, float]]) -> None:
    """Add the robustness study's metrics to ``result``. A study failing on one corruption
    (:class:`RobustnessStudyFailed`) costs only the robustness row: it is recorded as ``study_error`` with
    its traceback, and the job's merge, adaptation and clean metrics stand."""
    try:
        metrics = study()
    except RobustnessStudyFailed as exc:
        result.study_error = f"{type(exc).__name__}: {exc}"
        result.error_detail = traceback.format_exc(limit=-5)
        return
    result.metrics.update(metrics)


def clean_accuracy(result: JobResult, ws: Workspace) -> dict[str, float]:
    """The job's clean test accuracy per task, which the study's clean column reads."""
    return {t: result.metrics[f"acc/{t}"] for t in ws.cfg.task_names}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def adaptation_lock(spec: JobSpec, workdir: Path) -> ContextManager[bool]:
    """Held while a test-time-adaptation job runs in its ``workdir`` (a sweep's job, or ``harness
    export`` adapting a lost adaptation again): a second process adapting there at once deleted
    the first's checkpoint being written (as a killed run's leftover), and the first crashed. It
    waits instead, then resumes from what the first saved. The lock file lies beside the workdir,
    hidden, so the workdir holds only what the method saved."""
    from methods.base import resolve_method

    if not spec.method or not resolve_method(spec.method).uses_test_data:
        return contextlib.nullcontext(False)
    return build_lock(workdir.parent / f".{workdir.name}.lock",
                      f"{workdir}: waiting for another process (a sweep's job or an export) adapting there")


def run_job(spec: JobSpec, ws: Workspace, device: torch.device, workdir: Path) -> JobResult:
    """Run a job; failures are returned as a failed result with the reason, never raised."""
    result = JobResult.of(spec, "ok")
    t0 = time.perf_counter()
    held = contextlib.ExitStack()
    try:
        check_harness_code(spec)
        import_sweep_methods(spec, ws.cfg)
        check_method_code(spec)
        check_task_code(spec, ws.task)
        check_precision(ws.cfg.eval.precision, device)  # never float32 silently under a reduced-precision key
        held.enter_context(adaptation_lock(spec, workdir))
        if spec.kind == "pretrained":
            encoder = ws.pretrained_encoder
            result.timings["load"] = time.perf_counter() - t0
            result.metrics = evaluate_encoder(ws, encoder, ws.cfg.task_names, device,
                                              test_correct=result.test_correct)
            if ws.cfg.robustness:
                run_robustness_study(result, lambda: robustness_metrics(ws, encoder, device, clean_accuracy(result, ws),
                                                                        records=study_records(workdir)))
        elif spec.kind == "perfect_routing":
            encoder = perfect_routing_encoder(ws, spec.task, spec.params["scaling"])
            result.timings["load"] = time.perf_counter() - t0
            result.metrics = evaluate_encoder(ws, encoder, [spec.task], device, test_correct=result.test_correct)
        elif spec.kind == "individual":
            encoder = ws.finetuned_encoder(spec.task)
            result.warnings = ws.input_warnings([spec.task])
            result.timings["load"] = time.perf_counter() - t0
            result.metrics = evaluate_encoder(ws, encoder, [spec.task], device, test_correct=result.test_correct)
        elif spec.kind == "robustness":  # a grid method's selected setting, merged again
            merged, _ = merge(spec, ws, device, workdir)
            result.timings["merge"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            result.metrics = robustness_metrics(ws, merged, device, records=study_records(workdir))
            result.timings["evaluate"] = time.perf_counter() - t1
        else:
            merged, artifacts = merge(spec, ws, device, workdir)
            failpoint("merged")
            artifacts, result.warnings = plain_artifacts(artifacts, spec.method)
            result.warnings[:0] = ws.input_warnings(ws.cfg.seen_tasks(spec.protocol))
            result.artifacts = artifacts
            result.metrics.update(artifact_metrics(artifacts))
            result.timings["merge"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            final = spec.kind == "merge"
            study = final and spec.protocol == MAIN and robustness_inline(ws.cfg, spec.label)
            readapt = study and adapts_on_corruptions(ws.cfg, spec.method)
            result.metrics.update(evaluate_encoder(ws, merged, ws.cfg.task_names, device, test=final,
                                                   merged=ws.cfg.seen_tasks(spec.protocol),
                                                   test_correct=result.test_correct))
            adapted = ((lambda c: merge(spec, ws, device, workdir / f"corrupted-{c}", corruption=c)[0])
                       if readapt else None)
            if study and ws.cfg.robustness:
                run_robustness_study(result, lambda: robustness_metrics(ws, merged, device, clean_accuracy(result, ws),
                                                                        adapted, study_records(workdir)))
            result.timings["evaluate"] = time.perf_counter() - t1
        bad = [k for k, v in result.metrics.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"non-finite metric {bad[0]}")
    except PruneTrial as exc:
        if spec.kind == "trial":
            result.status, result.error = "pruned", str(exc) or "pruned"
        else:  # no pruner asked (ctx.report is None): the method's mistake, told and retried as a failure
            result.status = "failed"
            result.error = (f"PruneTrial: {str(exc) or 'pruned'} (raised outside an Optuna trial: only a study's "
                            "trial may stop early, when ctx.report returns True)")
            result.error_detail = traceback.format_exc(limit=-5)
    except MemoryError:
        result.status, result.error = "failed", "out of memory"
        result.error_detail = traceback.format_exc(limit=-3)
    except Exception as exc:  # isolation: one bad job must not take the sweep down
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        result.error_detail = traceback.format_exc(limit=-5)
    finally:
        held.close()
    result.timings["total"] = time.perf_counter() - t0
    return result


def check_encoder(spec: JobSpec, merged: Any, ws: Workspace | None = None,
                  heads: dict[str, torch.Tensor] | None = None, device: torch.device | None = None) -> None:
    """A merge must return an image encoder whose features the heads take: anything else would
    fail later with an error about evaluation (``mat1 and mat2 shapes cannot be multiplied``)
    that does not name the method at fault. Given the workspace and heads, one validation image
    of the first task goes through it to check its features are ``[1, width]`` of the heads, at
    the sweep's ``eval.precision``, as evaluation will run it."""
    if not isinstance(merged, torch.nn.Module):
        raise TypeError(f"merge() of {spec.method} returned {type(merged).__name__}, expected an nn.Module")
    if ws is None or not heads:
        return
    task, head = next(iter(heads.items()))
    split = ws.task(task).dataset("val")
    if len(split) == 0:
        return  # evaluation reports an empty split
    image = split[0][0][None]  # no DataLoader: its iterator would draw from torch's global generator
    where = f"merge() of {spec.method} returned an encoder that"
    was_training = merged.training
    precision = ws.cfg.eval.precision
    try:
        with torch.no_grad(), autocast(precision, device or "cpu"):
            features = merged.to(device).eval()(image.to(device))
    except Exception as exc:
        under = f", under eval.precision: {precision}" if precision != "fp32" else ""
        raise TypeError(f"{where} fails on one validation image of {task} (float32 {list(image.shape)}, "
                        f"as evaluation gives them{under}): {type(exc).__name__}: {exc}") from exc
    finally:
        merged.train(was_training)
    width = head.shape[1]
    if not isinstance(features, torch.Tensor) or tuple(features.shape) != (1, width):
        got = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise TypeError(f"{where} maps one image of {task} to {got}; the heads take features [1, {width}] "
                        "(the pretrained encoder's output width)")
    if not torch.isfinite(features).all():
        raise FloatingPointError(f"{where} maps one image of {task} to non-finite features")


def plain_artifacts(artifacts: dict[str, Any], method: str | None) -> tuple[dict[str, Any], list[str]]:
    """``ctx.artifacts`` as the result file stores them (JSON), and a warning per value it
    cannot: tensors (sparse ones dense) and numpy arrays become nested lists, numpy scalars numbers, sets and tuples
    lists (sets sorted), paths strings. Anything else is stored as its ``repr``, with a warning
    naming the method and the artifact: the job's result is kept rather than lost over it.

    Done where the job runs, so what crosses to the driver is plain data (a CUDA tensor would not
    unpickle on a login node without a GPU) and the driver stores exactly what it gets."""
    warnings: list[str] = []

    def plain(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        if isinstance(value, torch.Tensor):  # sparse ones too: tolist() takes only strided tensors
            return (value.to_dense() if value.layout != torch.strided else value).detach().cpu().tolist()
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not (k is None or isinstance(k, (str, bool, int, float))):
                    warnings.append(f"{method}: {where} has the key {k!r} ({type(k).__name__}): stored as the "
                                    "string of its key, as JSON keys are")
                out[str(k)] = plain(v, f"{where}[{k!r}]")
            return out
        if isinstance(value, (list, tuple)):
            return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, (set, frozenset)):
            items = [plain(v, f"{where} (an item)") for v in value]
            try:
                return sorted(items)
            except TypeError:
                return sorted(items, key=repr)
        tolist = getattr(value, "tolist", None)  # numpy arrays and scalars (np.float32, np.int64, np.bool_)
        if type(value).__module__ == "numpy" and callable(tolist):
            return plain(tolist(), where)
        warnings.append(f"{method}: {where} is a {type(value).__module__}.{type(value).__qualname__}, which the "
                        "result file (JSON) cannot hold: stored as its repr")
        return repr(value)

    return {str(k): plain(v, f"ctx.artifacts[{k!r}]") for k, v in artifacts.items()}, warnings


def artifact_metrics(artifacts: dict[str, Any]) -> dict[str, float]:
    """Scalars a method reports besides accuracy (router task identification per layer)."""
    out = {}
    per_layer = (artifacts.get("router_task_id") or {}).get("mean_per_layer") or []
    for i, v in enumerate(per_layer):
        out[f"router_task_id/layer{i}"] = 100.0 * float(v)
    if per_layer:
        out["router_task_id/avg"] = 100.0 * sum(per_layer) / len(per_layer)
    curves = artifacts.setdefault("curves", {})  # logged as per-step MLflow metrics
    if "tta_loss" in artifacts:
        curves["tta/loss"] = list(artifacts.pop("tta_loss"))
    for part, series in (artifacts.pop("tta_parts", None) or {}).items():  # tta/entropy, tta/task_id
        curves[f"tta/{part}"] = list(series)
    for row in artifacts.pop("tta_validation", None) or []:  # sparse: [step, value] pairs
        step = int(row["step"])
        for name, value in row.items():
            if name not in ("step", "tta_entropy", "tta_loss"):  # dense already: tta/entropy, tta/loss
                curves.setdefault(f"tta/{name}", []).append([step, float(value)])
    if not curves:
        del artifacts["curves"]
    return out


def perfect_routing_encoder(ws: Workspace, task: str, scaling: float) -> torch.nn.Module:
    """Task arithmetic everywhere except the Transformer MLPs, which are ``task``'s own."""
    from methods.base import with_state
    from methods.task_arithmetic import task_arithmetic_state

    state = task_arithmetic_state(ws.pretrained_encoder, ws.finetuned_encoders(), scaling)
    own = ws.finetuned_encoder(task).state_dict()
    mlp = [k for k in state if ".mlp." in k]
    if not mlp:
        raise ValueError("the image encoder has no Transformer MLPs ('.mlp.' parameters)")
    state.update({k: own[k] for k in mlp})
    return with_state(ws.pretrained_encoder, state)


def trial_reporter(handle: dict[str, Any]):
    """ctx.report for an Optuna trial: intermediate objective values, and the pruner's verdict.

    The trial is reopened from its storage, so this works in any process that can reach it."""
    import optuna

    from harness.tuning import make_pruner, open_storage, quiet_optuna

    quiet_optuna()
    storage = open_storage(handle["storage"])
    study = optuna.load_study(study_name=handle["study_name"], storage=storage,
                              pruner=make_pruner(handle.get("pruner", "none")))
    trial = optuna.trial.Trial(study, handle["trial_id"])
    objective = handle["objective"]
    # a trial run again after its driver was killed reported these steps already (Optuna keeps
    # the first value and warns about the second)
    reported = set(storage.get_trial(handle["trial_id"]).intermediate_values)

    def report(step: int, metrics: dict[str, float]) -> bool:
        if objective in metrics:
            if step not in reported:
                trial.report(float(metrics[objective]), step)
            return trial.should_prune()
        return False

    return report


def merge(spec: JobSpec, ws: Workspace, device: torch.device, workdir: Path,
          corruption: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The job's merged encoder and its artifacts. With ``corruption``, a test-time-adaptation
    method adapts on that corruption's copies of the test splits instead of the clean ones."""
    from methods.base import MergeContext, resolve_method

    cls = resolve_method(spec.method)
    method = cls(**spec.params)
    tasks = ws.cfg.seen_tasks(spec.protocol)  # unseen tasks take no part in merging or adaptation
    pretrained = ws.pretrained_encoder
    finetuned = ws.finetuned_encoders(tasks)
    heads = {t: ws.head(t) for t in tasks}
    unlabeled: dict[str, Any] = WithoutTestData(cls.__name__)
    adapted_on: dict[str, Any] = {}
    if cls.uses_test_data:
        adapted_on = adaptation_data(ws.cfg, corruption)
        batch = int(getattr(method, "batch_size", 16))
        seed = ws.cfg.adapt.shuffle_seed
        workers = stream_workers(len(tasks))
        for i, t in enumerate(tasks):
            ds = ws.task(t).dataset(ws.cfg.adapt.split) if corruption is None else ws.corrupted(t, corruption)
            unlabeled[t] = (lambda ds=ds, s=seed + i: unlabeled_batches(ds, batch, s, workers))

    def validate(encoder: torch.nn.Module) -> dict[str, float]:
        was_training = encoder.training
        out = evaluate_encoder(ws, encoder, tasks, device, test=False, merged=tasks)
        encoder.train(was_training)
        return out

    report = trial_reporter(spec.trial) if spec.trial else None
    sources = {"arch": ws.sources["arch"], "pretrained": ws.sources["pretrained"],
               "finetuned": {t: ws.sources["finetuned"].get(t) for t in tasks}}
    ctx = MergeContext(heads=heads, unlabeled=unlabeled, device=device, seed=ws.cfg.seed,
                       progress=ws.progress, validate=validate, workdir=str(workdir), report=report,
                       sources=sources, adapted_on=adapted_on, precision=ws.cfg.eval.precision)
    torch.manual_seed(ws.cfg.seed)
    before = input_state(pretrained, finetuned, heads)
    made = make_folder(workdir) or [workdir]  # one made by an earlier attempt too, if left empty
    try:
        merged = method.merge(pretrained, finetuned, ctx)
    finally:  # a merge that failed too: its traceback is in artifacts/<key>/, what it saved stays
        remove_empty(made)  # a method that saves nothing leaves no empty folder in work/ (nor work/<key>/)
    after = input_state(pretrained, finetuned, heads)
    changed = [name for name in {**before, **after} if before.get(name) != after.get(name)]
    if changed:
        ws.forget_models()  # the next job loads them again
        raise ModifiedInputs(
            f"{spec.method} changed its inputs in place ({changed[0]}"
            f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}): merge() must leave the "
            "pretrained and fine-tuned models and the heads as it got them (copy first, e.g. "
            "methods.base.with_state)")
    check_encoder(spec, merged, ws, heads, device)
    return merged, ctx.artifacts


def adaptation_data(cfg: SweepConfig, corruption: str | None = None) -> dict[str, Any]:
    """What a test-time-adaptation method adapts on: the clean split, or one corruption of the
    test splits at the robustness study's severity and seed (with ``eval.max_samples``, of the
    images a capped evaluation scores alone: :meth:`Workspace.corrupted`). Recorded with what the method saves
    (``MergeContext.adapted_on``): the per-corruption adaptations of a job lie side by side."""
    if corruption is None:
        return {"split": cfg.adapt.split, "corruption": None}
    rob = cfg.robustness
    return {"split": "test", "corruption": corruption, "severity": rob.severity, "corruption_seed": rob.seed,
            **capped_subset(cfg)}


class WithoutTestData(dict):
    """``ctx.unlabeled`` of a method that did not ask for test data: reading it says how to."""

    def __init__(self, method: str):
        super().__init__()
        self.method = method

    def __missing__(self, task: str) -> Any:
        raise KeyError(f"no unlabeled batches of {task!r}: {self.method} must set the class attribute "
                       "uses_test_data = True to get them")


class ModifiedInputs(RuntimeError):
    """A merge changed a model or head it was given. They are shared by the jobs of a process,
    so every later job would silently merge the changed ones."""


def input_state(pretrained: torch.nn.Module, finetuned: dict[str, torch.nn.Module],
                heads: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Per tensor, its :func:`harness.models.tensor_stamp`: one pass over the inputs, a fraction
    of a second for eight ViT-B/32 encoders."""
    tensors = {f"pretrained {k}": t for k, t in pretrained.state_dict(keep_vars=True).items()}
    for task, module in finetuned.items():
        tensors.update({f"{task} {k}": t for k, t in module.state_dict(keep_vars=True).items()})
    tensors.update({f"head {task}": t for task, t in heads.items()})
    return {name: tensor_stamp(t) for name, t in tensors.items()}
