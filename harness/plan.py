"""Expand a sweep into jobs: reference rows, then methods x hyperparameter settings, and the same
settings again under the ``generalization`` block's protocol when the sweep has one.

A JobSpec is plain data; its ``key`` (a content hash) is the result-cache key and the
MLflow identity of the job, so a rerun finds and skips what already finished.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal

from harness.cache import content_key
from harness.config import (BOUND_LABEL, GENERALIZATION, GENERALIZATION_SUFFIX, MAIN, AdaptSpec, SweepConfig, bound_label,
                            expand_grid, suite_tasks)

#: Bump when the meaning of a cached result changes.
RESULT_VERSION = 1

#: Kinds of job that merge with a method: the sweep's seed and adaptation data reach only them.
MERGE_KINDS = ("merge", "trial", "robustness")
#: The seed the keys of reference jobs and of methods that draw nothing (``seeded = False``) hold
#: whatever the sweep's: a reseeded sweep finds them cached; it is the default, so their keys
#: cached at seed 0 stay valid.
REFERENCE_SEED = 0

JobKind = Literal["pretrained", "individual", "perfect_routing", "merge", "trial", "robustness"]


@dataclass(frozen=True)
class JobSpec:
    kind: JobKind
    label: str
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    task: str | None = None  # the task of an "individual" reference job
    key: str = ""
    trial: dict[str, Any] | None = None  # Optuna trial handle (storage, study, trial id, objective)
    protocol: str = MAIN  # "generalization": merged and adapted on the generalization block's seen tasks
    method_id: str | None = None  # method_class_id() the key was computed with; the job checks it (check_method_code)
    task_code: dict[str, str] = field(default_factory=dict)  # own Task classes' digests in the key (check_task_code)
    # Not in the key: where the planning process's harness package lies and the digest of its code
    # (harness_code_id); the job checks it (check_harness_code). Empty: planned before it was recorded.
    harness_dir: str = ""
    harness_code: str = ""
    # Not in the key: a digest of each part of what the key was computed from (key_inputs), which its
    # result records, so that a row found stale later names the input that changed.
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return job_title(self.kind, self.task, self.label, self.params)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobSpec":
        """The spec of ``to_dict``; fields this code does not know (a spec planned by a newer
        harness) are dropped, so that the job gets as far as :func:`check_harness_code`."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def job_title(kind: str, task: str | None, label: str, params: dict[str, Any] | None = None) -> str:
    """How a job is named on its progress line, in failure summaries and as its MLflow run:
    ``individual/<task>`` for a per-task reference job (individual, a perfect-routing bound: only
    those have a task; a bound beside others by its lambda, ``perfect_routing/<task> (0.6)``, as
    its row), else its label and setting, ``label(k=v, ...)``, with ``robustness/`` before a
    robustness job's. Distinct jobs of a sweep have distinct titles (SLURM's records of a job of
    edited code are found by them)."""
    if task:
        beside = label[len(BOUND_LABEL):].strip() if kind == "perfect_routing" and label != BOUND_LABEL else ""
        return f"{kind}/{task}" + (f" {beside}" if beside else "")
    title = f"{label}({setting_text(params)})" if params else label
    return f"robustness/{title}" if kind == "robustness" else title


def setting_text(params: dict[str, Any]) -> str:
    """Hyperparameters as written in YAML (``1.0``, ``0.001``), except long floats cut to 4
    significant digits (an Optuna trial's 0.5939321535345923 reads 0.5939)."""
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value: Any) -> str:
    text = str(value)
    return f"{value:.4g}" if isinstance(value, float) and len(text) > 6 else text


def generalization_label(label: str) -> str:
    """The label of a method's generalization jobs: its own rows, runs and cache entries."""
    return label + GENERALIZATION_SUFFIX


def base_label(label: str) -> str:
    """Inverse of :func:`generalization_label` (a main-protocol label is returned as is)."""
    return label.removesuffix(GENERALIZATION_SUFFIX)


def adapts_on_corruptions(cfg: SweepConfig, method: str) -> bool:
    """Whether a merge job of ``method`` adapts again on each corruption's test images in the
    robustness study (``robustness.adapt: corrupted``, a test-time-adaptation method)."""
    from methods.base import resolve_method

    rob = cfg.robustness
    return rob is not None and rob.adapt == "corrupted" and resolve_method(method).uses_test_data


def robustness_inline(cfg: SweepConfig, label: str) -> bool:
    """Whether a main-protocol merge job of method ``label`` runs the robustness study itself.

    It does for a method with one setting (a tuned method's final setting included) and for a
    method that adapts at test time (adapting again would cost more than the study). A grid of
    any other method runs the study once, for its val-selected setting, in a follow-up
    ``robustness`` job (:func:`robustness_spec`): not for every grid point."""
    from methods.base import resolve_method

    m = next((m for m in cfg.methods if m.display == label), None)
    if m is None or m.tune is not None:
        return True
    one_setting = all(len(values) == 1 for values in m.grid.values())  # not expanded: this runs once per job
    return one_setting or resolve_method(m.name).uses_test_data


def robustness_spec(cfg: SweepConfig, label: str, params: dict[str, Any], identity: dict[str, Any],
                    task_identity: dict[str, Any] | None) -> JobSpec:
    """The follow-up job that runs the robustness study for a grid method's selected setting."""
    m = next(m for m in cfg.methods if m.display == label)
    return with_key(cfg, JobSpec("robustness", label, method=m.name, params=params), identity, task_identity)


def full_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Params with the method's defaults filled in: two spellings of one setting share a key."""
    from methods.base import resolve_method

    return resolve_method(method)(**params).model_dump(mode="json")


def method_class_id(method: str) -> str:
    """``module:Class``, and for a method of one's own the digest of its source files: editing
    it (while trying an idea) runs its jobs, studies and adaptations again instead of reusing
    results of the old code. The project's methods are versioned with the harness
    (:data:`RESULT_VERSION`), so their keys stay as they are across its commits."""
    from methods.base import resolve_method

    cls = resolve_method(method)
    identity = f"{cls.__module__}:{cls.__qualname__}"
    code = method_source_digest(cls)
    return identity if code is None else f"{identity}@{code}"


#: Where a task's identity holds the digest of its class's source (a name no task's own
#: ``identity()`` is likely to use: the two must not overwrite each other in a job key).
TASK_SOURCE_KEY = "harness.source_sha256"
#: Packages whose methods and tasks are the project's own: their source does not enter job keys.
OWN_PACKAGES = ("methods", "tasks", "harness")
#: Where the identity of a task of one's own holds the digest of its prompts, which build the
#: zero-shot heads every job scores with (the project's tasks' are versioned with the harness).
TASK_PROMPTS_KEY = "harness.prompts_sha256"
#: Per class object, the digest of its files when this process first saw it (just after importing
#: it, see ``resolve_method``): the code this process runs, even if the files change later.
_DIGESTS: weakref.WeakKeyDictionary[type, str | None] = weakref.WeakKeyDictionary()


def class_source_files(cls: type, root: type) -> list[str]:
    """The files defining ``cls`` and every base class between it and ``root`` (``MergeMethod``,
    ``Task``), outside the project's own packages (empty for the project's classes)."""
    from harness.imports import source_file

    files = []
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, root)) or klass is root:
            continue
        if klass.__module__.split(".")[0] in OWN_PACKAGES:
            continue
        path = source_file(klass)
        if path and path not in files:
            files.append(path)
    return files


def class_source_digest(cls: type, root: type) -> str | None:
    """sha256 of :func:`class_source_files` as they were when this process first asked (just
    after importing ``cls``); None for the project's classes (or one whose file cannot be found)."""
    if cls in _DIGESTS:
        return _DIGESTS[cls]
    files = class_source_files(cls, root)
    digest = None
    if files:
        h = hashlib.sha256()
        for path in files:
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        digest = h.hexdigest()[:16]
    _DIGESTS[cls] = digest
    return digest


def own_task(name: str) -> bool:
    """Whether task ``name`` is made by the project's code (a registered task of its ``tasks``
    package), not by a factory of one's own, whose images, labels and prompts are the user's."""
    from tasks.base import resolve_task

    return getattr(resolve_task(name), "__module__", "").split(".")[0] in OWN_PACKAGES


def method_source_files(cls: type) -> list[str]:
    """The files a method's merge code comes from, outside the project's own packages."""
    from methods.base import MergeMethod

    return class_source_files(cls, MergeMethod)


def method_source_digest(cls: type) -> str | None:
    """The digest of :func:`method_source_files` as this process imported them; None for the project's methods."""
    from methods.base import MergeMethod

    return class_source_digest(cls, MergeMethod)


def import_sweep_methods(spec: JobSpec, cfg: SweepConfig) -> None:
    """Import the modules of the sweep's ``module:Class`` entries, in order, until the job's
    method is known, when it is a registered name this process does not know: the driver resolved
    it after importing them (an entry below one naming its module), a worker process (a local
    pool's, a SLURM node) starts without those imports and would fail the job as 'unknown method'."""
    from methods.base import available_methods, resolve_method

    if spec.method is None or ":" in spec.method or spec.method in available_methods():
        return
    for m in cfg.methods:
        if ":" in m.name:
            resolve_method(m.name)
            if spec.method in available_methods():
                return


class MethodChanged(RuntimeError):
    """The method's code in this process is not the code its job's key was computed from."""


def check_method_code(spec: JobSpec) -> None:
    """Refuse to run a job whose method's source changed between planning and this process
    importing it (a SLURM job or a local worker that starts later): its result would be stored
    under the old code's key. Specs planned before keys carried the identity are not checked."""
    if spec.method is None or spec.method_id is None:
        return
    now = method_class_id(spec.method)
    if now == spec.method_id:
        return
    from methods.base import resolve_method

    files = ", ".join(method_source_files(resolve_method(spec.method))) or "its source"
    raise MethodChanged(f"{spec.method}: {files} changed since the sweep was submitted (planned as {spec.method_id}, "
                        f"now {now}): this job would store the new code's result under the old code's key; "
                        "rerun the sweep")


class TaskChanged(RuntimeError):
    """A task class's code in this process is not the code its job's key was computed from."""


def check_task_code(spec: JobSpec, task_of: Callable[[str], Any]) -> None:
    """As :func:`check_method_code`, for the Task classes of one's own a job reads (``task_of``
    builds one by name): a task file edited after the sweep was planned would store results of
    the new data code under the old key."""
    from tasks.base import Task

    for name, planned in spec.task_code.items():
        cls = type(task_of(name))
        now = class_source_digest(cls, Task)
        if now != planned:
            files = ", ".join(class_source_files(cls, Task)) or "its source"
            raise TaskChanged(f"task {name!r}: {files} changed since the sweep was submitted (planned as {planned}, "
                              f"now {now}): this job would store the new code's result under the old code's key; "
                              "rerun the sweep")


#: The packages whose code computes a job's result, their source ending up in no key (:data:`RESULT_VERSION`).
CODE_PACKAGES = ("harness", "methods", "tasks")
_HARNESS_CODE: tuple[str, str] | None = None


def code_digest(root: Path | str) -> str:
    """sha256 (16 hex digits) of the ``.py`` files of :data:`CODE_PACKAGES` under ``root`` (the
    directory holding them; hidden files and folders left out): their paths relative to ``root``, sorted, and their bytes. Where the
    tree lies does not enter it: an identical copy elsewhere has the same digest."""
    root = Path(root)
    files = []
    for package in CODE_PACKAGES:
        for folder, dirs, names in os.walk(root / package):
            # hidden entries are no modules: an editor's lock file (emacs ``.#ties.py``, a dangling
            # link while a buffer is modified), .ipynb_checkpoints/ copies
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
            files += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith(".")]
    h = hashlib.sha256()
    for rel, path in sorted((p.relative_to(root).as_posix(), p) for p in files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def harness_code_id() -> tuple[str, str]:
    """The directory of this process's ``harness`` package and the :func:`code_digest` of the tree
    holding it, computed once per process (when ``harness.plan`` is first imported): the code it
    imported, even if the files change later. The digest is empty where the files cannot be read."""
    global _HARNESS_CODE
    if _HARNESS_CODE is None:
        here = Path(__file__).resolve().parent
        try:
            digest = code_digest(here.parent)
        except OSError:
            digest = ""
        _HARNESS_CODE = (str(here), digest)
    return _HARNESS_CODE


class HarnessChanged(RuntimeError):
    """This process runs other harness code than the one the job was planned with."""


def check_harness_code(spec: JobSpec, running: tuple[str, str] | None = None) -> None:
    """Refuse to run a job in a process whose ``harness`` (``running``: its directory and digest,
    this process's by default) is not the code the driver planned the job with: a node importing
    another installation (``sbatch --export=NONE``, another environment), or files edited since
    submission. Its result would be stored under the planned key, computed by other code. Specs
    planned before the code was recorded are not checked."""
    if not spec.harness_code:
        return
    where, now = harness_code_id() if running is None else running
    if now == spec.harness_code:
        return
    if where == spec.harness_dir:
        raise HarnessChanged(f"harness code changed since the sweep was submitted ({where}: code {spec.harness_code} "
                             f"when planned, now {now or 'unreadable'}): results would be stored under keys of "
                             "other code; rerun the sweep")
    raise HarnessChanged(f"the node runs harness from {where} (code {now or 'unreadable'}), the sweep was planned with "
                         f"{spec.harness_dir} (code {spec.harness_code}): results would be stored under keys of other "
                         "code; make the node import the driver's harness (for sbatch --export=NONE, add a setup line "
                         "that activates the same environment) or rerun the sweep")


def plan_jobs(cfg: SweepConfig, identity: dict[str, Any] | None = None,
              task_identity: dict[str, Any] | None = None) -> list[JobSpec]:
    """All jobs of the sweep; keys are filled when model/task identities are given."""
    specs: list[JobSpec] = []
    refs = cfg.references
    if refs.pretrained:
        specs.append(JobSpec("pretrained", "pretrained"))
    if refs.individual:
        if identity is not None:
            with_checkpoint = list(identity["finetuned"])
        else:  # not built yet: the embedded suite fine-tunes its own tasks only
            with_checkpoint = suite_tasks(cfg) if cfg.model.source == "embedded" else cfg.task_names
        specs.extend(JobSpec("individual", "individual", task=t) for t in cfg.task_names if t in with_checkpoint)
    if refs.perfect_routing:
        several = len(refs.bound_lambdas) > 1
        for scaling in refs.bound_lambdas:
            specs.extend(JobSpec("perfect_routing", bound_label(scaling, several), params={"scaling": scaling},
                                 task=t) for t in cfg.merge_tasks)
    for m in cfg.methods:
        if m.tune:
            continue  # tuned methods get their jobs from the study (harness.tuning)
        for setting in expand_grid(m):
            specs.append(JobSpec("merge", m.display, method=m.name, params=setting))
    if cfg.generalization:  # every method row once more, merged on the seen tasks only
        specs.extend(JobSpec("merge", generalization_label(m.display), method=m.name, params=setting,
                             protocol=GENERALIZATION)
                     for m in cfg.methods if not m.tune for setting in expand_grid(m))
    if identity is None:
        return specs
    return [with_key(cfg, s, identity, task_identity) for s in specs]


def capped_subset(cfg: SweepConfig) -> dict[str, Any]:
    """Which images a capped evaluation scores (``eval.max_samples`` and how they are drawn), as
    job keys and adaptation records hold it; empty when nothing is capped."""
    return {} if cfg.eval.max_samples is None else {"max_samples": cfg.eval.max_samples, "subset": "seeded"}


def with_key(cfg: SweepConfig, s: JobSpec, identity: dict[str, Any],
             task_identity: dict[str, Any] | None) -> JobSpec:
    """The spec with its content key: everything that determines its result, nothing else."""
    body = {
        "v": RESULT_VERSION,
        "kind": s.kind,
        "task": s.task,
        "model": {"arch": identity["arch"], "pretrained": identity["pretrained"],
                  "heads": identity["heads"]},
        "eval": {"max_samples": None, **capped_subset(cfg)},
        "seed": REFERENCE_SEED,
    }
    if cfg.eval.precision != "fp32":  # every job evaluates; fp32 keys stay as before the field
        body["eval"]["precision"] = cfg.eval.precision
    if s.kind == "individual":
        body["finetuned"] = identity["finetuned"][s.task]
        body["tasks"] = {s.task: (task_identity or {}).get(s.task)}
    elif s.kind == "perfect_routing":
        body["finetuned"] = {t: identity["finetuned"][t] for t in cfg.merge_tasks}
        body["params"] = s.params
        body["tasks"] = {s.task: (task_identity or {}).get(s.task)}
    else:
        body["tasks"] = task_identity
    seen = cfg.seen_tasks(s.protocol)
    if s.kind in ("merge", "pretrained", "trial", "robustness"):
        body["merge_tasks"] = seen
        runs_study = s.protocol == MAIN and (s.kind in ("pretrained", "robustness")
                                             or (s.kind == "merge" and robustness_inline(cfg, s.label)))
        body["robustness"] = None
        if cfg.robustness and runs_study:
            body["robustness"] = cfg.robustness.identity()
            if not (s.kind == "merge" and adapts_on_corruptions(cfg, s.method)):
                body["robustness"].pop("adapt", None)  # only re-adapting jobs read it
            elif cfg.eval.max_samples is not None:  # they adapt on the capped images alone
                body["robustness"]["adapts_on"] = "scored images"
    if s.protocol != MAIN:  # main-protocol keys stay as they were before protocols existed
        body["protocol"] = s.protocol
    if s.kind in MERGE_KINDS:
        from methods.base import resolve_method

        method = resolve_method(s.method)(**s.params)
        body["finetuned"] = {t: identity["finetuned"][t] for t in seen}
        body["method"] = method_class_id(s.method)
        body["params"] = method.key_params()
        body["adapt"] = (cfg.adapt if method.uses_test_data else AdaptSpec()).model_dump()
        if method.key_holds_seed():
            body["seed"] = cfg.seed
        if method.batch_dependent():
            body["eval"]["batch_size"] = cfg.eval.batch_size
    if s.kind == "trial":  # a trial's result depends on its study (pruning decisions) too
        body["study"] = {k: s.trial[k] for k in ("study_name", "number")}
    task_code = {t: ident[TASK_SOURCE_KEY] for t, ident in (body["tasks"] or {}).items()
                 if isinstance(ident, dict) and TASK_SOURCE_KEY in ident}
    harness_dir, harness_code = harness_code_id()
    return JobSpec(s.kind, s.label, s.method, s.params, s.task, key=content_key(body), trial=s.trial,
                   protocol=s.protocol, method_id=body.get("method"), task_code=task_code,
                   harness_dir=harness_dir, harness_code=harness_code, inputs=key_inputs(body))


#: Parts of a key's body recorded per model file or task (``finetuned.<task>``), not as one digest.
_PER_ENTRY = ("model", "finetuned", "tasks")


def key_inputs(body: dict[str, Any]) -> dict[str, str]:
    """A short digest of each part of a job key's ``body`` (the checkpoint of each task, each task's
    identity, the method's code and params, the eval settings, ...): two keys differ exactly where
    these do, so comparing a result's with the job's now names what changed."""
    parts: dict[str, str] = {}
    for name, value in body.items():
        if name in _PER_ENTRY and isinstance(value, dict):
            parts.update({f"{name}.{k}": content_key(v, 12) for k, v in value.items()})
        else:
            parts[name] = content_key(value, 12)
    return parts


def setting_key(cfg: SweepConfig, s: JobSpec) -> str:
    """``s``'s key, or where the models are not known yet (no key) one computed without them,
    which is equal for two specs exactly when their keys will be: what a plan shown before any
    model is hashed counts as one job."""
    if s.key:
        return s.key
    blank = {"arch": None, "pretrained": None, "heads": None, "finetuned": dict.fromkeys(cfg.task_names)}
    return with_key(cfg, s, blank, None).key


harness_code_id()  # at import: the code this process runs is the code it imported
