"""Lazily loaded, memoised resources of one sweep: models, tasks, heads, identities.

A job gets everything through a Workspace, so a worker process (or a SLURM node) can
rebuild the same resources from the resolved config alone.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from harness.cache import atomic_write_json, content_key, read_json
from harness.config import MAIN, SweepConfig, TaskSpec, suite_tasks
from harness.errors import FieldError, HarnessError, NotBuilt, storage_problem
from harness.imports import source_file
from harness.model_checks import check_model_files, finetuned_field
from harness.models import (
    CONFIG_DIR,
    build_clip,
    check_encoder_shapes,
    tensor_shapes,
    file_digest,
    get_tokenizer,
    header_metadata,
    is_safetensors,
    load_state_dict,
    refuse_integer_weights,
    save_state_dict,
    state_dtypes,
    tensor_dtypes,
    zeroshot_head,
)
from harness.progress import counting_bar
from tasks.base import Task, TaskDataError, check_labels


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Every tensor equal (stops at the first that differs: a fine-tuned model's first one does)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def file_identity(path: str | None) -> str | None:
    """A model file's part of job keys: its content digest; a name that is no file (an open_clip
    tag) as it is."""
    return file_digest(path)[:16] if path and Path(path).is_file() else path


def encoder_summary_file(cache_dir: Path, arch: str, pretrained_identity: str | None) -> Path:
    """Where :attr:`Workspace.encoder_summary` keeps the summary of ``arch`` built with the weights
    file whose identity (:func:`file_identity`, None for none) is given."""
    from importlib.metadata import version

    ours = CONFIG_DIR / f"{arch}.json"
    key = content_key({"arch": arch, "pretrained": pretrained_identity, "open_clip": version("open_clip_torch"),
                       "config": ours.read_text() if ours.is_file() else None})
    return cache_dir / "encoders" / f"{arch}-{key}.json"


def cached_encoder_summary(path: Path) -> dict[str, Any] | None:
    """The summary at ``path``, None when there is none whole: written only once the model was
    built, its weights loaded (every tensor, strictly)."""
    summary = read_json(path)
    return summary if isinstance(summary, dict) and {"shapes", "params", "image_size"} <= summary.keys() else None


class Workspace:
    """``build=False``: identities only from what is built already (the embedded suite's models,
    converted checkpoints, the encoder summary); anything that would need building first raises
    :class:`harness.errors.NotBuilt` instead, so a dry run names job keys without training,
    converting or loading a model."""

    def __init__(self, cfg: SweepConfig, progress: bool = False, build: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.build = build
        self._tasks: dict[str, Task] = {}
        self._heads: dict[str, torch.Tensor] = {}
        self._finetuned: dict[str, nn.Module] = {}
        self._corrupted: dict[tuple[str, str], Any] = {}
        self._unchanged: dict[str, str] = {}  # task -> warning: its fine-tuned encoder is the pretrained one

    # -- model files ---------------------------------------------------------------------
    @cached_property
    def sources(self) -> dict[str, Any]:
        """Resolved checkpoint locations: arch, pretrained, finetuned per task."""
        m = self.cfg.model
        names = self.cfg.task_names
        if m.source == "embedded":
            from tasks.embedded.pipeline import prepare_suite

            art = prepare_suite(suite_tasks(self.cfg), self.cfg.resolved_cache_dir(), options=m.suite,
                                progress=self.progress, train=self.build)
            return {"arch": art.arch, "pretrained": str(art.pretrained),
                    "finetuned": {t: str(p) for t, p in art.finetuned.items()}, "heads": {}}
        check_model_files(self.cfg, "<config>")  # the CLI ran it already, naming the sweep file
        finetuned = {}
        for t in names:  # a missing one is an unseen task's (no individual row then)
            path = m.finetuned.get(t) or (m.finetuned_pattern.format(task=t) if m.finetuned_pattern else None)
            if path is not None and Path(path).exists():
                finetuned[t] = path
        pre, arch = m.pretrained, m.arch
        local_pre = bool(pre) and Path(pre).exists()
        if local_pre and self._foreign(pre, "clip"):  # e.g. a Hugging Face CLIPModel folder: convert once, cached
            from harness.checkpoints import checkpoint_arch, resolve_checkpoint

            pre = str(resolve_checkpoint(pre, self.cfg.resolved_cache_dir(), kind="clip", arch=m.arch,
                                         convert=self.build))
            arch = checkpoint_arch(pre) or arch
        for t, path in finetuned.items():
            if self._foreign(path, "image_encoder"):
                from harness.checkpoints import resolve_checkpoint

                finetuned[t] = str(resolve_checkpoint(path, self.cfg.resolved_cache_dir(), arch=arch,
                                                      projection=m.pretrained if local_pre else None,
                                                      convert=self.build))
        return {"arch": arch, "pretrained": pre, "finetuned": finetuned,
                "heads": {t: path for t, path in m.heads.items() if t in names}}

    @staticmethod
    def _foreign(path: str, kind: str) -> bool:
        """Not loadable as it is: a folder, a file that is not safetensors, or safetensors whose
        tensors are not laid out for ``kind``: an image encoder under a prefix (a whole CLIP,
        ``visual.``; a wrapper, ``model.visual.``) where a fine-tuned encoder belongs, no
        ``visual.`` tower where the whole pretrained CLIP belongs. Those go through
        :func:`harness.checkpoints.resolve_checkpoint`, which strips a prefix or says what is wrong."""
        p = Path(path)
        if p.is_dir() or not is_safetensors(p):
            return True
        try:
            keys = tensor_shapes(p)
        except HarnessError:
            return False  # loading it names the damage
        if kind == "clip":
            return not any(k.startswith("visual.") for k in keys)
        return "class_embedding" not in keys and any(k.endswith(".class_embedding") for k in keys)

    @cached_property
    def identity(self) -> dict[str, Any]:
        """Content identities of every model file: part of every job's cache key."""
        src = self.sources
        return {
            "arch": src["arch"],
            "pretrained": file_identity(src["pretrained"]),
            "finetuned": {t: file_identity(p) for t, p in src["finetuned"].items()},
            "heads": {t: file_identity(p) for t, p in src["heads"].items()},
        }

    @cached_property
    def clip(self) -> nn.Module:
        return build_clip(self.sources["arch"], self.sources["pretrained"], cache_dir=str(self.cfg.resolved_cache_dir() / "open_clip"))

    @property
    def pretrained_encoder(self) -> nn.Module:
        return self.clip.visual

    @cached_property
    def encoder_summary(self) -> dict[str, Any]:
        """The image encoder's tensor shapes, parameter count and input size.

        Kept on disk per (architecture, pretrained weights, open_clip version), so a driver whose
        jobs run in workers or on SLURM checks checkpoints and prints its plan without importing
        open_clip and building the model (3-4 s here, more for ViT-B/32). Written only once the
        model has been built with those weights: a pair that never loaded is still checked by
        building it. Weights named by an open_clip tag are always built (its cached file may have
        gone), so a missing file stays one error before any job."""
        arch, pretrained = self.sources["arch"], self.sources["pretrained"]
        path = None
        if not pretrained or Path(pretrained).is_file():
            path = encoder_summary_file(self.cfg.resolved_cache_dir(), arch, file_identity(pretrained))
            summary = cached_encoder_summary(path)
            if summary is not None:
                return summary
        if not self.build:
            raise NotBuilt(f"the image encoder of {arch} was never built with these weights (its input size "
                           "is not known without building it)")
        visual = self.clip.visual
        size = getattr(visual, "image_size", None)
        summary = {"shapes": {k: list(v.shape) for k, v in visual.state_dict().items()},
                   "params": sum(p.numel() for p in visual.parameters()),
                   "image_size": list(size) if isinstance(size, (tuple, list)) else size}
        if path is not None:
            atomic_write_json(path, summary)
        return summary

    @property
    def encoder_params(self) -> int:
        """The image encoder's parameter count: what decides the thread count (harness.runtime)."""
        return int(self.encoder_summary["params"])

    def finetuned_encoder(self, task: str) -> nn.Module:
        if task not in self._finetuned:
            path = self.sources["finetuned"][task]
            state = load_state_dict(path)
            enc = copy.deepcopy(self.clip.visual)
            check_encoder_shapes(path, {k: tuple(v.shape) for k, v in state.items()}, self._encoder_shapes,
                                 self.sources["arch"], self.checkpoint_name(task))
            refuse_integer_weights(state_dtypes(state), self.checkpoint_name(task))
            enc.load_state_dict(state)
            enc.eval()
            self._finetuned[task] = enc
            if same_weights(enc, self.clip.visual):
                self._unchanged[task] = (f"{self.checkpoint_name(task)}: the fine-tuned encoder of {task!r} equals "
                                         "the pretrained one (a zero task vector): is it the pretrained weights?")
        return self._finetuned[task]

    def input_warnings(self, tasks: list[str]) -> list[str]:
        """What a job using the fine-tuned encoders of ``tasks`` reports besides its result: those
        identical to the pretrained encoder (a copied file, a wrong path), which merge as nothing,
        and those identical to another task's (a copy-pasted path: one of them is the wrong task's);
        likewise for the ``model.heads`` files given for ``tasks`` (:meth:`_head_warnings`)."""
        for t in tasks:
            self.finetuned_encoder(t)
        unchanged = [self._unchanged[t] for t in tasks if t in self._unchanged]
        same = [w for i, t in enumerate(tasks) if (w := self._same_as_another(t, tasks[:i]))]
        return unchanged + same + self._head_warnings(tasks)

    def _head_warnings(self, tasks: list[str]) -> list[str]:
        """The ``model.heads`` files of ``tasks`` that look like another sweep task's: named (or
        imported from a file named) ``head_<Dataset>`` for another task's dataset, or with the
        content of another task's head (same class count, so the class check passes them)."""
        stored = self.sources["heads"]
        given = [t for t in tasks if t in stored]
        named = [w for t in given if (w := self._head_named_for_another(t, stored[t]))]
        return named + [w for i, t in enumerate(given) if (w := self._same_head_as_another(t, given[:i]))]

    def _head_named_for_another(self, task: str, path: str) -> str | None:
        """A warning when ``path``'s name, or the source its import recorded, is ``head_<Dataset>``
        of another task of the sweep."""
        key = {_dataset_key(t): t for t in self.cfg.task_names}
        for name in (path, _recorded_source(path)):
            match = re.fullmatch(r"head_(.+?)(\.[^.]*)?", Path(name).name) if name else None
            other = key.get(_dataset_key(match.group(1))) if match else None
            if other is not None and other != task:
                what = "is named" if name == path else f"was imported from {name}, named"
                return (f"model.heads.{task}: {path}: the head given for {task!r} {what} for the dataset of "
                        f"task {other!r}: is it the head of {other!r}?")
        return None

    def _same_head_as_another(self, task: str, reported: list[str]) -> str | None:
        """A warning when ``task``'s head file holds the tensor of another task's (None when not,
        or when one of ``reported`` already named the pair)."""
        stored = self.sources["heads"]
        same = [t for t in stored if t != task and torch.equal(self.head(t), self.head(task))]
        if not same or any(t in reported for t in same):
            return None
        others = ", ".join(f"{t!r} (model.heads.{t}: {stored[t]})" for t in same)
        return (f"model.heads.{task}: {stored[task]}: the head given for {task!r} has the same content as that of "
                f"{others}: is one of them another task's?")

    def _same_as_another(self, task: str, reported: list[str]) -> str | None:
        """A warning when ``task``'s checkpoint has the content of another sweep task's (None when
        not, or when one of ``reported`` already named the pair)."""
        digests = self.identity["finetuned"]
        same = [t for t in digests if t != task and digests[t] == digests[task]]
        if not same or any(t in reported for t in same):
            return None
        others = ", ".join(f"{t!r} ({self.checkpoint_name(t)})" for t in same)
        return (f"{self.checkpoint_name(task)}: the fine-tuned encoder of {task!r} is the same checkpoint as that "
                f"of {others}: is one of them another task's?")

    @cached_property
    def _encoder_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.encoder_summary["shapes"].items()}

    def preflight(self) -> None:
        """Check every input before anything runs or is written: checkpoint headers against the
        pretrained encoder, each task's data, each head's class count, and the device where the
        jobs run on this machine (a SLURM job resolves it on its node). Raises HarnessError."""
        self.check_device()
        for task, path in self.sources["finetuned"].items():
            check_encoder_shapes(path, tensor_shapes(path), self._encoder_shapes, self.sources["arch"],
                                 self.checkpoint_name(task))
            refuse_integer_weights(tensor_dtypes(path), self.checkpoint_name(task))
        for t in self.cfg.task_names:
            with self.entry_errors(t):  # the task's own data and templates (a head file's errors name the file)
                self.check_task_data(t)
                check_templates(self.task(t), t)
            self.head(t)
        self.check_adaptation_batches()

    def check_device(self) -> None:
        """``device`` names one this machine has, and ``eval.precision`` runs on it, where the jobs
        run here: else every job would fail with it, one line each. A SLURM job resolves its device on its node."""
        if self.cfg.executor.kind == "slurm":
            return
        from harness.runtime import missing_device

        problem = None if self.cfg.device == "auto" else missing_device(self.cfg.device)
        if problem is not None:
            raise FieldError("device", f"{problem.why}, where the jobs run (executor: {self.cfg.executor.kind}); "
                             f"use {problem.use}", self.cfg.device)
        self._check_precision()

    def _check_precision(self) -> None:
        """``eval.precision`` runs on the device the jobs run on here: else every job would fail
        with it, one line each (each job checks it too, a SLURM job on its node)."""
        from harness.precision import DTYPES, precision_problem
        from harness.runtime import resolve_device

        precision, device = self.cfg.eval.precision, resolve_device(self.cfg.device)
        problem = precision_problem(precision, device)
        if problem is not None:
            runs = " or ".join(p for p in DTYPES if precision_problem(p, device) is None)
            raise FieldError("eval.precision", f"{precision} does not run on {device} with torch {torch.__version__} "
                             f"({problem}), where the jobs run (executor: {self.cfg.executor.kind}); use {runs}",
                             precision)

    def check_device_before_building(self) -> None:
        """:meth:`check_device` before the model files are built (the embedded suite trained, a
        checkpoint converted: minutes) only for every job to be refused. Models already built
        are left to the preflight: a sweep whose jobs are all cached needs no device (a finished
        GPU sweep reports on a machine without one)."""
        try:
            self.check_device()
        except FieldError as missing:
            try:
                Workspace(self.cfg, build=False).identity
            except NotBuilt:
                raise missing from None
            except Exception:  # noqa: BLE001  (the run's own loading names it)
                pass

    def check_adaptation_batches(self) -> None:
        """Every ``batch_size`` a test-time-adaptation method may run with fits in each split it
        adapts on: a larger one would adapt on the whole split at every step, silently fewer
        images per step than asked for (and, with ``batch_reduce``, another routing)."""
        batches = adaptation_batch_sizes(self.cfg)
        if not batches:
            return  # no split is read for adaptation: none is opened
        split = self.cfg.adapt.split
        adapted = dict.fromkeys(self.cfg.merge_tasks + self.cfg.generalization_seen)  # unseen tasks are not
        sizes = {t: self.split_length(t, split) for t in adapted}
        smallest = min(sizes, key=sizes.get)
        rob, cap = self.cfg.robustness, self.cfg.eval.max_samples
        # a capped study's per-corruption adaptations adapt on the max_samples images it scores per task
        capped = rob is not None and rob.adapt == "corrupted" and cap is not None and cap < sizes[smallest]
        for where, value in batches:
            if value > sizes[smallest]:
                raise FieldError(where, f"larger than the {split} split of task {smallest!r} ({sizes[smallest]} "
                                 "images) that test-time adaptation reads: every step would adapt on the whole "
                                 "split instead; lower it", value)
            if capped and value > cap:
                raise FieldError(where, f"larger than the {cap} images per task (eval.max_samples) that the "
                                 "robustness study's per-corruption adaptations (robustness.adapt: corrupted) "
                                 "read: every step would adapt on all of them instead; lower it", value)

    def check_task_data(self, name: str) -> None:
        """Task ``name``'s evaluated splits hold images the model takes and labels its classes
        cover: a task of one's own with images of another size, an empty split or out-of-range
        labels is one error before any job, not a failure in every job or a silently wrong score.
        Reads one image per split (all labels of an in-memory split)."""
        task = self.task(name)
        if not task.classnames:
            raise TaskDataError(f"task {name!r}: no class names")
        size = self._input_size()
        side = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        for split in ("val", "test"):
            data = task.dataset(split)
            if len(data) == 0:
                raise TaskDataError(f"task {name!r}: split {split!r} is empty")
            image = data[0][0]
            want = (3, *side) if size is not None else None
            if not isinstance(image, torch.Tensor) or not image.is_floating_point() or (
                    want is not None and tuple(image.shape) != want):
                got = (f"a {type(image).__name__}" if not isinstance(image, torch.Tensor)
                       else f"a {image.dtype} tensor of shape {list(image.shape)}")
                raise self._image_error(name, isinstance(image, torch.Tensor) and image.is_floating_point(),
                                        f"split {split!r} gives images as {got}, but the image encoder of "
                                        f"{self.sources['arch']} takes float tensors of shape "
                                        f"{list(want) if want else '[3, H, W]'}")
            labels = getattr(data, "tensors", (None, None))[1]
            if labels is not None:
                check_labels(labels, task.num_classes, f"task {name!r}: split {split!r}")

    def _input_size(self) -> Any:
        """The image encoder's input size: the built encoder's, else (``validate`` before the model
        was ever built) its architecture's config's, so a task's images of another size are refused
        there as the run refuses them; None when neither is known without building."""
        from harness.models import arch_config

        try:
            return self.encoder_summary["image_size"]
        except NotBuilt:
            pass
        try:
            config = arch_config(self.sources["arch"]) or {}
        except NotBuilt:  # the embedded suite's model, not trained yet
            return None
        return (config.get("vision_cfg") or {}).get("image_size")

    def _image_error(self, name: str, sized: bool, problem: str) -> FieldError:
        """Task ``name``'s images refused as its entry's field: ``options.image_size`` when that
        option drew float images at another size (``sized``), else the entry, with its value."""
        index, spec = self._entry(name)
        if sized and "image_size" in spec.options:
            return FieldError(f"tasks.{index}.options.image_size", entry_named(name, problem + " (give the "
                              "encoder's size, or leave image_size out)"), spec.options["image_size"])
        return self._entry_error(name, problem + " (resize them in the task)")

    def _entry_error(self, name: str, problem: str) -> FieldError:
        """Task ``name``'s data refused as its entry's error: the file and ``tasks.N`` beside the
        task's words, with the entry's options (or name), as its other errors are named."""
        index, spec = self._entry(name)
        return FieldError(spec.name_field(f"tasks.{index}") if not spec.options else f"tasks.{index}",
                          entry_named(name, problem), spec.options or name)

    @contextlib.contextmanager
    def entry_errors(self, name: str) -> Iterator[None]:
        """Task ``name``'s data refused in the block (:class:`TaskDataError`: an empty split, labels
        outside its classes, a template without ``{}``) as its entry's error (:meth:`_entry_error`):
        alone, such a line named neither the sweep file nor the entry to fix."""
        try:
            yield
        except TaskDataError as exc:
            raise self._entry_error(name, str(exc)) from None

    def checkpoint_name(self, task: str) -> str:
        """``task``'s fine-tuned checkpoint as errors name it: the sweep field and the file it
        gives, and the converted file read in its place (a ``.pt`` converted into the cache)."""
        path = self.sources["finetuned"][task]
        if self.cfg.model.source != "files":
            return str(path)
        where, given = finetuned_field(self.cfg, task)
        if where == "model.finetuned_pattern":
            where += f" (task {task!r})"
        return f"{where}: {given}" + ("" if given == str(path) else f" (converted to {path})")

    def forget_models(self) -> None:
        """Drop the loaded models and heads (a job changed them); they load again when asked for."""
        self.__dict__.pop("clip", None)
        self._finetuned.clear()
        self._heads.clear()

    def finetuned_encoders(self, tasks: list[str] | None = None) -> dict[str, nn.Module]:
        """The encoders that are merged: those of ``tasks`` (default: the sweep's seen tasks)."""
        return {t: self.finetuned_encoder(t) for t in (self.cfg.merge_tasks if tasks is None else tasks)}

    # -- tasks and heads -----------------------------------------------------------------
    def task(self, name: str) -> Task:
        if name not in self._tasks:
            self._tasks[name] = self._new_task(name)
        return self._tasks[name]

    def split_length(self, name: str, split: str) -> int:
        """How many images task ``name``'s ``split`` holds. The encoder's input size only changes
        how a real dataset's images are preprocessed, not how many there are: without a built
        encoder they are counted by a task made at its factory's default size (kept nowhere), so
        ``validate`` checks them before any model exists."""
        try:
            return len(self.task(name).dataset(split))
        except NotBuilt:
            if not self._image_size_has_default(name):
                raise
            return len(self._new_task(name, sized=False).dataset(split))

    def _image_size_has_default(self, name: str) -> bool:
        from tasks.base import resolve_task

        param = inspect.signature(resolve_task(name)).parameters.get("image_size")
        return param is not None and param.default is not inspect.Parameter.empty

    def _new_task(self, name: str, sized: bool = True) -> Task:
        """Task ``name`` made by its factory with the sweep's options; ``sized``: given the
        encoder's input size where the factory takes one (else its own default)."""
        index, spec, factory, options = self._task_options(name, sized)
        try:
            task = factory(**options)
        except TaskDataError as exc:  # its data refused (an empty split): the entry's error, as the entry names it
            raise FieldError(f"tasks.{index}", entry_named(name, str(exc)), spec.options or None) from None
        except HarnessError:
            raise
        except Exception as exc:  # a factory of one's own failing (a missing file, a bug): one line naming the task
            if storage_problem(exc) is not None:
                raise
            if isinstance(exc, TypeError) and any(f"argument {k!r}" in str(exc) for k in spec.options):
                # an option a factory taking **options passes on to a call that has no such parameter
                raise FieldError(f"tasks.{index}.options", f"bad options for task {name!r}: {exc}",
                                 spec.options) from None
            raise FieldError(f"tasks.{index}", factory_failed(name, factory, exc),
                             spec.options or None) from exc
        if not isinstance(task, Task):
            kind = type(task)
            raise FieldError(spec.name_field(f"tasks.{index}"),
                             f"the factory returned a {kind.__module__}.{kind.__qualname__}, "
                             "not a tasks.base.Task", name)
        check_task_attributes(task, name)
        return task

    def check_task_options(self, name: str) -> None:
        """Task ``name``'s options fit its factory (:meth:`_task_options`), without making the
        task: ``validate`` checks every task's, the embedded suite's too, whose data takes minutes
        to generate the first time. A factory taking the encoder's input size without a default is
        given it: checked once the model is built (:class:`harness.errors.NotBuilt` before)."""
        self._task_options(name, sized=not self._image_size_has_default(name))

    def _task_options(self, name: str, sized: bool) -> tuple[int, TaskSpec, Any, dict[str, Any]]:
        """Task ``name``'s entry index, entry, factory and the options it is called with: the
        entry's, with what the sweep fills in (its ``data_root``, the suite's ``size``, the
        encoder's input size where ``sized``, the cache folder); each refused here as the entry's
        field (:func:`check_options`) rather than by the factory, or the task's data, later."""
        from tasks.base import resolve_task

        index, spec = self._entry(name)
        options = dict(spec.options)
        factory = resolve_task(name)
        params = inspect.signature(factory).parameters
        if self._sweep_data_root(name, options):
            options["data_root"] = self.cfg.data_root
        if self.cfg.model.source == "embedded" and "size" in params and "size" not in options:
            options["size"] = self.cfg.model.suite.get("size", "full")
        if sized and "image_size" in params and "image_size" not in options:  # real datasets: the model's input size
            size = self.encoder_summary["image_size"]
            if size is not None:
                options["image_size"] = size[0] if isinstance(size, (tuple, list)) else int(size)
        if "cache_dir" in params and "cache_dir" not in options:
            options["cache_dir"] = str(self.cfg.resolved_cache_dir())
        check_options(index, spec, factory, options)
        return index, spec, factory, options

    def _entry(self, name: str) -> tuple[int, TaskSpec]:
        """Task ``name``'s index in ``tasks`` and its entry: where its errors are named."""
        return next((i, t) for i, t in enumerate(self.cfg.tasks) if t.name == name)

    def _sweep_data_root(self, name: str, options: dict[str, Any]) -> bool:
        """Whether task ``name``'s factory is given the sweep's ``data_root``: it takes one and its
        own options give none."""
        from tasks.base import resolve_task

        return (bool(self.cfg.data_root) and "data_root" not in options
                and "data_root" in inspect.signature(resolve_task(name)).parameters)

    def corrupted(self, task: str, corruption: str):
        """The task's test split under ``corruption`` at the sweep's severity (cached on disk):
        with ``eval.max_samples``, only the images a capped evaluation scores (the same ones, each
        corrupted as in the whole split), which the study's adaptations then adapt on too."""
        if (task, corruption) not in self._corrupted:
            self._corrupted[(task, corruption)] = self._corrupted_split(task, corruption, wait=True)
        return self._corrupted[(task, corruption)]

    def _corrupted_split(self, task: str, corruption: str, wait: bool) -> Any:
        from tasks.corruptions import corrupted_split

        return corrupted_split(self.task(task), corruption, **self._corrupted_split_args(task),
                               progress=self.progress, wait=wait)

    def _corrupted_split_args(self, task: str) -> dict[str, Any]:
        """What names the study's corrupted copy of ``task``'s test split, but the corruption."""
        from harness.evaluation import evaluation_indices

        rob = self.cfg.robustness
        scored = evaluation_indices(len(self.task(task).dataset("test")), self.cfg.eval.max_samples)
        return {"severity": rob.severity, "cache_dir": self.cfg.resolved_cache_dir(), "seed": rob.seed,
                "identity": self.task_identity(task), "indices": None if scored is None else scored.tolist()}

    def study_tasks(self, adapting: bool) -> list[str]:
        """The tasks whose corrupted test splits the robustness study reads: its own and, where a
        method adapts again on each corruption (``adapting``), every merged task's."""
        rob = self.cfg.robustness
        return list(dict.fromkeys([*(self.cfg.seen_tasks(MAIN) if adapting else []), *rob.tasks]))

    def corrupted_splits_cached(self, adapting: bool) -> tuple[int, int]:
        """How many of the robustness study's corrupted splits are cached, of how many: the study
        builds the others (a dry run's count; no image is read or corrupted)."""
        from tasks.corruptions import corrupted_split_cached

        needed = [(t, c) for c in self.cfg.robustness.corruptions for t in self.study_tasks(adapting)]
        cached = sum(corrupted_split_cached(self.task(t), c, **self._corrupted_split_args(t)) for t, c in needed)
        return cached, len(needed)

    def build_free_corrupted_splits(self, corruptions: Iterable[str], adapting: bool) -> None:
        """Builds (or reads) the robustness study's splits under ``corruptions`` (its tasks' and,
        ``adapting`` on each corruption, every merged task's), passing over those another process
        is building: jobs that start together (a SLURM sweep's robustness jobs) then build
        different splits side by side, instead of all waiting for the one the first is building,
        then the next. :meth:`corrupted` returns the splits read here and waits for the others.
        An error is left to its split's turn in the study, where it is raised again (naming the
        corruption) once the corruptions before it are scored and recorded."""
        for corruption in corruptions:
            for task in self.study_tasks(adapting):
                if (task, corruption) in self._corrupted:
                    continue
                try:
                    split = self._corrupted_split(task, corruption, wait=False)
                except Exception:  # the study meets it again at its turn
                    return
                if split is not None:
                    self._corrupted[(task, corruption)] = split

    def task_identity(self, name: str | None = None) -> dict[str, Any]:
        """Each task's own identity (or task ``name``'s), plus the options the sweep gave its
        factory and, for a Task class of one's own, the digest of its source files: a task whose
        identity() does not cover an option, or whose data code was edited, must still not reuse
        results (or corrupted splits). The project's tasks and ``InMemoryTask`` (its identity
        hashes the images themselves) add no digest, so their keys are unchanged."""
        if name is None:
            return {t: self.task_identity(t) for t in self.cfg.task_names}
        from harness.plan import TASK_PROMPTS_KEY, TASK_SOURCE_KEY, class_source_digest, own_task

        options = next(t.options for t in self.cfg.tasks if t.name == name)
        if own_task(name):  # the project's tasks' identity holds their files, not where they lie
            options = {k: v for k, v in options.items() if k != "data_root"}
        elif self._sweep_data_root(name, options):  # given to a factory of one's own as its own option would be
            options = {**options, "data_root": self.cfg.data_root}
        task = self.task(name)
        code = class_source_digest(type(task), Task)
        prompts = None if own_task(name) else content_key(task.prompts())
        return {**task.identity(), **({"options": options} if options else {}), **({TASK_SOURCE_KEY: code} if code else {}),
                **({TASK_PROMPTS_KEY: prompts} if prompts else {})}

    def head(self, task: str) -> torch.Tensor:
        if task not in self._heads:
            t = self.task(task)
            stored = self.sources["heads"].get(task)
            if stored:
                head = self._stored_head(task, stored)
                where = f"model.heads.{task}: {stored}: "
            else:
                head, where = self._zeroshot_head(t, task), ""
            if head.shape[0] != t.num_classes:
                raise TaskDataError(
                    f"{where}task {task!r}: head has {head.shape[0]} classes but the dataset has {t.num_classes}"
                )
            self._heads[task] = head
        return self._heads[task]

    def _stored_head(self, task: str, path: str) -> torch.Tensor:
        """A ``model.heads`` file's ``[classes, dim]`` tensor, its shape checked against the image
        encoder's output here, so a wrong one fails before any job instead of in every job's matmul."""
        where = f"model.heads.{task}: {path}"
        try:
            state = load_state_dict(path)
        except HarnessError as exc:
            raise HarnessError(f"model.heads.{task}: {exc}") from None
        if not state:
            raise HarnessError(f"{where}: holds no tensors")
        key = stored_head_key(state)
        if key is None:  # a guess could score the wrong tensor, or drop a prefixed probe's bias
            shown = ", ".join(repr(k) for k in list(state)[:6]) + (", ..." if len(state) > 6 else "")
            raise HarnessError(f"{where}: holds {shown}, none of them the head: give its [classes, dim] tensor "
                               "as 'weight' (or 'head', or as the one '<prefix>.weight')")
        head = state[key]
        if head.ndim != 2:
            raise HarnessError(f"{where}: tensor {key!r} has shape {tuple(head.shape)}; a head is [classes, dim]")
        dim = self._feature_dim
        if dim is not None and head.shape[1] != dim:
            raise HarnessError(f"{where}: tensor {key!r} has shape {tuple(head.shape)}: {head.shape[1]} features, "
                               f"but the image encoder of {self.sources['arch']} outputs {dim}")
        if not head.is_floating_point():
            raise HarnessError(f"{where}: tensor {key!r} has dtype {head.dtype}, not floating point")
        bias_key = key.removesuffix("weight") + "bias" if key.endswith("weight") else "bias"
        bias = state.get(bias_key)
        if bias is not None and bias.is_floating_point() and bool((bias != 0).any()):
            raise HarnessError(f"{where}: tensor {bias_key!r} is not zero: logits are normalised image features "
                               f"times the head {key!r}, with no bias, so this head would score another "
                               "model's predictions; give a head without one (task_vectors' heads have a zero bias)")
        return head.float()  # a half-precision file: adaptation losses multiply float32 features by it

    @property
    def _feature_dim(self) -> int | None:
        """The image encoder's output size: its projection's columns (the width without one); None
        where it is not known (validate, before the encoder was ever built: the run checks it)."""
        try:
            shapes = self._encoder_shapes
        except NotBuilt:
            return None
        if "proj" in shapes and len(shapes["proj"]) == 2:
            return int(shapes["proj"][1])
        if "ln_post.weight" in shapes:
            return int(shapes["ln_post.weight"][0])
        return None

    def _zeroshot_head(self, task: Task, name: str | None = None) -> torch.Tensor:
        check_templates(task, name)
        key = content_key({"model": self.identity["arch"], "pretrained": self.identity["pretrained"],
                           "prompts": task.prompts()})
        path = self.cfg.resolved_cache_dir() / "heads" / f"{task.name}-{key}.safetensors"
        built_for = {"task": task.name, "prompts": content_key(task.prompts())}
        head = cached_head(path, built_for, task.num_classes)
        if head is None:
            prompts = task.prompts()
            with counting_bar(self.progress, f"zero-shot head {task.name}", len(prompts)) as advance:
                head = zeroshot_head(self.clip, get_tokenizer(self.sources["arch"]), prompts, advance=advance)
            save_state_dict({"weight": head}, path, metadata=built_for)
        return head


def check_options(index: int, spec: TaskSpec, factory: Any, options: dict[str, Any]) -> None:
    """The options of task entry ``index`` fit ``factory``'s parameters, and each the entry gives
    a project task's factory fits its annotated type and bounds: one error naming the entry's
    options (the option), not a failure inside the factory or a task made of a nonsense value."""
    from harness.plan import own_task
    from tasks.base import option_signature, option_type_problem, options_taker

    target = options_taker(factory)
    try:
        option_signature(factory).bind(**options)
    except TypeError as exc:  # the options do not fit the factory's parameters
        who = getattr(getattr(target, "func", target), "__qualname__", repr(factory))
        raise FieldError(f"tasks.{index}.options", f"bad options for task {spec.name!r}: {who}() {exc}",
                         spec.options) from None
    except ValueError:  # no signature to check them against (a built-in): the call tells
        pass
    if not own_task(spec.name):  # a factory of one's own may annotate loosely and convert what it is given
        return
    for key, value in spec.options.items():
        problem = option_type_problem(factory, key, value)
        if problem is not None:
            raise FieldError(f"tasks.{index}.options.{key}", f"bad option for task {spec.name!r}: {problem}", value)


def factory_failed(name: str, factory: Any, exc: Exception) -> str:
    """Task ``name``'s factory raised ``exc``: one line naming the task, the exception and the
    line of the factory's file it came from (else the innermost line)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)[1:]  # past this module's call
    home = source_file(factory)
    at = next((f for f in reversed(frames) if f.filename == home), frames[-1] if frames else None)
    where = f" at {at.filename}:{at.lineno}" if at is not None else ""
    who = f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"
    return f"task {name!r}: its factory {who} failed{where}: {type(exc).__name__}: {exc}"


def entry_named(name: str, message: str) -> str:
    """A factory's refusal of its data, led by the task as the sweep's entry names it: an
    ``InMemoryTask`` names the task its factory made (``task 'x'``), which a sweep listing
    ``my_tasks:make`` never names."""
    lead = f"task {name!r}"
    return message if message.startswith(lead) else f"{lead}: {message}"


def check_task_attributes(task: Task, name: str) -> None:
    """A task has the ``name``, ``classnames`` and ``templates`` every check and job reads, the
    last two as lists (a string would be taken letter by letter): a subclass that forgot one is
    one error naming the task, not an AttributeError in the first check that reads it."""
    kind = f"{type(task).__module__}.{type(task).__qualname__}"
    missing = [a for a in ("name", "classnames", "templates") if not hasattr(task, a)]
    if missing:
        raise TaskDataError(f"task {name!r}: the {kind} its factory returned has no {', '.join(missing)} "
                            "(a Task sets name, classnames and templates)")
    for attr in ("classnames", "templates"):
        if isinstance(getattr(task, attr), str):
            raise TaskDataError(f"task {name!r}: {attr} of the {kind} is the string {getattr(task, attr)!r}, "
                                "not a list of them")


def _dataset_key(name: str) -> str:
    """A dataset's name as task_vectors' file names and the sweep's task names both spell it
    (``head_EuroSAT``, ``eurosat``; ``head_SUN397``, ``sun397``)."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _recorded_source(path: str) -> str | None:
    """The source file ``harness import`` recorded in ``path``'s sidecar, None without one."""
    from harness.convert import harness_sidecar

    source = (harness_sidecar(path) or {}).get("source")
    return source if isinstance(source, str) else None


def stored_head_key(state: dict[str, torch.Tensor]) -> str | None:
    """The name of a ``model.heads`` file's head tensor: ``weight`` or ``head``, else the one
    ``<prefix>.weight`` (a linear layer saved under its module's name, its bias ``<prefix>.bias``),
    else the file's only tensor; None when the file holds several and none of these."""
    for key in ("weight", "head"):
        if key in state:
            return key
    weights = [k for k in state if k.endswith(".weight")]
    if len(weights) == 1:
        return weights[0]
    return next(iter(state)) if len(state) == 1 else None


def cached_head(path: Path, built_for: dict[str, str], classes: int) -> torch.Tensor | None:
    """The zero-shot head cached at ``path``, or None (then built again) when there is none whole:
    missing, damaged (empty, truncated), without its ``[classes, dim]`` tensor, or recording
    another task or other prompts than ``built_for`` (a head copied or renamed into place: another
    task with as many classes would score silently wrong). Heads cached before the record was
    kept record nothing and are read as they are."""
    if not path.is_file():
        return None
    try:
        recorded = header_metadata(path)
        head = load_state_dict(path).get("weight")
    except HarnessError:
        return None
    if any(recorded.get(k, v) != v for k, v in built_for.items()):
        return None
    return head if head is not None and head.ndim == 2 and head.shape[0] == classes else None


def adaptation_batch_sizes(cfg: SweepConfig) -> list[tuple[str, int]]:
    """(sweep field, value) of each ``batch_size`` a test-time-adaptation method of ``cfg`` may
    run with: its params or default, each grid value, its tuning space's largest."""
    from methods.base import resolve_method

    out = []
    for i, m in enumerate(cfg.methods):
        cls = resolve_method(m.name)
        if not cls.uses_test_data or "batch_size" not in cls.model_fields:
            continue
        space = m.tune.space.get("batch_size") if m.tune else None
        if "batch_size" in m.grid:
            out += [(f"methods.{i}.grid.batch_size", int(v)) for v in m.grid["batch_size"]]
        elif space is not None:
            ends = space.choices if space.type == "categorical" else [space.high]
            out.append((f"methods.{i}.tune.space.batch_size", int(max(ends))))
        else:
            out.append((f"methods.{i}.params.batch_size",
                        int(m.params.get("batch_size", cls.model_fields["batch_size"].default))))
    return out


def check_templates(task: Task, name: str | None = None) -> None:
    """Each prompt template takes the class name in one ``{}``: a template without it gives every
    class the same text (a head that cannot tell them apart), a named field fails to format.
    ``name``: the task as the sweep names it (a factory's import path), which the error names as
    the other checks of a task do, not the name the factory gave its task."""
    name = name or task.name
    if not task.templates:
        raise TaskDataError(f"task {name!r}: no prompt templates")
    for template in task.templates:
        try:
            filled = [template.format(c) for c in ("\0a", "\0b")]
        except (IndexError, KeyError, ValueError) as exc:
            raise TaskDataError(f"task {name!r}: prompt template {template!r} does not format with the class "
                                f"name ({type(exc).__name__}: {exc}); write the class name as {{}}") from None
        if filled[0] == filled[1]:
            raise TaskDataError(f"task {name!r}: prompt template {template!r} has no {{}} for the class name")
